#include "listener.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "compat.h"
#include "conn.h"
#include "log.h"
#include "worker.h"

int pc_listener_bind(const pc_config_t *conf, const pc_listener_cfg_t *cfg, char *err,
                     size_t errlen) {
  const struct sockaddr *sa = (const struct sockaddr *)&cfg->listen;
  socklen_t len =
      sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  int one = 1;
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) goto fail;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
    goto fail;
  /* "[::]:PORT" takes both families whatever net.ipv6.bindv6only says: a
   * transparent listener is where both families' redirects arrive. */
  int zero = 0;
  if (sa->sa_family == AF_INET6 &&
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) < 0)
    goto fail;
  if (bind(fd, sa, len) < 0 || listen(fd, 1024) < 0) goto fail;
  return fd;
fail:;
  int e = errno;
  if (fd >= 0) close(fd);
  snprintf(err, errlen, "%s:%d: %s %s: cannot listen on %s: %s", conf->file, cfg->line,
           cfg->direction == PC_DIR_INBOUND ? "inbound" : "outbound", cfg->name, cfg->listen_str,
           strerror(e));
  return -1;
}

/* One per listener (name and address) across the workers, found by the
 * workers as they create their copies; freed with the last copy. The
 * registry is touched only when listeners come and go. */
struct pc_listener_shared {
  char *name;
  struct sockaddr_storage listen;
  int refs;    /* registry lock */
  int pending; /* atomic: connections of every copy in their handshake */
  int paused;  /* atomic: some copy paused at the budget and waits for a wake-up */
  struct pc_listener_shared *next;
};

static uv_once_t registry_once = UV_ONCE_INIT;
static uv_mutex_t registry_lock;
static pc_listener_shared_t *registry;

static void registry_init(void) {
  if (uv_mutex_init(&registry_lock) != 0) pc_fatal("cannot initialise the listener registry");
}

static pc_listener_shared_t *shared_get(const pc_listener_cfg_t *cfg) {
  uv_once(&registry_once, registry_init);
  size_t n =
      cfg->listen.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  uv_mutex_lock(&registry_lock);
  pc_listener_shared_t *sh = registry;
  while (sh && (strcmp(sh->name, cfg->name) != 0 || sh->listen.ss_family != cfg->listen.ss_family ||
                memcmp(&sh->listen, &cfg->listen, n) != 0))
    sh = sh->next;
  if (!sh) {
    sh = pc_calloc(1, sizeof(*sh));
    sh->name = pc_strdup(cfg->name);
    memcpy(&sh->listen, &cfg->listen, sizeof(sh->listen));
    sh->next = registry;
    registry = sh;
  }
  sh->refs++;
  uv_mutex_unlock(&registry_lock);
  return sh;
}

static void shared_put(pc_listener_shared_t *sh) {
  if (!sh) return;
  uv_mutex_lock(&registry_lock);
  if (--sh->refs == 0) {
    pc_listener_shared_t **p = &registry;
    while (*p != sh)
      p = &(*p)->next;
    *p = sh->next;
    free(sh->name);
    free(sh);
  }
  uv_mutex_unlock(&registry_lock);
}

/* The listener's handshake budget is in use, counted over every worker (a
 * race between workers may take it at most workers - 1 past). */
static int over_budget(const pc_listener_t *l) {
  if (l->cfg->direction != PC_DIR_INBOUND) return 0;
  pc_listener_shared_t *sh = l->shared;
  int max = (int)l->w->gen->cfg->limits.max_pending_handshakes;
  if (__atomic_load_n(&sh->pending, __ATOMIC_SEQ_CST) < max) return 0;
  /* Publish "a copy may pause" before looking again, so a handshake that ends
   * in between either sees the flag or is seen here. */
  __atomic_store_n(&sh->paused, 1, __ATOMIC_SEQ_CST);
  return __atomic_load_n(&sh->pending, __ATOMIC_SEQ_CST) >= max;
}

void pc_listener_handshake_begun(pc_listener_t *l) {
  __atomic_add_fetch(&l->shared->pending, 1, __ATOMIC_SEQ_CST);
  l->stats.pending_handshakes++;
}

void pc_listener_handshake_done(pc_listener_t *l, const pc_throttle_key_t *failed_src) {
  pc_listener_shared_t *sh = l->shared;
  __atomic_sub_fetch(&sh->pending, 1, __ATOMIC_SEQ_CST);
  l->stats.pending_handshakes--;
  /* No wake-up once workers stop: their loops are going away. */
  if (__atomic_load_n(&sh->paused, __ATOMIC_SEQ_CST) &&
      !__atomic_load_n(&l->w->stop_requested, __ATOMIC_ACQUIRE) &&
      __atomic_exchange_n(&sh->paused, 0, __ATOMIC_SEQ_CST))
    pc_workers_wake(); /* each worker's on_wake resumes its paused copies */
  if (!failed_src || !failed_src->b[0]) return;
  const pc_config_t *cfg = l->w->gen->cfg;
  uint64_t now = uv_now(&l->w->loop);
  if (!l->throttle) {
    uint64_t seed = uv_hrtime();
    RAND_bytes((uint8_t *)&seed, sizeof(seed)); /* collisions must not be choosable */
    l->throttle = pc_throttle_new(seed);
  }
  if (pc_throttle_fail(l->throttle, failed_src, now, cfg->limits.handshake_failures_per_source,
                       cfg->limits.throttle_window_ms, cfg->limits.throttle_cooldown_ms)) {
    char src[64];
    pc_throttle_source_str(failed_src, src, sizeof(src));
    pc_log(PC_LOG_WARN,
           "listener %s: source %s throttled for %llu ms after %u failed handshakes within %llu "
           "ms: its connections are closed at accept (reason limit)",
           l->name, src, (unsigned long long)cfg->limits.throttle_cooldown_ms,
           cfg->limits.handshake_failures_per_source,
           (unsigned long long)cfg->limits.throttle_window_ms);
  }
  /* O(table) but only on a failure, which costs a TLS handshake's start. */
  l->stats.throttle_sources = (int64_t)pc_throttle_count(l->throttle, now);
}

int pc_listener_throttled(const pc_listener_t *l, const pc_throttle_key_t *src) {
  return l->throttle && pc_throttle_blocked(l->throttle, src, uv_now(&l->w->loop));
}

static void on_connection(uv_stream_t *server, int status) {
  pc_listener_t *l = server->data;
  pc_worker_t *w = l->w;
  if (status < 0) {
    /* libuv already accepted and dropped what it could not hold (EMFILE). */
    l->stats.accept_errors++;
    l->stats.conns[PC_DECISION_DENY][PC_REASON_LIMIT]++;
    pc_log(PC_LOG_WARN, "listener %s: accept failed: %s", l->name, uv_strerror(status));
    return;
  }
  if (__atomic_load_n(&w->stop_requested, __ATOMIC_ACQUIRE) || l->closed || l->stopping) return;
  if (pc_worker_check_drain(w)) return;
  int budget = over_budget(l);
  if (budget || pc_workers_over_limit(w, l->cfg->direction == PC_DIR_INBOUND)) {
    /* Leave the connection with libuv, which stops polling this socket until
     * pc_listener_resume accepts it: the kernel backlog queues the rest. */
    if (!l->paused) {
      l->paused = 1;
      w->npaused++;
      l->stats.accept_pauses++;
      if (budget)
        pc_log(PC_LOG_WARN,
               "listener %s: max_pending_handshakes reached (%d handshakes in progress), "
               "accepting paused on worker %d",
               l->name, __atomic_load_n(&l->shared->pending, __ATOMIC_RELAXED), w->index);
      else
        pc_log(PC_LOG_WARN, "listener %s: max_connections reached, accepting paused", l->name);
    }
    return;
  }
  pc_conn_accept(l);
}

static void on_closed(uv_handle_t *h) {
  pc_listener_t *l = h->data;
  l->closed = 1;
  pc_listener_unref(l);
}

pc_listener_t *pc_listener_new(pc_worker_t *w, const pc_listener_cfg_t *cfg, int fd) {
  pc_listener_t *l = pc_calloc(1, sizeof(*l));
  l->w = w;
  l->cfg = cfg;
  l->name = pc_strdup(cfg->name);
  l->refs = 1;
  l->shared = shared_get(cfg);
  int rc = uv_tcp_init(&w->loop, &l->tcp);
  if (rc) {
    close(fd);
    shared_put(l->shared);
    free(l->name);
    free(l);
    pc_log(PC_LOG_ERROR, "listener %s: %s", cfg->name, uv_strerror(rc));
    return NULL;
  }
  l->tcp.data = l;
  rc = uv_tcp_open(&l->tcp, fd);
  if (rc)
    close(fd); /* not adopted by the handle */
  else
    rc = uv_listen((uv_stream_t *)&l->tcp, 1024, on_connection);
  if (rc) {
    pc_log(PC_LOG_ERROR, "listener %s: %s", cfg->name, uv_strerror(rc));
    uv_close((uv_handle_t *)&l->tcp, on_closed); /* frees l */
    return NULL;
  }
  return l;
}

void pc_listener_resume(pc_listener_t *l) {
  if (!l->paused || l->closed || l->stopping || uv_is_closing((uv_handle_t *)&l->tcp) ||
      over_budget(l) || pc_workers_over_limit(l->w, l->cfg->direction == PC_DIR_INBOUND))
    return;
  l->paused = 0;
  l->w->npaused--;
  pc_log(PC_LOG_INFO, "listener %s: accepting again", l->name);
  pc_conn_accept(l); /* uv_accept takes the held connection and re-arms polling */
}

static void on_stopped(uv_handle_t *h) {
  pc_listener_t *l = h->data;
  l->closed = 1;
  if (l->release_on_close) pc_listener_unref(l);
}

static void unpause(pc_listener_t *l) {
  if (l->paused) {
    l->paused = 0;
    l->w->npaused--;
  }
}

void pc_listener_stop(pc_listener_t *l) {
  unpause(l);
  if (l->stopping || uv_is_closing((uv_handle_t *)&l->tcp)) return;
  l->stopping = 1;
  uv_close((uv_handle_t *)&l->tcp, on_stopped);
}

void pc_listener_close(pc_listener_t *l) {
  unpause(l);
  if (l->stopping) {
    if (l->closed)
      pc_listener_unref(l);
    else
      l->release_on_close = 1;
    return;
  }
  if (!uv_is_closing((uv_handle_t *)&l->tcp)) uv_close((uv_handle_t *)&l->tcp, on_closed);
}

void pc_listener_ref(pc_listener_t *l) { l->refs++; }

void pc_listener_unref(pc_listener_t *l) {
  if (--l->refs > 0) return;
  pc_throttle_free(l->throttle);
  shared_put(l->shared);
  free(l->name);
  free(l);
}

#include "listener.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <unistd.h>

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
  if (pc_workers_over_limit(w)) {
    /* Leave the connection with libuv, which stops polling this socket until
     * pc_listener_resume accepts it: the kernel backlog queues the rest. */
    if (!l->paused) {
      l->paused = 1;
      w->npaused++;
      l->stats.accept_pauses++;
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
  int rc = uv_tcp_init(&w->loop, &l->tcp);
  if (rc) {
    close(fd);
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
      pc_workers_over_limit(l->w))
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
  free(l->name);
  free(l);
}

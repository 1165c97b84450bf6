#include "dns.h"

#include <ares.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "endpoint.h"
#include "log.h"
#include "worker.h"

/* One c-ares channel driven by one loop: its sockets watched with uv_poll,
 * its retransmissions with one timer. The long-running resolver and --check
 * each have one. */
typedef struct sockwatch {
  uv_poll_t poll;
  int fd;
  struct resolver *r;
  struct sockwatch *next;
} sockwatch_t;

typedef struct resolver {
  uv_loop_t *loop;
  ares_channel ch;
  int up;
  int tick_ready; /* tick outlives the channel: a new one reuses it */
  uv_timer_t tick;
  sockwatch_t *socks;
} resolver_t;

/* A name being kept resolved (main thread); holds a target reference. */
typedef struct watch {
  pc_target_t *t;
  uv_timer_t timer;
  int querying, closing, dropped;
  pc_dns_result_t last;
  struct watch *next;
} watch_t;

typedef struct {
  char *servers; /* "ip:port,…" or NULL for resolv.conf's */
  uint64_t min_ttl_ms, max_ttl_ms, timeout_ms;
} settings_t;

static resolver_t res;
static settings_t cur;
static watch_t *watches;
static int started;

/* ---- c-ares on a libuv loop --------------------------------------------- */

static void arm_tick(resolver_t *r);

static void on_sock_closed(uv_handle_t *h) { free(h->data); }

static void on_poll(uv_poll_t *p, int status, int events) {
  sockwatch_t *s = p->data;
  ares_socket_t fd = (ares_socket_t)s->fd;
  /* An error is passed on as readiness: c-ares reads it and fails over. */
  int rd = status < 0 || (events & UV_READABLE), wr = status < 0 || (events & UV_WRITABLE);
  resolver_t *r = s->r;
  ares_process_fd(r->ch, rd ? fd : ARES_SOCKET_BAD, wr ? fd : ARES_SOCKET_BAD);
  arm_tick(r);
}

static void sock_state(void *data, ares_socket_t fd, int readable, int writable) {
  resolver_t *r = data;
  sockwatch_t **pp = &r->socks, *s;
  while ((s = *pp) && s->fd != (int)fd)
    pp = &s->next;
  if (!readable && !writable) {
    if (!s) return;
    *pp = s->next;
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, on_sock_closed);
    return;
  }
  if (!s) {
    s = pc_calloc(1, sizeof(*s));
    s->fd = (int)fd;
    s->r = r;
    if (uv_poll_init_socket(r->loop, &s->poll, fd) != 0) {
      free(s);
      pc_log(PC_LOG_ERROR, "dns: cannot watch a resolver socket");
      return;
    }
    s->poll.data = s;
    s->next = r->socks;
    r->socks = s;
  }
  uv_poll_start(&s->poll, (readable ? UV_READABLE : 0) | (writable ? UV_WRITABLE : 0), on_poll);
}

static void on_tick(uv_timer_t *t) {
  resolver_t *r = t->data;
  ares_process_fd(r->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
  arm_tick(r);
}

static void arm_tick(resolver_t *r) {
  if (!r->up) return;
  struct timeval tv, *tvp = ares_timeout(r->ch, NULL, &tv);
  if (!tvp) {
    uv_timer_stop(&r->tick);
    return;
  }
  uint64_t ms = (uint64_t)tvp->tv_sec * 1000u + (uint64_t)(tvp->tv_usec + 999) / 1000u;
  uv_timer_start(&r->tick, on_tick, ms, 0);
}

static int resolver_open(resolver_t *r, uv_loop_t *loop, const settings_t *s, char *err,
                         size_t errlen) {
  static int lib;
  if (!lib && ares_library_init(ARES_LIB_INIT_ALL) != ARES_SUCCESS) {
    snprintf(err, errlen, "cannot initialise c-ares");
    return -1;
  }
  lib = 1;
  r->loop = loop;
  r->socks = NULL;
  struct ares_options o = {0};
  o.sock_state_cb = sock_state;
  o.sock_state_cb_data = r;
  o.timeout = (int)s->timeout_ms;
  o.tries = 1;
  /* Without NOCHECKRESP c-ares 1.18 reports a SERVFAIL (or REFUSED) as
   * ECONNREFUSED, the same as a resolver that is down; with it, such an
   * answer is final (the next resolver is not asked) and counted as what
   * it is. A pod has one resolver (the cluster DNS) in all but odd cases. */
  o.flags = ARES_FLAG_NOCHECKRESP;
  int mask = ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS;
  int rc = ares_init_options(&r->ch, &o, mask);
  if (rc != ARES_SUCCESS) {
    snprintf(err, errlen, "cannot start the resolver: %s", ares_strerror(rc));
    return -1;
  }
  if (s->servers && (rc = ares_set_servers_ports_csv(r->ch, s->servers)) != ARES_SUCCESS) {
    snprintf(err, errlen, "dns.servers: %s", ares_strerror(rc));
    ares_destroy(r->ch);
    return -1;
  }
  if (!r->tick_ready) {
    uv_timer_init(loop, &r->tick);
    r->tick.data = r;
    r->tick_ready = 1;
  }
  r->up = 1;
  return 0;
}

/* Cancels what is in flight (callbacks fire with ARES_EDESTRUCTION); final:
 * the timer closes too (the loop must run to finish closing). */
static void resolver_close(resolver_t *r, int final) {
  if (final && r->tick_ready) {
    r->tick_ready = 0;
    uv_timer_stop(&r->tick);
    uv_close((uv_handle_t *)&r->tick, NULL);
  }
  if (!r->up) return;
  r->up = 0;
  ares_destroy(r->ch);
  if (r->tick_ready) uv_timer_stop(&r->tick);
  while (r->socks) { /* c-ares closes its sockets without telling us */
    sockwatch_t *s = r->socks;
    r->socks = s->next;
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, on_sock_closed);
  }
}

/* ---- one lookup --------------------------------------------------------- */

typedef void (*answer_cb)(void *arg, pc_dns_result_t r, const struct sockaddr_storage *addrs,
                          size_t n, uint64_t ttl_s, const char *detail);

typedef struct {
  answer_cb cb;
  void *arg;
  uint16_t port;
} lookup_t;

static pc_dns_result_t result_of(int status) {
  switch (status) {
  case ARES_SUCCESS: return PC_DNS_OK;
  case ARES_ENOTFOUND:
  case ARES_ENODATA:
  case ARES_ENONAME: return PC_DNS_NXDOMAIN;
  case ARES_ESERVFAIL:
  case ARES_EREFUSED: return PC_DNS_SERVFAIL;
  default: return PC_DNS_TIMEOUT; /* no answer at all: timed out, refused, unreachable */
  }
}

static int cmp_addr(const void *a, const void *b) {
  return memcmp(a, b, sizeof(struct sockaddr_storage));
}

static void on_addrinfo(void *arg, int status, int timeouts, struct ares_addrinfo *ai) {
  (void)timeouts;
  lookup_t *l = arg;
  if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
    l->cb(l->arg, PC_DNS_PENDING, NULL, 0, 0, NULL);
    free(l);
    return;
  }
  struct sockaddr_storage *addrs = NULL;
  size_t n = 0;
  uint64_t ttl = UINT64_MAX;
  if (status == ARES_SUCCESS && ai) {
    for (struct ares_addrinfo_node *x = ai->nodes; x; x = x->ai_next)
      n++;
    addrs = pc_calloc(n + 1, sizeof(*addrs));
    n = 0;
    for (struct ares_addrinfo_node *x = ai->nodes; x; x = x->ai_next) {
      if (x->ai_family == AF_INET && x->ai_addrlen >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in *s = (struct sockaddr_in *)&addrs[n++];
        memcpy(s, x->ai_addr, sizeof(*s));
        s->sin_port = htons(l->port);
      } else if (x->ai_family == AF_INET6 && x->ai_addrlen >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&addrs[n++];
        memcpy(s, x->ai_addr, sizeof(*s));
        s->sin6_port = htons(l->port);
      } else {
        continue;
      }
      if (x->ai_ttl >= 0 && (uint64_t)x->ai_ttl < ttl) ttl = (uint64_t)x->ai_ttl;
    }
  }
  if (ttl == UINT64_MAX) ttl = 0;
  /* Servers rotate their answers; a set in a stable order changes only
   * when its members do (and is logged only then). */
  if (n > 1) qsort(addrs, n, sizeof(*addrs), cmp_addr);
  pc_dns_result_t r = result_of(status);
  if (r == PC_DNS_OK && n == 0) r = PC_DNS_NXDOMAIN;
  l->cb(l->arg, r, addrs, n, ttl, r == PC_DNS_OK ? NULL : ares_strerror(status));
  free(addrs);
  if (ai) ares_freeaddrinfo(ai);
  free(l);
}

static void lookup(resolver_t *r, const char *host, uint16_t port, answer_cb cb, void *arg) {
  lookup_t *l = pc_calloc(1, sizeof(*l));
  l->cb = cb;
  l->arg = arg;
  l->port = port;
  struct ares_addrinfo_hints h = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
  ares_getaddrinfo(r->ch, host, NULL, &h, on_addrinfo, l);
  arm_tick(r);
}

/* ---- keeping names resolved --------------------------------------------- */

static void query(watch_t *w);

static void on_watch_closed(uv_handle_t *h) {
  watch_t *w = h->data;
  pc_target_unref(w->t);
  free(w);
}

static void watch_free(watch_t *w) {
  if (w->closing) return;
  w->closing = 1;
  uv_close((uv_handle_t *)&w->timer, on_watch_closed);
}

static void on_watch_timer(uv_timer_t *t) {
  watch_t *w = t->data;
  if (pc_target_refs(w->t) == 1) { /* no config holds it any more */
    watch_t **pp = &watches;
    while (*pp != w)
      pp = &(*pp)->next;
    *pp = w->next;
    pc_target_set_dns_state(w->t, NULL);
    watch_free(w);
    return;
  }
  query(w);
}

static void on_answer(void *arg, pc_dns_result_t r, const struct sockaddr_storage *addrs, size_t n,
                      uint64_t ttl_s, const char *detail) {
  watch_t *w = arg;
  w->querying = 0;
  if (w->dropped) {
    watch_free(w);
    return;
  }
  if (r == PC_DNS_PENDING) { /* the channel was replaced: ask the new one */
    uv_timer_start(&w->timer, on_watch_timer, 0, 0);
    return;
  }
  uint64_t ttl = ttl_s * 1000u;
  if (ttl < cur.min_ttl_ms) ttl = cur.min_ttl_ms;
  if (ttl > cur.max_ttl_ms) ttl = cur.max_ttl_ms;
  const char *listener = pc_target_listener(w->t), *spec = pc_target_spec(w->t);
  if (r == PC_DNS_OK) {
    int changed = pc_target_answer(w->t, r, addrs, n, ttl);
    if (changed || w->last != PC_DNS_OK) { /* a new set, or the first good answer in a while */
      pc_target_view_t after;
      pc_target_view(w->t, &after);
      pc_jbuf_t b = {0};
      for (size_t i = 0; i < after.neps; i++)
        pc_jbuf_printf(&b, "%s%s", i ? ", " : "", after.eps[i].address);
      pc_log(PC_LOG_INFO, "listener %s: %s resolved to %zu address%s (%s), ttl %llu ms", listener,
             spec, after.neps, after.neps == 1 ? "" : "es", b.data ? b.data : "",
             (unsigned long long)ttl);
      pc_jbuf_free(&b);
      pc_target_view_free(&after);
    }
    if (changed) pc_workers_wake(); /* idle pooled connections to left endpoints close */
  } else {
    pc_target_view_t v;
    pc_target_answer(w->t, r, NULL, 0, 0);
    pc_target_view(w->t, &v);
    if (w->last != r) {
      if (v.neps)
        pc_log(PC_LOG_WARN,
               "listener %s: cannot resolve %s (%s: %s); keeping the %zu address%s of the last "
               "good answer",
               listener, spec, pc_dns_result_word(r), detail ? detail : "", v.neps,
               v.neps == 1 ? "" : "es");
      else
        pc_log(PC_LOG_WARN, "listener %s: cannot resolve %s (%s: %s); its requests fail", listener,
               spec, pc_dns_result_word(r), detail ? detail : "");
    }
    pc_target_view_free(&v);
    ttl = cur.min_ttl_ms;
  }
  w->last = r;
  uv_timer_start(&w->timer, on_watch_timer, ttl, 0);
}

static void query(watch_t *w) {
  if (w->querying || w->closing || !res.up) return;
  w->querying = 1;
  lookup(&res, pc_target_host(w->t), pc_target_port(w->t), on_answer, w);
}

typedef struct {
  pc_target_t **v;
  size_t n, cap;
} tlist_t;

static void collect(pc_target_t *t, void *arg) {
  tlist_t *l = arg;
  if (pc_target_dns_state(t)) return;
  if (l->n == l->cap) {
    l->cap = l->cap ? l->cap * 2 : 8;
    l->v = pc_realloc(l->v, l->cap * sizeof(*l->v));
  }
  l->v[l->n++] = t;
}

static void take_settings(const pc_config_t *cfg, settings_t *s) {
  s->servers = cfg->dns.servers ? pc_strdup(cfg->dns.servers) : NULL;
  s->min_ttl_ms = cfg->dns.min_ttl_ms;
  s->max_ttl_ms = cfg->dns.max_ttl_ms;
  s->timeout_ms = cfg->dns.timeout_ms;
}

static int same_channel(const settings_t *a, const settings_t *b) {
  if (a->timeout_ms != b->timeout_ms) return 0;
  if (!a->servers || !b->servers) return a->servers == b->servers;
  return strcmp(a->servers, b->servers) == 0;
}

void pc_dns_sync(const pc_config_t *cfg) {
  if (!started) return;
  settings_t s;
  take_settings(cfg, &s);
  if (!same_channel(&s, &cur)) {
    resolver_close(&res, 0); /* in-flight queries come back PENDING and re-ask */
    char err[256];
    if (resolver_open(&res, res.loop, &s, err, sizeof(err)) != 0)
      pc_log(PC_LOG_ERROR, "dns: %s; names are not resolved until a reload fixes it", err);
  }
  free(cur.servers);
  cur = s;
  /* Forget names only we still hold: their listeners are gone. */
  for (watch_t **pp = &watches, *w; (w = *pp);) {
    if (pc_target_refs(w->t) > 1) {
      pp = &w->next;
      continue;
    }
    *pp = w->next;
    pc_target_set_dns_state(w->t, NULL);
    uv_timer_stop(&w->timer);
    if (w->querying)
      w->dropped = 1; /* freed when its answer comes back */
    else
      watch_free(w);
  }
  /* Start on names a config added. */
  tlist_t l = {0};
  pc_targets_each_name(collect, &l);
  for (size_t i = 0; i < l.n; i++) {
    watch_t *w = pc_calloc(1, sizeof(*w));
    pc_target_ref(l.v[i]);
    w->t = l.v[i];
    w->last = PC_DNS_PENDING;
    uv_timer_init(res.loop, &w->timer);
    w->timer.data = w;
    pc_target_set_dns_state(w->t, w);
    w->next = watches;
    watches = w;
    query(w);
  }
  free(l.v);
}

void pc_dns_start(uv_loop_t *loop, const pc_config_t *cfg) {
  take_settings(cfg, &cur);
  char err[256];
  res.loop = loop;
  if (resolver_open(&res, loop, &cur, err, sizeof(err)) != 0)
    pc_log(PC_LOG_ERROR, "dns: %s; names are not resolved until a reload fixes it", err);
  res.loop = loop;
  started = 1;
  pc_dns_sync(cfg);
}

void pc_dns_stop(void) {
  if (!started) return;
  started = 0;
  for (watch_t *w = watches; w; w = w->next) {
    uv_timer_stop(&w->timer);
    pc_target_set_dns_state(w->t, NULL);
    w->dropped = 1;
  }
  resolver_close(&res, 1); /* answers come back PENDING: dropped watches free themselves */
  while (watches) {
    watch_t *w = watches;
    watches = w->next;
    if (!w->querying) watch_free(w);
  }
  free(cur.servers);
  cur.servers = NULL;
}

/* ---- --check ------------------------------------------------------------ */

typedef struct {
  const pc_listener_cfg_t *lc;
  int failed;
  size_t *left;
  uv_loop_t *loop;
} check_t;

static void on_check_answer(void *arg, pc_dns_result_t r, const struct sockaddr_storage *addrs,
                            size_t n, uint64_t ttl_s, const char *detail) {
  (void)addrs;
  (void)ttl_s;
  check_t *c = arg;
  if (--*c->left == 0) uv_stop(c->loop); /* c-ares may keep its sockets open */
  if (r == PC_DNS_OK && n > 0) return;
  c->failed = 1;
  fprintf(stderr, "portcullis: warning: listener %s: %s does not resolve (%s%s%s)\n", c->lc->name,
          c->lc->target_str, pc_dns_result_word(r == PC_DNS_PENDING ? PC_DNS_TIMEOUT : r),
          detail ? ": " : "", detail ? detail : "");
}

int pc_dns_check(const pc_config_t *cfg) {
  /* Every config with a name target: listeners, and routes of transparent
   * listeners. */
  size_t cap = 0, names = 0;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    cap += 1 + cfg->listeners[i].nroutes;
  const pc_listener_cfg_t **lcs = pc_calloc(cap + 1, sizeof(*lcs));
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const pc_listener_cfg_t *l = &cfg->listeners[i];
    if (l->tgt && pc_target_is_name(l->tgt)) lcs[names++] = l;
    for (size_t k = 0; k < l->nroutes; k++)
      if (pc_target_is_name(l->routes[k].lc.tgt)) lcs[names++] = &l->routes[k].lc;
  }
  if (!names) {
    free(lcs);
    return 0;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  settings_t s;
  take_settings(cfg, &s);
  resolver_t r = {0};
  char err[256];
  int failed = 0;
  if (resolver_open(&r, &loop, &s, err, sizeof(err)) != 0) {
    fprintf(stderr, "portcullis: warning: dns: %s\n", err);
    failed = (int)names;
  } else {
    check_t *c = pc_calloc(names, sizeof(*c));
    size_t left = names;
    for (size_t i = 0; i < names; i++) {
      const pc_target_t *t = lcs[i]->tgt;
      c[i].lc = lcs[i];
      c[i].left = &left;
      c[i].loop = &loop;
      lookup(&r, pc_target_host(t), pc_target_port(t), on_check_answer, &c[i]);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    for (size_t i = 0; i < names; i++)
      failed += c[i].failed;
    free(c);
    resolver_close(&r, 1);
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop);
  free(s.servers);
  free(lcs);
  return failed;
}

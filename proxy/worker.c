#include "worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bufcache.h"
#include "compat.h"
#include "conn.h"
#include "endpoint.h"
#include "h2up.h"
#include "pool.h"
#include "tls.h"
#include "log.h"

static pc_worker_t *workers;
static int nworkers;
static int any_paused;  /* set when a worker paused; cleared by the wake-up */
static uint32_t fd_cap; /* atomic: written on publish, read by every worker */

static void close_fds(int *fds, size_t n) {
  for (size_t i = 0; fds && i < n; i++)
    if (fds[i] >= 0) close(fds[i]);
}

/* Takes over the pending generation: listeners kept by (name, address) keep
 * their sockets, added ones start, removed ones stop accepting; established
 * peers are re-checked against the new generation. */
static void adopt(pc_worker_t *w) {
  uv_mutex_lock(&w->lock);
  pc_gen_t *g = w->pending;
  int *fds = w->pending_fds;
  w->pending = NULL;
  w->pending_fds = NULL;
  uv_mutex_unlock(&w->lock);
  if (!g) return;
  pc_gen_t *old = w->gen;
  if (!old || old->cfg != g->cfg) {
    size_t n = g->cfg->nlisteners;
    pc_listener_t **next = pc_calloc(n, sizeof(*next));
    for (size_t i = 0; i < n; i++) {
      const pc_listener_cfg_t *lc = &g->cfg->listeners[i];
      if (fds[i] >= 0) {
        next[i] = pc_listener_new(w, lc, fds[i]);
        continue;
      }
      for (size_t j = 0; j < w->nlisteners; j++) {
        pc_listener_t *l = w->listeners[j];
        if (l && pc_config_same_listener(l->cfg, lc)) {
          l->cfg = lc;
          next[i] = l;
          w->listeners[j] = NULL; /* moves to next: not closed below */
          break;
        }
      }
    }
    pc_listener_t **prev = w->listeners;
    size_t nprev = w->nlisteners;
    int all = 1;
    for (size_t i = 0; i < n; i++) {
      if (!next[i])
        all = 0;
      else if (w->draining)
        pc_listener_stop(next[i]);
    }
    uv_mutex_lock(&w->lock);
    w->listeners = next;
    w->nlisteners = n;
    w->all_bound = all;
    uv_mutex_unlock(&w->lock);
    for (size_t j = 0; j < nprev; j++) {
      if (!prev[j]) continue;
      pc_log(PC_LOG_INFO, "worker %d: listener %s removed", w->index, prev[j]->name);
      pc_listener_close(prev[j]);
    }
    free(prev);
  }
  free(fds);
  w->gen = g;
  if (old) {
    pc_conn_recheck_all(w);
    pc_pool_sweep(w);
    pc_h2up_sweep(w);
    pc_gen_unref(old);
  }
}

int pc_worker_check_drain(pc_worker_t *w) {
  if (!__atomic_load_n(&w->drain_requested, __ATOMIC_ACQUIRE)) return 0;
  if (!w->draining) {
    w->draining = 1;
    for (size_t i = 0; i < w->nlisteners; i++)
      if (w->listeners[i]) pc_listener_stop(w->listeners[i]);
    pc_conn_drain_all(w);
    pc_pool_drain(w);
    pc_h2up_drain(w);
  }
  return 1;
}

void pc_worker_undefer(pc_worker_t *w, pc_deferred_t *d) {
  if (!d->queued) return;
  d->queued = 0;
  if (d->prev)
    d->prev->next = d->next;
  else
    w->deferred = d->next;
  if (d->next)
    d->next->prev = d->prev;
  else
    w->deferred_tail = d->prev;
  d->prev = d->next = NULL;
}

static void on_check(uv_check_t *c) {
  pc_worker_t *w = c->data;
  /* A run may queue others (or itself again); a bound keeps a bug from
   * spinning here: what is left runs after the next iteration. */
  for (int n = 0; w->deferred && n < 100000; n++) {
    pc_deferred_t *d = w->deferred;
    pc_worker_undefer(w, d);
    d->run(d);
  }
  if (!w->deferred) uv_check_stop(c);
}

void pc_worker_defer(pc_worker_t *w, pc_deferred_t *d) {
  if (d->queued) return;
  d->queued = 1;
  d->next = NULL;
  d->prev = w->deferred_tail;
  if (w->deferred_tail)
    w->deferred_tail->next = d;
  else
    w->deferred = d;
  w->deferred_tail = d;
  if (!uv_is_active((uv_handle_t *)&w->check)) uv_check_start(&w->check, on_check);
}

/* Any thread. Another worker may still be closing its connections (each
 * release may wake everyone) after w closed its wake handle: the flag,
 * set under the lock before the close, keeps that send from touching a
 * closed handle (or, later, a closed loop). */
static void wake_worker(pc_worker_t *w) {
  uv_mutex_lock(&w->lock);
  if (!w->wake_closed) uv_async_send(&w->wake);
  uv_mutex_unlock(&w->lock);
}

static void on_wake(uv_async_t *a) {
  pc_worker_t *w = a->data;
  if (__atomic_load_n(&w->stop_requested, __ATOMIC_ACQUIRE)) {
    uv_mutex_lock(&w->lock);
    size_t n = w->nlisteners;
    w->nlisteners = 0;
    w->wake_closed = 1;
    uv_mutex_unlock(&w->lock);
    for (size_t i = 0; i < n; i++)
      if (w->listeners[i]) pc_listener_close(w->listeners[i]);
    pc_conn_close_all(w);
    pc_pool_close_all(w);
    pc_h2up_close_all(w);
    uv_close((uv_handle_t *)&w->wake, NULL);
    uv_check_stop(&w->check);
    uv_close((uv_handle_t *)&w->check, NULL);
    return;
  }
  pc_worker_check_drain(w);
  adopt(w);
  uint64_t e = pc_endpoint_epoch();
  if (e != w->ep_epoch) { /* some name's answer changed: idle connections to left endpoints go */
    w->ep_epoch = e;
    pc_pool_sweep(w);
    pc_h2up_sweep(w);
  }
  for (size_t i = 0; i < w->nlisteners && w->npaused; i++)
    if (w->listeners[i]) pc_listener_resume(w->listeners[i]);
}

static void run(void *arg) {
  pc_worker_t *w = arg;
  adopt(w);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  pc_tls_thread_done();
  pc_bufcache_drain();
}

/* Binds, for worker w, a socket for every listener of cfg that w was not
 * already handed. Returns the fds (-1 = keep) or NULL with err set. */
static int *bind_added(const pc_worker_t *w, const pc_config_t *cfg, char *err, size_t errlen) {
  int *fds = pc_malloc((cfg->nlisteners ? cfg->nlisteners : 1) * sizeof(int));
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const pc_listener_cfg_t *lc = &cfg->listeners[i];
    int kept = 0;
    for (size_t j = 0; w->handed && j < w->handed->nlisteners && !kept; j++)
      kept = pc_config_same_listener(&w->handed->listeners[j], lc);
    fds[i] = kept ? -1 : pc_listener_bind(cfg, lc, err, errlen);
    if (!kept && fds[i] < 0) {
      close_fds(fds, i);
      free(fds);
      return NULL;
    }
  }
  return fds;
}

/* Parks g with its sockets in w's pending slot, replacing a generation that
 * w has not adopted yet (its sockets for listeners g keeps move over). */
static void hand_over(pc_worker_t *w, pc_gen_t *g, int *fds) {
  uv_mutex_lock(&w->lock);
  if (w->pending) {
    const pc_config_t *pc = w->pending->cfg;
    for (size_t i = 0; i < g->cfg->nlisteners; i++) {
      for (size_t j = 0; fds[i] < 0 && j < pc->nlisteners; j++) {
        if (w->pending_fds[j] >= 0 &&
            pc_config_same_listener(&pc->listeners[j], &g->cfg->listeners[i])) {
          fds[i] = w->pending_fds[j];
          w->pending_fds[j] = -1;
        }
      }
    }
    close_fds(w->pending_fds, pc->nlisteners);
    free(w->pending_fds);
    pc_gen_unref(w->pending);
  }
  pc_gen_ref(g);
  w->pending = g;
  w->pending_fds = fds;
  w->handed = g->cfg;
  uv_mutex_unlock(&w->lock);
}

/* Each connection needs two descriptors. Besides them: stdio, logs, signal
 * pipes; per worker epoll, async, libuv's reserve descriptor and one socket
 * per listener; the admin server's connections; and per worker and HTTP
 * listener up to http.pool_max_idle idle pooled upstream connections. If
 * the descriptor limit cannot hold max_connections on top, live connections
 * are capped so that accepting pauses before accept(2) or socket(2) fail
 * with EMFILE (which would drop peers without a trace). */
static void budget_descriptors(const pc_config_t *cfg) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  uint64_t http = 0;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    http += cfg->listeners[i].protocol == PC_PROTO_HTTP;
    for (size_t k = 0; k < cfg->listeners[i].nroutes; k++) /* each route has its pool */
      http += cfg->listeners[i].routes[k].lc.protocol == PC_PROTO_HTTP;
  }
  uint64_t reserve = 32 + (uint64_t)cfg->workers * (cfg->nlisteners + 8) +
                     cfg->admin.max_connections +
                     (uint64_t)cfg->workers * http * cfg->http.pool_max_idle;
  uint64_t need = (uint64_t)cfg->limits.max_connections * 2 + reserve;
  uint64_t have = rl.rlim_cur;
  uint32_t cap = 0;
  if (have < need) cap = have > reserve + 2 ? (uint32_t)((have - reserve) / 2) : 1;
  uint32_t old = __atomic_exchange_n(&fd_cap, cap, __ATOMIC_RELAXED);
  if (cap && cap != old)
    pc_log(PC_LOG_WARN,
           "descriptor limit %llu cannot hold limits.max_connections=%u (needs %llu, %llu of "
           "them for listeners, admin.max_connections and idle pooled connections); at most %u "
           "connections will be served at once and accepting pauses beyond that",
           (unsigned long long)have, cfg->limits.max_connections, (unsigned long long)need,
           (unsigned long long)reserve, cap);
  else if (!cap && old)
    pc_log(PC_LOG_INFO, "descriptor limit %llu holds limits.max_connections=%u again",
           (unsigned long long)have, cfg->limits.max_connections);
}

int pc_workers_create(pc_gen_t *gen, char *err, size_t errlen) {
  nworkers = gen->cfg->workers;
  workers = pc_calloc((size_t)nworkers, sizeof(pc_worker_t));
  for (int i = 0; i < nworkers; i++) {
    pc_worker_t *w = &workers[i];
    w->index = i;
    if (uv_loop_init(&w->loop) != 0 || uv_mutex_init(&w->lock) != 0)
      pc_fatal("cannot initialise a worker loop");
    uv_async_init(&w->loop, &w->wake, on_wake);
    uv_check_init(&w->loop, &w->check);
    w->check.data = w;
    w->wake.data = w;
  }
  return pc_workers_publish(gen, err, errlen);
}

int pc_workers_publish(pc_gen_t *g, char *err, size_t errlen) {
  int **fds = pc_calloc((size_t)nworkers, sizeof(int *));
  for (int i = 0; i < nworkers; i++) {
    fds[i] = bind_added(&workers[i], g->cfg, err, errlen);
    if (!fds[i]) {
      for (int j = 0; j < i; j++) {
        close_fds(fds[j], g->cfg->nlisteners);
        free(fds[j]);
      }
      free(fds);
      return -1;
    }
  }
  budget_descriptors(g->cfg);
  for (int i = 0; i < nworkers; i++) {
    hand_over(&workers[i], g, fds[i]);
    wake_worker(&workers[i]);
  }
  free(fds);
  return 0;
}

int pc_workers_start(void) {
  for (int i = 0; i < nworkers; i++) {
    int rc = uv_thread_create(&workers[i].thread, run, &workers[i]);
    if (rc) return rc;
  }
  return 0;
}

void pc_workers_stop(void) {
  for (int i = 0; i < nworkers; i++) {
    __atomic_store_n(&workers[i].stop_requested, 1, __ATOMIC_RELEASE);
    wake_worker(&workers[i]);
  }
  /* Every thread ends before any worker's loop or lock goes: a worker still
   * closing connections wakes (locks) the others. */
  for (int i = 0; i < nworkers; i++)
    uv_thread_join(&workers[i].thread);
  for (int i = 0; i < nworkers; i++) {
    pc_worker_t *w = &workers[i];
    uv_loop_close(&w->loop);
    free(w->listeners);
    free(w->scratch.obuf);
    if (w->pending) {
      close_fds(w->pending_fds, w->pending->cfg->nlisteners);
      free(w->pending_fds);
      pc_gen_unref(w->pending);
    }
    uv_mutex_destroy(&w->lock);
    pc_gen_unref(w->gen);
  }
  free(workers);
  workers = NULL;
}

void pc_workers_wake(void) {
  for (int i = 0; i < nworkers; i++)
    wake_worker(&workers[i]);
}

static uint32_t counted(int inbound) {
  int n = pc_conn_active() - (inbound ? 0 : pc_conn_pending());
  return n > 0 ? (uint32_t)n : 0;
}

int pc_workers_over_limit(const pc_worker_t *w, int inbound) {
  uint32_t max = w->gen->cfg->limits.max_connections;
  uint32_t cap = __atomic_load_n(&fd_cap, __ATOMIC_RELAXED);
  if (cap && cap < max) max = cap;
  if (counted(inbound) < max) return 0;
  /* Publish "someone may pause" before looking again, so a connection that
   * closes in between either sees the flag or is seen here. */
  __atomic_store_n(&any_paused, 1, __ATOMIC_SEQ_CST);
  return counted(inbound) >= max;
}

void pc_workers_conn_released(void) {
  if (!__atomic_load_n(&any_paused, __ATOMIC_SEQ_CST)) return;
  if (!__atomic_exchange_n(&any_paused, 0, __ATOMIC_SEQ_CST)) return;
  pc_workers_wake();
}

void pc_workers_drain(void) {
  for (int i = 0; i < nworkers; i++) {
    __atomic_store_n(&workers[i].drain_requested, 1, __ATOMIC_RELEASE);
    wake_worker(&workers[i]);
  }
}

void pc_workers_collect(void (*fn)(const pc_listener_t *, void *), void *arg) {
  for (int i = 0; i < nworkers; i++) {
    pc_worker_t *w = &workers[i];
    uv_mutex_lock(&w->lock);
    for (size_t j = 0; j < w->nlisteners; j++)
      if (w->listeners[j]) fn(w->listeners[j], arg);
    uv_mutex_unlock(&w->lock);
  }
}

int pc_workers_ready(const char **why) {
  for (int i = 0; i < nworkers; i++) {
    pc_worker_t *w = &workers[i];
    uv_mutex_lock(&w->lock);
    int started = w->listeners != NULL, bound = w->all_bound;
    uv_mutex_unlock(&w->lock);
    if (!started) {
      *why = "starting";
      return 0;
    }
    if (!bound) {
      *why = "a listener is not bound";
      return 0;
    }
  }
  return 1;
}

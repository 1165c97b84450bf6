#include "worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "compat.h"
#include "conn.h"
#include "log.h"

static pc_worker_t *workers;
static int nworkers;
static int any_paused; /* set when a worker paused; cleared by the wake-up */

static void on_wake(uv_async_t *a) {
  pc_worker_t *w = a->data;
  if (__atomic_load_n(&w->stop_requested, __ATOMIC_ACQUIRE)) {
    for (size_t i = 0; i < w->nlisteners; i++)
      pc_listener_close(&w->listeners[i], NULL);
    pc_conn_close_all(w);
    uv_close((uv_handle_t *)&w->wake, NULL);
    return;
  }
  for (size_t i = 0; i < w->nlisteners && w->npaused; i++)
    pc_listener_resume(&w->listeners[i]);
}

static void run(void *arg) {
  pc_worker_t *w = arg;
  for (size_t i = 0; i < w->nlisteners; i++) {
    int rc = pc_listener_start(&w->listeners[i], w, &w->gen->cfg->listeners[i], w->fds[i]);
    if (rc)
      pc_log(PC_LOG_ERROR, "worker %d: listener %s: %s", w->index, w->gen->cfg->listeners[i].name,
             uv_strerror(rc));
  }
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

int pc_workers_create(pc_gen_t *gen, char *err, size_t errlen) {
  const pc_config_t *cfg = gen->cfg;
  nworkers = cfg->workers;
  workers = pc_calloc((size_t)nworkers, sizeof(pc_worker_t));
  for (int i = 0; i < nworkers; i++) {
    pc_worker_t *w = &workers[i];
    w->index = i;
    w->gen = gen;
    pc_gen_ref(gen);
    w->nlisteners = cfg->nlisteners;
    w->listeners = pc_calloc(cfg->nlisteners, sizeof(pc_listener_t));
    w->fds = pc_calloc(cfg->nlisteners, sizeof(int));
    for (size_t j = 0; j < cfg->nlisteners; j++)
      w->fds[j] = -1;
    if (uv_loop_init(&w->loop) != 0) pc_fatal("uv_loop_init failed");
    uv_async_init(&w->loop, &w->wake, on_wake);
    w->wake.data = w;
    for (size_t j = 0; j < cfg->nlisteners; j++) {
      w->fds[j] = pc_listener_bind(cfg, &cfg->listeners[j], err, errlen);
      if (w->fds[j] < 0) return -1; /* the process exits; the kernel closes the rest */
    }
  }
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
    uv_async_send(&workers[i].wake);
  }
  for (int i = 0; i < nworkers; i++) {
    pc_worker_t *w = &workers[i];
    uv_thread_join(&w->thread);
    uv_loop_close(&w->loop);
    free(w->listeners);
    free(w->fds);
    free(w->scratch.obuf);
    pc_gen_unref(w->gen);
  }
  free(workers);
  workers = NULL;
}

static uint32_t fd_cap;

void pc_workers_set_fd_cap(uint32_t cap) { fd_cap = cap; }

int pc_workers_over_limit(const pc_worker_t *w) {
  uint32_t max = w->gen->cfg->limits.max_connections;
  if (fd_cap && fd_cap < max) max = fd_cap;
  if ((uint32_t)pc_conn_active() < max) return 0;
  /* Publish "someone may pause" before looking again, so a connection that
   * closes in between either sees the flag or is seen here. */
  __atomic_store_n(&any_paused, 1, __ATOMIC_SEQ_CST);
  return (uint32_t)pc_conn_active() >= max;
}

void pc_workers_conn_released(void) {
  if (!__atomic_load_n(&any_paused, __ATOMIC_SEQ_CST)) return;
  if (!__atomic_exchange_n(&any_paused, 0, __ATOMIC_SEQ_CST)) return;
  for (int i = 0; i < nworkers; i++)
    uv_async_send(&workers[i].wake);
}

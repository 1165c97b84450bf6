/*
 * worker.h - event-loop threads. Each worker owns one libuv loop, its own
 * listening sockets (one per configured listener, SO_REUSEPORT), its
 * connections, counters and scratch buffers; nothing on the per-byte path is
 * shared between workers.
 *
 * Generations reach a worker by hand-over: the main thread binds whatever
 * sockets a new generation adds, parks the generation in the worker's pending
 * slot and wakes it; the worker adopts it between two loop iterations (new
 * connections use it from then on, connections in flight keep theirs),
 * reconciles its listeners and re-checks its established peers.
 *
 * Lifecycle (main thread): pc_workers_create, pc_workers_start, any number of
 * pc_workers_publish, pc_workers_stop.
 */
#ifndef PC_WORKER_H
#define PC_WORKER_H

#include <stdint.h>

#include <uv.h>

#include "gen.h"
#include "listener.h"
#include "stream.h"

struct pc_conn;

/* Work deferred to the end of a loop iteration (pc_worker_defer). */
typedef struct pc_deferred {
  void (*run)(struct pc_deferred *d);
  struct pc_deferred *prev, *next;
  int queued;
} pc_deferred_t;

typedef struct pc_worker {
  int index;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t wake;           /* hand-over, stop request, or resume paused accepts */
  pc_gen_t *gen;             /* current generation; worker thread only */
  pc_listener_t **listeners; /* parallel to gen->cfg->listeners; NULL if one failed */
  size_t nlisteners;
  struct pc_conn *conns;   /* every live connection */
  struct pc_pool *pools;   /* HTTP mode: upstream connection pools (pool.h) */
  struct h2pool *h2pools;  /* HTTP mode: HTTP/2 upstream connections (h2up.h) */
  uv_check_t check;        /* runs the deferred work after each iteration's I/O */
  pc_deferred_t *deferred; /* queued, oldest first */
  pc_deferred_t *deferred_tail;
  int stop_requested;
  int drain_requested;
  int draining; /* worker thread: listeners stopped */
  int npaused;
  uint64_t ep_epoch; /* pc_endpoint_epoch when its pools were last swept */
  pc_scratch_t scratch;
  /* Guards listeners/nlisteners/all_bound for readers on other
   * threads (only this worker writes them), the hand-over fields, and every
   * uv_async_send on wake (against its close: wake_closed). */
  uv_mutex_t lock;
  int all_bound;             /* every listener of the adopted generation is up */
  int wake_closed;           /* wake is closing: no uv_async_send on it any more */
  pc_gen_t *pending;         /* handed over, not adopted yet */
  int *pending_fds;          /* per pending listener: new socket, or -1 to keep the old */
  const pc_config_t *handed; /* config of the newest generation handed over (main thread) */
} pc_worker_t;

/* Worker thread: runs d->run(d) once, after the I/O callbacks of this loop
 * iteration (libuv's check phase), however often it is asked before then.
 * Many callbacks of one iteration that each want the same connection's
 * output written (every stream of an HTTP/2 connection whose upstreams
 * answered in that iteration) thus make one write. pc_worker_undefer
 * cancels it (call before freeing d). */
void pc_worker_defer(pc_worker_t *w, pc_deferred_t *d);
void pc_worker_undefer(pc_worker_t *w, pc_deferred_t *d);

/* Creates cfg->workers workers for gen and binds all their sockets. Returns 0,
 * or -1 with one error line in err. Main thread. */
int pc_workers_create(pc_gen_t *gen, char *err, size_t errlen);

/* Starts the threads. Returns 0 or a libuv error. */
int pc_workers_start(void);

/* Hands g to every worker (each takes its own reference). Sockets for
 * listeners that g adds are bound first: if any cannot be, nothing is handed
 * over and -1 is returned with one error line in err. Otherwise the
 * descriptor budget is recomputed for g's config (see
 * pc_workers_over_limit; a warning names the cap when it changes). Main
 * thread. */
int pc_workers_publish(pc_gen_t *g, char *err, size_t errlen);

/* Asks every worker to close its listeners and connections, waits for the
 * threads and frees them. */
void pc_workers_stop(void);

/* Graceful drain: every worker stops accepting (listening sockets close, so
 * new connections are refused); open connections continue. Main thread. */
void pc_workers_drain(void);

/* Worker thread: if a drain was requested, stops w's listeners now (once)
 * and returns 1. The wake-up that pc_workers_drain sends may be handled after
 * a connection that arrived later; a listener calls this before it accepts,
 * so nothing that connects after the drain began is served. */
int pc_worker_check_drain(pc_worker_t *w);

/* Calls fn(l, arg) for every listener of every worker while holding that
 * worker's lock (fn must not block). A listener removed by a reload is no
 * longer visited: its counters end with it. Main thread. */
void pc_workers_collect(void (*fn)(const pc_listener_t *l, void *arg), void *arg);

/* 1 if every worker has adopted a generation and bound all its listeners;
 * else 0 with a short reason in why (static storage). Main thread. */
int pc_workers_ready(const char **why);

/* Non-zero when the process is at its connection cap (max_connections or the
 * descriptor cap, whichever is lower) for a listener of this direction:
 * accepting must pause. An inbound listener counts every live connection;
 * an outbound one leaves out inbound connections still in their handshake,
 * which limits.max_pending_handshakes bounds per inbound listener, so a
 * flood of silent connects to an inbound port never pauses the app's own
 * calls. The descriptor cap applies when the soft RLIMIT_NOFILE cannot hold
 * two descriptors per connection on top of the listeners, admin connections
 * and idle pooled upstream connections the config allows. Any worker. */
int pc_workers_over_limit(const pc_worker_t *w, int inbound);

/* Wakes every worker (unless it is stopping), which then retries its paused
 * listeners. Any thread. */
void pc_workers_wake(void);

/* A connection ended: if some worker paused accepting, let it try again.
 * Any worker thread. */
void pc_workers_conn_released(void);

#endif

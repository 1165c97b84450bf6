/*
 * worker.h - event-loop threads. Each worker owns one libuv loop, its own
 * listening sockets (one per configured listener, SO_REUSEPORT), its
 * connections, counters and scratch buffers; nothing on the per-byte path is
 * shared between workers.
 *
 * Lifecycle (main thread): pc_workers_create binds every socket, then
 * pc_workers_start runs the threads, pc_workers_stop asks them to close
 * everything and joins them.
 */
#ifndef PC_WORKER_H
#define PC_WORKER_H

#include <stdint.h>

#include <uv.h>

#include "gen.h"
#include "listener.h"
#include "stream.h"

struct pc_conn;

typedef struct pc_worker {
  int index;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t wake; /* stop request, or a chance to resume paused accepts */
  pc_gen_t *gen;   /* the generation this worker's listeners were built from */
  pc_listener_t *listeners;
  int *fds;
  size_t nlisteners;
  struct pc_conn *conns; /* every live connection, for shutdown */
  int stop_requested;
  int npaused;
  pc_scratch_t scratch;
} pc_worker_t;

/* Creates cfg->workers workers for gen and binds all their sockets. Returns 0,
 * or -1 with one error line in err (nothing is left open then). Takes a
 * reference on gen per worker. */
int pc_workers_create(pc_gen_t *gen, char *err, size_t errlen);

/* Starts the threads. Returns 0 or a libuv error. */
int pc_workers_start(void);

/* Asks every worker to close its listeners and connections, waits for the
 * threads and frees them. */
void pc_workers_stop(void);

/* Caps live connections below limits.max_connections when the descriptor
 * limit cannot hold that many (each connection needs two). 0 = no extra cap.
 * Main thread, before pc_workers_start. */
void pc_workers_set_fd_cap(uint32_t cap);

/* Non-zero when the process is at its connection cap (max_connections or the
 * descriptor cap, whichever is lower): accepting must pause. Any worker. */
int pc_workers_over_limit(const pc_worker_t *w);

/* A connection ended: if some worker paused accepting, let it try again.
 * Any worker thread. */
void pc_workers_conn_released(void);

#endif

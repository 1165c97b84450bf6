/*
 * listener.h - one configured listener on one worker: its own SO_REUSEPORT
 * socket, so the kernel spreads new connections across workers without a
 * shared accept lock.
 *
 * Sockets are bound in the main thread (at startup and on reload, so a bind
 * error is reported before anything changes) and adopted by the worker's
 * loop. Accepting pauses while the process is at its connection cap, and an
 * inbound listener's also while limits.max_pending_handshakes of its
 * connections (counted across all workers) are in their handshake: the
 * pending connection stays with libuv, which stops polling the socket until
 * pc_listener_resume accepts it.
 *
 * A listener is refcounted: the worker holds one reference and every
 * connection accepted from it one more, so a listener removed by a reload
 * stays valid (counters included) until its last connection is gone.
 * Worker thread only, except pc_listener_bind.
 */
#ifndef PC_LISTENER_H
#define PC_LISTENER_H

#include <uv.h>

#include "config.h"
#include "metrics.h"
#include "throttle.h"

struct pc_worker;

/* What the copies of one listener on every worker share: its handshake
 * budget's count (opaque; listener.c). */
typedef struct pc_listener_shared pc_listener_shared_t;

typedef struct pc_listener {
  uv_tcp_t tcp;
  struct pc_worker *w;
  const pc_listener_cfg_t *cfg; /* borrowed from the worker's current generation */
  char *name;                   /* owned copy: outlives cfg after a reload */
  int paused;
  int stopping; /* pc_listener_stop: the socket is (being) closed, the struct stays */
  int release_on_close;
  int closed;
  int refs;
  pc_listener_shared_t *shared; /* with this listener's copies on the other workers */
  pc_throttle_t *throttle;      /* inbound: created at the first failed handshake */
  pc_metrics_t stats;
} pc_listener_t;

/* Creates, binds and listens a socket with SO_REUSEPORT for cfg. Main thread.
 * Returns the descriptor, or -1 with "FILE:LINE: SETTING: error" in err. */
int pc_listener_bind(const pc_config_t *conf, const pc_listener_cfg_t *cfg, char *err,
                     size_t errlen);

/* Creates a listener on w's loop that adopts fd and starts accepting. Returns
 * it with one reference (the worker's), or NULL after logging why (fd is
 * closed then). */
pc_listener_t *pc_listener_new(struct pc_worker *w, const pc_listener_cfg_t *cfg, int fd);

/* Accepts the connection held while paused, if the cap and l's handshake
 * budget allow now. */
void pc_listener_resume(pc_listener_t *l);

/* Inbound: an accepted connection begins its TLS handshake; it counts
 * against l's limits.max_pending_handshakes (shared by l's copies on every
 * worker) until pc_listener_handshake_done. */
void pc_listener_handshake_begun(pc_listener_t *l);

/* Inbound: a handshake counted by pc_listener_handshake_begun ended. If it
 * failed (refused, timed out, or the peer went away or reset), failed_src is
 * its source: it counts towards that source's throttling, and when that
 * starts a cool-down one server event says so. NULL on success. If a copy
 * of l paused at the budget, every worker is woken to resume its copy (never
 * from inside this call). */
void pc_listener_handshake_done(pc_listener_t *l, const pc_throttle_key_t *failed_src);

/* Inbound: 1 if connections from src are to be closed at accept. */
int pc_listener_throttled(const pc_listener_t *l, const pc_throttle_key_t *src);

/* Stops accepting and closes the socket, then drops the worker's reference. */
void pc_listener_close(pc_listener_t *l);

/* Stops accepting and closes the socket (new connections are refused by the
 * kernel) but keeps the listener, and its counters, for the worker until
 * pc_listener_close. Used by graceful drain. */
void pc_listener_stop(pc_listener_t *l);

void pc_listener_ref(pc_listener_t *l);
void pc_listener_unref(pc_listener_t *l);

#endif

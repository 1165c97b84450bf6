/*
 * listener.h - one configured listener on one worker: its own SO_REUSEPORT
 * socket, so the kernel spreads new connections across workers without a
 * shared accept lock.
 *
 * Sockets are bound in the main thread at startup (so a bind error stops
 * startup with the setting named) and adopted by the worker's loop.
 * Accepting pauses while the process is at limits.max_connections: the
 * pending connection stays with libuv, which stops polling the socket until
 * pc_listener_resume accepts it.
 */
#ifndef PC_LISTENER_H
#define PC_LISTENER_H

#include <uv.h>

#include "config.h"
#include "metrics.h"

struct pc_worker;

typedef struct pc_listener {
  uv_tcp_t tcp;
  struct pc_worker *w;
  const pc_listener_cfg_t *cfg; /* borrowed from the worker's generation */
  int fd;
  int paused;
  pc_metrics_t stats;
} pc_listener_t;

/* Creates, binds and listens a socket with SO_REUSEPORT for cfg. Main thread.
 * Returns the descriptor, or -1 with "FILE:LINE: SETTING: error" in err. */
int pc_listener_bind(const pc_config_t *conf, const pc_listener_cfg_t *cfg, char *err,
                     size_t errlen);

/* Adopts fd into w's loop and starts accepting. Worker thread. 0 or libuv error. */
int pc_listener_start(pc_listener_t *l, struct pc_worker *w, const pc_listener_cfg_t *cfg, int fd);

/* Accepts the connection held while paused, if the limit allows now. */
void pc_listener_resume(pc_listener_t *l);

/* Stops accepting and closes the socket; close_cb as for uv_close. */
void pc_listener_close(pc_listener_t *l, uv_close_cb close_cb);

#endif

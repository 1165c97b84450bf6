/*
 * admin.h - the admin HTTP/1.1 server (llhttp) on admin.listen, for probes,
 * scrapes and operators: /healthz, /ready, /metrics (Prometheus text),
 * /config (effective config as JSON, no secret material) and /certs (loaded
 * certificates). GET and HEAD only; one request per connection, read by
 * adminreq.h.
 *
 * Runs on the main thread's loop, away from the workers' data path; metrics
 * are per-worker counters summed at scrape time (worker.h pc_workers_collect).
 */
#ifndef PC_ADMIN_H
#define PC_ADMIN_H

#include <uv.h>

#include "config.h"

/* Binds admin.listen of cfg on loop. Returns 0, or -1 with one line
 * "FILE:LINE: admin.listen: why" in err. Main thread. */
int pc_admin_start(uv_loop_t *loop, const pc_config_t *cfg, char *err, size_t errlen);

/* Marks the process as draining: /ready answers 503 "draining" from now on. */
void pc_admin_set_draining(void);

/* Stops listening and closes open admin connections. Main thread. */
void pc_admin_stop(void);

#endif

/*
 * h1up.h - HTTP/1.1 upstream calls (upcall.h): the HTTP/1 client codec over
 * the keep-alive pool (pool.h).
 *
 * A call borrows a connection from the pool of its worker, listener and
 * generation (so a request only rides a connection verified under the
 * generation that decided it), writes the request head (the HTTP/1 client's
 * own bytes, or one written from the neutral fields by pc_h1_head_from_nv)
 * and the body (as chunks when the head says chunked), parses the response
 * strictly (h1.h) and hands it on de-framed. Interim answers go to on_info;
 * a 101 to an Upgrade or a 2xx to CONNECT hands the connection over
 * (on_tunnel); a 101 to anything else is the upstream's protocol error.
 *
 * The connection goes back to the pool, before on_end, only when the
 * exchange ended cleanly both ways: the whole request was written, the
 * response was delimited by its own framing and the upstream kept the
 * connection alive (never for a request sent as HTTP/1.0). Bytes after a
 * response close it. Response bytes not yet consumed above 64 KiB stop
 * reading the upstream until the caller catches up.
 *
 * Failures before the response: 503 when no connection could be made, 504
 * for a TLS handshake that timed out, 502 for a refused or failed TLS
 * handshake (reason says why) and for an upstream that broke HTTP/1.1 or
 * the connection (reason "protocol"; retry when it was a reused connection
 * that failed before any response byte). Loop thread only.
 */
#ifndef PC_H1UP_H
#define PC_H1UP_H

#include "upcall.h"

typedef struct pc_h1call pc_h1call_t;

/* As pc_upcall_start, over HTTP/1.1. */
pc_h1call_t *pc_h1call_start(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                             pc_metrics_t *stats, const pc_upreq_t *req, const pc_upcall_cbs_t *cbs,
                             void *user);

void pc_h1call_send(pc_h1call_t *k, const char *data, size_t len);
void pc_h1call_end(pc_h1call_t *k);
void pc_h1call_consumed(pc_h1call_t *k, size_t n);
void pc_h1call_release(pc_h1call_t *k);

const char *pc_h1call_peer_id(const pc_h1call_t *k);
const char *pc_h1call_tls_version(const pc_h1call_t *k);
int pc_h1call_tls_resumed(const pc_h1call_t *k); /* the upstream's handshake resumed */
const char *pc_h1call_cipher(const pc_h1call_t *k);
const char *pc_h1call_endpoint(const pc_h1call_t *k);

#endif

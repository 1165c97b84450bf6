/*
 * h2up.h - HTTP/2 client connections shared by many requests: to the local
 * app (inbound listeners with app_protocol = "h2c": plaintext, prior
 * knowledge) or to the upstream sidecar (outbound listeners whose
 * upstream_protocol is "h2" or "auto": mTLS, ALPN h2).
 *
 * Like pool.h, connections belong to one worker, one listener and one
 * generation: a request rides only a connection made under the generation
 * that decided it, and a reload closes the older generations' connections
 * once their streams are done. A connection takes new streams while it has
 * fewer than the peer's SETTINGS_MAX_CONCURRENT_STREAMS and has not received
 * GOAWAY; otherwise a new one is opened. Idle connections close after
 * http.pool_idle_timeout_ms.
 *
 * An upstream that does not select h2 by ALPN is remembered (per listener
 * and generation): with upstream_protocol = "auto" its calls fail with
 * status PC_UPCALL_USE_H1 so that upcall.c sends them over HTTP/1.1
 * instead; with "h2" they fail with 502. The callbacks are upcall.h's;
 * interim (1xx) heads go to on_info, on_tunnel is never called.
 *
 * Response bytes count against the stream's and the connection's windows
 * until the caller says they were consumed (pc_h2call_consumed), so a slow
 * client holds the upstream back instead of making the sidecar buffer.
 * Loop thread of the owning worker only.
 */
#ifndef PC_H2UP_H
#define PC_H2UP_H

#include <stddef.h>

#include <nghttp2/nghttp2.h>

#include "gen.h"
#include "metrics.h"
#include "reason.h"
#include "upcall.h"

struct pc_worker;
typedef struct pc_h2call pc_h2call_t;

/* Starts a request: nv is the whole head (pseudo-headers first), copied.
 * end: the request has no body. pin: the endpoint to use (borrowed; NULL:
 * one is picked from lc's target). Callbacks fire later, never from inside
 * this call. stats counts connects and reuses (must outlive the call). */
pc_h2call_t *pc_h2call_start(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                             pc_metrics_t *stats, const nghttp2_nv *nv, size_t n, int end,
                             struct pc_endpoint *pin, const pc_upcall_cbs_t *cbs, void *user);

/* Request body bytes (copied; on_sent tells when they left) and its end. */
void pc_h2call_send(pc_h2call_t *c, const char *data, size_t len);
void pc_h2call_end(pc_h2call_t *c);

/* n response bytes passed on by the caller: the upstream may send more. */
void pc_h2call_consumed(pc_h2call_t *c, size_t n);

/* The caller is done with c: a stream still open is reset (CANCEL). No
 * callback fires afterwards. */
void pc_h2call_release(pc_h2call_t *c);

/* For the access log: the upstream's SPIFFE ID (outbound; NULL inbound),
 * its TLS version and cipher (NULL for plaintext). Valid until release. */
const char *pc_h2call_peer_id(const pc_h2call_t *c);
const char *pc_h2call_tls_version(const pc_h2call_t *c);
const char *pc_h2call_cipher(const pc_h2call_t *c);
/* "ip:port" of the endpoint its connection goes to; NULL if none. */
const char *pc_h2call_endpoint(const pc_h2call_t *c);

/* Non-zero if lc's upstream (under generation g) answered ALPN without h2. */
int pc_h2up_h1_only(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc);

/* After w adopted a new generation: older generations' idle connections
 * close, busy ones stop taking streams and close when done. */
void pc_h2up_sweep(struct pc_worker *w);

/* SIGTERM drain: idle connections close now; busy ones still carry the
 * requests of connections in flight and close when their last stream ends
 * (maybe_idle). */
void pc_h2up_drain(struct pc_worker *w);

/* Worker stop: closes every connection (callers' teardown released their
 * calls first). */
void pc_h2up_close_all(struct pc_worker *w);

#endif

/*
 * upcall.h - one request sent onwards and its response: what the exchange
 * (the request's policy decision, deadline and log line, kept by the client
 * side's codec: l7.c for HTTP/1 clients, h2.c for HTTP/2 clients) sees of
 * the upstream, whichever protocol carries it.
 *
 * Requests and responses cross this interface in one neutral form, HTTP/2
 * style: pseudo-headers, then fields with lowercase names and no hop-by-hop
 * fields, body bytes already de-framed, trailers as fields. Two upstream
 * codecs implement it, and each owns its framing and its connections:
 *
 *   h1up.h  HTTP/1.1 over the keep-alive pool (pool.h), one request per
 *           connection at a time;
 *   h2up.h  HTTP/2 streams over shared connections, as many per connection
 *           as the peer's SETTINGS_MAX_CONCURRENT_STREAMS.
 *
 * pc_upcall_start picks one from the listener of the deciding generation:
 * inbound, app_protocol ("h2c": HTTP/2, else HTTP/1.1); outbound,
 * upstream_protocol ("h2", "http/1.1", or "auto": HTTP/2 when the request
 * prefers it and the upstream has not shown by ALPN that it speaks only
 * HTTP/1.1; an upstream found to speak only HTTP/1.1 takes the request over
 * HTTP/1.1 instead, as long as no body byte went out). Upgrade and CONNECT
 * requests (tunnel) go over HTTP/1.1 only.
 *
 * Loop thread of the owning worker only. No callback fires from inside a
 * call into this interface except where said.
 */
#ifndef PC_UPCALL_H
#define PC_UPCALL_H

#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "gen.h"
#include "metrics.h"
#include "reason.h"

struct pc_worker;
struct pc_upconn;
typedef struct pc_upcall pc_upcall_t;

/* A request head in the neutral form. */
typedef struct {
  /* :method, :scheme, :authority (if any), :path, then the fields:
   * lowercase, no hop-by-hop fields, content-length when the body's length
   * is known. Copied by pc_upcall_start. */
  const nghttp2_nv *nv;
  size_t n;
  int end;       /* no body follows */
  int tunnel;    /* Upgrade or CONNECT: HTTP/1.1 only; see on_tunnel */
  int prefer_h2; /* upstream_protocol "auto" may use HTTP/2 for it */
  /* Optional: the head as HTTP/1.1 bytes, written by an HTTP/1 client's
   * codec from the bytes it received (field case and order kept), used
   * instead of one built from nv when the request goes over HTTP/1.1.
   * h1_chunked: it says Transfer-Encoding: chunked, so body bytes are sent
   * as chunks. Copied. With h1_head set, a request that goes over HTTP/1.1
   * (pc_upcall_uses_h2 said so, prefer_h2 = 0: no fall-back) needs only
   * :method in nv. */
  const char *h1_head;
  size_t h1_head_len;
  int h1_chunked;
  /* Transparent connections: the endpoint (the original destination) the
   * request must go to, instead of one picked from the listener's target;
   * borrowed (the connection holds it). NULL: picked. */
  struct pc_endpoint *pin;
} pc_upreq_t;

/* pc_upcall_cbs_t.on_fail status: HTTP/2 only, and the upstream speaks only
 * HTTP/1.1 (h2up.h; pc_upcall_start handles it, callers never see it). */
#define PC_UPCALL_USE_H1 (-1)

typedef struct {
  /* An interim (1xx, not 101) response head; may come before on_head. NULL:
   * interim responses are dropped. */
  void (*on_info)(void *user, int status, const nghttp2_nv *nv, size_t n);
  /* The final response head: fields in the neutral form (valid during the
   * callback), content-length among them when the body's length is known.
   * end: nothing follows. */
  void (*on_head)(void *user, int status, const nghttp2_nv *nv, size_t n, int end);
  /* De-framed response body bytes. They count against a window of the
   * upstream's until passed to pc_upcall_consumed. */
  void (*on_data)(void *user, const uint8_t *data, size_t len);
  /* The response ended, with trailers (n may be 0). */
  void (*on_end)(void *user, const nghttp2_nv *nv, size_t n);
  /* The call failed; no callback follows. Before the head, status is what
   * to answer (502, 503 or 504) with reason and detail (static text), and
   * retry says the upstream never processed the request (a stale pooled
   * connection that failed before answering, REFUSED_STREAM, a stream past
   * a GOAWAY): a request without body may be sent again. After the head,
   * status is 0: the response was cut. */
  void (*on_fail)(void *user, int status, pc_reason_t reason, const char *detail, int retry);
  /* n request body bytes left the sidecar (or its upstream queue has room
   * for them): the client may send as many more. */
  void (*on_sent)(void *user, size_t n);
  /* A tunnel request was accepted (101 to an Upgrade, 2xx to CONNECT).
   * head: the response head as HTTP/1.1 bytes to give the client; rest:
   * bytes that followed it. The caller now owns up (pool.h: splice it, and
   * give it back with pc_pool_release(up, PC_POOL_ABORT or _CLOSE)); the
   * call is finished and must still be released. May be NULL for callers
   * that never send a tunnel request. */
  void (*on_tunnel)(void *user, int status, struct pc_upconn *up, const char *head, size_t head_len,
                    const char *rest, size_t rest_len);
} pc_upcall_cbs_t;

/* Non-zero if a request under generation g's listener lc goes onwards as
 * HTTP/2 (see above); prefer_h2 as in pc_upreq_t. Callers refuse a tunnel
 * request where it does. */
int pc_upcall_uses_h2(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc, int prefer_h2);

/* Starts req under generation g's listener lc. stats counts connects and
 * reuses and must outlive the call; cbs too. Never NULL. */
pc_upcall_t *pc_upcall_start(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                             pc_metrics_t *stats, const pc_upreq_t *req, const pc_upcall_cbs_t *cbs,
                             void *user);

/* Request body bytes (copied or queued; on_sent tells when they left) and
 * its end. */
void pc_upcall_send(pc_upcall_t *c, const char *data, size_t len);
void pc_upcall_end(pc_upcall_t *c);

/* n response bytes were passed on: the upstream may send as many more. */
void pc_upcall_consumed(pc_upcall_t *c, size_t n);

/* The caller is done with c (whatever state it is in): a request still in
 * flight is abandoned (HTTP/2: its stream reset; HTTP/1.1: its connection
 * closed with RST unless the exchange ended cleanly). No callback fires
 * afterwards. */
void pc_upcall_release(pc_upcall_t *c);

/* For the access log: the upstream's SPIFFE ID (outbound; NULL inbound or
 * before connecting), its TLS version and cipher (NULL for plaintext).
 * Valid until release. */
const char *pc_upcall_peer_id(const pc_upcall_t *c);
const char *pc_upcall_tls_version(const pc_upcall_t *c);
const char *pc_upcall_cipher(const pc_upcall_t *c);
/* The endpoint ("ip:port") the request went to last; NULL if none. */
const char *pc_upcall_endpoint(const pc_upcall_t *c);

#endif

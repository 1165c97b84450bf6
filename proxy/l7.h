/*
 * l7.h - HTTP/1.1 proxying for one client connection (protocol = "http"):
 * the HTTP/1 client codec, each request an exchange carried onwards by
 * upcall.h (HTTP/1.1 over the pool, or HTTP/2 where the listener says so).
 *
 * Inbound: peer --mTLS--> [down] portcullis --pooled plaintext--> app.
 * Outbound: app --plain--> [down] portcullis --pooled mTLS--> upstream.
 *
 * Requests are parsed strictly (h1.h) and handled one at a time: a pipelined
 * request waits, unread, until the previous response is complete, so answers
 * go out in order and a request is never parsed against a stale state. For
 * each request the current generation's listener decides (a reload applies
 * to the next request on a keep-alive connection): inbound, the peer's
 * identity against the allow entries' methods and paths (403 otherwise);
 * then the head goes onwards without hop-by-hop fields, inbound with the
 * peer's identity in x-forwarded-client-cert (any copy from the peer
 * dropped). Bodies stream both ways under the stream watermarks; chunked
 * bodies are re-chunked; request trailers are dropped, response trailers
 * (an HTTP/2 upstream's) go into the last chunk; interim answers are
 * relayed to HTTP/1.1 clients. A 101 to an Upgrade request, or a 2xx to
 * CONNECT, turns the connection into an L4 splice.
 *
 * Every answered request writes one access-log line and counts in the
 * listener's request metrics; errors the sidecar answers itself carry a JSON
 * body naming the reason (400/431/408 for bad or slow requests, 403 for the
 * allow list, 502/503/504 for the upstream).
 *
 * The connection (conn.c) owns the pc_l7_t and routes its client stream's
 * callbacks to pc_l7_on_*; l7 asks for the connection's end through on_done
 * exactly once. Loop thread only.
 */
#ifndef PC_L7_H
#define PC_L7_H

#include <stdint.h>

#include "gen.h"
#include "listener.h"
#include "stream.h"
#include "worker.h"

struct pc_endpoint;

typedef struct pc_l7 pc_l7_t;

/* What the connection lends to its HTTP handler; everything must outlive it. */
typedef struct {
  pc_worker_t *w;
  pc_listener_t *l;            /* counters */
  pc_gen_t *gen;               /* the connection's generation */
  const pc_listener_cfg_t *lc; /* its listener config in that generation */
  const char *peer_addr;       /* access log "peer" */
  const char *app_addr;        /* access log "app" */
  const char *peer_id;         /* inbound: the verified peer's SPIFFE ID */
  const char *tls_version;     /* inbound: the client side's TLS */
  const char *cipher;          /* inbound */
  uint64_t *last_active;       /* loop time of the last byte either way */
  struct pc_endpoint *pin;     /* transparent: every request goes there; NULL: picked */
} pc_l7_env_t;

/* Creates the handler for down (established: TLS done inbound, accepted
 * outbound) and starts reading requests. on_done(arg, how, reset) asks the
 * connection to end ("eof", "reset", "timeout", ...); it fires once, never
 * from inside pc_l7_start. Returns the handler, owned by the connection. */
pc_l7_t *pc_l7_start(pc_stream_t *down, const pc_l7_env_t *env,
                     void (*on_done)(void *arg, const char *how, int reset), void *arg);

/* Non-zero if the client's input so far ends at a message boundary: no
 * request head begun, or the request in flight read whole. A TLS client
 * that ends there without close_notify truncated nothing (conn.c). */
int pc_l7_at_boundary(const pc_l7_t *x);

/* Graceful end (SIGTERM drain): a connection between requests (no byte of
 * a next head read or kept) closes now, gently (close_notify, FIN, then the
 * usual linger); one with a request in flight closes after its answer,
 * which says "connection: close" if its head has not gone out yet. A head
 * begun is read and answered the same way. Worker thread; may end the
 * connection (on_done) before it returns. */
void pc_l7_drain(pc_l7_t *x);

void pc_l7_on_data(pc_l7_t *x, const char *buf, size_t len);
void pc_l7_on_eof(pc_l7_t *x);
void pc_l7_on_error(pc_l7_t *x, int err);
void pc_l7_on_drain(pc_l7_t *x);
void pc_l7_on_shutdown(pc_l7_t *x, int status);

/* The connection is ending: closes the upstream connection in use and the
 * handler's timer (close_cb fires for it, with the handle's data set to
 * data). Returns the number of handles closed (for the connection's count).
 * No callback into the connection fires afterwards. */
int pc_l7_close(pc_l7_t *x, uv_close_cb close_cb, void *data);

/* The generation that decides a request arriving now on env's connection:
 * the worker's current one, under the same listener name, if that listener
 * is still an HTTP listener of the same direction; else the connection's
 * own. *lc gets that generation's listener config. Returns the generation
 * with a reference taken (the caller unrefs it). */
pc_gen_t *pc_l7_decider(const pc_l7_env_t *env, const pc_listener_cfg_t **lc);

/* Inbound: the line "x-forwarded-client-cert: By=<us>;Hash=<sha256 of the
 * peer's leaf>;URI=<peer>\r\n" for requests from down's verified peer
 * (malloc'd), or NULL if there is no peer. */
char *pc_l7_make_xfcc(pc_stream_t *down, const pc_l7_env_t *env);

/* Frees the handler; call once every handle pc_l7_close closed is closed. */
void pc_l7_free(pc_l7_t *x);

#endif

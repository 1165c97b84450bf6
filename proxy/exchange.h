/*
 * exchange.h - one HTTP request and its answer, whichever codec carried it
 * in: the part of HTTP mode that does not depend on HTTP/1 or HTTP/2.
 *
 * A client codec (l7.c for HTTP/1 connections, h2.c for each HTTP/2 stream)
 * parses a request head, then hands the exchange its method and path:
 * pc_exchange_begin picks the generation that decides it (pc_l7_decider)
 * and, inbound, checks the peer's identity against the allow entries'
 * methods and paths. The codec then sends the request onwards through
 * e->call (upcall.h), relays the answer in its own framing, and ends the
 * exchange with one access-log line and the listener's request metrics
 * (pc_exchange_log), which say the same things for both codecs.
 *
 * What stays in the codecs is what the wire dictates: parsing and framing,
 * the sidecar's own error answers (HTTP/1 JSON, HTTP/2 JSON or a gRPC
 * trailers-only response), and how deadlines are timed (one timer per
 * HTTP/1 connection, one per HTTP/2 connection for all its streams).
 * Loop thread only.
 */
#ifndef PC_EXCHANGE_H
#define PC_EXCHANGE_H

#include <stddef.h>
#include <stdint.h>

#include "l7.h"
#include "upcall.h"

typedef struct {
  /* the request */
  char *method, *path; /* NUL-terminated copies; path without its query */
  size_t method_len, path_len;
  pc_gen_t *gen;               /* the deciding generation (a reference) */
  const pc_listener_cfg_t *lc; /* its listener */
  /* onwards */
  pc_upcall_t *call;
  char *up_peer;                  /* outbound: the upstream's SPIFFE ID */
  const char *up_tls, *up_cipher; /* outbound: its TLS (static strings) */
  char endpoint[56];              /* "ip:port" the request went to last; "" if none */
  int up_resumed;                 /* outbound: its handshake resumed a session */
  int retries;
  /* the answer, as the log line will say it */
  int status;
  int grpc_status; /* -1: none */
  pc_decision_t decision;
  pc_reason_t reason;
  uint64_t t_start, t_sent; /* uv_hrtime: head began / request went onwards */
  double upstream_ms;       /* request sent -> response head; < 0: not involved */
  uint64_t req_bytes, res_bytes;
  unsigned logged : 1, begun : 1;
} pc_exchange_t;

/* Clears e for a new request (the codec sets t_start when its first byte
 * arrives). */
void pc_exchange_init(pc_exchange_t *e);

/* Names a request that is refused before it is decided (a malformed head):
 * copies method and path (either may be NULL) for the log line. */
void pc_exchange_name(pc_exchange_t *e, const char *method, size_t method_len, const char *path,
                      size_t path_len);

/* The head is complete: copies method and path (path_len: up to the query),
 * takes the deciding generation and listener, and checks the allow
 * entries (inbound). Returns PC_REASON_NONE, or PC_REASON_NOT_ALLOWED with
 * the 403's detail written to detail. */
pc_reason_t pc_exchange_begin(pc_exchange_t *e, const pc_l7_env_t *env, const char *method,
                              size_t method_len, const char *path, size_t path_len, char *detail,
                              size_t detail_len);

/* Starts req onwards under the deciding generation (e->call). */
void pc_exchange_send(pc_exchange_t *e, const pc_l7_env_t *env, const pc_upreq_t *req,
                      const pc_upcall_cbs_t *cbs, void *user);

/* Releases e->call (keeping what the log needs of its upstream first). */
void pc_exchange_release_call(pc_exchange_t *e);

/* The decision for a call that failed with reason r: an identity refused is
 * "deny", anything else on the way to the upstream "error". */
pc_decision_t pc_exchange_fail_decision(pc_reason_t r);

/* Writes the exchange's access-log line and counts it in the listener's
 * metrics, once (later calls do nothing). protocol: PC_HTTP_10, _11, _2
 * (an HTTP/1 exchange without a request line logs no protocol). */
void pc_exchange_log(pc_exchange_t *e, const pc_l7_env_t *env, int protocol);

/* Forgets the request (releases the call and the generation, frees the
 * copies); e is ready for pc_exchange_init. */
void pc_exchange_end(pc_exchange_t *e);

#endif

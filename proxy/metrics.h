/*
 * metrics.h - per-worker, per-listener counters.
 *
 * Each worker owns the counters of its listeners and is the only writer, so
 * the data path needs no lock and no locked read-modify-write. A reader on
 * another thread (the admin scrape, main thread) sums the workers' copies with
 * relaxed loads and accepts that a sum may be a moment old. Writers therefore
 * go through PC_STAT_*: a relaxed atomic load and store, which compiles to
 * the plain load/add/store of a `++` (no lock prefix) but keeps a counter
 * from being torn and the program free of data races (a plain write against
 * the scrape's atomic read is one; ThreadSanitizer reports it).
 */
#ifndef PC_METRICS_H
#define PC_METRICS_H

#include <stdint.h>

#include "reason.h"

typedef enum {
  PC_DECISION_ALLOW,
  PC_DECISION_DENY,
  PC_DECISION_ERROR,
  PC_DECISION_COUNT
} pc_decision_t;

/* Upper bounds (seconds) of the duration histograms' buckets; +Inf is
 * implied. Handshakes: 0.5 ms .. 5 s; HTTP requests add 10 s and 30 s (the
 * default response timeout). */
#define PC_HIST_MAX 15
typedef struct {
  const double *bounds;
  int n;
} pc_hist_bounds_t;
extern const pc_hist_bounds_t pc_hs_bounds, pc_request_bounds;

typedef struct {
  uint64_t buckets[PC_HIST_MAX + 1]; /* non-cumulative; [n] = +Inf */
  uint64_t count;
  double sum;
} pc_hist_t;

/* requests_by_proto index: HTTP/1.0, HTTP/1.1, HTTP/2. */
#define PC_HTTP_PROTOS 3
enum { PC_HTTP_10, PC_HTTP_11, PC_HTTP_2 };
/* Why the sidecar sent a GOAWAY: a client over a limit (flood, abuse), a
 * drain (SIGTERM), a protocol error, or a revoked peer. */
typedef enum {
  PC_H2_GOAWAY_LIMIT,
  PC_H2_GOAWAY_DRAIN,
  PC_H2_GOAWAY_PROTOCOL,
  PC_H2_GOAWAY_REVOKED,
  PC_H2_GOAWAY_REASONS
} pc_h2_goaway_t;
/* RFC 9113 error codes 0 (NO_ERROR) .. 13 (HTTP_1_1_REQUIRED); others count
 * as INTERNAL_ERROR. */
#define PC_H2_ERROR_CODES 14

/* HTTP status classes 1xx..5xx are indexed 1..5; 0 is unused. */
#define PC_HTTP_CLASSES 6

typedef struct {
  uint64_t conns[PC_DECISION_COUNT][PC_REASON_COUNT]; /* closed or refused connections */
  pc_hist_t handshake;                                /* successful handshakes */
  uint64_t tls_resumed; /* of those, resumed ones that passed the re-judgement */
  uint64_t bytes_from_peer, bytes_to_peer;
  /* HTTP mode: answered requests by status class, decision and reason */
  uint64_t requests[PC_HTTP_CLASSES][PC_DECISION_COUNT][PC_REASON_COUNT];
  pc_hist_t request; /* request durations */
  uint64_t upstream_connects, upstream_reuses;
  uint64_t upstream_expired; /* pooled upstream connections closed: certificate expired */
  uint64_t connect_failures; /* forward / upstream could not be reached */
  uint64_t tls_truncations;  /* TLS peer or upstream sent FIN without close_notify */
  uint64_t accept_errors;    /* accept(2) failed, e.g. out of descriptors */
  uint64_t accept_pauses;    /* times accepting paused at max_connections */
  int64_t active;
  int64_t pending_handshakes; /* inbound: accepted, TLS handshake not finished */
  int64_t throttle_sources;   /* inbound: sources in the throttle table (throttle.h) */
  /* HTTP mode by protocol: answered requests (streams for HTTP/2) */
  uint64_t requests_by_proto[PC_HTTP_PROTOS];
  int64_t h2_streams;                        /* open HTTP/2 streams */
  uint64_t h2_goaways[PC_H2_GOAWAY_REASONS]; /* GOAWAYs sent, by pc_h2_goaway_t */
  uint64_t h2_resets[2][PC_H2_ERROR_CODES];  /* RST_STREAM [0] sent, [1] received */
} pc_metrics_t;

/* Updates a counter of pc_metrics_t; owning worker thread only (one writer,
 * so load-then-store loses nothing). x is evaluated twice: no side effects. */
#define PC_STAT_ADD(x, n)                                                                          \
  __atomic_store_n(&(x), __atomic_load_n(&(x), __ATOMIC_RELAXED) + (n), __ATOMIC_RELAXED)
#define PC_STAT_INC(x) PC_STAT_ADD(x, 1)
#define PC_STAT_DEC(x) PC_STAT_ADD(x, -1)
#define PC_STAT_SET(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/* Words for the label values of the HTTP/2 counters. */
const char *pc_http_proto_word(int proto);
const char *pc_h2_goaway_word(int reason);
const char *pc_h2_error_word(uint32_t code);

/* The word for a decision: "allow", "deny", "error". */
const char *pc_decision_word(pc_decision_t d);

/* Adds src into dst (relaxed reads of a live worker's counters). */
void pc_metrics_add(pc_metrics_t *dst, const pc_metrics_t *src);

/* Records one observation of seconds. Owning worker only. */
void pc_hist_observe(pc_hist_t *h, const pc_hist_bounds_t *b, double seconds);

/* Appends the Prometheus text exposition of every metric to out. Main thread
 * (reads the workers' counters; see worker.h pc_workers_collect). */

#endif

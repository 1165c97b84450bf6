/*
 * metrics.h - per-worker, per-listener counters.
 *
 * Each worker owns the counters of its listeners and is the only writer, so
 * the data path uses plain increments: no locks, no atomics. A reader on
 * another thread (the admin scrape) sums the workers' copies with relaxed
 * loads and accepts that a sum may be a moment old.
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

/* Upper bounds (seconds) of the handshake-duration histogram buckets; +Inf
 * is implied. */
#define PC_HS_BUCKETS 13
extern const double pc_hs_bucket_bounds[PC_HS_BUCKETS];

typedef struct {
  uint64_t conns[PC_DECISION_COUNT][PC_REASON_COUNT]; /* closed or refused connections */
  uint64_t hs_buckets[PC_HS_BUCKETS + 1];             /* non-cumulative; last = +Inf */
  uint64_t hs_count;
  double hs_sum;
  uint64_t bytes_from_peer, bytes_to_peer;
  uint64_t connect_failures; /* forward / upstream could not be reached */
  uint64_t accept_errors;    /* accept(2) failed, e.g. out of descriptors */
  uint64_t accept_pauses;    /* times accepting paused at max_connections */
  int64_t active;
} pc_metrics_t;

/* The word for a decision: "allow", "deny", "error". */
const char *pc_decision_word(pc_decision_t d);

/* Adds src into dst (relaxed reads of a live worker's counters). */
void pc_metrics_add(pc_metrics_t *dst, const pc_metrics_t *src);

/* Records one successful handshake that took seconds. Owning worker only. */
void pc_metrics_handshake(pc_metrics_t *m, double seconds);

/* Appends the Prometheus text exposition of every metric to out. Main thread
 * (reads the workers' counters; see worker.h pc_workers_collect). */

#endif

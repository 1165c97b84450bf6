#include "metrics.h"

/* Loopback handshakes take well under a millisecond; 5 s covers the default
 * handshake timeout's neighbourhood. */
const double pc_hs_bucket_bounds[PC_HS_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                   0.1,    0.25,  0.5,    1,     2.5,  5};

void pc_metrics_handshake(pc_metrics_t *m, double seconds) {
  int i = 0;
  while (i < PC_HS_BUCKETS && seconds > pc_hs_bucket_bounds[i])
    i++;
  m->hs_buckets[i]++;
  m->hs_count++;
  m->hs_sum += seconds;
}

const char *pc_decision_word(pc_decision_t d) {
  static const char *const words[] = {"allow", "deny", "error"};
  return (unsigned)d < PC_DECISION_COUNT ? words[d] : "error";
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

void pc_metrics_add(pc_metrics_t *dst, const pc_metrics_t *src) {
  for (int d = 0; d < PC_DECISION_COUNT; d++)
    for (int r = 0; r < PC_REASON_COUNT; r++)
      dst->conns[d][r] += LOAD(src->conns[d][r]);
  dst->bytes_from_peer += LOAD(src->bytes_from_peer);
  dst->bytes_to_peer += LOAD(src->bytes_to_peer);
  dst->connect_failures += LOAD(src->connect_failures);
  dst->accept_errors += LOAD(src->accept_errors);
  dst->accept_pauses += LOAD(src->accept_pauses);
  dst->active += LOAD(src->active);
  for (int i = 0; i <= PC_HS_BUCKETS; i++)
    dst->hs_buckets[i] += LOAD(src->hs_buckets[i]);
  dst->hs_count += LOAD(src->hs_count);
  double sum;
  __atomic_load(&src->hs_sum, &sum, __ATOMIC_RELAXED);
  dst->hs_sum += sum;
}

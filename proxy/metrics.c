#include "metrics.h"

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
}

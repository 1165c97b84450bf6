#include "hist.h"

#include <string.h>

#define SUB (1u << HIST_SUB_BITS)
#define HALF (SUB >> 1)

void hist_init(hist_t *h) {
  memset(h, 0, sizeof(*h));
  h->min = UINT64_MAX;
}

/* Values below SUB map to themselves; above, the exponent e drops e low bits
 * and the remaining top HIST_SUB_BITS bits pick one of HALF sub-buckets. */
static unsigned bucket_of(uint64_t v) {
  if (v < SUB) return (unsigned)v;
  unsigned msb = 63u - (unsigned)__builtin_clzll(v);
  unsigned e = msb - HIST_SUB_BITS + 1;
  return (e << (HIST_SUB_BITS - 1)) + (unsigned)(v >> e);
}

static uint64_t highest_of(unsigned idx) {
  if (idx < SUB) return idx;
  unsigned e = idx / HALF - 1;
  uint64_t m = idx - (uint64_t)e * HALF;
  return ((m + 1) << e) - 1;
}

void hist_add(hist_t *h, uint64_t v) {
  if (v >> HIST_MAX_BITS) v = (UINT64_C(1) << HIST_MAX_BITS) - 1;
  h->b[bucket_of(v)]++;
  h->count++;
  h->sum += (double)v;
  if (v < h->min) h->min = v;
  if (v > h->max) h->max = v;
}

void hist_merge(hist_t *dst, const hist_t *src) {
  for (unsigned i = 0; i < HIST_BUCKETS; i++)
    dst->b[i] += src->b[i];
  dst->count += src->count;
  dst->sum += src->sum;
  if (src->min < dst->min) dst->min = src->min;
  if (src->max > dst->max) dst->max = src->max;
}

uint64_t hist_percentile(const hist_t *h, double p) {
  if (h->count == 0) return 0;
  uint64_t rank = (uint64_t)(p / 100.0 * (double)h->count + 0.5);
  if (rank < 1) rank = 1;
  if (rank > h->count) rank = h->count;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) {
    seen += h->b[i];
    if (seen >= rank) {
      uint64_t v = highest_of(i);
      return v > h->max ? h->max : v;
    }
  }
  return h->max;
}

double hist_mean(const hist_t *h) { return h->count ? h->sum / (double)h->count : 0.0; }

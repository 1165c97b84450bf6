/*
 * hist.h - a latency histogram in the style of HdrHistogram: log-linear
 * buckets (256 linear sub-buckets per power of two), so every recorded value
 * keeps better than 0.8 % relative precision from 1 unit up to 2^47 units.
 * The load generator records microseconds. Not thread-safe: one per thread,
 * merged at the end.
 */
#ifndef PC_BENCH_HIST_H
#define PC_BENCH_HIST_H

#include <stdint.h>

#define HIST_SUB_BITS 8
#define HIST_MAX_BITS 47
#define HIST_BUCKETS ((HIST_MAX_BITS - HIST_SUB_BITS + 3) << (HIST_SUB_BITS - 1))

typedef struct {
  uint64_t count, min, max;
  double sum;
  uint64_t b[HIST_BUCKETS];
} hist_t;

void hist_init(hist_t *h);
/* Values above 2^47 - 1 are clamped. */
void hist_add(hist_t *h, uint64_t v);
void hist_merge(hist_t *dst, const hist_t *src);
/* The highest value equivalent (same bucket) to the one at percentile p
 * (0 < p <= 100), as HdrHistogram reports it; 0 when empty. */
uint64_t hist_percentile(const hist_t *h, double p);
double hist_mean(const hist_t *h);

#endif

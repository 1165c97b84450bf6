#include "metrics.h"

/* Loopback handshakes and requests take well under a millisecond; 5 s
 * covers the default handshake timeout's neighbourhood, 30 s the default
 * response timeout. */
static const double bounds[PC_HIST_MAX] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                           0.25,   0.5,   1,      2.5,   5,    10,    30};
const pc_hist_bounds_t pc_hs_bounds = {bounds, 13}, pc_request_bounds = {bounds, 15};

void pc_hist_observe(pc_hist_t *h, const pc_hist_bounds_t *b, double seconds) {
  int i = 0;
  while (i < b->n && seconds > b->bounds[i])
    i++;
  PC_STAT_INC(h->buckets[i]);
  PC_STAT_INC(h->count);
  double sum;
  __atomic_load(&h->sum, &sum, __ATOMIC_RELAXED);
  sum += seconds;
  __atomic_store(&h->sum, &sum, __ATOMIC_RELAXED);
}

const char *pc_decision_word(pc_decision_t d) {
  static const char *const words[] = {"allow", "deny", "error"};
  return (unsigned)d < PC_DECISION_COUNT ? words[d] : "error";
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

static void hist_add(pc_hist_t *dst, const pc_hist_t *src) {
  for (int i = 0; i <= PC_HIST_MAX; i++)
    dst->buckets[i] += LOAD(src->buckets[i]);
  dst->count += LOAD(src->count);
  double sum;
  __atomic_load(&src->sum, &sum, __ATOMIC_RELAXED);
  dst->sum += sum;
}

void pc_metrics_add(pc_metrics_t *dst, const pc_metrics_t *src) {
  for (int d = 0; d < PC_DECISION_COUNT; d++)
    for (int r = 0; r < PC_REASON_COUNT; r++)
      dst->conns[d][r] += LOAD(src->conns[d][r]);
  dst->bytes_from_peer += LOAD(src->bytes_from_peer);
  dst->bytes_to_peer += LOAD(src->bytes_to_peer);
  dst->connect_failures += LOAD(src->connect_failures);
  dst->tls_truncations += LOAD(src->tls_truncations);
  dst->tls_resumed += LOAD(src->tls_resumed);
  dst->accept_errors += LOAD(src->accept_errors);
  dst->accept_pauses += LOAD(src->accept_pauses);
  dst->active += LOAD(src->active);
  dst->pending_handshakes += LOAD(src->pending_handshakes);
  dst->throttle_sources += LOAD(src->throttle_sources);
  hist_add(&dst->handshake, &src->handshake);
  hist_add(&dst->request, &src->request);
  for (int k = 0; k < PC_HTTP_CLASSES; k++)
    for (int d = 0; d < PC_DECISION_COUNT; d++)
      for (int r = 0; r < PC_REASON_COUNT; r++)
        dst->requests[k][d][r] += LOAD(src->requests[k][d][r]);
  dst->upstream_connects += LOAD(src->upstream_connects);
  dst->upstream_reuses += LOAD(src->upstream_reuses);
  dst->upstream_expired += LOAD(src->upstream_expired);
  for (int k = 0; k < PC_HTTP_PROTOS; k++)
    dst->requests_by_proto[k] += LOAD(src->requests_by_proto[k]);
  dst->h2_streams += LOAD(src->h2_streams);
  for (int k = 0; k < PC_H2_GOAWAY_REASONS; k++)
    dst->h2_goaways[k] += LOAD(src->h2_goaways[k]);
  for (int s = 0; s < 2; s++)
    for (int k = 0; k < PC_H2_ERROR_CODES; k++)
      dst->h2_resets[s][k] += LOAD(src->h2_resets[s][k]);
}

const char *pc_http_proto_word(int proto) {
  static const char *const words[] = {"HTTP/1.0", "HTTP/1.1", "HTTP/2"};
  return proto >= 0 && proto < PC_HTTP_PROTOS ? words[proto] : "HTTP/1.1";
}

const char *pc_h2_goaway_word(int reason) {
  static const char *const words[] = {"limit", "drain", "protocol", "revoked"};
  return reason >= 0 && reason < PC_H2_GOAWAY_REASONS ? words[reason] : "protocol";
}

const char *pc_h2_error_word(uint32_t code) {
  static const char *const words[] = {"NO_ERROR",
                                      "PROTOCOL_ERROR",
                                      "INTERNAL_ERROR",
                                      "FLOW_CONTROL_ERROR",
                                      "SETTINGS_TIMEOUT",
                                      "STREAM_CLOSED",
                                      "FRAME_SIZE_ERROR",
                                      "REFUSED_STREAM",
                                      "CANCEL",
                                      "COMPRESSION_ERROR",
                                      "CONNECT_ERROR",
                                      "ENHANCE_YOUR_CALM",
                                      "INADEQUATE_SECURITY",
                                      "HTTP_1_1_REQUIRED"};
  return code < PC_H2_ERROR_CODES ? words[code] : "INTERNAL_ERROR";
}

#include "exchange.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "log.h"
#include "policy.h"

void pc_exchange_init(pc_exchange_t *e) {
  memset(e, 0, sizeof(*e));
  e->grpc_status = -1;
  e->upstream_ms = -1;
  e->decision = PC_DECISION_ALLOW;
}

static char *copy_span(const char *s, size_t n) {
  char *c = pc_malloc(n + 1);
  if (n) memcpy(c, s, n);
  c[n] = '\0';
  return c;
}

void pc_exchange_name(pc_exchange_t *e, const char *method, size_t method_len, const char *path,
                      size_t path_len) {
  free(e->method);
  free(e->path);
  e->method = method ? copy_span(method, method_len) : NULL;
  e->method_len = method ? method_len : 0;
  e->path = path ? copy_span(path, path_len) : NULL;
  e->path_len = path ? path_len : 0;
}

pc_reason_t pc_exchange_begin(pc_exchange_t *e, const pc_l7_env_t *env, const char *method,
                              size_t method_len, const char *path, size_t path_len, char *detail,
                              size_t detail_len) {
  e->begun = 1;
  if (!e->t_start) e->t_start = uv_hrtime();
  pc_exchange_name(e, method, method_len, path, path_len);
  e->gen = pc_l7_decider(env, &e->lc);
  if (env->lc->direction == PC_DIR_INBOUND &&
      pc_policy_check_request(e->lc->policy, env->peer_id, e->method, method_len, e->path,
                              path_len) != PC_REASON_NONE) {
    snprintf(detail, detail_len, "%.16s %.96s is not allowed for this peer", e->method, e->path);
    return PC_REASON_NOT_ALLOWED;
  }
  return PC_REASON_NONE;
}

void pc_exchange_send(pc_exchange_t *e, const pc_l7_env_t *env, const pc_upreq_t *req,
                      const pc_upcall_cbs_t *cbs, void *user) {
  e->t_sent = uv_hrtime();
  pc_upreq_t r = *req;
  r.pin = env->pin;
  e->call = pc_upcall_start(env->w, e->gen, e->lc, &env->l->stats, &r, cbs, user);
}

static void keep_peer(pc_exchange_t *e) {
  if (!e->call) return;
  const char *ep = pc_upcall_endpoint(e->call);
  if (ep) snprintf(e->endpoint, sizeof(e->endpoint), "%s", ep);
  if (e->up_peer) return;
  const char *id = pc_upcall_peer_id(e->call);
  if (id) e->up_peer = pc_strdup(id);
  e->up_tls = pc_upcall_tls_version(e->call);
  e->up_cipher = pc_upcall_cipher(e->call);
}

void pc_exchange_release_call(pc_exchange_t *e) {
  if (!e->call) return;
  keep_peer(e);
  pc_upcall_t *k = e->call;
  e->call = NULL;
  pc_upcall_release(k);
}

pc_decision_t pc_exchange_fail_decision(pc_reason_t r) {
  return pc_reason_is_identity(r) ? PC_DECISION_DENY : PC_DECISION_ERROR;
}

static const char *const proto_words[PC_HTTP_PROTOS] = {"HTTP/1.0", "HTTP/1.1", "HTTP/2"};

void pc_exchange_log(pc_exchange_t *e, const pc_l7_env_t *env, int protocol) {
  if (e->logged) return;
  e->logged = 1;
  keep_peer(e);
  uint64_t now = uv_hrtime();
  if (!e->t_start) e->t_start = now;
  double secs = (double)(now - e->t_start) / 1e9;
  int k = e->status / 100;
  if (k < 1 || k >= PC_HTTP_CLASSES) k = 5;
  pc_metrics_t *m = &env->l->stats;
  m->requests[k][e->decision][e->reason]++;
  m->requests_by_proto[protocol]++;
  pc_hist_observe(&m->request, &pc_request_bounds, secs);
  int inbound = env->lc->direction == PC_DIR_INBOUND;
  pc_request_rec_t rec = {
      .listener = env->lc->name,
      .direction = inbound ? "inbound" : "outbound",
      .peer = env->peer_addr,
      .app = env->app_addr,
      .peer_id = inbound ? env->peer_id : e->up_peer,
      .method = e->method,
      .method_len = e->method_len,
      .path = e->path,
      .path_len = e->path_len,
      .protocol = e->method || protocol == PC_HTTP_2 ? proto_words[protocol] : NULL,
      .status = e->status,
      .grpc_status = e->grpc_status,
      .decision = pc_decision_word(e->decision),
      .reason = e->reason,
      .request_bytes = e->req_bytes,
      .response_bytes = e->res_bytes,
      .duration_ms = secs * 1e3,
      .upstream_ms = e->upstream_ms,
      .tls_version = inbound ? env->tls_version : e->up_tls,
      .cipher = inbound ? env->cipher : e->up_cipher,
      .endpoint = e->endpoint[0] ? e->endpoint : NULL,
  };
  pc_log_request(&rec);
}

void pc_exchange_end(pc_exchange_t *e) {
  pc_exchange_release_call(e);
  if (e->gen) pc_gen_unref(e->gen);
  free(e->method);
  free(e->path);
  free(e->up_peer);
  pc_exchange_init(e);
}

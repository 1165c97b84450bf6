#include "admin.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/digest.h>
#include <openssl/x509.h>

#include "adminreq.h"
#include "certstore.h"
#include "compat.h"
#include "conn.h"
#include "endpoint.h"
#include "gen.h"
#include "identity.h"
#include "log.h"
#include "reload.h"
#include "worker.h"

#define REQUEST_TIMEOUT_MS 5000
#define ADMIN_SNDBUF (64 * 1024) /* SO_SNDBUF per admin connection (Linux doubles it) */

typedef struct admin_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_write_t write_req;
  uv_shutdown_t shutdown_req;
  pc_adminreq_t req;
  int answered, handles;
  pc_jbuf_t out;
  struct admin_conn *prev, *next;
} admin_conn_t;

static uv_tcp_t server;
static admin_conn_t *conns; /* open admin connections, closed by pc_admin_stop */
static int server_open;
static int draining;
static uint32_t nconns;         /* open, counted against admin.max_connections */
static int at_cap;              /* refusing; logged once per episode */
static uint64_t refused_limit;  /* closed at once at admin.max_connections */
static uint64_t closed_timeout; /* response not taken within admin.write_timeout_ms */
static uint32_t max_conns = 64;
static uint64_t write_timeout_ms = 10000;

void pc_admin_set_draining(void) { draining = 1; }

/* ---- responses ---------------------------------------------------------- */

static void on_conn_closed(uv_handle_t *h) {
  admin_conn_t *a = h->data;
  if (--a->handles > 0) return;
  if (a->prev)
    a->prev->next = a->next;
  else
    conns = a->next;
  if (a->next) a->next->prev = a->prev;
  pc_jbuf_free(&a->out);
  free(a);
  nconns--;
}

/* reset: a client that stopped reading; RST drops what the kernel still
 * holds for it too. */
static void close_conn(admin_conn_t *a, int reset) {
  uv_timer_stop(&a->timer);
  if (!uv_is_closing((uv_handle_t *)&a->timer)) uv_close((uv_handle_t *)&a->timer, on_conn_closed);
  if (uv_is_closing((uv_handle_t *)&a->tcp)) return;
  if (!reset || uv_tcp_close_reset(&a->tcp, on_conn_closed) != 0)
    uv_close((uv_handle_t *)&a->tcp, on_conn_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) { close_conn(req->data, 0); }

static void on_written(uv_write_t *req, int status) {
  admin_conn_t *a = req->data;
  a->shutdown_req.data = a;
  if (status < 0 || uv_is_closing((uv_handle_t *)&a->tcp) ||
      uv_shutdown(&a->shutdown_req, (uv_stream_t *)&a->tcp, on_shutdown) != 0)
    close_conn(a, 0);
}

static void on_write_timeout(uv_timer_t *t) {
  admin_conn_t *a = t->data;
  closed_timeout++;
  pc_log(PC_LOG_WARN,
         "admin: closing a connection whose client did not read its response within "
         "admin.write_timeout_ms=%llu (timeout)",
         (unsigned long long)write_timeout_ms);
  close_conn(a, 1);
}

static void respond(admin_conn_t *a, int status, const char *reason, const char *ctype,
                    const char *extra_headers, const char *body, size_t body_len, int head_only) {
  if (a->answered) return;
  a->answered = 1;
  uv_read_stop((uv_stream_t *)&a->tcp);
  pc_jbuf_t hdr = {0};
  pc_jbuf_printf(&hdr,
                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                 "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
                 status, reason, ctype, body_len, extra_headers ? extra_headers : "");
  pc_jbuf_raw(&a->out, hdr.data, hdr.len);
  if (!head_only && body_len) pc_jbuf_raw(&a->out, body, body_len);
  pc_jbuf_free(&hdr);
  uv_buf_t b = uv_buf_init(a->out.data, (unsigned)a->out.len);
  a->write_req.data = a;
  if (uv_write(&a->write_req, (uv_stream_t *)&a->tcp, &b, 1, on_written) != 0) {
    close_conn(a, 0);
    return;
  }
  /* Until the kernel has taken the whole response and the FIN: a client
   * that never reads would otherwise hold it here for ever. */
  uv_timer_start(&a->timer, on_write_timeout, write_timeout_ms, 0);
}

static void respond_text(admin_conn_t *a, int status, const char *reason, const char *body) {
  respond(a, status, reason, "text/plain; charset=utf-8", NULL, body, strlen(body), 0);
}

/* ---- /metrics ----------------------------------------------------------- */

typedef struct {
  char *name;
  pc_direction_t dir;
  int http; /* protocol = "http" */
  pc_metrics_t m;
} series_t;

typedef struct {
  series_t *v;
  size_t n;
} series_set_t;

static void collect_one(const pc_listener_t *l, void *arg) {
  series_set_t *set = arg;
  for (size_t i = 0; i < set->n; i++) {
    if (set->v[i].dir == l->cfg->direction && strcmp(set->v[i].name, l->name) == 0) {
      pc_metrics_add(&set->v[i].m, &l->stats);
      return;
    }
  }
  set->v = pc_realloc(set->v, (set->n + 1) * sizeof(series_t));
  series_t *s = &set->v[set->n++];
  memset(s, 0, sizeof(*s));
  s->name = pc_strdup(l->name);
  s->dir = l->cfg->direction;
  s->http = l->cfg->protocol == PC_PROTO_HTTP;
  pc_metrics_add(&s->m, &l->stats);
}

static const char *dir_word(pc_direction_t d) {
  return d == PC_DIR_INBOUND ? "inbound" : "outbound";
}

static void help(pc_jbuf_t *b, const char *name, const char *type, const char *text) {
  pc_jbuf_printf(b, "# HELP portcullis_%s %s\n# TYPE portcullis_%s %s\n", name, text, name, type);
}

/* Listener names are config strings limited to printable text; escape the
 * characters the exposition format reserves anyway. */
static void label_value(pc_jbuf_t *b, const char *v) {
  for (; *v; v++) {
    if (*v == '\\' || *v == '"')
      pc_jbuf_printf(b, "\\%c", *v);
    else if (*v == '\n')
      pc_jbuf_raw(b, "\\n", 2);
    else
      pc_jbuf_raw(b, v, 1);
  }
}

static void lbl(pc_jbuf_t *b, const series_t *s) {
  pc_jbuf_raw(b, "listener=\"", 10);
  label_value(b, s->name);
  pc_jbuf_printf(b, "\",direction=\"%s\"", dir_word(s->dir));
}

static void histogram(pc_jbuf_t *b, const char *name, const series_t *s, const pc_hist_t *h,
                      const pc_hist_bounds_t *hb) {
  uint64_t cum = 0;
  for (int k = 0; k <= hb->n; k++) {
    cum += h->buckets[k];
    pc_jbuf_printf(b, "portcullis_%s_bucket{", name);
    lbl(b, s);
    if (k < hb->n)
      pc_jbuf_printf(b, ",le=\"%g\"} %llu\n", hb->bounds[k], (unsigned long long)cum);
    else
      pc_jbuf_printf(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
  }
  pc_jbuf_printf(b, "portcullis_%s_sum{", name);
  lbl(b, s);
  pc_jbuf_printf(b, "} %.6f\nportcullis_%s_count{", h->sum, name);
  lbl(b, s);
  pc_jbuf_printf(b, "} %llu\n", (unsigned long long)h->count);
}

/* Endpoint sets and DNS (endpoint.h), per listener of the current
 * generation and per route of a transparent outbound listener (labelled
 * route="<destination>" too). */
typedef struct {
  const pc_listener_cfg_t *lc;
  pc_target_view_t v;
} tgt_row_t;

static void tgt_labels(pc_jbuf_t *b, const char *family, const tgt_row_t *t) {
  pc_jbuf_printf(b, "portcullis_%s{listener=\"", family);
  label_value(b, t->lc->name);
  if (t->lc->parent) {
    pc_jbuf_printf(b, "\",route=\"");
    label_value(b, t->lc->target_str);
  }
  pc_jbuf_raw(b, "\"", 1);
}

static void render_endpoint_metrics(pc_jbuf_t *b, const pc_config_t *cfg) {
  size_t n = 0, cap = cfg->nlisteners;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    cap += cfg->listeners[i].nroutes;
  tgt_row_t *t = pc_calloc(cap + 1, sizeof(*t));
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const pc_listener_cfg_t *l = &cfg->listeners[i];
    t[n].lc = l;
    pc_target_view(l->tgt, &t[n++].v);
    for (size_t k = 0; k < l->nroutes; k++) {
      t[n].lc = &l->routes[k].lc;
      pc_target_view(l->routes[k].lc.tgt, &t[n++].v);
    }
  }
  help(b, "upstream_endpoints", "gauge",
       "Addresses in each listener's (or route's) endpoint set, by state (healthy, ejected).");
  for (size_t i = 0; i < n; i++) {
    size_t ej = 0;
    for (size_t k = 0; k < t[i].v.neps; k++)
      ej += t[i].v.eps[k].ejected != 0;
    for (int st = 0; st < 2; st++) {
      tgt_labels(b, "upstream_endpoints", &t[i]);
      pc_jbuf_printf(b, ",state=\"%s\"} %zu\n", st ? "ejected" : "healthy",
                     st ? ej : t[i].v.neps - ej);
    }
  }
  help(b, "upstream_ejections_total", "counter",
       "Endpoints ejected by passive health (failed connect or handshake, reset before any "
       "response).");
  for (size_t i = 0; i < n; i++) {
    tgt_labels(b, "upstream_ejections_total", &t[i]);
    pc_jbuf_printf(b, "} %llu\n", (unsigned long long)t[i].v.ejections);
  }
  help(b, "dns_resolutions_total", "counter",
       "Lookups of a listener's (or route's) NAME:PORT target by result (ok, nxdomain, "
       "servfail, timeout).");
  for (size_t i = 0; i < n; i++)
    for (int r = 0; r < PC_DNS_RESULTS && t[i].v.is_name; r++) {
      tgt_labels(b, "dns_resolutions_total", &t[i]);
      pc_jbuf_printf(b, ",result=\"%s\"} %llu\n", pc_dns_result_word((pc_dns_result_t)r),
                     (unsigned long long)t[i].v.resolutions[r]);
    }
  help(b, "dns_stale", "gauge",
       "1 while a listener's (or route's) name keeps the endpoints of its last good answer "
       "because later lookups failed.");
  for (size_t i = 0; i < n; i++) {
    if (!t[i].v.is_name) continue;
    tgt_labels(b, "dns_stale", &t[i]);
    pc_jbuf_printf(b, "} %d\n", t[i].v.stale);
  }
  for (size_t i = 0; i < n; i++)
    pc_target_view_free(&t[i].v);
  free(t);
}

static void utc_ms(pc_jbuf_t *b, const char *key, uint64_t ms) {
  if (!ms) {
    pc_jbuf_printf(b, ",\"%s\":null", key);
    return;
  }
  char t[40];
  pc_log_utc((time_t)(ms / 1000u), t, sizeof(t));
  pc_jbuf_kv_str(b, key, t);
}

/* A target's answer and endpoints (l->target_str names it). */
static void target_json(pc_jbuf_t *b, const pc_listener_cfg_t *l) {
  pc_target_view_t v;
  pc_target_view(l->tgt, &v);
  pc_jbuf_kv_str(b, "target", l->target_str);
  pc_jbuf_kv_bool(b, "dns", v.is_name);
  pc_jbuf_kv_str(b, "last_result", pc_dns_result_word(v.last_result));
  pc_jbuf_kv_bool(b, "stale", v.stale);
  utc_ms(b, "resolved_at", v.resolved_at_ms);
  if (v.is_name && v.resolved_at_ms)
    pc_jbuf_kv_u64(b, "ttl_ms", v.ttl_ms);
  else
    pc_jbuf_printf(b, ",\"ttl_ms\":null");
  pc_jbuf_kv_u64(b, "ejections", v.ejections);
  pc_jbuf_printf(b, ",\"endpoints\":[");
  for (size_t k = 0; k < v.neps; k++) {
    const pc_endpoint_view_t *e = &v.eps[k];
    pc_jbuf_raw(b, k ? ",{" : "{", k ? 2 : 1);
    pc_jbuf_kv_str(b, "address", e->address);
    pc_jbuf_kv_str(b, "state", e->ejected ? "ejected" : "healthy");
    utc_ms(b, "ejected_until", e->ejected_until_ms);
    pc_jbuf_kv_u64(b, "in_flight", e->in_flight);
    pc_jbuf_printf(b, "}");
  }
  pc_jbuf_printf(b, "]");
  pc_target_view_free(&v);
}

/* GET /endpoints: every listener's target, its answer and its endpoints. */
static void render_endpoints(pc_jbuf_t *b, const pc_gen_t *g) {
  const pc_config_t *cfg = g->cfg;
  pc_jbuf_printf(b, "{\"listeners\":[");
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const pc_listener_cfg_t *l = &cfg->listeners[i];
    pc_jbuf_raw(b, i ? ",{" : "{", i ? 2 : 1);
    pc_jbuf_kv_str(b, "name", l->name);
    pc_jbuf_kv_str(b, "direction", dir_word(l->direction));
    target_json(b, l);
    if (l->transparent && l->direction == PC_DIR_OUTBOUND) {
      pc_jbuf_printf(b, ",\"routes\":[");
      for (size_t r = 0; r < l->nroutes; r++) {
        pc_jbuf_raw(b, r ? ",{" : "{", r ? 2 : 1);
        target_json(b, &l->routes[r].lc);
        pc_jbuf_printf(b, "}");
      }
      pc_jbuf_printf(b, "]");
    }
    pc_jbuf_printf(b, "}");
  }
  pc_jbuf_printf(b, "]}\n");
}

static void render_metrics(pc_jbuf_t *b) {
  series_set_t set = {0};
  pc_workers_collect(collect_one, &set);
  help(b, "connections_total", "counter",
       "Connections by listener, direction, decision (allow, deny, error) and reason.");
  for (size_t i = 0; i < set.n; i++)
    for (int d = 0; d < PC_DECISION_COUNT; d++)
      for (int r = 0; r < PC_REASON_COUNT; r++) {
        uint64_t v = set.v[i].m.conns[d][r];
        if (!v) continue; /* a series appears the first time it happens */
        pc_jbuf_printf(b, "portcullis_connections_total{");
        lbl(b, &set.v[i]);
        pc_jbuf_printf(b, ",decision=\"%s\",reason=\"%s\"} %llu\n",
                       pc_decision_word((pc_decision_t)d), pc_reason_word((pc_reason_t)r),
                       (unsigned long long)v);
      }
  static const struct {
    const char *name, *text;
    size_t off;
  } gauges[] = {
      {"active_connections", "Open connections.", offsetof(pc_metrics_t, active)},
      {"pending_handshakes",
       "Inbound connections accepted whose TLS handshake has not finished "
       "(limits.max_pending_handshakes).",
       offsetof(pc_metrics_t, pending_handshakes)},
      {"throttle_sources",
       "Inbound: sources (IPv4 address or IPv6 prefix of limits.throttle_ipv6_prefix bits) "
       "held in the handshake-failure throttle tables, as of each table's last failure; at "
       "most 4096 per listener and worker.",
       offsetof(pc_metrics_t, throttle_sources)},
  };
  for (size_t g = 0; g < PC_ARRAY_SIZE(gauges); g++) {
    help(b, gauges[g].name, "gauge", gauges[g].text);
    for (size_t i = 0; i < set.n; i++) {
      int64_t v = *(const int64_t *)((const char *)&set.v[i].m + gauges[g].off);
      pc_jbuf_printf(b, "portcullis_%s{", gauges[g].name);
      lbl(b, &set.v[i]);
      pc_jbuf_printf(b, "} %lld\n", (long long)v);
    }
  }
  help(b, "handshake_duration_seconds", "histogram",
       "Duration of successful TLS handshakes (inbound: from accept).");
  for (size_t i = 0; i < set.n; i++)
    histogram(b, "handshake_duration_seconds", &set.v[i], &set.v[i].m.handshake, &pc_hs_bounds);
  help(b, "http_requests_total", "counter",
       "HTTP mode: answered requests by status class, decision and reason.");
  for (size_t i = 0; i < set.n; i++)
    for (int k = 1; k < PC_HTTP_CLASSES; k++)
      for (int d = 0; d < PC_DECISION_COUNT; d++)
        for (int r = 0; r < PC_REASON_COUNT; r++) {
          uint64_t v = set.v[i].m.requests[k][d][r];
          if (!v) continue;
          pc_jbuf_printf(b, "portcullis_http_requests_total{");
          lbl(b, &set.v[i]);
          pc_jbuf_printf(b, ",class=\"%dxx\",decision=\"%s\",reason=\"%s\"} %llu\n", k,
                         pc_decision_word((pc_decision_t)d), pc_reason_word((pc_reason_t)r),
                         (unsigned long long)v);
        }
  help(b, "http_request_duration_seconds", "histogram",
       "HTTP mode: from the first byte of a request to the end of its response.");
  for (size_t i = 0; i < set.n; i++)
    if (set.v[i].http)
      histogram(b, "http_request_duration_seconds", &set.v[i], &set.v[i].m.request,
                &pc_request_bounds);
  help(b, "http_protocol_requests_total", "counter",
       "HTTP mode: answered requests (HTTP/2: streams) by protocol.");
  for (size_t i = 0; i < set.n; i++)
    for (int k = 0; k < PC_HTTP_PROTOS; k++) {
      if (!set.v[i].http) continue;
      pc_jbuf_printf(b, "portcullis_http_protocol_requests_total{");
      lbl(b, &set.v[i]);
      pc_jbuf_printf(b, ",protocol=\"%s\"} %llu\n", pc_http_proto_word(k),
                     (unsigned long long)set.v[i].m.requests_by_proto[k]);
    }
  help(b, "http2_active_streams", "gauge", "HTTP/2 streams open on client connections.");
  for (size_t i = 0; i < set.n; i++) {
    if (!set.v[i].http) continue;
    pc_jbuf_printf(b, "portcullis_http2_active_streams{");
    lbl(b, &set.v[i]);
    pc_jbuf_printf(b, "} %lld\n", (long long)set.v[i].m.h2_streams);
  }
  help(b, "http2_goaways_sent_total", "counter",
       "GOAWAY frames the sidecar sent, by reason (limit, drain, protocol, revoked).");
  for (size_t i = 0; i < set.n; i++)
    for (int k = 0; k < PC_H2_GOAWAY_REASONS; k++) {
      if (!set.v[i].http) continue;
      pc_jbuf_printf(b, "portcullis_http2_goaways_sent_total{");
      lbl(b, &set.v[i]);
      pc_jbuf_printf(b, ",reason=\"%s\"} %llu\n", pc_h2_goaway_word(k),
                     (unsigned long long)set.v[i].m.h2_goaways[k]);
    }
  help(b, "http2_resets_total", "counter",
       "RST_STREAM frames sent and received, by error code (only codes seen).");
  for (size_t i = 0; i < set.n; i++)
    for (int side = 0; side < 2; side++)
      for (uint32_t k = 0; k < PC_H2_ERROR_CODES; k++) {
        uint64_t v = set.v[i].m.h2_resets[side][k];
        if (!v) continue;
        pc_jbuf_printf(b, "portcullis_http2_resets_total{");
        lbl(b, &set.v[i]);
        pc_jbuf_printf(b, ",side=\"%s\",code=\"%s\"} %llu\n", side ? "received" : "sent",
                       pc_h2_error_word(k), (unsigned long long)v);
      }
  help(b, "bytes_total", "counter", "Plaintext bytes moved, by flow (from_peer, to_peer).");
  for (size_t i = 0; i < set.n; i++) {
    pc_jbuf_printf(b, "portcullis_bytes_total{");
    lbl(b, &set.v[i]);
    pc_jbuf_printf(b, ",flow=\"from_peer\"} %llu\nportcullis_bytes_total{",
                   (unsigned long long)set.v[i].m.bytes_from_peer);
    lbl(b, &set.v[i]);
    pc_jbuf_printf(b, ",flow=\"to_peer\"} %llu\n", (unsigned long long)set.v[i].m.bytes_to_peer);
  }
  static const struct {
    const char *name, *text;
    size_t off;
  } counters[] = {
      {"upstream_connect_failures_total", "Connections to the app or upstream that failed.",
       offsetof(pc_metrics_t, connect_failures)},
      {"tls_truncations_total",
       "TLS connections in use that the peer (inbound) or upstream (outbound) ended with a FIN "
       "but no close_notify; each was reset.",
       offsetof(pc_metrics_t, tls_truncations)},
      {"tls_resumptions_total",
       "Successful TLS handshakes that resumed a session (and passed the re-judgement of the "
       "peer's stored chain); they are also counted in handshake_duration_seconds.",
       offsetof(pc_metrics_t, tls_resumed)},
      {"accept_errors_total", "accept(2) failures (e.g. out of descriptors).",
       offsetof(pc_metrics_t, accept_errors)},
      {"accept_paused_total",
       "Times accepting paused at the connection cap or, inbound, at "
       "limits.max_pending_handshakes.",
       offsetof(pc_metrics_t, accept_pauses)},
      {"http_upstream_connects_total", "HTTP mode: new connections opened to the app or upstream.",
       offsetof(pc_metrics_t, upstream_connects)},
      {"http_upstream_reuses_total", "HTTP mode: requests sent over a pooled connection.",
       offsetof(pc_metrics_t, upstream_reuses)},
      {"http_upstream_expired_total",
       "HTTP mode: pooled connections closed, not reused, because the upstream's certificate "
       "(or its trust-bundle chain) expired more than limits.revoke_grace_ms ago.",
       offsetof(pc_metrics_t, upstream_expired)},
  };
  for (size_t c = 0; c < PC_ARRAY_SIZE(counters); c++) {
    help(b, counters[c].name, "counter", counters[c].text);
    for (size_t i = 0; i < set.n; i++) {
      uint64_t v = *(const uint64_t *)((const char *)&set.v[i].m + counters[c].off);
      pc_jbuf_printf(b, "portcullis_%s{", counters[c].name);
      lbl(b, &set.v[i]);
      pc_jbuf_printf(b, "} %llu\n", (unsigned long long)v);
    }
  }
  for (size_t i = 0; i < set.n; i++)
    free(set.v[i].name);
  free(set.v);

  pc_gen_t *g = pc_gen_current();
  if (g) render_endpoint_metrics(b, g->cfg);
  help(b, "certificate_expiry_timestamp_seconds", "gauge",
       "notAfter of this sidecar's certificate (Unix time).");
  pc_jbuf_printf(b, "portcullis_certificate_expiry_timestamp_seconds %lld\n",
                 (long long)(g ? g->certs->not_after : 0));
  help(b, "config_generation", "gauge", "Generation of config and certificates in use.");
  pc_jbuf_printf(b, "portcullis_config_generation %llu\n", (unsigned long long)(g ? g->id : 0));
  if (g) pc_gen_unref(g);
  pc_reload_stats_t rs;
  pc_reload_stats(&rs);
  help(b, "reloads_total", "counter", "Reload attempts by kind (certs, config) and result.");
  for (int k = 0; k < PC_RELOAD_KINDS; k++) {
    const char *kind = pc_reload_kind_word((pc_reload_kind_t)k);
    pc_jbuf_printf(b, "portcullis_reloads_total{kind=\"%s\",result=\"ok\"} %llu\n", kind,
                   (unsigned long long)rs.ok[k]);
    pc_jbuf_printf(b, "portcullis_reloads_total{kind=\"%s\",result=\"failed\"} %llu\n", kind,
                   (unsigned long long)rs.failed[k]);
  }
  help(b, "log_lines_dropped_total", "counter",
       "Log lines (access and server) dropped because stdout or stderr did not keep up.");
  pc_jbuf_printf(b, "portcullis_log_lines_dropped_total %llu\n",
                 (unsigned long long)pc_log_dropped());
  help(b, "admin_refused_total", "counter",
       "Admin connections closed unserved: at admin.max_connections (limit), or whose client "
       "did not read its response within admin.write_timeout_ms (timeout).");
  pc_jbuf_printf(b, "portcullis_admin_refused_total{reason=\"%s\"} %llu\n",
                 pc_reason_word(PC_REASON_LIMIT), (unsigned long long)refused_limit);
  pc_jbuf_printf(b, "portcullis_admin_refused_total{reason=\"%s\"} %llu\n",
                 pc_reason_word(PC_REASON_TIMEOUT), (unsigned long long)closed_timeout);
  help(b, "admin_connections", "gauge", "Open admin connections (this scrape's included).");
  pc_jbuf_printf(b, "portcullis_admin_connections %u\n", nconns);
  help(b, "draining", "gauge", "1 while draining after SIGTERM.");
  pc_jbuf_printf(b, "portcullis_draining %d\n", draining);
  help(b, "build_info", "gauge", "Build information.");
  pc_jbuf_printf(b,
                 "portcullis_build_info{version=\"%s\",tls_library=\"BoringSSL\",libuv=\"%s\"} 1\n",
                 PC_VERSION, uv_version_string());
}

/* ---- /config and /certs ------------------------------------------------- */

static void strings_json(pc_jbuf_t *b, const char *key, const char *const *v, size_t n) {
  pc_jbuf_printf(b, ",\"%s\":[", key);
  for (size_t i = 0; i < n; i++) {
    if (i) pc_jbuf_raw(b, ",", 1);
    pc_jbuf_str(b, v[i], strlen(v[i]));
  }
  pc_jbuf_raw(b, "]", 1);
}

static void rules_json(pc_jbuf_t *b, const char *key, const pc_policy_t *p) {
  pc_jbuf_printf(b, ",\"%s\":[", key);
  for (size_t i = 0; i < pc_policy_count(p); i++) {
    const char *ns, *sa;
    pc_policy_rule(p, i, &ns, &sa);
    pc_jbuf_printf(b, "%s{", i ? "," : "");
    pc_jbuf_kv_str(b, "namespace", ns);
    pc_jbuf_kv_str(b, "service_account", sa);
    const char *const *methods, *const *paths;
    size_t nm, np;
    pc_policy_rule_http(p, i, &methods, &nm, &paths, &np);
    if (methods) strings_json(b, "methods", methods, nm);
    if (paths) strings_json(b, "paths", paths, np);
    pc_jbuf_raw(b, "}", 1);
  }
  pc_jbuf_raw(b, "]", 1);
}

/* What a listener (or a transparent listener's route) says about its
 * upstream side and its peers. */
static void listener_json(pc_jbuf_t *b, const pc_listener_cfg_t *l, int dir) {
  if (l->parent) {
    pc_jbuf_kv_str(b, "destination", l->target_str);
    pc_jbuf_kv_bool(b, "passthrough", l->passthrough);
  }
  if (dir == 1) pc_jbuf_kv_str(b, "server_name", l->server_name);
  pc_jbuf_kv_str(b, "protocol", l->protocol == PC_PROTO_HTTP ? "http" : "tcp");
  if (l->protocol == PC_PROTO_HTTP && dir == 0)
    pc_jbuf_kv_str(b, "app_protocol", l->app_protocol == PC_APP_H2C ? "h2c" : "http/1.1");
  else if (l->protocol == PC_PROTO_HTTP)
    pc_jbuf_kv_str(b, "upstream_protocol",
                   l->upstream_protocol == PC_UP_H2      ? "h2"
                   : l->upstream_protocol == PC_UP_HTTP1 ? "http/1.1"
                                                         : "auto");
  rules_json(b, dir == 0 ? "allow" : "expect", l->policy);
}

static void render_config(pc_jbuf_t *b, const pc_gen_t *g) {
  const pc_config_t *c = g->cfg;
  pc_jbuf_raw(b, "{", 1);
  pc_jbuf_kv_i64(b, "generation", (long long)g->id);
  pc_jbuf_kv_str(b, "file", c->file);
  pc_jbuf_kv_str(b, "trust_domain", c->trust_domain);
  pc_jbuf_kv_i64(b, "workers", c->workers);
  /* Paths only: key material and passphrases are never in the config. */
  pc_jbuf_raw(b, ",\"identity\":{", 13);
  pc_jbuf_kv_str(b, "cert", c->identity.cert);
  pc_jbuf_kv_str(b, "key", c->identity.key);
  pc_jbuf_kv_str(b, "ca", c->identity.ca);
  pc_jbuf_kv_str(b, "key_passphrase_file", c->identity.key_passphrase_file);
  pc_jbuf_kv_bool(b, "watch", c->identity.watch);
  pc_jbuf_kv_i64(b, "poll_interval_ms", (long long)c->identity.poll_interval_ms);
  pc_jbuf_kv_i64(b, "expiry_warning_hours", c->identity.expiry_warning_hours);
  pc_jbuf_raw(b, "},\"tls\":{", 9);
  pc_jbuf_kv_str(b, "min_version", c->tls.min_version == TLS1_3_VERSION ? "1.3" : "1.2");
  pc_jbuf_kv_str(b, "ciphers", c->tls.ciphers);
  pc_jbuf_kv_str(b, "curves", c->tls.curves);
  pc_jbuf_kv_i64(b, "verify_depth", c->tls.verify_depth);
  pc_jbuf_kv_bool(b, "resumption", c->tls.resumption);
  pc_jbuf_raw(b, "},\"admin\":{", 11);
  pc_jbuf_kv_str(b, "listen", c->admin.listen_str);
  pc_jbuf_kv_i64(b, "max_connections", c->admin.max_connections);
  pc_jbuf_kv_i64(b, "write_timeout_ms", (long long)c->admin.write_timeout_ms);
  pc_jbuf_raw(b, "},\"log\":{", 9);
  static const char *const levels[] = {"debug", "info", "warn", "error"};
  pc_jbuf_kv_str(b, "level", levels[c->log.level]);
  pc_jbuf_kv_bool(b, "access", c->log.access);
  pc_jbuf_raw(b, "},\"limits\":{", 12);
  pc_jbuf_kv_i64(b, "max_connections", c->limits.max_connections);
  pc_jbuf_kv_i64(b, "handshake_timeout_ms", (long long)c->limits.handshake_timeout_ms);
  pc_jbuf_kv_i64(b, "connect_timeout_ms", (long long)c->limits.connect_timeout_ms);
  pc_jbuf_kv_i64(b, "idle_timeout_ms", (long long)c->limits.idle_timeout_ms);
  pc_jbuf_kv_i64(b, "drain_timeout_ms", (long long)c->limits.drain_timeout_ms);
  pc_jbuf_kv_i64(b, "revoke_grace_ms", (long long)c->limits.revoke_grace_ms);
  pc_jbuf_kv_i64(b, "max_pending_handshakes", c->limits.max_pending_handshakes);
  pc_jbuf_kv_i64(b, "handshake_failures_per_source", c->limits.handshake_failures_per_source);
  pc_jbuf_kv_i64(b, "throttle_window_ms", (long long)c->limits.throttle_window_ms);
  pc_jbuf_kv_i64(b, "throttle_cooldown_ms", (long long)c->limits.throttle_cooldown_ms);
  pc_jbuf_kv_i64(b, "throttle_ipv6_prefix", c->limits.throttle_ipv6_prefix);
  pc_jbuf_raw(b, "},\"http\":{", 10);
  pc_jbuf_kv_i64(b, "max_request_line", c->http.max_request_line);
  pc_jbuf_kv_i64(b, "max_header_bytes", c->http.max_header_bytes);
  pc_jbuf_kv_i64(b, "max_headers", c->http.max_headers);
  pc_jbuf_kv_i64(b, "request_timeout_ms", (long long)c->http.request_timeout_ms);
  pc_jbuf_kv_i64(b, "response_timeout_ms", (long long)c->http.response_timeout_ms);
  pc_jbuf_kv_i64(b, "body_timeout_ms", (long long)c->http.body_timeout_ms);
  pc_jbuf_kv_i64(b, "pool_max_idle", c->http.pool_max_idle);
  pc_jbuf_kv_i64(b, "pool_idle_timeout_ms", (long long)c->http.pool_idle_timeout_ms);
  pc_jbuf_raw(b, "},\"http2\":{", 11);
  pc_jbuf_kv_i64(b, "max_concurrent_streams", c->http2.max_concurrent_streams);
  pc_jbuf_kv_i64(b, "stream_window", c->http2.stream_window);
  pc_jbuf_kv_i64(b, "connection_window", c->http2.connection_window);
  pc_jbuf_raw(b, "}", 1);
  for (int dir = 0; dir < 2; dir++) {
    pc_jbuf_printf(b, ",\"%s\":[", dir == 0 ? "inbound" : "outbound");
    int first = 1;
    for (size_t i = 0; i < c->nlisteners; i++) {
      const pc_listener_cfg_t *l = &c->listeners[i];
      if ((int)l->direction != dir) continue;
      pc_jbuf_raw(b, first ? "{" : ",{", first ? 1 : 2);
      first = 0;
      pc_jbuf_kv_str(b, "name", l->name);
      pc_jbuf_kv_str(b, "listen", l->listen_str);
      pc_jbuf_kv_bool(b, "transparent", l->transparent);
      if (l->transparent && dir == 1) {
        pc_jbuf_printf(b, ",\"routes\":[");
        for (size_t k = 0; k < l->nroutes; k++) {
          pc_jbuf_raw(b, k ? ",{" : "{", k ? 2 : 1);
          listener_json(b, &l->routes[k].lc, dir);
          pc_jbuf_raw(b, "}", 1);
        }
        pc_jbuf_raw(b, "]}", 2);
        continue;
      }
      pc_jbuf_kv_str(b, dir == 0 ? "forward" : "upstream", l->transparent ? NULL : l->target_str);
      listener_json(b, l, dir);
      pc_jbuf_raw(b, "}", 1);
    }
    pc_jbuf_raw(b, "]", 1);
  }
  pc_jbuf_raw(b, "}\n", 2);
}

static void time_json(pc_jbuf_t *b, const char *key, const ASN1_TIME *t) {
  char buf[32] = "";
  time_t when = pc_certs_time(t);
  if (when) pc_log_utc(when, buf, sizeof(buf));
  pc_jbuf_kv_str(b, key, buf);
}

static void name_json(pc_jbuf_t *b, const char *key, X509_NAME *n) {
  BIO *bio = BIO_new(BIO_s_mem());
  if (!bio) pc_fatal("out of memory");
  X509_NAME_print_ex(bio, n, 0, XN_FLAG_RFC2253);
  const uint8_t *data;
  size_t len;
  BIO_mem_contents(bio, &data, &len);
  char *s = pc_malloc(len + 1);
  memcpy(s, data, len);
  s[len] = '\0';
  pc_jbuf_kv_str(b, key, s);
  free(s);
  BIO_free(bio);
}

static void cert_json(pc_jbuf_t *b, X509 *x, int first) {
  pc_jbuf_raw(b, first ? "{" : ",{", first ? 1 : 2);
  /* An empty trust domain never matches, so any well-formed ID comes back as
   * "wrong trust domain" with the ID filled in: this is a report, not a check. */
  char *id = NULL;
  pc_identity_from_cert(x, "", &id);
  pc_jbuf_kv_str(b, "spiffe_id", id);
  free(id);
  name_json(b, "subject", X509_get_subject_name(x));
  name_json(b, "issuer", X509_get_issuer_name(x));
  char serial[80];
  pc_certs_serial(x, serial, sizeof(serial));
  pc_jbuf_kv_str(b, "serial", serial);
  time_json(b, "not_before", X509_get0_notBefore(x));
  time_json(b, "not_after", X509_get0_notAfter(x));
  uint8_t md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  char fp[2 * EVP_MAX_MD_SIZE + 1] = "";
  if (X509_digest(x, EVP_sha256(), md, &mdlen))
    for (unsigned i = 0; i < mdlen; i++)
      snprintf(fp + 2 * i, 3, "%02x", md[i]);
  pc_jbuf_kv_str(b, "sha256", fp);
  pc_jbuf_raw(b, "}", 1);
}

static void render_certs(pc_jbuf_t *b, const pc_gen_t *g) {
  pc_jbuf_raw(b, "{", 1);
  pc_jbuf_kv_i64(b, "generation", (long long)g->id);
  pc_jbuf_raw(b, ",\"identity\":[", 13);
  cert_json(b, g->certs->leaf, 1);
  for (size_t i = 0; i < sk_X509_num(g->certs->chain); i++)
    cert_json(b, sk_X509_value(g->certs->chain, i), 0);
  pc_jbuf_raw(b, "],\"bundle\":[", 12);
  for (size_t i = 0; i < sk_X509_num(g->certs->bundle); i++)
    cert_json(b, sk_X509_value(g->certs->bundle, i), i == 0);
  pc_jbuf_raw(b, "]}\n", 3);
}

/* ---- routing ------------------------------------------------------------- */

static void route(admin_conn_t *a) {
  int method = pc_adminreq_method(&a->req);
  int head = method == HTTP_HEAD;
  if (method != HTTP_GET && !head) {
    respond(a, 405, "Method Not Allowed", "text/plain; charset=utf-8", "Allow: GET, HEAD\r\n",
            "method not allowed\n", 19, 0);
    return;
  }
  const char *path = pc_adminreq_path(&a->req);
  pc_jbuf_t body = {0};
  const char *json = "application/json";
  if (strcmp(path, "/healthz") == 0) {
    respond(a, 200, "OK", "text/plain; charset=utf-8", NULL, "ok\n", 3, head);
  } else if (strcmp(path, "/ready") == 0) {
    const char *why = NULL;
    pc_gen_t *g = pc_gen_current();
    if (draining)
      why = "draining";
    else if (!g)
      why = "no certificates loaded";
    else if (pc_workers_ready(&why))
      pc_targets_pending(&why); /* the first answer for every name */
    if (g) pc_gen_unref(g);
    if (why) {
      pc_jbuf_printf(&body, "%s\n", why);
      respond(a, 503, "Service Unavailable", "text/plain; charset=utf-8", NULL, body.data, body.len,
              head);
    } else {
      respond(a, 200, "OK", "text/plain; charset=utf-8", NULL, "ready\n", 6, head);
    }
  } else if (strcmp(path, "/metrics") == 0) {
    render_metrics(&body);
    respond(a, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", NULL, body.data, body.len,
            head);
  } else if (strcmp(path, "/endpoints") == 0) {
    pc_gen_t *g = pc_gen_current();
    if (!g) {
      respond_text(a, 503, "Service Unavailable", "starting\n");
    } else {
      render_endpoints(&body, g);
      pc_gen_unref(g);
      respond(a, 200, "OK", json, NULL, body.data, body.len, head);
    }
  } else if (strcmp(path, "/config") == 0 || strcmp(path, "/certs") == 0) {
    pc_gen_t *g = pc_gen_current();
    if (!g) {
      respond_text(a, 503, "Service Unavailable", "starting\n");
    } else {
      if (path[2] == 'o')
        render_config(&body, g);
      else
        render_certs(&body, g);
      pc_gen_unref(g);
      respond(a, 200, "OK", json, NULL, body.data, body.len, head);
    }
  } else {
    respond_text(a, 404, "Not Found", "not found\n");
  }
  pc_jbuf_free(&body);
}

/* ---- connections --------------------------------------------------------- */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  static char scratch[4096]; /* main thread only; consumed before the next read */
  *buf = uv_buf_init(scratch, sizeof(scratch));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  admin_conn_t *a = st->data;
  if (a->answered) return;
  if (nread < 0) {
    close_conn(a, 0);
    return;
  }
  if (nread == 0) return;
  switch (pc_adminreq_feed(&a->req, buf->base, (size_t)nread)) {
  case 0: break;
  case 200: route(a); break;
  case 414: respond_text(a, 414, "URI Too Long", "uri too long\n"); break;
  case 431:
    respond_text(a, 431, "Request Header Fields Too Large", "request head too large\n");
    break;
  default: respond_text(a, 400, "Bad Request", "bad request\n"); break;
  }
}

static void on_timeout(uv_timer_t *t) {
  admin_conn_t *a = t->data;
  respond_text(a, 408, "Request Timeout", "request timeout\n");
}

static void on_refused_closed(uv_handle_t *h) { free(h); }

/* At admin.max_connections: take the connection off the backlog and close it
 * at once (the client sees its end before any response). */
static void refuse(uv_stream_t *srv) {
  uv_tcp_t *t = pc_malloc(sizeof(*t));
  uv_tcp_init(srv->loop, t);
  if (uv_accept(srv, (uv_stream_t *)t) == 0) refused_limit++;
  uv_close((uv_handle_t *)t, on_refused_closed);
  if (!at_cap)
    pc_log(PC_LOG_WARN,
           "admin: admin.max_connections=%u reached, closing new admin connections (limit)",
           max_conns);
  at_cap = 1;
}

static void on_connection(uv_stream_t *srv, int status) {
  if (status < 0) return;
  pc_gen_t *g = pc_gen_current();
  if (g) {
    max_conns = g->cfg->admin.max_connections;
    write_timeout_ms = g->cfg->admin.write_timeout_ms;
    pc_gen_unref(g);
  }
  if (nconns >= max_conns) {
    refuse(srv);
    return;
  }
  if (at_cap) pc_log(PC_LOG_INFO, "admin: accepting admin connections again");
  at_cap = 0;
  nconns++;
  admin_conn_t *a = pc_calloc(1, sizeof(*a));
  uv_tcp_init(srv->loop, &a->tcp);
  uv_timer_init(srv->loop, &a->timer);
  a->tcp.data = a->timer.data = a;
  a->handles = 2;
  a->next = conns;
  if (conns) conns->prev = a;
  conns = a;
  if (uv_accept(srv, (uv_stream_t *)&a->tcp) != 0) {
    close_conn(a, 0);
    return;
  }
  /* A fixed send buffer (Linux would grow it to 4 MiB on loopback) bounds
   * what a client that does not read makes the kernel hold, before and
   * after the close; the write deadline covers the rest. */
  int sndbuf = ADMIN_SNDBUF;
  uv_send_buffer_size((uv_handle_t *)&a->tcp, &sndbuf);
  pc_adminreq_init(&a->req);
  uv_timer_start(&a->timer, on_timeout, REQUEST_TIMEOUT_MS, 0);
  uv_read_start((uv_stream_t *)&a->tcp, alloc_cb, on_read);
}

int pc_admin_start(uv_loop_t *loop, const pc_config_t *cfg, char *err, size_t errlen) {
  max_conns = cfg->admin.max_connections;
  write_timeout_ms = cfg->admin.write_timeout_ms;
  uv_tcp_init(loop, &server);
  server_open = 1;
  int rc = uv_tcp_bind(&server, (const struct sockaddr *)&cfg->admin.listen, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&server, 128, on_connection);
  if (rc) {
    snprintf(err, errlen, "%s:%d: admin.listen: cannot listen on %s: %s", cfg->file,
             cfg->admin.line, cfg->admin.listen_str, uv_strerror(rc));
    return -1;
  }
  return 0;
}

void pc_admin_stop(void) {
  if (server_open && !uv_is_closing((uv_handle_t *)&server)) uv_close((uv_handle_t *)&server, NULL);
  server_open = 0;
  for (admin_conn_t *a = conns; a; a = a->next)
    close_conn(a, 0);
}

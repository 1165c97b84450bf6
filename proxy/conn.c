#include "conn.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

#include "compat.h"
#include "deadline.h"
#include "endpoint.h"
#include "h2.h"
#include "l7.h"
#include "log.h"
#include "route.h"
#include "splice.h"
#include "tls.h"

/* How long a refused peer gets to read its alert before the socket closes. */
#define LINGER_MS 1000

typedef enum {
  ST_HANDSHAKE,
  ST_CONNECTING,
  ST_RETRY, /* a failed connect's socket is closing; the next endpoint follows */
  ST_ESTABLISHED,
  ST_LINGER,
  ST_CLOSED
} state_t;

/* Connect attempts per connection, each to another endpoint while the set
 * has one (endpoint.h). */
#define MAX_CONNECT_ATTEMPTS 3

typedef struct pc_conn {
  pc_stream_t down; /* accepted: the peer (inbound) or the app (outbound) */
  pc_stream_t up;   /* opened: the app (inbound) or the upstream (outbound) */
  uv_timer_t timer;
  uv_connect_t connect_req;
  pc_worker_t *w;
  pc_listener_t *l;
  const pc_listener_cfg_t *lc;
  pc_gen_t *gen;
  pc_tls_peer_t peer;
  pc_splice_t splice;
  pc_l7_t *l7;                   /* protocol = "http": the HTTP/1 handler, in place of the splice */
  pc_h2_t *h2;                   /* the HTTP/2 handler (ALPN h2, or an app that sent the preface) */
  char sniff[PC_H2_PREFACE_LEN]; /* outbound: first bytes while they match the preface */
  uint8_t sniff_len, sniffing, l7_closed;
  state_t state;
  int handles; /* open libuv handles; the last close frees the connection */
  int inbound;
  int logged;
  pc_decision_t decision;
  pc_reason_t reason;
  const char *close_how;
  const char *tls_version, *cipher;
  uint64_t start_ns;
  uint64_t hs_start_ns; /* when our TLS handshake began */
  uint64_t last_active; /* loop time, ms */
  uint8_t rechecked;    /* the timer's deadline expired once (deadline.h) */
  uint64_t revoke_at;   /* loop time at which a re-check's refusal takes effect; 0 = none */
  uint64_t expire_at;   /* loop time: peer certificate's not_after + grace; 0 = none */
  pc_reason_t revoke_reason;
  int handshaken;        /* the peer's chain was verified; re-checks apply */
  int pending;           /* inbound: counted in the listener's handshake budget */
  pc_throttle_key_t src; /* inbound: the peer's source, for throttling */
  char peer_addr[64], app_addr[64];
  pc_endpoint_t *ep; /* the upstream / app endpoint connected to (counted in flight) */
  uint8_t attempts;  /* connects started */
  uint8_t connected; /* TCP reached ep (the access log names it only then) */
  /* Transparent: the endpoint at the original destination, chosen at
   * accept. TCP: it is ep, the only one tried. HTTP: a reference (not
   * counted) that every request's pool connection goes to. */
  int pinned;
  pc_endpoint_t *pin;
  char dst[56]; /* the original destination, for a refusal's log line */
  struct pc_conn *prev, *next;
} pc_conn_t;

static int active_conns;
static int pending_conns;

int pc_conn_active(void) { return __atomic_load_n(&active_conns, __ATOMIC_SEQ_CST); }
int pc_conn_pending(void) { return __atomic_load_n(&pending_conns, __ATOMIC_SEQ_CST); }

/* An inbound handshake ended, one way or another (once per connection). */
static void end_handshake(pc_conn_t *c, int failed) {
  if (!c->pending) return;
  c->pending = 0;
  __atomic_sub_fetch(&pending_conns, 1, __ATOMIC_SEQ_CST);
  pc_listener_handshake_done(c->l, failed ? &c->src : NULL);
}

static pc_stream_t *tls_side(pc_conn_t *c) { return c->inbound ? &c->down : &c->up; }
static pc_reason_t recheck(pc_conn_t *c, const pc_gen_t *g);

/* The connection ends at na (wall clock) + grace_ms: the expiry of the path
 * the latest decision verified (a reload's re-check replaces the
 * handshake's). */
static void expire_by(pc_conn_t *c, time_t na, uint64_t grace_ms) {
  if (!na) return;
  int64_t left_ms = ((int64_t)na - (int64_t)time(NULL)) * 1000;
  c->expire_at = uv_now(c->timer.loop) + (uint64_t)(left_ms > 0 ? left_ms : 0) + grace_ms;
}
static pc_stream_t *app_side(pc_conn_t *c) { return c->inbound ? &c->up : &c->down; }

static void on_data(pc_stream_t *s, const char *buf, size_t len);
static void on_eof(pc_stream_t *s);
static void on_error(pc_stream_t *s, int err);
static void on_drain(pc_stream_t *s);
static void on_shutdown(pc_stream_t *s, int status);
static void on_handshake(pc_stream_t *s, int status);

static const pc_stream_cbs_t stream_cbs = {on_data,  on_eof,      on_error,
                                           on_drain, on_shutdown, on_handshake};

static void write_log(pc_conn_t *c) {
  if (c->logged) return;
  c->logged = 1;
  PC_STAT_INC(c->l->stats.conns[c->decision][c->reason]);
  /* HTTP mode logs each request; a connection line only for a refusal. */
  if ((c->l7 || c->h2) && c->decision == PC_DECISION_ALLOW) return;
  uint64_t from_peer = c->splice.bytes[0], to_peer = c->splice.bytes[1];
  pc_access_rec_t rec = {
      .listener = c->lc->name,
      .direction = c->inbound ? "inbound" : "outbound",
      .peer = c->peer_addr,
      .app = c->app_addr,
      .peer_id = c->peer.peer_id,
      .decision = pc_decision_word(c->decision),
      .reason = c->reason,
      .close = c->close_how,
      .tls_version = c->tls_version,
      .cipher = c->cipher,
      .endpoint = c->ep && c->connected ? c->ep->str
                  : c->pin              ? c->pin->str
                  : c->dst[0]           ? c->dst
                                        : NULL,
      .resumed = c->peer.resumed,
      .bytes_from_peer = from_peer,
      .bytes_to_peer = to_peer,
      .duration_ms = (double)(uv_hrtime() - c->start_ns) / 1e6,
  };
  pc_log_access(&rec);
}

static void on_handle_closed(uv_handle_t *h) {
  pc_conn_t *c = h->data;
  if (--c->handles > 0) return;
  pc_stream_release(&c->down);
  pc_stream_release(&c->up);
  pc_l7_free(c->l7);
  pc_h2_free(c->h2);
  pc_endpoint_done(c->ep);
  pc_endpoint_unref(c->pin);
  free(c->peer.peer_id);
  if (c->prev)
    c->prev->next = c->next;
  else
    c->w->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  PC_STAT_DEC(c->l->stats.active);
  pc_listener_unref(c->l);
  pc_gen_unref(c->gen);
  free(c);
  __atomic_sub_fetch(&active_conns, 1, __ATOMIC_SEQ_CST);
  pc_workers_conn_released();
}

/* The one teardown path: log, count, close every handle. */
static void teardown(pc_conn_t *c, const char *how, int reset) {
  if (c->state == ST_CLOSED) return;
  c->state = ST_CLOSED;
  end_handshake(c, 1);
  if (!c->close_how) c->close_how = how;
  write_log(c);
  uv_timer_stop(&c->timer);
  uv_close((uv_handle_t *)&c->timer, on_handle_closed);
  if (c->l7 && !c->l7_closed) c->handles += pc_l7_close(c->l7, on_handle_closed, c);
  if (c->h2) c->handles += pc_h2_close(c->h2, on_handle_closed, c);
  pc_stream_close(&c->down, reset, on_handle_closed);
  if (c->up.initialised) pc_stream_close(&c->up, reset, on_handle_closed);
}

static void arm(pc_conn_t *c, uint64_t ms, uv_timer_cb cb) {
  c->rechecked = 0;
  uv_timer_start(&c->timer, cb, ms, 0);
}

/* A peer that a reload no longer allows, or whose certificate expired, loses
 * its connection once the grace period is over. */
static void revoke_conn(pc_conn_t *c, pc_reason_t r) {
  c->decision = PC_DECISION_DENY;
  c->reason = r;
  pc_log(PC_LOG_INFO, "listener %s: closing connection from %s (%s): %s", c->lc->name,
         c->peer.peer_id ? c->peer.peer_id : "?", c->peer_addr,
         r == PC_REASON_EXPIRED ? "peer certificate expired or no longer trusted"
                                : "peer no longer allowed");
  if (c->h2) pc_h2_revoke(c->h2);
  teardown(c, "revoked", 0);
}

static void on_established_timer(uv_timer_t *t);

/* One timer serves every deadline of an established connection. */
static void rearm(pc_conn_t *c) {
  uint64_t now = uv_now(c->timer.loop), next = c->last_active + c->gen->cfg->limits.idle_timeout_ms;
  if (c->revoke_at && c->revoke_at < next) next = c->revoke_at;
  if (c->expire_at && c->expire_at < next) next = c->expire_at;
  arm(c, next > now ? next - now : 0, on_established_timer);
}

static void on_established_timer(uv_timer_t *t) {
  pc_conn_t *c = t->data;
  uint64_t now = uv_now(t->loop);
  if (c->revoke_at && now >= c->revoke_at)
    revoke_conn(c, c->revoke_reason);
  else if (c->expire_at && now >= c->expire_at)
    revoke_conn(c, PC_REASON_EXPIRED);
  else if (now - c->last_active >= c->gen->cfg->limits.idle_timeout_ms) {
    if (!pc_deadline_recheck(t, on_established_timer, &c->rechecked))
      teardown(c, "idle_timeout", 0);
  } else
    rearm(c);
}

static void on_linger_timer(uv_timer_t *t) { teardown(t->data, NULL, 0); }

/* A TLS alert from the peer after our side of the handshake finished: with
 * TLS 1.3 this is how a server refuses our certificate. */
static const char *describe_tls_end(pc_conn_t *c) {
  uint32_t e = tls_side(c)->tls_error;
  int r = ERR_GET_LIB(e) == ERR_LIB_SSL ? ERR_GET_REASON(e) : 0;
  if (r < SSL_AD_REASON_OFFSET) return "error";
  pc_log(PC_LOG_WARN, "listener %s: %s %s sent TLS alert \"%s\"", c->lc->name,
         c->inbound ? "peer" : "upstream", c->peer_addr,
         SSL_alert_desc_string_long(r - SSL_AD_REASON_OFFSET));
  return "peer_alert";
}

static void on_splice_done(pc_splice_t *sp, int reset, int err) {
  pc_conn_t *c = pc_container_of(sp, pc_conn_t, splice);
  teardown(c, reset ? (err == PC_STREAM_ETLS ? describe_tls_end(c) : "reset") : "eof", reset);
}

static void on_l7_done(void *arg, const char *how, int reset) { teardown(arg, how, reset); }

static void make_env(pc_conn_t *c, pc_l7_env_t *out);

static void establish(pc_conn_t *c) {
  c->state = ST_ESTABLISHED;
  c->decision = PC_DECISION_ALLOW;
  c->last_active = uv_now(c->timer.loop);
  rearm(c);
  if (c->lc->protocol != PC_PROTO_HTTP) {
    pc_splice_start(&c->splice, tls_side(c), app_side(c), on_splice_done);
    return;
  }
  pc_l7_env_t env;
  make_env(c, &env);
  if (c->inbound && pc_tls_alpn_is_h2(c->down.ssl)) {
    c->h2 = pc_h2_start(&c->down, &env, on_l7_done, c, NULL, 0);
    /* Its handshake outlived the drain's start: GOAWAY at once. */
    if (c->w->draining && c->state == ST_ESTABLISHED) pc_h2_drain(c->h2);
    return;
  }
  /* Outbound, the app may speak HTTP/2 with prior knowledge: its first bytes
   * decide (on_data). HTTP/1 is served meanwhile, so a silent app still
   * gets its 408. Inbound, a client whose handshake ended after the drain
   * began still gets its first request served (it may be on its way); the
   * answer closes the connection. */
  c->sniffing = !c->inbound;
  c->l7 = pc_l7_start(&c->down, &env, on_l7_done, c);
}

/* Outbound HTTP: bytes from the app while they may still be the HTTP/2
 * preface. */
static void sniff(pc_conn_t *c, const char *buf, size_t len) {
  size_t n = PC_H2_PREFACE_LEN - c->sniff_len;
  if (n > len) n = len;
  if (memcmp(buf, &PC_H2_PREFACE[c->sniff_len], n) != 0) {
    c->sniffing = 0;
    if (c->sniff_len) {
      pc_l7_on_data(c->l7, c->sniff, c->sniff_len);
      if (c->state != ST_ESTABLISHED) return;
    }
    pc_l7_on_data(c->l7, buf, len);
    return;
  }
  memcpy(c->sniff + c->sniff_len, buf, n);
  c->sniff_len = (uint8_t)(c->sniff_len + n);
  if (c->sniff_len < PC_H2_PREFACE_LEN) return;
  c->sniffing = 0;
  c->handles += pc_l7_close(c->l7, on_handle_closed, c);
  c->l7_closed = 1;
  pc_l7_env_t env;
  make_env(c, &env);
  c->h2 = pc_h2_start(&c->down, &env, on_l7_done, c, c->sniff, c->sniff_len);
  if (len > n && c->state == ST_ESTABLISHED) pc_h2_on_data(c->h2, buf + n, len - n);
  if (c->w->draining && c->state == ST_ESTABLISHED) pc_h2_drain(c->h2);
}

static void make_env(pc_conn_t *c, pc_l7_env_t *out) {
  pc_l7_env_t env = {.w = c->w,
                     .l = c->l,
                     .gen = c->gen,
                     .lc = c->lc,
                     .peer_addr = c->peer_addr,
                     .app_addr = c->app_addr,
                     .peer_id = c->peer.peer_id,
                     .tls_version = c->tls_version,
                     .cipher = c->cipher,
                     .resumed = c->peer.resumed,
                     .last_active = &c->last_active,
                     .pin = c->pin};
  *out = env;
}

/* Ends a connection whose peer was refused during the handshake: the alert is
 * already queued; send FIN after it and drain the peer's input for a moment
 * so the close does not turn into an RST that destroys the alert. */
static void refuse(pc_conn_t *c, pc_decision_t d, pc_reason_t r) {
  end_handshake(c, 1);
  c->decision = d;
  c->reason = r;
  c->close_how = "refused";
  write_log(c);
  if (c->inbound) {
    c->state = ST_LINGER;
    arm(c, LINGER_MS, on_linger_timer);
    pc_stream_shutdown(&c->down, 1);
    if (pc_stream_discard(&c->down)) teardown(c, NULL, 0);
    return;
  }
  /* Outbound: the app learns of the refusal through an RST, never a clean
   * EOF that could pass for an empty answer. */
  teardown(c, "refused", 1);
}

static void on_handshake_timer(uv_timer_t *t) {
  pc_conn_t *c = t->data;
  if (pc_deadline_recheck(t, on_handshake_timer, &c->rechecked)) return;
  if (c->inbound) {
    c->decision = PC_DECISION_DENY;
    c->reason = PC_REASON_TIMEOUT;
    teardown(c, "timeout", 1);
  } else {
    const pc_config_t *cfg = c->gen->cfg;
    pc_endpoint_failed(c->ep, cfg->health.ejection_base_ms, cfg->health.ejection_max_ms,
                       "TLS handshake timed out");
    c->decision = PC_DECISION_ERROR;
    c->reason = PC_REASON_TIMEOUT;
    teardown(c, "timeout", 1);
  }
}

static void start_connect(pc_conn_t *c);

/* The socket of a failed attempt is closed: try the next endpoint. */
static void on_retry_closed(uv_handle_t *h) {
  pc_conn_t *c = h->data;
  if (c->state == ST_CLOSED) {
    on_handle_closed(h);
    return;
  }
  c->handles--;
  pc_stream_release(&c->up);
  start_connect(c);
}

/* A connect failed (why, for the log): the endpoint is ejected, and another
 * one tried if the set has one and attempts are left. Returns 1 if a retry
 * is under way. */
static int connect_failed(pc_conn_t *c, const char *why) {
  const pc_config_t *cfg = c->gen->cfg;
  PC_STAT_INC(c->l->stats.connect_failures);
  pc_endpoint_failed(c->ep, cfg->health.ejection_base_ms, cfg->health.ejection_max_ms, why);
  if (c->pinned) return 0; /* the original destination or nothing */
  size_t n = pc_target_size(c->lc->tgt);
  if (c->attempts >= MAX_CONNECT_ATTEMPTS || c->attempts >= n) return 0;
  c->state = ST_RETRY;
  uv_timer_stop(&c->timer);
  pc_stream_close(&c->up, 1, on_retry_closed);
  return 1;
}

static void on_connect_timer(uv_timer_t *t) {
  pc_conn_t *c = t->data;
  if (pc_deadline_recheck(t, on_connect_timer, &c->rechecked)) return;
  pc_log(PC_LOG_WARN, "listener %s: connecting to %s (%s) timed out", c->lc->name, c->ep->str,
         c->lc->target_str);
  if (connect_failed(c, "connect timed out")) return;
  c->decision = PC_DECISION_ERROR;
  c->reason = PC_REASON_TIMEOUT;
  teardown(c, "connect_failed", 1);
}

static void start_upstream_tls(pc_conn_t *c) {
  c->state = ST_HANDSHAKE;
  arm(c, c->gen->cfg->limits.handshake_timeout_ms, on_handshake_timer);
  c->peer.endpoint = c->ep->str;
  SSL *ssl = pc_tls_new(c->gen->client_ctx, &c->peer);
  SSL_set_tlsext_host_name(ssl, c->lc->server_name);
  c->hs_start_ns = uv_hrtime();
  if (pc_stream_start_tls(&c->up, ssl, 0) != 0) {
    pc_log(PC_LOG_ERROR, "listener %s: cannot start TLS to %s: %s", c->lc->name, c->ep->str,
           pc_tls_error_string());
    c->decision = PC_DECISION_ERROR;
    teardown(c, "error", 1);
  }
}

static void on_connect(uv_connect_t *req, int status) {
  pc_conn_t *c = req->data;
  if (c->state != ST_CONNECTING) return;
  if (status < 0) {
    pc_log(PC_LOG_WARN, "listener %s: cannot connect to %s (%s): %s", c->lc->name, c->ep->str,
           c->lc->target_str, uv_strerror(status));
    if (connect_failed(c, "connect failed")) return;
    c->decision = PC_DECISION_ERROR;
    teardown(c, "connect_failed", 1);
    return;
  }
  /* outbound: once the handshake passed */
  if (c->inbound || c->lc->passthrough) pc_endpoint_ok(c->ep);
  c->connected = 1;
  uv_tcp_nodelay(&c->up.tcp, 1);
  if (c->inbound || c->lc->passthrough)
    establish(c);
  else
    start_upstream_tls(c);
}

static void start_connect(pc_conn_t *c) {
  if (!c->pinned) {
    pc_endpoint_t *prev = c->ep;
    c->ep = pc_target_pick(c->lc->tgt, prev);
    pc_endpoint_done(prev);
  }
  if (!c->ep) {
    /* A name that never resolved: fail fast, nothing to wait for. */
    pc_log(PC_LOG_WARN, "listener %s: %s", c->lc->name, pc_target_unresolved_text(c->lc->tgt));
    c->decision = PC_DECISION_ERROR;
    teardown(c, "unresolved", 1);
    return;
  }
  c->attempts++;
  snprintf(c->inbound ? c->app_addr : c->peer_addr, sizeof(c->app_addr), "%s", c->ep->str);
  c->state = ST_CONNECTING;
  arm(c, c->gen->cfg->limits.connect_timeout_ms, on_connect_timer);
  int rc = pc_stream_init(&c->up, c->timer.loop, &c->w->scratch, &stream_cbs, c);
  if (rc == 0) {
    c->handles++;
    c->up.tcp.data = c;
    c->connect_req.data = c;
    rc = uv_tcp_connect(&c->connect_req, &c->up.tcp, (const struct sockaddr *)&c->ep->addr,
                        on_connect);
  }
  if (rc < 0) {
    pc_log(PC_LOG_WARN, "listener %s: cannot connect to %s (%s): %s", c->lc->name, c->ep->str,
           c->lc->target_str, uv_strerror(rc));
    if (c->up.initialised && connect_failed(c, "connect failed")) return;
    if (!c->up.initialised) PC_STAT_INC(c->l->stats.connect_failures);
    c->decision = PC_DECISION_ERROR;
    teardown(c, "connect_failed", 1);
  }
}

static pc_conn_t *conn_of(pc_stream_t *s) { return s->owner; }

static void on_handshake(pc_stream_t *s, int status) {
  pc_conn_t *c = conn_of(s);
  if (c->state != ST_HANDSHAKE) return;
  if (status < 0) {
    pc_reason_t r = pc_tls_failure_reason(s->ssl);
    const pc_config_t *cfg = c->gen->cfg;
    if (!c->inbound)
      pc_endpoint_failed(c->ep, cfg->health.ejection_base_ms, cfg->health.ejection_max_ms,
                         c->peer.reason != PC_REASON_NONE ? "its identity was refused"
                                                          : "TLS handshake failed");
    if (c->inbound || c->peer.reason != PC_REASON_NONE) {
      refuse(c, PC_DECISION_DENY, r);
    } else {
      /* The upstream refused us, or spoke something other than TLS. */
      pc_log(PC_LOG_WARN, "listener %s: TLS handshake with upstream %s (%s) failed (%s)",
             c->lc->name, c->ep->str, c->lc->target_str, pc_reason_word(r));
      c->decision = PC_DECISION_ERROR;
      c->reason = r;
      teardown(c, "upstream_refused", 1);
    }
    return;
  }
  end_handshake(c, 0);
  if (!c->inbound) pc_endpoint_ok(c->ep);
  c->tls_version = SSL_get_version(s->ssl);
  c->cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(s->ssl));
  uint8_t alert;
  pc_reason_t rr = pc_tls_handshake_done(&c->peer, s->ssl, &alert);
  if (rr != PC_REASON_NONE) {
    /* A resumed session whose peer would be refused now. */
    pc_stream_alert(s, alert);
    refuse(c, PC_DECISION_DENY, rr);
    return;
  }
  if (c->peer.resumed) PC_STAT_INC(c->l->stats.tls_resumed);
  c->handshaken = 1;
  pc_hist_observe(&c->l->stats.handshake, &pc_hs_bounds,
                  (double)(uv_hrtime() - c->hs_start_ns) / 1e9);
  expire_by(c, c->peer.not_after, c->gen->cfg->limits.revoke_grace_ms);
  /* A reload published while this handshake was running: the peer must pass
   * the policy in force now, before the app sees a byte. */
  if (c->w->gen != c->gen) {
    pc_reason_t r = recheck(c, c->w->gen);
    if (r != PC_REASON_NONE) {
      c->decision = PC_DECISION_DENY;
      c->reason = r;
      teardown(c, "refused", c->inbound ? 0 : 1);
      return;
    }
  }
  if (c->inbound && c->lc->protocol != PC_PROTO_HTTP) {
    /* Hold any early application data until the app is connected. */
    pc_stream_read_stop(s);
    start_connect(c);
  } else {
    establish(c); /* HTTP mode connects per request, from a pool */
  }
}

static void on_data(pc_stream_t *s, const char *buf, size_t len) {
  pc_conn_t *c = conn_of(s);
  if (c->state != ST_ESTABLISHED) return;
  if (c->h2) {
    pc_h2_on_data(c->h2, buf, len);
    return;
  }
  if (c->l7) {
    if (c->sniffing)
      sniff(c, buf, len);
    else
      pc_l7_on_data(c->l7, buf, len);
    return;
  }
  c->last_active = uv_now(c->timer.loop);
  if (s == tls_side(c))
    PC_STAT_ADD(c->l->stats.bytes_from_peer, len);
  else
    PC_STAT_ADD(c->l->stats.bytes_to_peer, len);
  pc_splice_on_data(&c->splice, s, buf, len);
}

static void on_eof(pc_stream_t *s) {
  pc_conn_t *c = conn_of(s);
  if (c->state == ST_ESTABLISHED && c->h2)
    pc_h2_on_eof(c->h2);
  else if (c->state == ST_ESTABLISHED && c->l7)
    pc_l7_on_eof(c->l7);
  else if (c->state == ST_ESTABLISHED)
    pc_splice_on_eof(&c->splice, s);
  else if (c->state == ST_LINGER)
    teardown(c, NULL, 0);
  else
    teardown(c, "eof", 0);
}

/* The TLS side ended with a FIN but no close_notify: what it sent last may be
 * cut short, so the connection ends as a reset (the splice, l7 and h2 treat
 * every stream error so), never as a clean end. Said once, for operators:
 * a peer that keeps doing this crashes, or someone injects FINs. */
static void note_truncation(pc_conn_t *c) {
  PC_STAT_INC(c->l->stats.tls_truncations);
  pc_log(PC_LOG_INFO,
         "listener %s: %s %s (%s) closed TCP without TLS close_notify: data may be truncated; "
         "resetting the connection",
         c->lc->name, c->inbound ? "peer" : "upstream", c->peer_addr,
         c->peer.peer_id ? c->peer.peer_id : "?");
}

static void on_error(pc_stream_t *s, int err) {
  pc_conn_t *c = conn_of(s);
  /* An HTTP/1 client that stops between requests, or after a whole one,
   * cut nothing short: it is heard as an end (its answer still goes out). */
  if (err == PC_STREAM_ETRUNC && c->state == ST_ESTABLISHED && c->l7 && pc_l7_at_boundary(c->l7)) {
    pc_l7_on_eof(c->l7);
    return;
  }
  if (err == PC_STREAM_ETRUNC && c->state != ST_CLOSED) note_truncation(c);
  if (c->state == ST_ESTABLISHED && c->h2) {
    pc_h2_on_error(c->h2, err);
  } else if (c->state == ST_ESTABLISHED && c->l7) {
    pc_l7_on_error(c->l7, err);
  } else if (c->state == ST_ESTABLISHED) {
    pc_splice_on_error(&c->splice, s, err);
  } else {
    if (c->decision == PC_DECISION_ALLOW && c->state != ST_LINGER) c->decision = PC_DECISION_ERROR;
    teardown(c, "reset", 1);
  }
}

static void on_drain(pc_stream_t *s) {
  pc_conn_t *c = conn_of(s);
  if (c->state == ST_ESTABLISHED && c->h2)
    pc_h2_on_drain(c->h2);
  else if (c->state == ST_ESTABLISHED && c->l7)
    pc_l7_on_drain(c->l7);
  else if (c->state == ST_ESTABLISHED)
    pc_splice_on_drain(&c->splice, s);
}

static void on_shutdown(pc_stream_t *s, int status) {
  pc_conn_t *c = conn_of(s);
  if (c->state == ST_ESTABLISHED && c->h2)
    pc_h2_on_shutdown(c->h2, status);
  else if (c->state == ST_ESTABLISHED && c->l7)
    pc_l7_on_shutdown(c->l7, status);
  else if (c->state == ST_ESTABLISHED)
    pc_splice_on_shutdown(&c->splice, s, status);
}

/* Inbound: a source that keeps failing handshakes is closed at accept,
 * before any TLS, during its cool-down: counted (deny, limit), but not
 * logged line by line; the listener said once that it is throttled. */
static int throttle_at_accept(pc_conn_t *c) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  if (uv_tcp_getpeername(&c->down.tcp, (struct sockaddr *)&ss, &len) != 0 ||
      pc_throttle_key((const struct sockaddr *)&ss, c->gen->cfg->limits.throttle_ipv6_prefix,
                      &c->src) != 0)
    return 0;
  if (!pc_listener_throttled(c->l, &c->src)) return 0;
  c->decision = PC_DECISION_DENY;
  c->reason = PC_REASON_LIMIT;
  c->logged = 1;
  PC_STAT_INC(c->l->stats.conns[PC_DECISION_DENY][PC_REASON_LIMIT]);
  teardown(c, "throttled", 1);
  return 1;
}

/* A refusal before anything was read or sent (a transparent connection
 * that no route takes): counted and logged as any refusal, closed with RST
 * so the app cannot take it for an empty answer. */
static void refuse_at_accept(pc_conn_t *c, const char *why) {
  pc_log(PC_LOG_INFO, "listener %s: refusing connection from %s to %s: %s", c->lc->name,
         c->inbound ? c->peer_addr : c->app_addr, c->dst[0] ? c->dst : "?", why);
  c->decision = PC_DECISION_DENY;
  c->reason = PC_REASON_NOT_ALLOWED;
  teardown(c, "refused", 1);
}

/* Transparent listener: the original destination picks the route (its
 * config replaces the listener's for this connection) and pins the
 * endpoint. Returns 1 if the connection was refused. */
static int route_at_accept(pc_conn_t *c) {
  struct sockaddr_storage dst;
  if (c->inbound)
    pc_stream_addr(&c->down, 1, c->peer_addr, sizeof(c->peer_addr));
  else
    pc_stream_addr(&c->down, 1, c->app_addr, sizeof(c->app_addr));
  int self = pc_route_original_dst(&c->down.tcp, &dst);
  if (self < 0) {
    refuse_at_accept(c, "it has no original destination (not redirected to the listener)");
    return 1;
  }
  pc_addr_str(&dst, c->dst, sizeof(c->dst));
  if (!c->inbound) snprintf(c->peer_addr, sizeof(c->peer_addr), "%s", c->dst);
  if (self) {
    refuse_at_accept(c, "it was made to the transparent listener itself, not redirected to it");
    return 1;
  }
  pc_endpoint_t *ep;
  if (c->inbound) {
    ep = pc_route_local(c->lc, &dst);
  } else {
    const pc_listener_cfg_t *r = pc_route_match(c->lc, &dst, &ep);
    if (!r) {
      refuse_at_accept(c, "no route takes that destination");
      return 1;
    }
    c->lc = r;
  }
  c->pinned = 1;
  if (c->lc->protocol == PC_PROTO_HTTP) {
    pc_endpoint_settle(ep); /* requests count themselves */
    c->pin = ep;
  } else {
    c->ep = ep;
  }
  return 0;
}

int pc_conn_accept(pc_listener_t *l) {
  pc_worker_t *w = l->w;
  pc_conn_t *c = pc_calloc(1, sizeof(*c));
  c->w = w;
  c->l = l;
  c->lc = l->cfg;
  c->inbound = l->cfg->direction == PC_DIR_INBOUND;
  c->gen = w->gen;
  pc_gen_ref(c->gen);
  pc_listener_ref(l);
  c->start_ns = uv_hrtime();
  c->decision = PC_DECISION_ERROR;
  uv_timer_init(&w->loop, &c->timer);
  c->timer.data = c;
  c->handles = 1;
  pc_stream_init(&c->down, &w->loop, &w->scratch, &stream_cbs, c);
  c->down.tcp.data = c;
  c->handles++;
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  PC_STAT_INC(l->stats.active);
  __atomic_add_fetch(&active_conns, 1, __ATOMIC_SEQ_CST);
  int rc = uv_accept((uv_stream_t *)&l->tcp, (uv_stream_t *)&c->down.tcp);
  if (rc < 0) {
    c->logged = 1; /* nothing happened worth a line */
    teardown(c, "error", 0);
    return rc;
  }
  uv_tcp_nodelay(&c->down.tcp, 1);
  if (c->inbound && throttle_at_accept(c)) return 0;
  if (c->lc->transparent && route_at_accept(c)) return 0;
  c->peer.trust_domain = c->gen->cfg->trust_domain;
  c->peer.store = c->gen->certs->store;
  c->peer.depth = c->gen->cfg->tls.verify_depth;
  c->peer.policy = c->lc->policy;
  c->peer.is_server = c->inbound;
  c->peer.cache_tag = c->gen->id;
  c->peer.name = c->lc->name;
  c->peer.alpn_http = c->lc->protocol == PC_PROTO_HTTP;
  if (c->inbound) {
    pc_stream_addr(&c->down, 1, c->peer_addr, sizeof(c->peer_addr));
    snprintf(c->app_addr, sizeof(c->app_addr), "%s",
             c->pinned ? (c->ep ? c->ep : c->pin)->str : c->lc->target_str);
    c->pending = 1;
    __atomic_add_fetch(&pending_conns, 1, __ATOMIC_SEQ_CST);
    pc_listener_handshake_begun(l);
    c->state = ST_HANDSHAKE;
    arm(c, c->gen->cfg->limits.handshake_timeout_ms, on_handshake_timer);
    c->hs_start_ns = c->start_ns;
    if (pc_stream_start_tls(&c->down, pc_tls_new(c->gen->server_ctx, &c->peer), 1) != 0)
      teardown(c, "error", 1);
  } else {
    /* until connected */
    snprintf(c->peer_addr, sizeof(c->peer_addr), "%s",
             c->pinned ? (c->ep ? c->ep : c->pin)->str : c->lc->target_str);
    if (!c->pinned) pc_stream_addr(&c->down, 1, c->app_addr, sizeof(c->app_addr));
    if (c->lc->protocol == PC_PROTO_HTTP)
      establish(c);
    else
      start_connect(c);
  }
  return 0;
}

/* HTTP connections end as soon as nothing is in flight (l7.h, h2.h); the
 * next pointer stays valid because a connection is freed only in its last
 * close callback. */
void pc_conn_drain_all(pc_worker_t *w) {
  for (pc_conn_t *c = w->conns; c; c = c->next) {
    if (c->state != ST_ESTABLISHED) continue;
    if (c->h2)
      pc_h2_drain(c->h2);
    else if (c->l7 && !c->l7_closed && !(c->sniffing && c->sniff_len))
      pc_l7_drain(c->l7); /* (a preface begun: drained once it is HTTP/2, sniff) */
  }
}

void pc_conn_close_all(pc_worker_t *w) {
  pc_conn_t *c = w->conns;
  while (c) {
    pc_conn_t *next = c->next;
    if (c->state != ST_CLOSED) teardown(c, "shutdown", 0);
    c = next;
  }
}

/* Re-runs the peer decision of c against generation g (a newer one than c
 * started with): g's trust bundle, trust domain and depth, validity, and the
 * allow or expect list of g's listener by c's name. A connection whose
 * listener g renamed or removed keeps its own list, but is judged on g's
 * bundle like any other. PC_REASON_NONE if it passes; then the connection
 * also ends by the expiry of the path g's bundle verified. */
static pc_reason_t recheck(pc_conn_t *c, const pc_gen_t *g) {
  const pc_listener_cfg_t *lc = pc_config_counterpart(g->cfg, c->lc);
  if (!lc || lc->direction != c->lc->direction) lc = c->lc;
  pc_tls_peer_t pv = {.policy = lc->policy,
                      .trust_domain = g->cfg->trust_domain,
                      .store = g->certs->store,
                      .depth = g->cfg->tls.verify_depth,
                      .is_server = c->inbound,
                      .cache_tag = g->id};
  pc_reason_t r = pc_tls_recheck(&pv, tls_side(c)->ssl);
  free(pv.peer_id);
  if (r == PC_REASON_NONE) expire_by(c, pv.not_after, g->cfg->limits.revoke_grace_ms);
  return r;
}

void pc_conn_recheck_all(pc_worker_t *w) {
  const pc_gen_t *g = w->gen;
  uint64_t now = uv_now(&w->loop);
  for (pc_conn_t *c = w->conns; c; c = c->next) {
    if (!c->handshaken || c->state == ST_CLOSED || c->state == ST_LINGER) continue;
    pc_reason_t r = recheck(c, g);
    if (r == PC_REASON_NONE) {
      if (c->revoke_at) {
        pc_log(PC_LOG_INFO, "listener %s: connection from %s (%s) is allowed again", c->lc->name,
               c->peer.peer_id ? c->peer.peer_id : "?", c->peer_addr);
        c->revoke_at = 0;
      }
    } else if (!c->revoke_at) {
      c->revoke_at = now + g->cfg->limits.revoke_grace_ms;
      c->revoke_reason = r;
      pc_log(PC_LOG_INFO,
             "listener %s: connection from %s (%s) fails the new policy (%s); closing in %llu ms",
             c->lc->name, c->peer.peer_id ? c->peer.peer_id : "?", c->peer_addr, pc_reason_word(r),
             (unsigned long long)g->cfg->limits.revoke_grace_ms);
    }
    if (c->state == ST_ESTABLISHED) rearm(c);
  }
}

#include "pool.h"

#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "deadline.h"
#include "endpoint.h"
#include "log.h"
#include "worker.h"

enum { UP_CONNECTING, UP_HANDSHAKE, UP_LENT, UP_IDLE, UP_CLOSED };

struct pc_pool {
  pc_worker_t *w;
  pc_gen_t *gen;
  const pc_listener_cfg_t *lc;
  pc_upconn_t *idle; /* most recently used first */
  uint32_t nidle;
  uint32_t nconns; /* every connection of this pool, lent or not */
  int detached;    /* the worker stopped: freed with its last connection */
  pc_pool_t *next;
};

static void on_data(pc_stream_t *s, const char *buf, size_t len);
static void on_eof(pc_stream_t *s);
static void on_error(pc_stream_t *s, int err);
static void on_drain(pc_stream_t *s) { (void)s; }
static void on_shutdown(pc_stream_t *s, int status) {
  (void)s;
  (void)status;
}
static void on_handshake(pc_stream_t *s, int status);

static const pc_stream_cbs_t pool_cbs = {on_data,  on_eof,      on_error,
                                         on_drain, on_shutdown, on_handshake};

static void pool_free_if_done(pc_pool_t *p) {
  if (p->nconns > 0 || (!p->detached && p->gen == p->w->gen)) return;
  if (p->detached) {
    pc_gen_unref(p->gen);
    free(p);
    return;
  }
  pc_pool_t **pp = (pc_pool_t **)&p->w->pools;
  while (*pp != p)
    pp = &(*pp)->next;
  *pp = p->next;
  pc_gen_unref(p->gen);
  free(p);
}

pc_pool_t *pc_pool_for(pc_worker_t *w, pc_gen_t *g, const pc_listener_cfg_t *lc) {
  for (pc_pool_t *p = w->pools; p; p = p->next)
    if (p->gen == g && p->lc == lc) return p;
  pc_pool_t *p = pc_calloc(1, sizeof(*p));
  p->w = w;
  p->gen = g;
  p->lc = lc;
  pc_gen_ref(g);
  p->next = w->pools;
  w->pools = p;
  return p;
}

static void unlink_idle(pc_upconn_t *up) {
  pc_pool_t *p = up->pool;
  if (up->prev)
    up->prev->next = up->next;
  else
    p->idle = up->next;
  if (up->next) up->next->prev = up->prev;
  up->prev = up->next = NULL;
  p->nidle--;
}

static void on_closed(uv_handle_t *h) {
  pc_upconn_t *up = h->data;
  if (--up->handles > 0) return;
  pc_stream_release(&up->s);
  free(up->peer.peer_id);
  if (up->counted) pc_endpoint_settle(up->ep);
  pc_endpoint_unref(up->ep);
  pc_pool_t *p = up->pool;
  free(up);
  p->nconns--;
  pool_free_if_done(p);
}

static void close_up(pc_upconn_t *up, int reset) {
  if (up->state == UP_CLOSED) return;
  if (up->state == UP_IDLE) unlink_idle(up);
  up->state = UP_CLOSED;
  up->on_ready = NULL;
  uv_timer_stop(&up->timer);
  uv_close((uv_handle_t *)&up->timer, on_closed);
  pc_stream_close(&up->s, reset, on_closed);
}

static void lend(pc_upconn_t *up) {
  up->state = UP_LENT;
  /* An idle timer is left to lapse (on_idle_timer): stopping it here and
   * starting it again on release would cost two timer-heap updates per
   * request. */
  if (!up->idle_timer) uv_timer_stop(&up->timer);
  up->s.cbs = up->user_cbs;
  up->s.owner = up->user_owner;
}

/* Tells the borrower how the attempt ended; a failed connection closes. */
static void finish_attempt(pc_upconn_t *up, pc_upconn_fail_t fail, pc_reason_t reason,
                           const char *detail) {
  pc_upconn_ready_cb cb = up->on_ready;
  void *user = up->user;
  up->on_ready = NULL;
  if (fail == PC_UPCONN_OK) {
    pc_endpoint_ok(up->ep);
    lend(up);
  } else {
    if (up->stats && fail == PC_UPCONN_CONNECT) PC_STAT_INC(up->stats->connect_failures);
    if (up->ep) {
      const pc_config_t *cfg = up->pool->gen->cfg;
      pc_endpoint_failed(up->ep, cfg->health.ejection_base_ms, cfg->health.ejection_max_ms,
                         detail ? detail : "connection failed");
    }
    close_up(up, 1);
  }
  if (cb) cb(user, up, fail, reason, detail);
}

static void on_fail_timer(uv_timer_t *t) {
  pc_upconn_t *up = t->data;
  finish_attempt(up, up->fail_kind, up->fail_reason, up->fail_detail);
}

/* Failures found while starting are reported from the loop, not from inside
 * pc_pool_acquire. */
static void fail_later(pc_upconn_t *up, pc_upconn_fail_t fail, pc_reason_t reason,
                       const char *detail) {
  up->fail_kind = fail;
  up->fail_reason = reason;
  up->fail_detail = detail;
  uv_timer_start(&up->timer, on_fail_timer, 0, 0);
}

static void on_attempt_timer(uv_timer_t *t) {
  pc_upconn_t *up = t->data;
  if (pc_deadline_recheck(t, on_attempt_timer, &up->rechecked)) return;
  const char *what = up->state == UP_CONNECTING ? "connect" : "TLS handshake";
  pc_log(PC_LOG_WARN, "listener %s: %s to %s (%s) timed out", up->pool->lc->name, what, up->ep->str,
         up->pool->lc->target_str);
  if (up->state == UP_CONNECTING)
    finish_attempt(up, PC_UPCONN_CONNECT, PC_REASON_TIMEOUT,
                   "connecting to the upstream timed out");
  else
    finish_attempt(up, PC_UPCONN_TLS, PC_REASON_TIMEOUT,
                   "TLS handshake with the upstream timed out");
}

static void on_idle_timer(uv_timer_t *t) {
  pc_upconn_t *up = t->data;
  if (up->state != UP_IDLE) return; /* lent since: released again, it restarts */
  uint64_t now = uv_now(t->loop), timeout = up->pool->gen->cfg->http.pool_idle_timeout_ms;
  if (now - up->idle_since < timeout) {
    uv_timer_start(t, on_idle_timer, timeout - (now - up->idle_since), 0);
    return;
  }
  close_up(up, 0);
}

static void on_handshake(pc_stream_t *s, int status) {
  pc_upconn_t *up = s->owner;
  if (up->state != UP_HANDSHAKE) return;
  if (status < 0) {
    pc_reason_t r = pc_tls_failure_reason(s->ssl);
    pc_log(PC_LOG_WARN, "listener %s: TLS with upstream %s (%s) failed: %s", up->pool->lc->name,
           up->ep->str, up->peer.peer_id ? up->peer.peer_id : "?", pc_reason_word(r));
    finish_attempt(up, PC_UPCONN_TLS, r,
                   up->peer.reason != PC_REASON_NONE ? "the upstream's identity was refused"
                                                     : "TLS with the upstream failed");
    return;
  }
  uint8_t alert;
  pc_reason_t r = pc_tls_handshake_done(&up->peer, s->ssl, &alert);
  if (r != PC_REASON_NONE) {
    pc_log(PC_LOG_WARN, "listener %s: resumed TLS with upstream %s (%s) refused: %s",
           up->pool->lc->name, up->pool->lc->target_str, up->peer.peer_id ? up->peer.peer_id : "?",
           pc_reason_word(r));
    pc_stream_alert(s, alert);
    finish_attempt(up, PC_UPCONN_TLS, r, "the upstream's identity was refused");
    return;
  }
  if (up->stats && up->peer.resumed) PC_STAT_INC(up->stats->tls_resumed);
  if (up->stats)
    pc_hist_observe(&up->stats->handshake, &pc_hs_bounds,
                    (double)(uv_hrtime() - up->hs_start) / 1e9);
  finish_attempt(up, PC_UPCONN_OK, PC_REASON_NONE, NULL);
}

static void on_connect(uv_connect_t *req, int status) {
  pc_upconn_t *up = req->data;
  if (up->state != UP_CONNECTING) return;
  pc_pool_t *p = up->pool;
  if (status < 0) {
    pc_log(PC_LOG_WARN, "listener %s: cannot connect to %s (%s): %s", p->lc->name, up->ep->str,
           p->lc->target_str, uv_strerror(status));
    finish_attempt(up, PC_UPCONN_CONNECT, PC_REASON_NONE, "cannot connect to the upstream");
    return;
  }
  uv_tcp_nodelay(&up->s.tcp, 1);
  up->connected = 1;
  if (p->lc->direction == PC_DIR_INBOUND) {
    pc_stream_read_start(&up->s);
    finish_attempt(up, PC_UPCONN_OK, PC_REASON_NONE, NULL);
    return;
  }
  up->state = UP_HANDSHAKE;
  up->rechecked = 0;
  uv_timer_start(&up->timer, on_attempt_timer, p->gen->cfg->limits.handshake_timeout_ms, 0);
  up->peer = (pc_tls_peer_t){.policy = p->lc->policy,
                             .trust_domain = p->gen->cfg->trust_domain,
                             .store = p->gen->certs->store,
                             .depth = p->gen->cfg->tls.verify_depth,
                             .is_server = 0,
                             .cache_tag = p->gen->id,
                             .name = p->lc->name,
                             .endpoint = up->ep->str};
  SSL *ssl = pc_tls_new(p->gen->client_ctx, &up->peer);
  SSL_set_tlsext_host_name(ssl, p->lc->server_name);
  up->hs_start = uv_hrtime();
  if (pc_stream_start_tls(&up->s, ssl, 0) != 0)
    fail_later(up, PC_UPCONN_TLS, PC_REASON_PROTOCOL, "cannot start TLS");
}

/* Whether an idle connection may not be lent again (and is closed). */
static int unusable(pc_pool_t *p, pc_upconn_t *up, pc_metrics_t *stats) {
  /* Bytes an idle connection holds were never asked for (an app that
   * answered twice): it is closed, never lent, or they would be the answer
   * to this borrower's request. This matters most for a connection lent
   * again inside the read that completed its last response (a pipelined next
   * request), where libuv reads the rest of the socket only afterwards. */
  if (pc_stream_has_input(&up->s)) {
    pc_log(PC_LOG_WARN, "listener %s: %s sent unrequested bytes; closing that connection",
           p->lc->name, up->ep->str);
    return 1;
  }
  if (pc_tls_peer_expired(&up->peer, p->gen->cfg->limits.revoke_grace_ms)) {
    /* Credentials bind every request, not only the handshake. */
    pc_log(PC_LOG_INFO,
           "listener %s: the certificate of upstream %s (%s) expired; closing a pooled "
           "connection to it",
           p->lc->name, up->ep->str, up->peer.peer_id ? up->peer.peer_id : "?");
    PC_STAT_INC(stats->upstream_expired);
    return 1;
  }
  return pc_endpoint_removed(up->ep); /* a newer answer left it out */
}

pc_upconn_t *pc_pool_acquire(pc_pool_t *p, pc_endpoint_t *pin, pc_metrics_t *stats,
                             const pc_stream_cbs_t *cbs, void *owner, pc_upconn_ready_cb on_ready,
                             void *user, int *ready) {
  pc_endpoint_t *ep = pin;
  if (pin)
    pc_endpoint_use(pin);
  else
    ep = pc_target_pick(p->lc->tgt, NULL);
  pc_upconn_t *up = p->idle, *next;
  for (; up; up = next) {
    next = up->next;
    if (up->ep != ep) continue;
    if (!unusable(p, up, stats)) break;
    close_up(up, 1);
  }
  if (up) {
    pc_endpoint_unref(ep); /* the connection holds one; the count stays */
    unlink_idle(up);
    up->counted = 1;
    up->stats = stats;
    up->user_cbs = cbs;
    up->user_owner = owner;
    lend(up);
    *ready = 1;
    return up;
  }
  *ready = 0;
  up = pc_calloc(1, sizeof(*up));
  up->pool = p;
  up->ep = ep;
  up->counted = ep != NULL;
  up->stats = stats;
  up->user_cbs = cbs;
  up->user_owner = owner;
  up->on_ready = on_ready;
  up->user = user;
  up->state = UP_CONNECTING;
  p->nconns++;
  uv_timer_init(&p->w->loop, &up->timer);
  up->timer.data = up;
  up->handles = 1;
  int rc = pc_stream_init(&up->s, &p->w->loop, &p->w->scratch, &pool_cbs, up);
  if (rc == 0) {
    up->handles++;
    up->s.tcp.data = up;
  }
  if (!ep) {
    fail_later(up, PC_UPCONN_UNRESOLVED, PC_REASON_NONE, pc_target_unresolved_text(p->lc->tgt));
    return up;
  }
  PC_STAT_INC(stats->upstream_connects);
  if (rc == 0) {
    up->req.data = up;
    rc = uv_tcp_connect(&up->req, &up->s.tcp, (const struct sockaddr *)&ep->addr, on_connect);
  }
  if (rc < 0) {
    pc_log(PC_LOG_WARN, "listener %s: cannot connect to %s (%s): %s", p->lc->name, ep->str,
           p->lc->target_str, uv_strerror(rc));
    fail_later(up, PC_UPCONN_CONNECT, PC_REASON_NONE, "cannot connect to the upstream");
  } else {
    up->rechecked = 0;
    uv_timer_start(&up->timer, on_attempt_timer, p->gen->cfg->limits.connect_timeout_ms, 0);
  }
  return up;
}

void pc_pool_release(pc_upconn_t *up, int how) {
  pc_pool_t *p = up->pool;
  if (up->state == UP_CLOSED) return;
  if (up->s.truncated && up->stats) {
    /* The borrower took the stream's PC_STREAM_ETRUNC as a failure. */
    PC_STAT_INC(up->stats->tls_truncations);
    pc_log(PC_LOG_INFO,
           "listener %s: upstream %s (%s) closed TCP without TLS close_notify: its response may "
           "be truncated; not passed on as complete",
           p->lc->name, p->lc->target_str, up->peer.peer_id ? up->peer.peer_id : "?");
  }
  up->on_ready = NULL;
  up->stats = NULL;
  if (up->counted) pc_endpoint_settle(up->ep);
  up->counted = 0;
  if (how != PC_POOL_KEEP || up->state != UP_LENT || p->gen != p->w->gen || p->w->draining ||
      p->nidle >= p->gen->cfg->http.pool_max_idle || up->s.tcp_eof || up->s.shutting ||
      pc_endpoint_removed(up->ep)) {
    close_up(up, how == PC_POOL_ABORT);
    return;
  }
  up->served++;
  up->state = UP_IDLE;
  up->s.cbs = &pool_cbs;
  up->s.owner = up;
  up->next = p->idle;
  if (p->idle) p->idle->prev = up;
  p->idle = up;
  p->nidle++;
  up->idle_since = uv_now(&p->w->loop);
  if (!up->idle_timer || !uv_is_active((uv_handle_t *)&up->timer)) {
    up->idle_timer = 1;
    uv_timer_start(&up->timer, on_idle_timer, p->gen->cfg->http.pool_idle_timeout_ms, 0);
  }
  pc_stream_read_start(&up->s);
}

/* Idle: anything the app or upstream says now was not asked for. */
static void on_data(pc_stream_t *s, const char *buf, size_t len) {
  (void)buf;
  pc_upconn_t *up = s->owner;
  if (up->state == UP_IDLE)
    pc_log(PC_LOG_WARN, "listener %s: %s sent %zu unrequested bytes; closing that connection",
           up->pool->lc->name, up->ep->str, len);
  close_up(up, 1);
}

static void on_eof(pc_stream_t *s) { close_up(s->owner, 0); }

static void on_error(pc_stream_t *s, int err) {
  pc_upconn_t *up = s->owner;
  (void)err;
  if (up->state == UP_CONNECTING || up->state == UP_HANDSHAKE)
    finish_attempt(up, PC_UPCONN_TLS, PC_REASON_PROTOCOL,
                   "the upstream closed during the TLS handshake");
  else
    close_up(up, 1);
}

static void close_idle(pc_pool_t *p) {
  while (p->idle)
    close_up(p->idle, 0);
}

void pc_pool_sweep(pc_worker_t *w) {
  pc_pool_t *p = w->pools;
  while (p) {
    pc_pool_t *next = p->next;
    if (p->gen != w->gen) {
      close_idle(p);
      pool_free_if_done(p);
    } else {
      pc_upconn_t *up = p->idle, *un;
      for (; up; up = un) {
        un = up->next;
        if (pc_endpoint_removed(up->ep)) close_up(up, 0);
      }
    }
    p = next;
  }
}

void pc_pool_drain(pc_worker_t *w) {
  for (pc_pool_t *p = w->pools; p; p = p->next)
    close_idle(p);
}

void pc_pool_close_all(pc_worker_t *w) {
  pc_pool_t *p = w->pools;
  while (p) {
    pc_pool_t *next = p->next;
    close_idle(p);
    if (p->nconns == 0) {
      pc_gen_unref(p->gen);
      free(p);
    } else {
      p->detached = 1;
      p->next = NULL;
    }
    p = next;
  }
  w->pools = NULL;
}

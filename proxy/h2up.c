#include "h2up.h"

#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "deadline.h"
#include "endpoint.h"
#include "h2io.h"
#include "log.h"
#include "stream.h"
#include "tls.h"
#include "worker.h"

enum { C_CONNECTING, C_HANDSHAKE, C_READY, C_CLOSED };

typedef struct h2conn h2conn_t;

typedef struct h2pool {
  pc_worker_t *w;
  pc_gen_t *gen;
  const pc_listener_cfg_t *lc;
  h2conn_t *conns;
  uint32_t nconns;
  int h1_only;  /* the upstream selected no h2 by ALPN */
  int detached; /* the worker stopped: freed with its last connection */
  struct h2pool *next;
} h2pool_t;

struct h2conn {
  pc_stream_t s;
  pc_tls_peer_t peer;
  uv_timer_t timer; /* connect / handshake deadline, then the idle timer */
  uv_connect_t req;
  h2pool_t *pool;
  pc_endpoint_t *ep; /* where it goes (a reference); NULL: the name has no address */
  nghttp2_session *ss;
  int state, handles;
  uint8_t rechecked;
  pc_h2call_t *calls;
  pc_h2call_t *sent_list; /* calls with body bytes framed and not yet reported */
  uint32_t ncalls;        /* calls not yet released */
  uint64_t served;        /* streams that ended with a whole response */
  uint64_t hs_start;
  pc_jbuf_t out;
  unsigned in_flush : 1, again : 1, goaway : 1, send_bp : 1, retired : 1, in_recv : 1,
      gentle : 1,      /* closed by us (idle, retired, drain): no failure of the endpoint */
      connected : 1;   /* TCP reached ep (the access log names it only then) */
  pc_deferred_t defer; /* flush after this loop iteration's I/O (flush_later) */
  h2conn_t *prev, *next;
};

typedef struct {
  uint32_t no, nl, vo, vl;
} hfield_t;

struct pc_h2call {
  h2conn_t *conn;
  pc_endpoint_t *ep; /* picked for it: counted in flight until it is freed */
  int32_t id;
  const pc_upcall_cbs_t *cbs;
  void *user;
  pc_metrics_t *stats;
  pc_jbuf_t sbuf; /* request body not yet framed */
  size_t soff;
  pc_jbuf_t hb; /* header bytes being collected */
  hfield_t *hf;
  uint32_t nhf, hfcap, hbytes;
  int status;
  size_t unconsumed;      /* response bytes received and not yet consumed */
  size_t sent;            /* request body bytes framed, not yet reported by on_sent */
  pc_h2call_t *sent_next; /* on the connection's list of calls with sent > 0 */
  unsigned head : 1, ended : 1, end_req : 1, released : 1, closed : 1, deferred : 1, any : 1,
      over : 1, dying : 1; /* dying: its stream is closing; release only marks it */
  pc_h2call_t *prev, *next;
};

static void conn_close(h2conn_t *c, const char *why);
static void flush(h2conn_t *c);

/* ---- pools -------------------------------------------------------------- */

static h2pool_t *pool_find(pc_worker_t *w, pc_gen_t *g, const pc_listener_cfg_t *lc, int make) {
  for (h2pool_t *p = w->h2pools; p; p = p->next)
    if (p->gen == g && p->lc == lc) return p;
  if (!make) return NULL;
  h2pool_t *p = pc_calloc(1, sizeof(*p));
  p->w = w;
  p->gen = g;
  p->lc = lc;
  pc_gen_ref(g);
  p->next = w->h2pools;
  w->h2pools = p;
  return p;
}

static void pool_free_if_done(h2pool_t *p) {
  if (p->nconns > 0 || (!p->detached && p->gen == p->w->gen)) return;
  if (!p->detached) {
    h2pool_t **pp = (h2pool_t **)&p->w->h2pools;
    while (*pp != p)
      pp = &(*pp)->next;
    *pp = p->next;
  }
  pc_gen_unref(p->gen);
  free(p);
}

int pc_h2up_h1_only(pc_worker_t *w, pc_gen_t *g, const pc_listener_cfg_t *lc) {
  h2pool_t *p = pool_find(w, g, lc, 0);
  return p && p->h1_only;
}

/* ---- calls -------------------------------------------------------------- */

static void conn_maybe_free(h2conn_t *c);

static void call_free(pc_h2call_t *k) {
  h2conn_t *c = k->conn;
  if (k->sent) { /* still waiting to be reported: off that list (rare) */
    pc_h2call_t **pp = &c->sent_list;
    while (*pp != k)
      pp = &(*pp)->sent_next;
    *pp = k->sent_next;
  }
  if (k->prev)
    k->prev->next = k->next;
  else
    c->calls = k->next;
  if (k->next) k->next->prev = k->prev;
  pc_jbuf_free(&k->sbuf);
  pc_jbuf_free(&k->hb);
  free(k->hf);
  pc_endpoint_done(k->ep);
  free(k);
  if (c->state == C_CLOSED) conn_maybe_free(c);
}

/* Fires on_fail once, unless the call ended or was released. */
static void call_fail(pc_h2call_t *k, int status, pc_reason_t r, const char *detail, int retry) {
  if (k->released || k->ended) return;
  k->ended = 1;
  if (k->head) status = 0;
  k->cbs->on_fail(k->user, status, r, detail, retry);
}

static pc_h2call_t *call_of(h2conn_t *c, int32_t id) {
  return nghttp2_session_get_stream_user_data(c->ss, id);
}

static ssize_t read_req(nghttp2_session *ss, int32_t id, uint8_t *buf, size_t length,
                        uint32_t *flags, nghttp2_data_source *src, void *user) {
  (void)ss;
  (void)id;
  (void)user;
  pc_h2call_t *k = src->ptr;
  size_t left = k->sbuf.len - k->soff;
  size_t n = left < length ? left : length;
  if (n) memcpy(buf, k->sbuf.data + k->soff, n);
  k->soff += n;
  if (k->soff == k->sbuf.len) k->soff = k->sbuf.len = 0;
  if (n && !k->sent) { /* reported after the send (report_sent), outside nghttp2 */
    k->sent_next = k->conn->sent_list;
    k->conn->sent_list = k;
  }
  k->sent += n;
  if (k->end_req && k->sbuf.len == 0) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
  }
  if (n == 0) {
    k->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  return (ssize_t)n;
}

/* What callers ask for (request bytes, window, resets) goes out once, after
 * every client stream of this loop iteration has been heard: one write
 * carries many streams' frames (worker.h pc_worker_defer). */
static void flush_later(h2conn_t *c) {
  if (c->state == C_READY) pc_worker_defer(c->pool->w, &c->defer);
}

static void run_deferred(pc_deferred_t *d) { flush(pc_container_of(d, h2conn_t, defer)); }

static void req_more(pc_h2call_t *k) {
  if (k->deferred && !k->closed) {
    k->deferred = 0;
    nghttp2_session_resume_data(k->conn->ss, k->id);
  }
  flush_later(k->conn);
}

void pc_h2call_send(pc_h2call_t *k, const char *data, size_t len) {
  pc_jbuf_raw(&k->sbuf, data, len);
  req_more(k);
}

void pc_h2call_end(pc_h2call_t *k) {
  k->end_req = 1;
  req_more(k);
}

void pc_h2call_consumed(pc_h2call_t *k, size_t n) {
  if (n > k->unconsumed) n = k->unconsumed;
  k->unconsumed -= n;
  if (k->conn->state == C_CLOSED || !n) return;
  nghttp2_session_consume(k->conn->ss, k->id, n);
  flush_later(k->conn);
}

void pc_h2call_release(pc_h2call_t *k) {
  h2conn_t *c = k->conn;
  k->released = 1;
  c->ncalls--;
  if (k->dying) return; /* freed by the code that is closing it */
  if (k->closed || c->state == C_CLOSED) {
    int live = c->state != C_CLOSED; /* a closed c may go with its last call */
    call_free(k);
    if (live) flush_later(c);
    return;
  }
  /* The window the caller never consumed goes back to the connection; a
   * stream not finished both ways is cancelled (it closes, and is freed, in
   * on_stream_close). */
  if (k->unconsumed) nghttp2_session_consume_connection(c->ss, k->unconsumed);
  k->unconsumed = 0;
  if (!(k->ended && k->end_req && k->sbuf.len == 0))
    nghttp2_submit_rst_stream(c->ss, NGHTTP2_FLAG_NONE, k->id, NGHTTP2_CANCEL);
  flush_later(c);
}

const char *pc_h2call_peer_id(const pc_h2call_t *k) { return k->conn->peer.peer_id; }

const char *pc_h2call_tls_version(const pc_h2call_t *k) {
  return k->conn->s.ssl ? SSL_get_version(k->conn->s.ssl) : NULL;
}

const char *pc_h2call_endpoint(const pc_h2call_t *k) {
  return k->conn->ep && k->conn->connected ? k->conn->ep->str : NULL;
}
int pc_h2call_tls_resumed(const pc_h2call_t *k) { return k->conn->peer.resumed; }

const char *pc_h2call_cipher(const pc_h2call_t *k) {
  return k->conn->s.ssl ? SSL_CIPHER_get_name(SSL_get_current_cipher(k->conn->s.ssl)) : NULL;
}

/* ---- nghttp2 callbacks -------------------------------------------------- */

static int on_header(nghttp2_session *ss, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *user) {
  (void)ss;
  (void)flags;
  h2conn_t *c = user;
  pc_h2call_t *k = call_of(c, f->hd.stream_id);
  if (!k || k->over) return 0;
  const pc_config_t *cfg = c->pool->gen->cfg;
  k->hbytes += (uint32_t)(nlen + vlen + 4);
  if (k->nhf + 1 > cfg->http.max_headers || k->hbytes > cfg->http.max_header_bytes) {
    k->over = 1;
    return 0;
  }
  if (nlen == 7 && memcmp(name, ":status", 7) == 0) {
    int st = 0;
    for (size_t i = 0; i < vlen && i < 3; i++)
      st = st * 10 + (value[i] - '0');
    k->status = st;
    return 0;
  }
  if (k->nhf == k->hfcap) {
    k->hfcap = k->hfcap ? 2 * k->hfcap : 16;
    k->hf = pc_realloc(k->hf, k->hfcap * sizeof(*k->hf));
  }
  hfield_t *e = &k->hf[k->nhf++];
  e->no = (uint32_t)k->hb.len;
  e->nl = (uint32_t)nlen;
  pc_jbuf_raw(&k->hb, (const char *)name, nlen);
  e->vo = (uint32_t)k->hb.len;
  e->vl = (uint32_t)vlen;
  pc_jbuf_raw(&k->hb, (const char *)value, vlen);
  return 0;
}

/* The collected fields as an nv array (caller frees). */
static nghttp2_nv *fields_nv(pc_h2call_t *k) {
  nghttp2_nv *nv = pc_calloc(k->nhf + 1, sizeof(*nv));
  for (uint32_t i = 0; i < k->nhf; i++)
    nv[i] = (nghttp2_nv){(uint8_t *)k->hb.data + k->hf[i].no, (uint8_t *)k->hb.data + k->hf[i].vo,
                         k->hf[i].nl, k->hf[i].vl, NGHTTP2_NV_FLAG_NONE};
  return nv;
}

static void reset_fields(pc_h2call_t *k) {
  k->nhf = 0;
  k->hbytes = 0;
  k->hb.len = 0;
}

static int on_frame_recv(nghttp2_session *ss, const nghttp2_frame *f, void *user) {
  (void)ss;
  h2conn_t *c = user;
  if (f->hd.type == NGHTTP2_GOAWAY) {
    c->goaway = 1; /* streams past its last id close with REFUSED_STREAM: retried */
    return 0;
  }
  pc_h2call_t *k = f->hd.stream_id ? call_of(c, f->hd.stream_id) : NULL;
  if (!k) return 0;
  int end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
  if (f->hd.type == NGHTTP2_HEADERS) {
    if (k->over) {
      nghttp2_submit_rst_stream(c->ss, NGHTTP2_FLAG_NONE, k->id, NGHTTP2_INTERNAL_ERROR);
      pc_log(PC_LOG_WARN, "listener %s: upstream %s: response header fields over the limits",
             c->pool->lc->name, c->ep->str);
      call_fail(k, 502, PC_REASON_PROTOCOL,
                "the upstream's response header fields exceed the sidecar's limits", 0);
      return 0;
    }
    if (!k->head && k->status >= 100 && k->status < 200) {
      if (k->cbs->on_info && !k->released && !k->ended && k->status != 101) {
        nghttp2_nv *nv = fields_nv(k);
        k->cbs->on_info(k->user, k->status, nv, k->nhf);
        free(nv);
      }
      reset_fields(k);
      return 0;
    }
    k->any = 1;
    nghttp2_nv *nv = fields_nv(k);
    if (!k->head) {
      k->head = 1;
      if (!k->released && !k->ended) k->cbs->on_head(k->user, k->status, nv, k->nhf, end);
      if (end && !k->released && !k->ended) {
        k->ended = 1;
        k->cbs->on_end(k->user, NULL, 0);
      }
    } else if (!k->released && !k->ended) {
      k->ended = 1;
      k->cbs->on_end(k->user, nv, k->nhf);
    }
    free(nv);
    reset_fields(k);
  } else if (f->hd.type == NGHTTP2_DATA && end && !k->released && !k->ended) {
    k->ended = 1;
    k->cbs->on_end(k->user, NULL, 0);
  }
  return 0;
}

static int on_data_chunk(nghttp2_session *ss, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *user) {
  (void)flags;
  h2conn_t *c = user;
  pc_h2call_t *k = call_of(c, id);
  if (!k || k->released || k->ended) {
    nghttp2_session_consume(ss, id, len);
    return 0;
  }
  k->any = 1;
  k->unconsumed += len;
  k->cbs->on_data(k->user, data, len);
  return 0;
}

static int on_stream_close(nghttp2_session *ss, int32_t id, uint32_t code, void *user) {
  (void)ss;
  h2conn_t *c = user;
  pc_h2call_t *k = call_of(c, id);
  if (!k) return 0;
  nghttp2_session_set_stream_user_data(c->ss, id, NULL);
  if (k->ended && k->head) c->served++;
  if (k->unconsumed) nghttp2_session_consume_connection(c->ss, k->unconsumed);
  k->unconsumed = 0;
  k->dying = 1;
  if (!k->ended && !k->released) {
    int retry = !k->any && code == NGHTTP2_REFUSED_STREAM;
    if (!retry)
      pc_log(PC_LOG_WARN, "listener %s: upstream %s reset a stream (%s)", c->pool->lc->name,
             c->ep->str, pc_h2_error_word(code));
    call_fail(k, 502, PC_REASON_PROTOCOL,
              retry ? "the upstream refused the stream" : "the upstream reset the stream", retry);
  }
  k->dying = 0; /* a release from now on frees it */
  k->closed = 1;
  if (k->released) call_free(k);
  return 0;
}

/* ---- the connection ----------------------------------------------------- */

/* A closed connection is freed once its handles are closed and every call
 * on it was released (a caller may hold a failed call a while). */
static void conn_maybe_free(h2conn_t *c) {
  if (c->handles > 0 || c->calls) return;
  pc_worker_undefer(c->pool->w, &c->defer);
  pc_stream_release(&c->s);
  free(c->peer.peer_id);
  if (c->ss) nghttp2_session_del(c->ss);
  pc_jbuf_free(&c->out);
  pc_endpoint_unref(c->ep);
  h2pool_t *p = c->pool;
  free(c);
  p->nconns--;
  pool_free_if_done(p);
}

static void on_closed(uv_handle_t *hd) {
  h2conn_t *c = hd->data;
  c->handles--;
  conn_maybe_free(c);
}

static void unlink_conn(h2conn_t *c) {
  h2pool_t *p = c->pool;
  if (c->prev)
    c->prev->next = c->next;
  else
    p->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

/* Ends the connection: every call still attached fails (before its head,
 * with status; retry if the upstream never answered a stream of a
 * connection that had served others), then the handles close. */
static void conn_fail(h2conn_t *c, int status, pc_reason_t r, const char *detail) {
  if (c->state == C_CLOSED) return;
  int was_ready = c->state == C_READY;
  /* Passive health: a failed connect or handshake, or a connection that
   * ends before answering anything, ejects its endpoint; what never reached
   * it may go to another. A fall-back to HTTP/1.1 is no failure. */
  int any = 0;
  for (pc_h2call_t *k = c->calls; k; k = k->next)
    any |= k->any;
  int fresh_fail = status != PC_UPCALL_USE_H1 && !c->gentle && c->ep && !any && c->served == 0;
  if (fresh_fail) {
    const pc_config_t *cfg = c->pool->gen->cfg;
    pc_endpoint_failed(c->ep, cfg->health.ejection_base_ms, cfg->health.ejection_max_ms, detail);
  }
  int elsewhere = fresh_fail && !was_ready && status == 503 && !pc_config_pinned(c->pool->lc) &&
                  pc_target_size(c->pool->lc->tgt) > 1;
  c->state = C_CLOSED;
  unlink_conn(c);
  /* Callers may release any call of c from inside on_fail: all are marked
   * first, so that release only marks them, and swept afterwards. */
  c->handles++; /* c outlives the sweep */
  for (pc_h2call_t *k = c->calls; k; k = k->next)
    k->dying = k->closed = 1;
  for (pc_h2call_t *k = c->calls; k; k = k->next) {
    if (status == 503 && k->stats && !k->released) PC_STAT_INC(k->stats->connect_failures);
    /* A ready connection that served before and dies with a stream
     * unanswered was most likely closed by the peer as it went idle; a
     * fresh one that dies before answering anything (a TLS 1.3 server
     * refusing our certificate just after the handshake) is no reason to
     * try the same upstream again. */
    call_fail(k, status, r, detail,
              status == PC_UPCALL_USE_H1 || (was_ready && c->served > 0 && !k->any) || elsewhere);
  }
  pc_h2call_t *k = c->calls;
  while (k) {
    pc_h2call_t *next = k->next;
    k->dying = 0;
    if (k->released) call_free(k);
    k = next;
  }
  c->handles--;
  uv_timer_stop(&c->timer);
  uv_close((uv_handle_t *)&c->timer, on_closed);
  pc_stream_close(&c->s, 0, on_closed);
}

static void conn_close(h2conn_t *c, const char *why) {
  pc_log(PC_LOG_DEBUG, "listener %s: HTTP/2 connection to %s closes (%s)", c->pool->lc->name,
         c->ep ? c->ep->str : c->pool->lc->target_str, why);
  c->gentle = 1;
  conn_fail(c, 502, PC_REASON_PROTOCOL, "the upstream connection closed");
}

static void on_idle_timer(uv_timer_t *t) {
  h2conn_t *c = t->data;
  if (c->ncalls == 0 && c->calls == NULL) conn_close(c, "idle");
}

/* No call left: close if retired or of an older generation, else wait
 * pool_idle_timeout_ms for the next one. */
static void maybe_idle(h2conn_t *c) {
  if (c->state != C_READY || c->ncalls || c->calls) return;
  if (!c->out.len && c->out.data) pc_jbuf_release(&c->out);
  if (c->retired || c->goaway || c->pool->gen != c->pool->w->gen || c->pool->w->draining ||
      (c->ep && pc_endpoint_removed(c->ep))) {
    conn_close(c, "retired");
    return;
  }
  uv_timer_start(&c->timer, on_idle_timer, c->pool->gen->cfg->http.pool_idle_timeout_ms, 0);
}

/* Tells callers how much of their request bodies went out: one report per
 * call on sent_list, popped before its callback, so that a caller may do
 * anything from on_sent, releasing calls included (call_free takes a call
 * off the list). */
static void report_sent(h2conn_t *c) {
  pc_h2call_t *k;
  while ((k = c->sent_list)) {
    c->sent_list = k->sent_next;
    size_t n = k->sent;
    k->sent = 0;
    if (!k->released && !k->ended && !k->dying) k->cbs->on_sent(k->user, n);
  }
}

static void flush(h2conn_t *c) {
  if (c->state != C_READY || c->in_recv) return; /* s_on_data flushes after mem_recv */
  if (c->in_flush) {
    c->again = 1;
    return;
  }
  c->in_flush = 1;
  do {
    c->again = 0;
    unsigned bp = c->send_bp;
    int err = 0, rc = pc_h2io_send(c->ss, &c->s, &c->out, &bp, &err);
    c->send_bp = bp;
    if (rc != PC_H2IO_OK) {
      c->in_flush = 0;
      conn_fail(c, 502, PC_REASON_PROTOCOL,
                rc == PC_H2IO_SESSION ? "HTTP/2 with the upstream failed"
                                      : "writing to the upstream failed");
      return;
    }
  } while (c->again && c->state == C_READY);
  c->in_flush = 0;
  if (c->state != C_READY) return;
  report_sent(c);
  if (c->state != C_READY) return;
  if (!nghttp2_session_want_read(c->ss) && !nghttp2_session_want_write(c->ss)) {
    conn_close(c, "done");
    return;
  }
  maybe_idle(c);
}

static void s_on_data(pc_stream_t *s, const char *buf, size_t len) {
  h2conn_t *c = s->owner;
  if (c->state != C_READY) return;
  uv_timer_stop(&c->timer);
  c->in_recv = 1;
  ssize_t rv = nghttp2_session_mem_recv(c->ss, (const uint8_t *)buf, len);
  c->in_recv = 0;
  if (c->state != C_READY) return;
  if (rv < 0) {
    pc_log(PC_LOG_WARN, "listener %s: HTTP/2 from %s: %s", c->pool->lc->name, c->ep->str,
           nghttp2_strerror((int)rv));
    conn_fail(c, 502, PC_REASON_PROTOCOL, "the upstream broke HTTP/2");
    return;
  }
  flush(c);
}

static void s_on_eof(pc_stream_t *s) {
  conn_fail(s->owner, 502, PC_REASON_PROTOCOL,
            "the upstream closed the connection before the response ended");
}

static void s_on_error(pc_stream_t *s, int err) {
  h2conn_t *c = s->owner;
  pc_h2call_t *k = c->calls; /* a call in flight: the truncation cut it (counted once) */
  while (k && (k->released || k->ended))
    k = k->next;
  if (err == PC_STREAM_ETRUNC && k) {
    PC_STAT_INC(k->stats->tls_truncations);
    pc_log(PC_LOG_INFO,
           "listener %s: upstream %s closed TCP without TLS close_notify: resetting"
           " its streams",
           c->pool->lc->name, c->ep->str);
  }
  if (c->state == C_HANDSHAKE || c->state == C_CONNECTING)
    conn_fail(c, 502, PC_REASON_PROTOCOL, "the upstream closed during the TLS handshake");
  else
    conn_fail(c, 502, PC_REASON_PROTOCOL,
              err == PC_STREAM_ETLS
                  ? "the upstream ended TLS (it may have refused this sidecar's identity)"
                  : "the upstream connection failed");
}

static void s_on_drain(pc_stream_t *s) {
  h2conn_t *c = s->owner;
  c->send_bp = 0;
  flush(c);
}

static void s_on_shutdown(pc_stream_t *s, int status) {
  (void)s;
  (void)status;
}

static void become_ready(h2conn_t *c) {
  c->state = C_READY;
  uv_timer_stop(&c->timer);
  flush(c);
}

static void s_on_handshake(pc_stream_t *s, int status) {
  h2conn_t *c = s->owner;
  if (c->state != C_HANDSHAKE) return;
  const pc_listener_cfg_t *lc = c->pool->lc;
  if (status < 0) {
    pc_reason_t r = pc_tls_failure_reason(s->ssl);
    pc_log(PC_LOG_WARN, "listener %s: TLS with upstream %s (%s) failed: %s", lc->name, c->ep->str,
           c->peer.peer_id ? c->peer.peer_id : "?", pc_reason_word(r));
    conn_fail(c, 502, r,
              c->peer.reason != PC_REASON_NONE ? "the upstream's identity was refused"
                                               : "TLS with the upstream failed");
    return;
  }
  uint8_t alert;
  pc_reason_t r = pc_tls_handshake_done(&c->peer, s->ssl, &alert);
  if (r != PC_REASON_NONE) {
    pc_log(PC_LOG_WARN, "listener %s: resumed TLS with upstream %s (%s) refused: %s", lc->name,
           lc->target_str, c->peer.peer_id ? c->peer.peer_id : "?", pc_reason_word(r));
    pc_stream_alert(s, alert);
    conn_fail(c, 502, r, "the upstream's identity was refused");
    return;
  }
  pc_h2call_t *k = c->calls;
  if (k && k->stats && c->peer.resumed) PC_STAT_INC(k->stats->tls_resumed);
  if (k && k->stats)
    pc_hist_observe(&k->stats->handshake, &pc_hs_bounds, (double)(uv_hrtime() - c->hs_start) / 1e9);
  if (!pc_tls_alpn_is_h2(s->ssl)) {
    if (lc->upstream_protocol == PC_UP_AUTO) {
      pc_log(PC_LOG_INFO, "listener %s: upstream %s does not offer h2; using HTTP/1.1", lc->name,
             lc->target_str);
      c->pool->h1_only = 1;
      conn_fail(c, PC_UPCALL_USE_H1, PC_REASON_NONE, "the upstream speaks HTTP/1.1 only");
    } else {
      pc_log(PC_LOG_WARN, "listener %s: upstream %s did not select h2 by ALPN", lc->name,
             lc->target_str);
      conn_fail(c, 502, PC_REASON_PROTOCOL, "the upstream does not speak HTTP/2");
    }
    return;
  }
  pc_endpoint_ok(c->ep);
  become_ready(c);
}

static const pc_stream_cbs_t conn_cbs = {s_on_data,  s_on_eof,      s_on_error,
                                         s_on_drain, s_on_shutdown, s_on_handshake};

static void on_attempt_timer(uv_timer_t *t) {
  h2conn_t *c = t->data;
  if (pc_deadline_recheck(t, on_attempt_timer, &c->rechecked)) return;
  const pc_listener_cfg_t *lc = c->pool->lc;
  if (!c->ep) {
    conn_fail(c, 503, PC_REASON_NONE, pc_target_unresolved_text(lc->tgt));
    return;
  }
  pc_log(PC_LOG_WARN, "listener %s: %s to %s (%s) timed out", lc->name,
         c->state == C_CONNECTING ? "connect" : "TLS handshake", c->ep->str, lc->target_str);
  if (c->state == C_CONNECTING)
    conn_fail(c, 503, PC_REASON_TIMEOUT, "connecting to the upstream timed out");
  else
    conn_fail(c, 504, PC_REASON_TIMEOUT, "TLS handshake with the upstream timed out");
}

static void on_connect(uv_connect_t *req, int status) {
  h2conn_t *c = req->data;
  if (c->state != C_CONNECTING) return;
  h2pool_t *p = c->pool;
  const pc_listener_cfg_t *lc = p->lc;
  if (status < 0) {
    pc_log(PC_LOG_WARN, "listener %s: cannot connect to %s (%s): %s", lc->name, c->ep->str,
           lc->target_str, uv_strerror(status));
    conn_fail(c, 503, PC_REASON_NONE, "cannot connect to the upstream");
    return;
  }
  uv_tcp_nodelay(&c->s.tcp, 1);
  c->connected = 1;
  if (lc->direction == PC_DIR_INBOUND) {
    pc_stream_read_start(&c->s);
    become_ready(c);
    return;
  }
  c->state = C_HANDSHAKE;
  c->rechecked = 0;
  uv_timer_start(&c->timer, on_attempt_timer, p->gen->cfg->limits.handshake_timeout_ms, 0);
  c->peer = (pc_tls_peer_t){.policy = lc->policy,
                            .trust_domain = p->gen->cfg->trust_domain,
                            .store = p->gen->certs->store,
                            .depth = p->gen->cfg->tls.verify_depth,
                            .is_server = 0,
                            .cache_tag = p->gen->id,
                            .name = lc->name,
                            .endpoint = c->ep->str};
  SSL *ssl = pc_tls_new(p->gen->client_ctx, &c->peer);
  SSL_set_tlsext_host_name(ssl, lc->server_name);
  static const uint8_t h2_only[] = "\x02h2", both[] = "\x02h2\x08http/1.1";
  if (lc->upstream_protocol == PC_UP_AUTO)
    SSL_set_alpn_protos(ssl, both, sizeof(both) - 1);
  else
    SSL_set_alpn_protos(ssl, h2_only, sizeof(h2_only) - 1);
  c->hs_start = uv_hrtime();
  if (pc_stream_start_tls(&c->s, ssl, 0) != 0)
    conn_fail(c, 502, PC_REASON_PROTOCOL, "cannot start TLS");
}

static h2conn_t *conn_new(h2pool_t *p, pc_endpoint_t *ep) {
  h2conn_t *c = pc_calloc(1, sizeof(*c));
  c->pool = p;
  c->ep = ep;
  if (ep) pc_endpoint_ref(ep);
  c->state = C_CONNECTING;
  c->defer.run = run_deferred;
  p->nconns++;
  c->next = p->conns;
  if (p->conns) p->conns->prev = c;
  p->conns = c;
  uv_timer_init(&p->w->loop, &c->timer);
  c->timer.data = c;
  c->handles = 1;
  const pc_config_t *cfg = p->gen->cfg;
  nghttp2_session_callbacks *cb;
  nghttp2_session_callbacks_new(&cb);
  nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
  nghttp2_option *opt;
  nghttp2_option_new(&opt);
  nghttp2_option_set_no_auto_window_update(opt, 1);
  if (nghttp2_session_client_new2(&c->ss, cb, c, opt) != 0) pc_fatal("out of memory");
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cb);
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, cfg->http2.stream_window},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, cfg->http.max_header_bytes},
  };
  nghttp2_submit_settings(c->ss, NGHTTP2_FLAG_NONE, iv, PC_ARRAY_SIZE(iv));
  nghttp2_session_set_local_window_size(c->ss, NGHTTP2_FLAG_NONE, 0,
                                        (int32_t)cfg->http2.connection_window);
  int rc = pc_stream_init(&c->s, &p->w->loop, &p->w->scratch, &conn_cbs, c);
  if (rc == 0) {
    c->handles++;
    c->s.tcp.data = c;
    c->req.data = c;
    if (!ep) { /* fails from the loop (on_attempt_timer), as any attempt */
      c->rechecked = 1;
      uv_timer_start(&c->timer, on_attempt_timer, 0, 0);
      return c;
    }
    rc = uv_tcp_connect(&c->req, &c->s.tcp, (const struct sockaddr *)&ep->addr, on_connect);
  }
  if (rc < 0) {
    pc_log(PC_LOG_WARN, "listener %s: cannot connect to %s (%s): %s", p->lc->name,
           ep ? ep->str : "?", p->lc->target_str, uv_strerror(rc));
    c->rechecked = 1; /* report at once, from the loop */
    uv_timer_start(&c->timer, on_attempt_timer, 0, 0);
  } else {
    c->rechecked = 0;
    uv_timer_start(&c->timer, on_attempt_timer, cfg->limits.connect_timeout_ms, 0);
  }
  return c;
}

/* A connection with room for one more stream, or a new one. A connection
 * whose upstream's credentials expired (plus limits.revoke_grace_ms) takes
 * no new stream: it closes once its streams are done. */
static h2conn_t *conn_for(h2pool_t *p, pc_endpoint_t *ep, pc_metrics_t *stats, int *reused) {
  uint32_t ours = p->gen->cfg->http2.max_concurrent_streams;
  h2conn_t *next;
  for (h2conn_t *c = p->conns; ep && c; c = next) {
    next = c->next;
    if (c->ep != ep || c->state == C_CLOSED || c->goaway || c->retired) continue;
    if (c->state == C_READY && pc_tls_peer_expired(&c->peer, p->gen->cfg->limits.revoke_grace_ms)) {
      pc_log(PC_LOG_INFO,
             "listener %s: the certificate of upstream %s (%s) expired; its HTTP/2 connection "
             "takes no new streams",
             p->lc->name, c->ep->str, c->peer.peer_id ? c->peer.peer_id : "?");
      PC_STAT_INC(stats->upstream_expired);
      c->retired = 1;
      if (!c->ncalls && !c->calls) conn_close(c, "expired");
      continue;
    }
    if (nghttp2_session_get_next_stream_id(c->ss) > (1u << 31) - 1024) {
      c->retired = 1; /* running out of stream ids: new streams go elsewhere */
      continue;
    }
    uint32_t cap =
        nghttp2_session_get_remote_settings(c->ss, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
    if (cap > ours) cap = ours;
    if (c->ncalls < cap) {
      *reused = 1;
      return c;
    }
  }
  *reused = 0;
  return conn_new(p, ep);
}

pc_h2call_t *pc_h2call_start(pc_worker_t *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                             pc_metrics_t *stats, const nghttp2_nv *nv, size_t n, int end,
                             pc_endpoint_t *pin, const pc_upcall_cbs_t *cbs, void *user) {
  h2pool_t *p = pool_find(w, g, lc, 1);
  int reused;
  pc_endpoint_t *ep = pin;
  if (pin)
    pc_endpoint_use(pin);
  else
    ep = pc_target_pick(lc->tgt, NULL);
  h2conn_t *c = conn_for(p, ep, stats, &reused);
  if (reused)
    PC_STAT_INC(stats->upstream_reuses);
  else if (ep)
    PC_STAT_INC(stats->upstream_connects);
  pc_h2call_t *k = pc_calloc(1, sizeof(*k));
  k->conn = c;
  k->ep = ep;
  k->cbs = cbs;
  k->user = user;
  k->stats = stats;
  k->end_req = end != 0;
  k->next = c->calls;
  if (c->calls) c->calls->prev = k;
  c->calls = k;
  c->ncalls++;
  if (c->state == C_READY) uv_timer_stop(&c->timer); /* its idle timer */
  nghttp2_data_provider prd = {.source = {.ptr = k}, .read_callback = read_req};
  k->id = nghttp2_submit_request(c->ss, NULL, nv, n, end ? NULL : &prd, k);
  if (k->id < 0) pc_fatal("nghttp2_submit_request failed");
  flush_later(c);
  return k;
}

/* ---- generations -------------------------------------------------------- */

void pc_h2up_sweep(pc_worker_t *w) {
  h2pool_t *p = w->h2pools;
  while (p) {
    h2pool_t *next = p->next;
    if (p->gen != w->gen) {
      h2conn_t *c = p->conns;
      while (c) {
        h2conn_t *cn = c->next;
        c->retired = 1;
        if (c->state == C_READY && !c->ncalls && !c->calls) conn_close(c, "retired");
        c = cn;
      }
      pool_free_if_done(p);
    } else {
      /* Connections to endpoints a newer answer left out take no new
       * streams and close once the ones they carry are done. */
      h2conn_t *c = p->conns;
      while (c) {
        h2conn_t *cn = c->next;
        if (c->ep && pc_endpoint_removed(c->ep)) {
          c->retired = 1;
          if (c->state == C_READY && !c->ncalls && !c->calls) conn_close(c, "endpoint removed");
        }
        c = cn;
      }
    }
    p = next;
  }
}

void pc_h2up_drain(pc_worker_t *w) {
  for (h2pool_t *p = w->h2pools; p; p = p->next) {
    h2conn_t *c = p->conns;
    while (c) {
      h2conn_t *cn = c->next;
      if (c->state == C_READY && !c->ncalls && !c->calls) conn_close(c, "drain");
      c = cn;
    }
  }
}

void pc_h2up_close_all(pc_worker_t *w) {
  h2pool_t *p = w->h2pools;
  w->h2pools = NULL;
  while (p) {
    h2pool_t *next = p->next;
    p->detached = 1;
    p->next = NULL;
    while (p->conns)
      conn_close(p->conns, "stop");
    if (p->nconns == 0) {
      pc_gen_unref(p->gen);
      free(p);
    }
    p = next;
  }
}

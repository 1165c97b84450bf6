#include "h1up.h"

#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "endpoint.h"
#include "h1.h"
#include "log.h"
#include "pool.h"
#include "worker.h"

/* Response bytes handed on and not yet consumed: above HIGH the upstream is
 * no longer read, below LOW again. */
#define RES_HIGH (64 * 1024)
#define RES_LOW (16 * 1024)
/* Request bytes (head, body, chunk framing) are collected and written once
 * per loop iteration: a head and the body that came with it make one write
 * (one TLS record, one syscall). More than this goes at once. */
#define COLLECT_MAX (16 * 1024)

struct pc_h1call {
  pc_worker_t *w;
  const pc_listener_cfg_t *lc;
  pc_metrics_t *stats;
  const pc_upcall_cbs_t *cbs;
  void *user;
  pc_upconn_t *up;
  pc_h1_parser_t res;
  pc_h1_limits_t lim;
  pc_jbuf_t out;     /* request bytes not written yet (framed) */
  size_t unsent;     /* body bytes in out */
  size_t held;       /* body bytes written while the upstream's queue was full (told on drain) */
  size_t to_report;  /* body bytes to tell about (on_sent) after this loop iteration */
  size_t unconsumed; /* response bytes handed on, not yet consumed */
  pc_deferred_t defer;
  int busy; /* depth of this module's callbacks on the stack: free only at 0 */
  char *peer_id;
  const char *tls_version, *cipher;
  char endpoint[56]; /* "ip:port" of the connection used, for the access log */
  int fail_status, fail_retry;
  pc_reason_t fail_reason;
  const char *fail_detail;
  unsigned ready : 1, chunked : 1, end : 1, end_written : 1, tunnel : 1, connect : 1, http10 : 1,
      head : 1, any : 1, done : 1, released : 1, paused : 1, resume : 1, fail_pending : 1,
      reused : 1;
};

static void s_on_data(pc_stream_t *s, const char *buf, size_t len);
static void s_on_eof(pc_stream_t *s);
static void s_on_error(pc_stream_t *s, int err);
static void s_on_drain(pc_stream_t *s);
static void s_on_shutdown(pc_stream_t *s, int status) {
  (void)s;
  (void)status;
}
static void s_on_handshake(pc_stream_t *s, int status) {
  (void)s;
  (void)status;
}
static const pc_stream_cbs_t up_cbs = {s_on_data,  s_on_eof,      s_on_error,
                                       s_on_drain, s_on_shutdown, s_on_handshake};

static void call_free(pc_h1call_t *k) {
  pc_worker_undefer(k->w, &k->defer);
  pc_h1_free(&k->res);
  pc_jbuf_free(&k->out);
  free(k->peer_id);
  free(k);
}

static void enter(pc_h1call_t *k) { k->busy++; }

/* Leaving one of this module's callbacks: a call released meanwhile is
 * freed once nothing of it is on the stack any more. */
static void leave(pc_h1call_t *k) {
  if (--k->busy == 0 && k->released) call_free(k);
}

static int live(const pc_h1call_t *k) { return !k->done && !k->released; }

static void drop_up(pc_h1call_t *k, int how) {
  if (!k->up) return;
  pc_upconn_t *up = k->up;
  k->up = NULL;
  pc_pool_release(up, how);
}

/* Fires on_fail once, unless the call ended or was released. The
 * connection is reset: the upstream must not take a cut-off request as
 * whole. */
static void call_fail(pc_h1call_t *k, int status, pc_reason_t r, const char *detail, int retry) {
  if (!live(k)) return;
  k->done = 1;
  drop_up(k, PC_POOL_ABORT);
  /* The pool logged connect and TLS failures; a retried one is not news. */
  if (r == PC_REASON_PROTOCOL && !retry)
    pc_log(PC_LOG_WARN, "listener %s: upstream %s: %s", k->lc->name, k->lc->target_str, detail);
  if (k->head) status = 0;
  k->cbs->on_fail(k->user, status, r, detail, retry);
}

static void flush(pc_h1call_t *k);

static void run_deferred(pc_deferred_t *d) {
  pc_h1call_t *k = pc_container_of(d, pc_h1call_t, defer);
  enter(k);
  flush(k);
  if (k->fail_pending) {
    k->fail_pending = 0;
    call_fail(k, k->fail_status, k->fail_reason, k->fail_detail, k->fail_retry);
  }
  if (k->resume && k->up && live(k)) {
    k->resume = 0;
    pc_stream_read_start(&k->up->s);
  }
  if (k->to_report && live(k)) {
    size_t n = k->to_report;
    k->to_report = 0;
    k->cbs->on_sent(k->user, n);
  }
  leave(k);
}

/* Failures found inside a call from the caller are told from the loop. */
static void fail_soon(pc_h1call_t *k, int status, pc_reason_t r, const char *detail, int retry) {
  if (k->fail_pending) return;
  k->fail_pending = 1;
  k->fail_status = status;
  k->fail_reason = r;
  k->fail_detail = detail;
  k->fail_retry = retry;
  pc_worker_defer(k->w, &k->defer);
}

/* A reused connection that failed before any response byte had most likely
 * been closed by the upstream while idle: the request may go again. */
static int retryable(const pc_h1call_t *k) { return k->reused && !k->any; }

/* ---- the request -------------------------------------------------------- */

/* n body bytes are on their way: told at once (after this loop iteration)
 * unless the upstream's queue is full, then on its drain. */
static void passed(pc_h1call_t *k, size_t n) {
  if (!n) return;
  if (pc_stream_queued(&k->up->s) > PC_STREAM_HIGH_WATER) {
    k->held += n;
    return;
  }
  k->to_report += n;
  pc_worker_defer(k->w, &k->defer);
}

/* Writes what was collected. */
static void flush(pc_h1call_t *k) {
  if (!k->ready || !k->up || !k->out.len || !live(k)) return;
  size_t n = k->out.len, body = k->unsent;
  k->out.len = 0;
  k->unsent = 0;
  if (pc_stream_write(&k->up->s, k->out.data, n) != 0) {
    fail_soon(k, 502, PC_REASON_PROTOCOL, "writing to the upstream failed", retryable(k));
    return;
  }
  passed(k, body);
}

/* Collected bytes go out at the end of this loop iteration, or now if many. */
static void collected(pc_h1call_t *k) {
  if (!k->ready) return;
  if (k->out.len > COLLECT_MAX)
    flush(k);
  else
    pc_worker_defer(k->w, &k->defer);
}

/* Appends body bytes to out, framed as the head said. */
static void frame(pc_h1call_t *k, const char *data, size_t len) {
  if (k->chunked) pc_jbuf_printf(&k->out, "%zx\r\n", len);
  pc_jbuf_raw(&k->out, data, len);
  if (k->chunked) pc_jbuf_raw(&k->out, "\r\n", 2);
  k->unsent += len;
}

static void frame_end(pc_h1call_t *k) {
  if (!k->end || k->end_written) return;
  k->end_written = 1;
  if (k->chunked) pc_jbuf_raw(&k->out, "0\r\n\r\n", 5);
}

/* For the access log, also of an upstream that was refused. */
static void keep_peer(pc_h1call_t *k, const pc_upconn_t *up) {
  if (up->ep) memcpy(k->endpoint, up->ep->str, sizeof(k->endpoint));
  if (up->peer.peer_id && !k->peer_id) k->peer_id = pc_strdup(up->peer.peer_id);
  if (up->s.ssl) {
    k->tls_version = SSL_get_version(up->s.ssl);
    k->cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(up->s.ssl));
  }
}

/* The connection is ready: the head and what body arrived meanwhile go out
 * in one write. */
static void start_sending(pc_h1call_t *k) {
  pc_upconn_t *up = k->up;
  k->ready = 1;
  if (up->served > 0) {
    k->reused = 1;
    k->stats->upstream_reuses++;
  }
  keep_peer(k, up);
  collected(k);
}

static void on_ready(void *user, pc_upconn_t *up, pc_upconn_fail_t fail, pc_reason_t reason,
                     const char *detail) {
  pc_h1call_t *k = user;
  enter(k);
  if (fail != PC_UPCONN_OK) {
    keep_peer(k, up); /* up is closing, but readable now */
    k->up = NULL;     /* the pool closes it */
    int status = fail == PC_UPCONN_CONNECT || fail == PC_UPCONN_UNRESOLVED ? 503
                 : reason == PC_REASON_TIMEOUT                             ? 504
                                                                           : 502;
    /* Nothing reached the upstream: another endpoint may take it (the
     * failed one is ejected now). */
    int retry =
        fail == PC_UPCONN_CONNECT && !pc_config_pinned(k->lc) && pc_target_size(k->lc->tgt) > 1;
    call_fail(k, status, reason, detail, retry);
  } else {
    start_sending(k);
  }
  leave(k);
}

void pc_h1call_send(pc_h1call_t *k, const char *data, size_t len) {
  if (!live(k) || !len) return;
  frame(k, data, len);
  collected(k);
}

void pc_h1call_end(pc_h1call_t *k) {
  if (!live(k)) return;
  k->end = 1;
  frame_end(k);
  collected(k);
}

void pc_h1call_consumed(pc_h1call_t *k, size_t n) {
  if (n > k->unconsumed) n = k->unconsumed;
  k->unconsumed -= n;
  if (k->paused && k->unconsumed < RES_LOW && k->up && live(k)) {
    /* read_start may hand over decrypted bytes at once: from the loop */
    k->paused = 0;
    k->resume = 1;
    pc_worker_defer(k->w, &k->defer);
  }
}

void pc_h1call_release(pc_h1call_t *k) {
  if (k->released) return;
  k->released = 1;
  drop_up(k, PC_POOL_ABORT);
  if (!k->busy) call_free(k);
}

const char *pc_h1call_peer_id(const pc_h1call_t *k) { return k->peer_id; }
const char *pc_h1call_tls_version(const pc_h1call_t *k) { return k->tls_version; }
const char *pc_h1call_cipher(const pc_h1call_t *k) { return k->cipher; }
const char *pc_h1call_endpoint(const pc_h1call_t *k) { return k->endpoint[0] ? k->endpoint : NULL; }

/* ---- the response ------------------------------------------------------- */

/* The head's end-to-end fields in the neutral form (lowercase names, no
 * hop-by-hop fields, content-length when the framing gave one), for one
 * callback. */
static void head_fields(pc_h1call_t *k, int bodyless_status) {
  const pc_h1_msg_t *m = &k->res.msg;
  nghttp2_nv *nv = pc_calloc(m->nfields + 1, sizeof(*nv));
  pc_jbuf_t names = {0};
  size_t *off = pc_calloc(m->nfields + 1, sizeof(*off));
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    off[i] = names.len;
    if (pc_h1_hop_by_hop(m, f)) continue;
    for (uint32_t j = 0; j < f->name_len; j++) {
      char c = f->name[j];
      if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
      pc_jbuf_raw(&names, &c, 1);
    }
  }
  size_t n = 0;
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    if (pc_h1_hop_by_hop(m, f)) continue;
    nv[n++] = (nghttp2_nv){(uint8_t *)names.data + off[i], (uint8_t *)f->value, f->name_len,
                           f->value_len, NGHTTP2_NV_FLAG_NONE};
  }
  char cl[24];
  if (m->has_length && m->status != 204 && m->status >= 200) {
    int cln = snprintf(cl, sizeof(cl), "%llu", (unsigned long long)m->length);
    nv[n++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)cl, 14, (size_t)cln,
                           NGHTTP2_NV_FLAG_NONE};
  }
  if (m->status < 200) {
    if (k->cbs->on_info) k->cbs->on_info(k->user, m->status, nv, n);
  } else {
    int end = bodyless_status || (m->has_length && m->length == 0) || pc_h1_complete(&k->res);
    k->cbs->on_head(k->user, m->status, nv, n, end);
  }
  free(nv);
  free(off);
  pc_jbuf_free(&names);
}

/* Returns 1 if the call is over (tunnel, failure, release). */
static int response_head(pc_h1call_t *k, const char *rest, size_t rest_len) {
  const pc_h1_msg_t *m = &k->res.msg;
  int st = m->status;
  if (st < 200 && st != 101) { /* 100 Continue, 103 Early Hints */
    head_fields(k, 1);
    uint8_t rm = k->res.req_method;
    pc_h1_reset(&k->res);
    k->res.req_method = rm;
    return !live(k);
  }
  int tunnel = k->tunnel && (k->connect ? st < 300 : st == 101);
  if (st == 101 && !tunnel) {
    call_fail(k, 502, PC_REASON_PROTOCOL,
              "101 Switching Protocols to a request that asked for no switch", 0);
    return 1;
  }
  k->head = 1;
  if (tunnel) {
    pc_jbuf_t h = {0};
    pc_h1_write_head(&k->res, &h, st == 101 ? PC_H1_OUT_UPGRADE : 0, NULL);
    pc_upconn_t *up = k->up;
    k->up = NULL;
    k->done = 1;
    k->cbs->on_tunnel(k->user, st, up, h.data, h.len, rest, rest_len);
    pc_jbuf_free(&h);
    return 1;
  }
  int bodyless = k->res.req_method == HTTP_HEAD || st == 204 || st == 304;
  head_fields(k, bodyless);
  return !live(k);
}

static void response_done(pc_h1call_t *k, int extra) {
  if (extra)
    pc_log(PC_LOG_WARN,
           "listener %s: upstream %s sent bytes after its response (a second response?); closing "
           "that connection",
           k->lc->name, k->lc->target_str);
  flush(k); /* the request's last bytes, if they are still collected here */
  const pc_h1_msg_t *m = &k->res.msg;
  int reusable = !extra && m->keep_alive && !m->until_close && k->end_written && !k->unsent &&
                 !k->fail_pending && !k->http10;
  k->done = 1;
  /* Back to the pool before on_end, so that the caller's next request can
   * take it (the pool closes it instead if it holds unread bytes). */
  drop_up(k, reusable ? PC_POOL_KEEP : PC_POOL_CLOSE);
  k->cbs->on_end(k->user, NULL, 0);
}

static void on_body(void *user, const char *data, size_t len) {
  pc_h1call_t *k = user;
  if (!live(k)) return;
  k->unconsumed += len;
  k->cbs->on_data(k->user, (const uint8_t *)data, len);
}

static void s_on_data(pc_stream_t *s, const char *buf, size_t len) {
  pc_h1call_t *k = s->owner;
  if (!live(k)) return;
  enter(k);
  k->any = 1;
  size_t off = 0;
  while (live(k)) {
    size_t used = 0;
    int rc = pc_h1_feed(&k->res, buf + off, len - off, &used);
    off += used;
    if (rc == PC_H1_MORE) break;
    if (rc == PC_H1_HEAD) {
      if (response_head(k, buf + off, len - off)) break;
    } else if (rc == PC_H1_DONE) {
      if (live(k)) response_done(k, off < len);
      break;
    } else {
      call_fail(k, 502, PC_REASON_PROTOCOL, k->res.detail, 0);
      break;
    }
  }
  if (live(k) && k->up && !k->paused && k->unconsumed > RES_HIGH) {
    k->paused = 1;
    k->resume = 0;
    pc_stream_read_stop(s);
  }
  leave(k);
}

/* A new connection that ends before any response byte: the endpoint is
 * ejected (a reused one may just have timed out idle, which says nothing). */
static void eject_if_fresh(pc_h1call_t *k, const char *why) {
  if (k->any || k->reused || !k->up || !k->up->ep) return;
  const pc_config_t *cfg = k->w->gen->cfg;
  pc_endpoint_failed(k->up->ep, cfg->health.ejection_base_ms, cfg->health.ejection_max_ms, why);
}

static void s_on_eof(pc_stream_t *s) {
  pc_h1call_t *k = s->owner;
  if (!live(k)) return;
  enter(k);
  if (!k->head) eject_if_fresh(k, "closed before responding");
  if (k->head && pc_h1_finish(&k->res) == PC_H1_DONE)
    response_done(k, 0);
  else
    call_fail(k, 502, PC_REASON_PROTOCOL,
              "the upstream closed the connection before the response ended", retryable(k));
  leave(k);
}

static void s_on_error(pc_stream_t *s, int err) {
  pc_h1call_t *k = s->owner;
  if (!live(k)) return;
  enter(k);
  eject_if_fresh(k, "reset before responding");
  /* With TLS 1.3 an upstream that refuses our certificate says so with an
   * alert just after the handshake. */
  call_fail(k, 502, PC_REASON_PROTOCOL,
            err == PC_STREAM_ETLS && !k->any
                ? "the upstream ended TLS (it may have refused this sidecar's identity)"
                : "the upstream connection failed",
            retryable(k));
  leave(k);
}

static void s_on_drain(pc_stream_t *s) {
  pc_h1call_t *k = s->owner;
  if (!live(k) || !k->held) return;
  enter(k);
  size_t n = k->held;
  k->held = 0;
  k->cbs->on_sent(k->user, n);
  leave(k);
}

/* ---- starting ----------------------------------------------------------- */

static int nv_is(const nghttp2_nv *f, const char *name, size_t len) {
  return f->namelen == len && memcmp(f->name, name, len) == 0;
}

pc_h1call_t *pc_h1call_start(pc_worker_t *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                             pc_metrics_t *stats, const pc_upreq_t *req, const pc_upcall_cbs_t *cbs,
                             void *user) {
  pc_h1call_t *k = pc_calloc(1, sizeof(*k));
  k->w = w;
  k->lc = lc;
  k->stats = stats;
  k->cbs = cbs;
  k->user = user;
  k->defer.run = run_deferred;
  k->end = req->end != 0;
  k->tunnel = req->tunnel != 0;
  uint8_t method = HTTP_GET;
  for (size_t i = 0; i < req->n; i++)
    if (nv_is(&req->nv[i], ":method", 7)) {
      const nghttp2_nv *f = &req->nv[i];
      if (f->valuelen == 4 && memcmp(f->value, "HEAD", 4) == 0) method = HTTP_HEAD;
      if (f->valuelen == 7 && memcmp(f->value, "CONNECT", 7) == 0) method = HTTP_CONNECT;
    }
  k->connect = method == HTTP_CONNECT;
  if (req->h1_head) {
    pc_jbuf_raw(&k->out, req->h1_head, req->h1_head_len);
    k->chunked = req->h1_chunked != 0;
    /* "... HTTP/1.0\r\n" ends the request line of a request sent as 1.0 */
    const char *eol = memchr(req->h1_head, '\n', req->h1_head_len);
    k->http10 = eol && eol - req->h1_head >= 9 && memcmp(eol - 9, "HTTP/1.0\r", 9) == 0;
  } else {
    int chunked = 0;
    pc_h1_head_from_nv(&k->out, req->nv, req->n, k->end, &chunked);
    k->chunked = chunked != 0;
  }
  frame_end(k);
  const pc_config_t *cfg = g->cfg;
  k->lim = (pc_h1_limits_t){cfg->http.max_request_line, cfg->http.max_header_bytes,
                            cfg->http.max_headers};
  pc_h1_init(&k->res, 0, &k->lim, on_body, k);
  k->res.req_method = method;
  int ready = 0;
  k->up = pc_pool_acquire(pc_pool_for(w, g, lc), req->pin, stats, &up_cbs, k, on_ready, k, &ready);
  if (ready) start_sending(k);
  return k;
}

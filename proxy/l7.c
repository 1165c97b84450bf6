#include "l7.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "compat.h"
#include "deadline.h"
#include "h1.h"
#include "h2up.h"
#include "log.h"
#include "pool.h"
#include "splice.h"

/* How long a client gets to read a closing answer before the socket closes. */
#define LINGER_MS 1000
/* A request that met only stale pooled connections is retried at most this
 * often. */
#define MAX_RETRIES 3
/* Client bytes kept, unparsed, while a request is in flight. */
#define KEEP_MAX (64 * 1024)

typedef enum {
  X_HEAD,    /* waiting for (the rest of) a request head */
  X_REQUEST, /* a request is being handled */
  X_TUNNEL,  /* after 101 / CONNECT 2xx: spliced */
  X_CLOSING, /* answered; waiting for the client to read it and go */
  X_DONE,
} xstate_t;

struct pc_l7 {
  pc_stream_t *down;
  pc_l7_env_t env;
  int inbound;
  void (*on_done)(void *, const char *, int);
  void *arg;
  uv_timer_t timer; /* lazy: see arm() */
  uv_timer_cb timer_cb;
  uint64_t due;      /* loop time (ms) at which timer_cb runs, while timer_on */
  uint8_t rechecked; /* the deadline expired once (deadline.h) */
  pc_h1_limits_t lim;
  pc_h1_parser_t req, res;
  xstate_t state;
  char *in; /* client bytes kept while a request waits (pipelining) */
  size_t in_len, in_cap;
  char *xfcc; /* "x-forwarded-client-cert: ...\r\n" (inbound) */
  /* the request in flight */
  pc_gen_t *rgen;
  const pc_listener_cfg_t *rlc;
  pc_upconn_t *up;
  pc_h2call_t *call;  /* an HTTP/2 upstream, in place of up (see go_h2) */
  size_t call_queued; /* request body bytes the call holds, not yet sent */
  size_t unconsumed;  /* response bytes the client has not taken yet (HTTP/2 upstream) */
  pc_jbuf_t head_out; /* request head for the upstream, kept for a retry */
  pc_jbuf_t out;      /* scratch for heads and chunks going out */
  pc_jbuf_t dq, uq;   /* small writes collected for the client / upstream (put) */
  int retries;
  unsigned broken : 2, head_started : 1, up_ready : 1, req_done : 1, res_head : 1, res_any : 1,
      close_after : 1, out_chunked : 1, down_bp : 1, up_bp : 1, timer_on : 1, in_process : 1,
      logged : 1, peer_done : 1, shut_done : 1;
  char *method, *path;
  size_t method_len, path_len;
  int status;
  uint64_t t_start, t_sent;
  double upstream_ms;
  uint64_t req_bytes, res_bytes;
  pc_splice_t splice;
};

static void up_on_data(pc_stream_t *s, const char *buf, size_t len);
static void up_on_eof(pc_stream_t *s);
static void up_on_error(pc_stream_t *s, int err);
static void up_on_drain(pc_stream_t *s);
static void up_on_shutdown(pc_stream_t *s, int status);
static void up_on_handshake(pc_stream_t *s, int status) {
  (void)s;
  (void)status;
}
static const pc_stream_cbs_t up_cbs = {up_on_data,  up_on_eof,      up_on_error,
                                       up_on_drain, up_on_shutdown, up_on_handshake};

static void process(pc_l7_t *x);
static int wants_h2(const pc_l7_t *x, const pc_listener_cfg_t *lc);
static void go_h2(pc_l7_t *x);
static int flush_queue(pc_l7_t *x, pc_stream_t *to);
static void begin_request(pc_l7_t *x);

static void touch(pc_l7_t *x) { *x->env.last_active = uv_now(x->timer.loop); }

static void finish(pc_l7_t *x, const char *how, int reset) {
  if (x->state == X_DONE) return;
  x->state = X_DONE;
  uv_timer_stop(&x->timer);
  x->on_done(x->arg, how, reset);
}

/* The connection's one timer is lazy. Every request disarms and arms it
 * twice, and restarting a libuv timer is a heap removal and insertion each
 * time; so arm() records the deadline and (re)starts the libuv timer only when
 * it would fire too late, a fire before the deadline starts it again for the
 * rest, and a fire while disarmed does nothing. */
static void timer_tick(uv_timer_t *t) {
  pc_l7_t *x = t->data;
  if (!x->timer_on) return;
  uint64_t now = uv_now(t->loop);
  if (now < x->due) {
    uv_timer_start(t, timer_tick, x->due - now, 0);
    return;
  }
  if (pc_deadline_recheck(t, timer_tick, &x->rechecked)) return;
  x->timer_on = 0;
  x->timer_cb(t);
}

static void arm(pc_l7_t *x, uint64_t ms, uv_timer_cb cb) {
  x->timer_on = 1;
  x->rechecked = 0;
  x->timer_cb = cb;
  x->due = uv_now(x->timer.loop) + ms;
  if (!uv_is_active((uv_handle_t *)&x->timer) || uv_timer_get_due_in(&x->timer) > ms)
    uv_timer_start(&x->timer, timer_tick, ms, 0);
}

static void disarm(pc_l7_t *x) { x->timer_on = 0; }

static const char *peer_id_of(const pc_l7_t *x) {
  /* outbound: the upstream of the request in flight */
  if (x->inbound) return x->env.peer_id;
  if (x->call) return pc_h2call_peer_id(x->call);
  return x->up ? x->up->peer.peer_id : NULL;
}

static void count_request(pc_l7_t *x, int status, pc_decision_t d, pc_reason_t r) {
  int k = status / 100;
  if (k < 1 || k >= PC_HTTP_CLASSES) k = 5;
  x->env.l->stats.requests[k][d][r]++;
  x->env.l->stats.requests_by_proto[x->method && !x->req.msg.minor ? PC_HTTP_10 : PC_HTTP_11]++;
  pc_hist_observe(&x->env.l->stats.request, &pc_request_bounds,
                  (double)(uv_hrtime() - x->t_start) / 1e9);
}

/* One access-log line and the counters for the request in flight. */
static void log_request(pc_l7_t *x, int status, pc_decision_t d, pc_reason_t r) {
  if (x->logged) return;
  x->logged = 1;
  if (!x->t_start) x->t_start = uv_hrtime();
  count_request(x, status, d, r);
  pc_request_rec_t rec = {
      .listener = x->env.lc->name,
      .direction = x->inbound ? "inbound" : "outbound",
      .peer = x->env.peer_addr,
      .app = x->env.app_addr,
      .peer_id = peer_id_of(x),
      .method = x->method,
      .method_len = x->method_len,
      .path = x->path,
      .path_len = x->path_len,
      .protocol = x->method ? (x->req.msg.minor ? "HTTP/1.1" : "HTTP/1.0") : NULL,
      .status = status,
      .grpc_status = -1,
      .decision = pc_decision_word(d),
      .reason = r,
      .request_bytes = x->req_bytes,
      .response_bytes = x->res_bytes,
      .duration_ms = (double)(uv_hrtime() - x->t_start) / 1e6,
      .upstream_ms = x->upstream_ms,
      .tls_version = x->inbound ? x->env.tls_version : NULL,
      .cipher = x->inbound ? x->env.cipher : NULL,
  };
  if (!x->inbound && x->up && x->up->s.ssl) {
    rec.tls_version = SSL_get_version(x->up->s.ssl);
    rec.cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(x->up->s.ssl));
  } else if (!x->inbound && x->call) {
    rec.tls_version = pc_h2call_tls_version(x->call);
    rec.cipher = pc_h2call_cipher(x->call);
  }
  pc_log_request(&rec);
}

/* Forgets the request in flight; the upstream connection goes back to the
 * pool (how: PC_POOL_KEEP) or is closed. */
static void end_request(pc_l7_t *x, int how) {
  if (x->call) {
    pc_h2call_t *k = x->call;
    x->call = NULL;
    pc_h2call_release(k);
  }
  x->call_queued = x->unconsumed = 0;
  if (x->up) {
    pc_upconn_t *up = x->up;
    if (how == PC_POOL_KEEP && x->up_ready) flush_queue(x, &up->s);
    x->uq.len = 0;
    x->up = NULL;
    pc_pool_release(up, how);
  }
  x->up_ready = x->req_done = x->res_head = x->res_any = x->out_chunked = x->up_bp = 0;
  x->down_bp = 0;
  x->head_started = x->logged = 0;
  x->retries = 0;
  free(x->method);
  free(x->path);
  x->method = x->path = NULL;
  x->method_len = x->path_len = 0;
  x->status = 0;
  x->t_start = x->t_sent = 0;
  x->upstream_ms = -1;
  x->req_bytes = x->res_bytes = 0;
  x->head_out.len = 0;
  if (x->rgen) pc_gen_unref(x->rgen);
  x->rgen = NULL;
  x->rlc = NULL;
  pc_h1_reset(&x->req);
  pc_h1_reset(&x->res);
}

/* ---- closing ------------------------------------------------------------ */

/* Small writes in one callback (a response head, a short body, the last
 * chunk) are collected per side and sent as one write (one TLS record, one
 * syscall) when the callback ends (settle). Bigger ones go at once, after
 * what is collected. */
#define COLLECT_MAX (16 * 1024)

static int send_now(pc_l7_t *x, pc_stream_t *to, const char *data, size_t len) {
  if (pc_stream_write(to, data, len) == 0) return 0;
  x->broken = to == x->down ? 1 : 2;
  return -1;
}

static pc_jbuf_t *queue_of(pc_l7_t *x, pc_stream_t *to) { return to == x->down ? &x->dq : &x->uq; }

static int flush_queue(pc_l7_t *x, pc_stream_t *to) {
  pc_jbuf_t *q = queue_of(x, to);
  if (!q->len) return 0;
  size_t n = q->len;
  q->len = 0;
  return x->broken ? -1 : send_now(x, to, q->data, n);
}

/* Writes to one side. A failed write (the peer reset) is remembered and
 * acted on by check_broken once the current callback unwinds: ending the
 * connection from inside a parser callback would pull state from under it. */
static int put(pc_l7_t *x, pc_stream_t *to, const char *data, size_t len) {
  if (x->broken) return -1;
  pc_jbuf_t *q = queue_of(x, to);
  if (q->len + len <= COLLECT_MAX) {
    pc_jbuf_raw(q, data, len);
    return 0;
  }
  if (flush_queue(x, to) != 0) return -1;
  return send_now(x, to, data, len);
}

static void upstream_failed(pc_l7_t *x, const char *detail);

/* Returns 1 if a failed write ended the request or the connection. */
static int check_broken(pc_l7_t *x) {
  if (!x->broken || x->state == X_DONE || x->state == X_TUNNEL) return 0;
  if (x->broken == 2 && x->state == X_REQUEST) {
    x->broken = 0;
    upstream_failed(x, "writing to the upstream failed");
    return 1;
  }
  if (x->state == X_REQUEST) log_request(x, x->status, PC_DECISION_ERROR, PC_REASON_NONE);
  finish(x, "reset", 1);
  return 1;
}

/* End of every callback into this module: send what was collected, then act
 * on a failed write. */
static void settle(pc_l7_t *x) {
  if (x->state == X_DONE) return;
  flush_queue(x, x->down);
  if (x->up && x->up_ready) flush_queue(x, &x->up->s);
  if (check_broken(x)) return;
  /* Between requests a keep-alive connection holds no buffers: thousands
   * of idle clients cost their TLS state and this struct, not their last
   * request's head and scratch. The buffers go to the worker's buffer
   * cache, where the next request on any connection finds them. */
  if (x->state == X_HEAD && !x->up && !x->call && x->in_len == 0 && !x->head_started) {
    pc_h1_trim(&x->req);
    pc_h1_trim(&x->res);
    pc_jbuf_release(&x->head_out);
    pc_jbuf_release(&x->out);
    pc_jbuf_release(&x->dq);
    pc_jbuf_release(&x->uq);
  }
}

static void on_linger_timer(uv_timer_t *t) { finish(t->data, "eof", 0); }

/* Sends everything queued, then close_notify and FIN, and drops the client's
 * input meanwhile, so that closing does not turn into an RST that destroys
 * the answer. The connection ends when the client has closed too, or
 * LINGER_MS after our FIN. */
static void close_gently(pc_l7_t *x) {
  flush_queue(x, x->down);
  x->state = X_CLOSING;
  disarm(x);
  x->peer_done = pc_stream_discard(x->down);
  pc_stream_shutdown(x->down, 0);
}

/* The sidecar answers the request itself. keep: the connection may serve
 * the next request (only when the request was read completely). Never called
 * with keep from outside feed(), which goes on with the next request. */
static void reply_error(pc_l7_t *x, int status, pc_decision_t d, pc_reason_t r, const char *detail,
                        int keep) {
  if (x->env.w->draining) keep = 0;
  x->out.len = 0;
  pc_h1_error_response(&x->out, status, r == PC_REASON_NONE ? "" : pc_reason_word(r), detail, keep);
  put(x, x->down, x->out.data, x->out.len);
  x->status = status;
  log_request(x, status, d, r);
  end_request(x, PC_POOL_ABORT);
  if (!keep) {
    close_gently(x);
    return;
  }
  x->state = X_HEAD;
}

/* ---- bodies ------------------------------------------------------------- */

/* Writes body bytes, as one chunk when chunked (one write: one TLS record). */
static int write_body(pc_l7_t *x, pc_stream_t *to, const char *data, size_t len, int chunked) {
  if (!chunked) return put(x, to, data, len);
  x->out.len = 0;
  pc_jbuf_printf(&x->out, "%zx\r\n", len);
  pc_jbuf_raw(&x->out, data, len);
  pc_jbuf_raw(&x->out, "\r\n", 2);
  return put(x, to, x->out.data, x->out.len);
}

static void on_req_body(void *user, const char *data, size_t len) {
  pc_l7_t *x = user;
  x->req_bytes += len;
  if (x->call) {
    pc_h2call_send(x->call, data, len);
    x->call_queued += len;
    if (x->call_queued > PC_STREAM_HIGH_WATER) x->down_bp = 1;
    return;
  }
  write_body(x, &x->up->s, data, len, x->req.msg.chunked);
  if (pc_stream_queued(&x->up->s) > PC_STREAM_HIGH_WATER) x->down_bp = 1;
}

static void on_res_body(void *user, const char *data, size_t len) {
  pc_l7_t *x = user;
  if (write_body(x, x->down, data, len, x->out_chunked) == 0) x->res_bytes += len;
}

/* ---- requests ----------------------------------------------------------- */

static void timer_fired(uv_timer_t *t) {
  pc_l7_t *x = t->data;
  if (x->state == X_HEAD)
    reply_error(x, 408, PC_DECISION_DENY, PC_REASON_TIMEOUT,
                "the request head did not arrive in time", 0);
  else if (x->state == X_REQUEST && !x->res_head)
    reply_error(x, 504, PC_DECISION_ERROR, PC_REASON_TIMEOUT, "the upstream did not answer in time",
                0);
}

static void on_timer(uv_timer_t *t) {
  pc_l7_t *x = t->data;
  timer_fired(t);
  settle(x);
}

/* Can client bytes be parsed now? Not while the upstream is not ready, nor
 * after the request ended (the next one waits for this answer), nor while
 * the upstream's queue is full; and no next request starts while the
 * client has not read what it was already sent (a client that pipelines and
 * never reads would otherwise make the answers queue up without bound). */
static int blocked(const pc_l7_t *x) {
  if (x->state == X_HEAD) return pc_stream_queued(x->down) > PC_STREAM_HIGH_WATER;
  if (x->state != X_REQUEST) return 1;
  return !x->up_ready || x->req_done || x->down_bp;
}

static void request_done(pc_l7_t *x) {
  x->req_done = 1;
  if (x->call)
    pc_h2call_end(x->call);
  else if (x->req.msg.chunked)
    put(x, &x->up->s, "0\r\n\r\n", 5);
  if (!x->res_head) arm(x, x->env.gen->cfg->http.response_timeout_ms, on_timer);
}

/* Feeds client bytes to the request parser; returns how many it used (the
 * caller keeps the rest for later). */
static size_t feed(pc_l7_t *x, const char *buf, size_t len) {
  size_t total = 0;
  while (!blocked(x)) {
    size_t used = 0;
    int rc = pc_h1_feed(&x->req, buf + total, len - total, &used);
    total += used;
    if (x->state == X_HEAD && !x->head_started && total > 0) {
      x->head_started = 1;
      x->t_start = uv_hrtime();
      if (!x->timer_on) arm(x, x->env.gen->cfg->http.request_timeout_ms, on_timer);
    }
    if (rc == PC_H1_MORE) break;
    if (rc == PC_H1_HEAD) {
      begin_request(x);
    } else if (rc == PC_H1_DONE) {
      request_done(x);
    } else {
      int st = x->req.status;
      if (x->state == X_REQUEST && x->up_ready) {
        /* The head went upstream already (bad chunking): the app must not
         * see a completed request. */
        pc_log(PC_LOG_INFO, "listener %s: malformed request body from %s: %s", x->env.lc->name,
               x->env.peer_addr, x->req.detail);
      }
      reply_error(x, st, PC_DECISION_DENY, st == 431 ? PC_REASON_LIMIT : PC_REASON_PROTOCOL,
                  x->req.detail, 0);
      return len;
    }
  }
  return total;
}

static void keep_input(pc_l7_t *x, const char *buf, size_t len) {
  if (x->in_len + len > x->in_cap) {
    x->in_cap = x->in_len + len;
    x->in = pc_realloc(x->in, x->in_cap);
  }
  memcpy(x->in + x->in_len, buf, len);
  x->in_len += len;
}

/* Reads from the client only while its bytes can be parsed. */
static void sync_down(pc_l7_t *x) {
  if (x->state != X_HEAD && x->state != X_REQUEST) return;
  /* While a request waits, the client may go on sending (pipelining); up
   * to KEEP_MAX is kept rather than stopping and restarting the read for
   * every request (two epoll_ctl calls each). */
  int want = !x->down_bp && x->in_len < KEEP_MAX;
  if (want && !x->down->reading)
    pc_stream_read_start(x->down);
  else if (!want && x->down->reading)
    pc_stream_read_stop(x->down);
}

/* Parses kept client bytes as far as possible, then reads on. */
static void process(pc_l7_t *x) {
  if (x->in_process) return;
  x->in_process = 1;
  size_t used = feed(x, x->in, x->in_len);
  if (used >= x->in_len) {
    x->in_len = 0;
  } else {
    memmove(x->in, x->in + used, x->in_len - used);
    x->in_len -= used;
  }
  x->in_process = 0;
  sync_down(x);
}

static void up_ready(pc_l7_t *x) {
  x->up_ready = 1;
  if (x->up->served > 0) x->env.l->stats.upstream_reuses++;
  put(x, &x->up->s, x->head_out.data, x->head_out.len);
  x->t_sent = uv_hrtime();
  if (x->req_done) /* a retry: the request had no body */
    arm(x, x->env.gen->cfg->http.response_timeout_ms, on_timer);
}

static void up_ready_cb(void *user, pc_upconn_t *up, int status, pc_reason_t reason,
                        const char *detail) {
  pc_l7_t *x = user;
  if (status != 0) {
    /* up is closing but readable now: the log names the refused upstream. */
    int ours = up->peer.reason != PC_REASON_NONE;
    reply_error(x, status, ours ? PC_DECISION_DENY : PC_DECISION_ERROR, reason, detail, 0);
    return;
  }
  up_ready(x);
  process(x);
}

static void on_up_ready(void *user, pc_upconn_t *up, int status, pc_reason_t reason,
                        const char *detail) {
  up_ready_cb(user, up, status, reason, detail);
  settle(user);
}

static void acquire(pc_l7_t *x) {
  pc_pool_t *p = pc_pool_for(x->env.w, x->rgen, x->rlc);
  int ready = 0;
  x->up = pc_pool_acquire(p, &x->env.l->stats, &up_cbs, x, on_up_ready, x, &ready);
  if (ready) up_ready(x);
}

static char *copy_span(const char *s, size_t n) {
  char *c = pc_malloc(n + 1);
  memcpy(c, s, n);
  c[n] = '\0';
  return c;
}

static void begin_request(pc_l7_t *x) {
  const pc_h1_msg_t *m = &x->req.msg;
  disarm(x);
  x->state = X_REQUEST;
  if (!x->t_start) x->t_start = uv_hrtime();
  x->method = copy_span(m->method_str, m->method_len);
  x->method_len = m->method_len;
  x->path = copy_span(m->target, m->path_len);
  x->path_len = m->path_len;
  const pc_listener_cfg_t *lc;
  x->rgen = pc_l7_decider(&x->env, &lc);
  x->rlc = lc;
  if (x->inbound && pc_policy_check_request(lc->policy, x->env.peer_id, x->method, x->method_len,
                                            x->path, x->path_len) != PC_REASON_NONE) {
    char detail[160];
    snprintf(detail, sizeof(detail), "%.16s %.96s is not allowed for this peer", x->method,
             x->path);
    reply_error(x, 403, PC_DECISION_DENY, PC_REASON_NOT_ALLOWED, detail, pc_h1_complete(&x->req));
    return;
  }
  unsigned flags = 0;
  if (m->chunked) flags |= PC_H1_OUT_CHUNKED;
  if (m->has_length) flags |= PC_H1_OUT_LENGTH;
  if (m->upgrade) flags |= PC_H1_OUT_UPGRADE;
  if (x->inbound) flags |= PC_H1_OUT_DROP_XFCC;
  x->head_out.len = 0;
  pc_h1_write_head(&x->req, &x->head_out, flags, x->xfcc);
  x->close_after = !m->keep_alive;
  x->res.req_method = m->method;
  if (wants_h2(x, lc)) {
    if (m->upgrade || m->method == HTTP_CONNECT) {
      reply_error(x, 502, PC_DECISION_ERROR, PC_REASON_PROTOCOL,
                  "Upgrade and CONNECT cannot be carried over HTTP/2 to this upstream", 0);
      return;
    }
    go_h2(x);
    return;
  }
  acquire(x);
}

/* ---- onwards as HTTP/2 (h2up.h) ----------------------------------------- */

/* Inbound to an app that speaks only h2c, or outbound with
 * upstream_protocol = "h2", requests go on as HTTP/2 streams. ("auto"
 * keeps HTTP/1 clients on HTTP/1.1: only HTTP/2 clients probe for h2.) */
static int wants_h2(const pc_l7_t *x, const pc_listener_cfg_t *lc) {
  return x->inbound ? lc->app_protocol == PC_APP_H2C : lc->upstream_protocol == PC_UP_H2;
}

static void k_on_head(void *user, int status, const nghttp2_nv *nv, size_t n, int end) {
  pc_l7_t *x = user;
  const pc_h1_msg_t *q = &x->req.msg;
  if (x->upstream_ms < 0) x->upstream_ms = (double)(uv_hrtime() - x->t_sent) / 1e6;
  disarm(x);
  x->res_head = x->res_any = 1;
  x->status = status;
  if (x->env.w->draining || !x->req_done) x->close_after = 1;
  int bodiless = q->method == HTTP_HEAD || status == 204 || status == 304;
  int has_len = 0;
  x->out.len = 0;
  pc_jbuf_printf(&x->out, "HTTP/1.1 %d %s\r\n", status, pc_h1_phrase(status));
  for (size_t i = 0; i < n; i++) {
    if (nv[i].namelen == 14 && memcmp(nv[i].name, "content-length", 14) == 0) has_len = 1;
    pc_jbuf_raw(&x->out, (const char *)nv[i].name, nv[i].namelen);
    pc_jbuf_raw(&x->out, ": ", 2);
    pc_jbuf_raw(&x->out, (const char *)nv[i].value, nv[i].valuelen);
    pc_jbuf_raw(&x->out, "\r\n", 2);
  }
  if (!has_len && !bodiless) {
    if (end)
      pc_jbuf_raw(&x->out, "content-length: 0\r\n", 19);
    else if (q->minor == 1) {
      pc_jbuf_raw(&x->out, "transfer-encoding: chunked\r\n", 28);
      x->out_chunked = 1;
    } else {
      x->close_after = 1; /* HTTP/1.0: the end of the body is the end of the connection */
    }
  }
  if (x->close_after)
    pc_jbuf_raw(&x->out, "connection: close\r\n", 19);
  else if (q->minor == 0)
    pc_jbuf_raw(&x->out, "connection: keep-alive\r\n", 24);
  pc_jbuf_raw(&x->out, "\r\n", 2);
  put(x, x->down, x->out.data, x->out.len);
  settle(x);
}

static void k_on_data(void *user, const uint8_t *data, size_t len) {
  pc_l7_t *x = user;
  touch(x);
  if (x->inbound)
    x->env.l->stats.bytes_to_peer += len;
  else
    x->env.l->stats.bytes_from_peer += len;
  if (write_body(x, x->down, (const char *)data, len, x->out_chunked) == 0) x->res_bytes += len;
  /* The window is given back as the client takes the bytes. */
  if (pc_stream_queued(x->down) + x->dq.len > PC_STREAM_HIGH_WATER)
    x->unconsumed += len;
  else
    pc_h2call_consumed(x->call, len);
  settle(x);
}

static void k_on_end(void *user, const nghttp2_nv *nv, size_t n) {
  pc_l7_t *x = user;
  if (x->out_chunked) {
    /* Trailers fit in the last chunk's trailer section. */
    x->out.len = 0;
    pc_jbuf_raw(&x->out, "0\r\n", 3);
    for (size_t i = 0; i < n; i++) {
      pc_jbuf_raw(&x->out, (const char *)nv[i].name, nv[i].namelen);
      pc_jbuf_raw(&x->out, ": ", 2);
      pc_jbuf_raw(&x->out, (const char *)nv[i].value, nv[i].valuelen);
      pc_jbuf_raw(&x->out, "\r\n", 2);
    }
    pc_jbuf_raw(&x->out, "\r\n", 2);
    put(x, x->down, x->out.data, x->out.len);
    x->out_chunked = 0;
  }
  if (!x->req_done) x->close_after = 1;
  log_request(x, x->status, PC_DECISION_ALLOW, PC_REASON_NONE);
  int close = x->close_after;
  end_request(x, PC_POOL_CLOSE);
  if (close) {
    close_gently(x);
  } else {
    x->state = X_HEAD;
    process(x);
  }
  settle(x);
}

static void k_on_fail(void *user, int status, pc_reason_t r, const char *detail, int retry) {
  pc_l7_t *x = user;
  const pc_h1_msg_t *q = &x->req.msg;
  if (retry && !x->res_any && x->retries < MAX_RETRIES && x->req_done && x->req_bytes == 0 &&
      !q->chunked) {
    pc_h2call_t *k = x->call;
    x->call = NULL;
    pc_h2call_release(k);
    x->retries++;
    disarm(x);
    go_h2(x);
    settle(x);
    return;
  }
  if (status > 0) {
    if (status == PC_H2CALL_USE_H1) status = 502;
    pc_log(PC_LOG_WARN, "listener %s: upstream %s: %s", x->env.lc->name, x->rlc->target_str,
           detail);
    reply_error(x, status, pc_reason_is_identity(r) ? PC_DECISION_DENY : PC_DECISION_ERROR, r,
                detail, 0);
  } else {
    log_request(x, x->status, PC_DECISION_ERROR, PC_REASON_PROTOCOL);
    end_request(x, PC_POOL_ABORT);
    finish(x, "reset", 1);
  }
  settle(x);
}

static void k_on_sent(void *user, size_t n) {
  pc_l7_t *x = user;
  x->call_queued = n > x->call_queued ? 0 : x->call_queued - n;
  if (x->down_bp && x->call_queued < PC_STREAM_LOW_WATER) {
    x->down_bp = 0;
    process(x);
    sync_down(x);
  }
  settle(x);
}

static const pc_h2call_cbs_t call_cbs = {k_on_head, k_on_data, k_on_end, k_on_fail, k_on_sent};

/* The parsed HTTP/1 head as HTTP/2 fields: pseudo-headers from the request
 * line and Host, field names lowercased, hop-by-hop fields and any
 * x-forwarded-client-cert from the peer dropped, ours added. */
static void go_h2(pc_l7_t *x) {
  const pc_h1_msg_t *m = &x->req.msg;
  const pc_h1_field_t *host = pc_h1_find(m, "host");
  pc_jbuf_t *names = &x->head_out;
  names->len = 0;
  size_t *off = pc_calloc(m->nfields + 1, sizeof(*off));
  for (size_t i = 0; i < m->nfields; i++) {
    off[i] = names->len;
    for (uint32_t j = 0; j < m->fields[i].name_len; j++) {
      char c = m->fields[i].name[j];
      if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
      pc_jbuf_raw(names, &c, 1);
    }
  }
  nghttp2_nv *nv = pc_calloc(m->nfields + 7, sizeof(*nv));
  size_t n = 0;
  nv[n++] = (nghttp2_nv){(uint8_t *)":method", (uint8_t *)m->method_str, 7, m->method_len, 0};
  nv[n++] = (nghttp2_nv){(uint8_t *)":scheme", (uint8_t *)(x->inbound ? "https" : "http"), 7,
                         x->inbound ? 5u : 4u, 0};
  if (host)
    nv[n++] = (nghttp2_nv){(uint8_t *)":authority", (uint8_t *)host->value, 10, host->value_len, 0};
  nv[n++] = (nghttp2_nv){(uint8_t *)":path", (uint8_t *)m->target, 5, m->target_len, 0};
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    if (pc_h1_hop_by_hop(m, f) || f == host) continue;
    if (x->inbound && pc_h1_is_xfcc(f->name, f->name_len)) continue;
    nv[n++] = (nghttp2_nv){(uint8_t *)names->data + off[i], (uint8_t *)f->value, f->name_len,
                           f->value_len, 0};
  }
  if (x->inbound && x->xfcc) {
    size_t xl = strlen(x->xfcc); /* "x-forwarded-client-cert: V\r\n" */
    nv[n++] = (nghttp2_nv){(uint8_t *)x->xfcc, (uint8_t *)x->xfcc + 25, 23, xl - 27, 0};
  }
  char cl[24];
  if (m->has_length) {
    int cln = snprintf(cl, sizeof(cl), "%llu", (unsigned long long)m->length);
    nv[n++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)cl, 14, (size_t)cln, 0};
  }
  int end = !m->chunked && (!m->has_length || m->length == 0);
  x->t_sent = uv_hrtime();
  x->up_ready = 1; /* the call takes body bytes at once (it buffers them) */
  x->call = pc_h2call_start(x->env.w, x->rgen, x->rlc, &x->env.l->stats, nv, n, end, &call_cbs, x);
  free(nv);
  free(off);
  names->len = 0;
  if (x->req_done) arm(x, x->env.gen->cfg->http.response_timeout_ms, on_timer);
}

/* ---- responses ---------------------------------------------------------- */

static void on_splice_done(pc_splice_t *sp, int reset, int err) {
  (void)err;
  pc_l7_t *x = pc_container_of(sp, pc_l7_t, splice);
  x->req_bytes += sp->bytes[0];
  x->res_bytes += sp->bytes[1];
  log_request(x, x->status, PC_DECISION_ALLOW, PC_REASON_NONE);
  finish(x, reset ? "reset" : "eof", reset);
}

/* 101 to an Upgrade, 2xx to CONNECT: from here on bytes pass untouched. */
static void start_tunnel(pc_l7_t *x, const char *rest, size_t rest_len) {
  x->state = X_TUNNEL;
  disarm(x);
  if (rest_len) {
    put(x, x->down, rest, rest_len);
    x->res_bytes += rest_len;
  }
  if (x->in_len) {
    put(x, &x->up->s, x->in, x->in_len);
    x->req_bytes += x->in_len;
    x->in_len = 0;
  }
  flush_queue(x, x->down);
  flush_queue(x, &x->up->s);
  pc_splice_start(&x->splice, x->down, &x->up->s, on_splice_done);
}

/* The upstream broke HTTP: 502 if the client has no answer yet, else the
 * client's connection is reset (a truncated body must not look complete). */
static void bad_response(pc_l7_t *x, const char *detail) {
  pc_log(PC_LOG_WARN, "listener %s: upstream %s: %s", x->env.lc->name, x->rlc->target_str, detail);
  if (!x->res_head) {
    reply_error(x, 502, PC_DECISION_ERROR, PC_REASON_PROTOCOL, detail, 0);
    return;
  }
  log_request(x, x->status, PC_DECISION_ERROR, PC_REASON_PROTOCOL);
  end_request(x, PC_POOL_ABORT);
  finish(x, "reset", 1);
}

/* Returns 1 if the connection changed hands (tunnel) or ended. */
static int on_response_head(pc_l7_t *x, const char *rest, size_t rest_len) {
  const pc_h1_msg_t *m = &x->res.msg;
  const pc_h1_msg_t *q = &x->req.msg;
  int st = m->status;
  if (x->upstream_ms < 0) x->upstream_ms = (double)(uv_hrtime() - x->t_sent) / 1e6;
  if (st < 200 && st != 101) {
    /* Interim (100 Continue, 103 Early Hints): relayed to HTTP/1.1 clients. */
    if (q->minor == 1) {
      x->out.len = 0;
      pc_h1_write_head(&x->res, &x->out, 0, NULL);
      put(x, x->down, x->out.data, x->out.len);
    }
    uint8_t rm = x->res.req_method;
    pc_h1_reset(&x->res);
    x->res.req_method = rm;
    return 0;
  }
  disarm(x);
  x->res_head = 1;
  x->status = st;
  int tunnel = (st == 101 && q->upgrade) || (q->method == HTTP_CONNECT && st < 300);
  if (st == 101 && !tunnel) {
    bad_response(x, "101 Switching Protocols to a request that asked for no switch");
    return 1;
  }
  x->out.len = 0;
  if (tunnel) {
    pc_h1_write_head(&x->res, &x->out, st == 101 ? PC_H1_OUT_UPGRADE : 0, NULL);
    put(x, x->down, x->out.data, x->out.len);
    start_tunnel(x, rest, rest_len);
    return 1;
  }
  unsigned flags = 0;
  if (x->env.w->draining || !x->req_done) x->close_after = 1;
  /* A response to HEAD, a 204 or a 304 keeps its framing fields but has no
   * body to frame. */
  int bodiless = q->method == HTTP_HEAD || st == 204 || st == 304;
  if (m->chunked || m->until_close) {
    if (q->minor == 1) {
      flags |= PC_H1_OUT_CHUNKED;
      x->out_chunked = !bodiless;
    } else if (!bodiless) {
      x->close_after = 1; /* HTTP/1.0: the end of the body is the end of the connection */
    }
  }
  if (m->has_length) flags |= PC_H1_OUT_LENGTH;
  if (x->close_after)
    flags |= PC_H1_OUT_CLOSE;
  else if (q->minor == 0)
    flags |= PC_H1_OUT_KEEPALIVE;
  pc_h1_write_head(&x->res, &x->out, flags, NULL);
  put(x, x->down, x->out.data, x->out.len);
  return 0;
}

static void response_done(pc_l7_t *x, int extra) {
  if (x->out_chunked) put(x, x->down, "0\r\n\r\n", 5);
  if (extra)
    pc_log(PC_LOG_WARN,
           "listener %s: upstream %s sent bytes after its response (a second response?); closing "
           "that connection",
           x->env.lc->name, x->rlc->target_str);
  const pc_h1_msg_t *m = &x->res.msg;
  int reusable = !extra && m->keep_alive && !m->until_close && x->req_done && x->req.msg.minor == 1;
  int close = x->close_after || !x->req_done;
  log_request(x, x->status, PC_DECISION_ALLOW, PC_REASON_NONE);
  end_request(x, reusable ? PC_POOL_KEEP : PC_POOL_CLOSE);
  if (close) {
    close_gently(x);
    return;
  }
  x->state = X_HEAD;
  process(x);
}

/* A pooled connection the app had already given up on fails before any
 * answer: a request without body is safe to send again. */
static int retryable(const pc_l7_t *x) {
  const pc_h1_msg_t *q = &x->req.msg;
  return x->up && x->up->served > 0 && !x->res_any && x->retries < MAX_RETRIES && x->req_done &&
         !q->chunked && (!q->has_length || q->length == 0) && !q->upgrade &&
         q->method != HTTP_CONNECT;
}

static void upstream_failed(pc_l7_t *x, const char *detail) {
  if (retryable(x)) {
    pc_upconn_t *old = x->up;
    x->up = NULL;
    x->up_ready = 0;
    x->uq.len = 0;
    x->retries++;
    disarm(x);
    pc_pool_release(old, PC_POOL_CLOSE);
    acquire(x);
    return;
  }
  bad_response(x, detail);
}

static pc_l7_t *of_up(pc_stream_t *s) { return s->owner; }

static void up_data(pc_l7_t *x, pc_stream_t *s, const char *buf, size_t len);

static void up_on_data(pc_stream_t *s, const char *buf, size_t len) {
  pc_l7_t *x = of_up(s);
  up_data(x, s, buf, len);
  settle(x);
}

static void up_data(pc_l7_t *x, pc_stream_t *s, const char *buf, size_t len) {
  touch(x);
  if (x->inbound)
    x->env.l->stats.bytes_to_peer += len;
  else
    x->env.l->stats.bytes_from_peer += len;
  if (x->state == X_TUNNEL) {
    pc_splice_on_data(&x->splice, s, buf, len);
    return;
  }
  if (x->state != X_REQUEST) return;
  x->res_any = 1;
  size_t off = 0;
  for (;;) {
    size_t used = 0;
    int rc = pc_h1_feed(&x->res, buf + off, len - off, &used);
    off += used;
    if (rc == PC_H1_MORE) break;
    if (rc == PC_H1_HEAD) {
      if (on_response_head(x, buf + off, len - off)) return;
    } else if (rc == PC_H1_DONE) {
      response_done(x, off < len);
      return;
    } else {
      bad_response(x, x->res.detail);
      return;
    }
  }
  if (pc_stream_queued(x->down) + x->dq.len > PC_STREAM_HIGH_WATER) {
    x->up_bp = 1;
    pc_stream_read_stop(s);
  }
}

static void up_eof(pc_stream_t *s) {
  pc_l7_t *x = of_up(s);
  if (x->state == X_TUNNEL) {
    pc_splice_on_eof(&x->splice, s);
    return;
  }
  if (x->state != X_REQUEST) return;
  if (x->res_head && pc_h1_finish(&x->res) == PC_H1_DONE) {
    response_done(x, 0);
    return;
  }
  upstream_failed(x, "the upstream closed the connection before the response ended");
}

static void up_on_eof(pc_stream_t *s) {
  pc_l7_t *x = of_up(s);
  up_eof(s);
  settle(x);
}

static void up_error(pc_stream_t *s, int err) {
  pc_l7_t *x = of_up(s);
  if (x->state == X_TUNNEL) {
    pc_splice_on_error(&x->splice, s, err);
    return;
  }
  if (x->state != X_REQUEST) return;
  /* With TLS 1.3 an upstream that refuses our certificate says so with an
   * alert just after the handshake. */
  upstream_failed(x, err == PC_STREAM_ETLS && !x->res_any
                         ? "the upstream ended TLS (it may have refused this sidecar's identity)"
                         : "the upstream connection failed");
}

static void up_on_error(pc_stream_t *s, int err) {
  pc_l7_t *x = of_up(s);
  up_error(s, err);
  settle(x);
}

static void up_drain(pc_stream_t *s) {
  pc_l7_t *x = of_up(s);
  if (x->state == X_TUNNEL) {
    pc_splice_on_drain(&x->splice, s);
  } else if (x->down_bp) {
    x->down_bp = 0;
    process(x);
  }
}

static void up_on_drain(pc_stream_t *s) {
  pc_l7_t *x = of_up(s);
  up_drain(s);
  settle(x);
}

static void up_on_shutdown(pc_stream_t *s, int status) {
  pc_l7_t *x = of_up(s);
  if (x->state == X_TUNNEL) pc_splice_on_shutdown(&x->splice, s, status);
}

/* ---- the client side ---------------------------------------------------- */

static void down_data(pc_l7_t *x, const char *buf, size_t len);

void pc_l7_on_data(pc_l7_t *x, const char *buf, size_t len) {
  down_data(x, buf, len);
  settle(x);
}

static void down_data(pc_l7_t *x, const char *buf, size_t len) {
  touch(x);
  if (x->inbound)
    x->env.l->stats.bytes_from_peer += len;
  else
    x->env.l->stats.bytes_to_peer += len;
  if (x->state == X_TUNNEL) {
    pc_splice_on_data(&x->splice, x->down, buf, len);
    return;
  }
  if (x->state != X_HEAD && x->state != X_REQUEST) return;
  if (x->in_len > 0 || x->in_process) {
    keep_input(x, buf, len);
    if (!x->in_process) process(x);
    return;
  }
  size_t used = feed(x, buf, len);
  if (used < len && (x->state == X_HEAD || x->state == X_REQUEST))
    keep_input(x, buf + used, len - used);
  sync_down(x);
}

void pc_l7_on_eof(pc_l7_t *x) {
  switch (x->state) {
  case X_TUNNEL: pc_splice_on_eof(&x->splice, x->down); return;
  case X_CLOSING:
    x->peer_done = 1;
    if (x->shut_done) finish(x, "eof", 0);
    return;
  case X_HEAD: finish(x, "eof", 0); return;
  case X_REQUEST:
    if (x->req_done) {
      x->close_after = 1; /* half-closed after its request: answer, then close */
      return;
    }
    log_request(x, x->status, PC_DECISION_ERROR, PC_REASON_NONE);
    finish(x, "eof", 0);
    return;
  default: return;
  }
}

void pc_l7_on_error(pc_l7_t *x, int err) {
  if (x->state == X_TUNNEL) {
    pc_splice_on_error(&x->splice, x->down, err);
    return;
  }
  if (x->state == X_REQUEST) log_request(x, x->status, PC_DECISION_ERROR, PC_REASON_NONE);
  finish(x, "reset", 1);
}

void pc_l7_on_drain(pc_l7_t *x) {
  if (x->state == X_TUNNEL) {
    pc_splice_on_drain(&x->splice, x->down);
    return;
  }
  if (x->call && x->unconsumed) {
    size_t n = x->unconsumed;
    x->unconsumed = 0;
    pc_h2call_consumed(x->call, n);
  }
  if (x->up_bp && x->up) {
    x->up_bp = 0;
    pc_stream_read_start(&x->up->s);
  }
  /* Pipelined requests waited for the client to read its answers. */
  if (x->state == X_HEAD && x->in_len) process(x);
  settle(x);
}

void pc_l7_on_shutdown(pc_l7_t *x, int status) {
  if (x->state == X_TUNNEL) {
    pc_splice_on_shutdown(&x->splice, x->down, status);
  } else if (x->state == X_CLOSING) {
    x->shut_done = 1;
    if (x->peer_done || status < 0)
      finish(x, status < 0 ? "reset" : "eof", status < 0);
    else
      arm(x, LINGER_MS, on_linger_timer);
  }
}

/* ---- lifecycle ---------------------------------------------------------- */

/* "x-forwarded-client-cert: By=<us>;Hash=<sha256 of the peer's leaf>;URI=<peer>" */
pc_gen_t *pc_l7_decider(const pc_l7_env_t *env, const pc_listener_cfg_t **lc) {
  pc_gen_t *g = env->w->gen;
  const pc_listener_cfg_t *l = pc_config_listener(g->cfg, env->lc->name);
  if (!l || l->direction != env->lc->direction || l->protocol != PC_PROTO_HTTP) {
    g = env->gen;
    l = env->lc;
  }
  pc_gen_ref(g);
  *lc = l;
  return g;
}

char *pc_l7_make_xfcc(pc_stream_t *down, const pc_l7_env_t *env) {
  uint8_t md[SHA256_DIGEST_LENGTH];
  if (!env->peer_id || pc_tls_peer_leaf_sha256(down->ssl, md) != 0) return NULL;
  char hex[2 * SHA256_DIGEST_LENGTH + 1];
  for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
    snprintf(hex + 2 * i, 3, "%02x", md[i]);
  pc_jbuf_t b = {0};
  pc_jbuf_printf(&b, "x-forwarded-client-cert: By=%s;Hash=%s;URI=%s\r\n",
                 env->gen->certs->spiffe_id, hex, env->peer_id);
  /* Kept for the connection's life: sized to fit, not a cached 2 KiB buffer. */
  char *xfcc = pc_strdup(b.data);
  pc_jbuf_release(&b);
  return xfcc;
}

pc_l7_t *pc_l7_start(pc_stream_t *down, const pc_l7_env_t *env,
                     void (*on_done)(void *, const char *, int), void *arg) {
  pc_l7_t *x = pc_calloc(1, sizeof(*x));
  x->down = down;
  x->env = *env;
  x->inbound = env->lc->direction == PC_DIR_INBOUND;
  x->on_done = on_done;
  x->arg = arg;
  x->upstream_ms = -1;
  const pc_config_t *cfg = env->gen->cfg;
  x->lim = (pc_h1_limits_t){cfg->http.max_request_line, cfg->http.max_header_bytes,
                            cfg->http.max_headers};
  pc_h1_init(&x->req, 1, &x->lim, on_req_body, x);
  pc_h1_init(&x->res, 0, &x->lim, on_res_body, x);
  if (x->inbound) x->xfcc = pc_l7_make_xfcc(down, env);
  uv_timer_init(&env->w->loop, &x->timer);
  x->timer.data = x;
  x->state = X_HEAD;
  /* The first request's head is due from now: a silent client gets 408. */
  arm(x, cfg->http.request_timeout_ms, on_timer);
  pc_stream_read_start(down);
  return x;
}

int pc_l7_close(pc_l7_t *x, uv_close_cb close_cb, void *data) {
  x->state = X_DONE;
  if (x->call) {
    pc_h2call_t *k = x->call;
    x->call = NULL;
    pc_h2call_release(k);
  }
  if (x->up) {
    pc_upconn_t *up = x->up;
    x->up = NULL;
    pc_pool_release(up, PC_POOL_ABORT);
  }
  uv_timer_stop(&x->timer);
  x->timer.data = data;
  uv_close((uv_handle_t *)&x->timer, close_cb);
  return 1;
}

void pc_l7_free(pc_l7_t *x) {
  if (!x) return;
  pc_h1_free(&x->req);
  pc_h1_free(&x->res);
  if (x->rgen) pc_gen_unref(x->rgen);
  free(x->in);
  free(x->xfcc);
  free(x->method);
  free(x->path);
  pc_jbuf_free(&x->head_out);
  pc_jbuf_free(&x->out);
  pc_jbuf_free(&x->dq);
  pc_jbuf_free(&x->uq);
  free(x);
}

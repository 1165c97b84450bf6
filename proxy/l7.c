#include "l7.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "compat.h"
#include "deadline.h"
#include "h1.h"
#include "log.h"
#include "pool.h"
#include "exchange.h"
#include "upcall.h"
#include "splice.h"

/* How long a client gets to read a closing answer before the socket closes. */
#define LINGER_MS 1000
/* A request that met only stale pooled connections is retried at most this
 * often. */
/* A request is sent at most three times: the retries cover a stale pooled
 * connection and a failed connect (README "Service names"). */
#define MAX_RETRIES 2
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
  pc_h1_parser_t req;
  xstate_t state;
  char *in; /* client bytes kept while a request waits (pipelining) */
  size_t in_len, in_cap;
  char *xfcc;         /* "x-forwarded-client-cert: ...\r\n" (inbound) */
  pc_exchange_t ex;   /* the request in flight (exchange.h) */
  pc_upconn_t *tun;   /* after a tunnel was accepted: its upstream connection */
  size_t call_queued; /* request body bytes the call holds, not yet sent */
  size_t unconsumed;  /* response bytes the client has not taken yet */
  pc_jbuf_t head_out; /* request head for the upstream, kept for a retry */
  pc_jbuf_t names;    /* lowercased field names for the onward fields */
  pc_jbuf_t out;      /* scratch for heads and chunks going out */
  pc_jbuf_t dq;       /* small writes collected for the client (put) */
  unsigned broken : 1, head_started : 1, req_done : 1, res_head : 1, res_any : 1, close_after : 1,
      out_chunked : 1, down_bp : 1, timer_on : 1, in_process : 1, peer_done : 1, shut_done : 1,
      await_continue : 1; /* Expect: 100-continue, no body byte yet, no answer yet: the
                             upstream owes the next move (response deadline) */
  pc_deferred_t defer;    /* settle after this loop iteration's I/O (later()) */
  pc_splice_t splice;
};

static void process(pc_l7_t *x);
static void go(pc_l7_t *x);
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

/* One access-log line and the counters for the request in flight. */
static void log_request(pc_l7_t *x, int status, pc_decision_t d, pc_reason_t r) {
  if (x->ex.logged) return;
  x->ex.status = status;
  x->ex.decision = d;
  x->ex.reason = r;
  pc_exchange_log(&x->ex, &x->env, x->ex.method && !x->req.msg.minor ? PC_HTTP_10 : PC_HTTP_11);
}

/* Forgets the request in flight. The call is released: one that ended
 * cleanly already gave its connection back (h1up.h), any other is
 * abandoned. */
static void end_request(pc_l7_t *x) {
  pc_exchange_end(&x->ex);
  x->call_queued = x->unconsumed = 0;
  x->req_done = x->res_head = x->res_any = x->out_chunked = x->await_continue = 0;
  x->down_bp = 0;
  x->head_started = 0;
  x->head_out.len = 0;
  pc_h1_reset(&x->req);
}

/* ---- closing ------------------------------------------------------------ */

/* Small writes to the client in one callback (a response head, a short
 * body, the last chunk) are collected and sent as one write (one TLS
 * record, one syscall) when the callback ends (settle). Bigger ones go at
 * once, after what is collected. */
#define COLLECT_MAX (16 * 1024)

static int send_now(pc_l7_t *x, const char *data, size_t len) {
  if (pc_stream_write(x->down, data, len) == 0) return 0;
  x->broken = 1;
  return -1;
}

static int flush_queue(pc_l7_t *x) {
  if (!x->dq.len) return 0;
  size_t n = x->dq.len;
  x->dq.len = 0;
  return x->broken ? -1 : send_now(x, x->dq.data, n);
}

/* Writes to the client. A failed write (the client reset) is remembered and
 * acted on by check_broken once the current callback unwinds: ending the
 * connection from inside a parser callback would pull state from under it. */
static int put(pc_l7_t *x, const char *data, size_t len) {
  if (x->broken) return -1;
  if (x->dq.len + len <= COLLECT_MAX) {
    pc_jbuf_raw(&x->dq, data, len);
    return 0;
  }
  if (flush_queue(x) != 0) return -1;
  return send_now(x, data, len);
}

/* Returns 1 if a failed write ended the connection. */
static int check_broken(pc_l7_t *x) {
  if (!x->broken || x->state == X_DONE || x->state == X_TUNNEL) return 0;
  if (x->state == X_REQUEST) log_request(x, x->ex.status, PC_DECISION_ERROR, PC_REASON_NONE);
  finish(x, "reset", 1);
  return 1;
}

/* End of every callback into this module: send what was collected, then act
 * on a failed write. */
static void settle(pc_l7_t *x) {
  if (x->state == X_DONE) return;
  flush_queue(x);
  if (check_broken(x)) return;
  /* Between requests a keep-alive connection holds no buffers: thousands
   * of idle clients cost their TLS state and this struct, not their last
   * request's head and scratch. The buffers go to the worker's buffer
   * cache, where the next request on any connection finds them. */
  if (x->state == X_HEAD && !x->ex.call && x->in_len == 0 && !x->head_started) {
    pc_h1_trim(&x->req);
    pc_jbuf_release(&x->head_out);
    pc_jbuf_release(&x->names);
    pc_jbuf_release(&x->out);
    pc_jbuf_release(&x->dq);
  }
}

static void run_deferred(pc_deferred_t *d) { settle(pc_container_of(d, pc_l7_t, defer)); }

/* From the upstream's callbacks: what they collected for the client goes
 * out once, after the upstream's whole read was heard (an HTTP/1.1
 * response's head, body and end arrive in one read: one write, one TLS
 * record), in libuv's check phase of this loop iteration (worker.h). */
static void later(pc_l7_t *x) {
  if (x->state != X_DONE) pc_worker_defer(x->env.w, &x->defer);
}

static void on_linger_timer(uv_timer_t *t) { finish(t->data, "eof", 0); }

/* Sends everything queued, then close_notify and FIN, and drops the client's
 * input meanwhile, so that closing does not turn into an RST that destroys
 * the answer. The connection ends when the client has closed too, or
 * LINGER_MS after our FIN. */
static void close_gently(pc_l7_t *x) {
  flush_queue(x);
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
  put(x, x->out.data, x->out.len);
  x->ex.status = status;
  log_request(x, status, d, r);
  end_request(x);
  if (!keep) {
    close_gently(x);
    return;
  }
  x->state = X_HEAD;
}

/* ---- bodies ------------------------------------------------------------- */

/* Writes body bytes to the client, as one chunk when chunked (one write:
 * one TLS record). */
static int write_body(pc_l7_t *x, const char *data, size_t len, int chunked) {
  if (!chunked) return put(x, data, len);
  x->out.len = 0;
  pc_jbuf_printf(&x->out, "%zx\r\n", len);
  pc_jbuf_raw(&x->out, data, len);
  pc_jbuf_raw(&x->out, "\r\n", 2);
  return put(x, x->out.data, x->out.len);
}

static void on_timer(uv_timer_t *t);

/* While a request body is incomplete, the timer is its progress deadline:
 * each body byte moves it (arm() is lazy, so this costs no timer-heap
 * update per read). */
static void arm_body(pc_l7_t *x) { arm(x, x->env.gen->cfg->http.body_timeout_ms, on_timer); }

/* The client may now send its body (100 Continue came, or it sent body
 * bytes without waiting): the body deadline applies. */
static void continued(pc_l7_t *x) {
  if (!x->await_continue) return;
  x->await_continue = 0;
  if (!x->req_done) arm_body(x);
}

static void on_req_body(void *user, const char *data, size_t len) {
  pc_l7_t *x = user;
  x->await_continue = 0;
  arm_body(x);
  x->ex.req_bytes += len;
  pc_upcall_send(x->ex.call, data, len);
  x->call_queued += len;
  if (x->call_queued > PC_STREAM_HIGH_WATER) x->down_bp = 1;
}

/* ---- requests ----------------------------------------------------------- */

/* The client stopped sending a request body. Releasing the call resets its
 * upstream connection (h1up.h; HTTP/2: RST_STREAM): the app must not take
 * the cut-off request as whole. A response already begun is cut too. */
static void body_timed_out(pc_l7_t *x) {
  pc_log(PC_LOG_INFO, "listener %s: request body from %s stalled for %llu ms (timeout)",
         x->env.lc->name, x->env.peer_addr,
         (unsigned long long)x->env.gen->cfg->http.body_timeout_ms);
  if (!x->res_head) {
    reply_error(x, 408, PC_DECISION_DENY, PC_REASON_TIMEOUT,
                "the request body did not arrive in time", 0);
    return;
  }
  log_request(x, x->ex.status, PC_DECISION_DENY, PC_REASON_TIMEOUT);
  end_request(x);
  finish(x, "reset", 1);
}

static void timer_fired(uv_timer_t *t) {
  pc_l7_t *x = t->data;
  if (x->state == X_HEAD)
    reply_error(x, 408, PC_DECISION_DENY, PC_REASON_TIMEOUT,
                "the request head did not arrive in time", 0);
  else if (x->state == X_REQUEST && x->await_continue)
    reply_error(x, 504, PC_DECISION_ERROR, PC_REASON_TIMEOUT,
                "the upstream did not answer Expect: 100-continue in time", 0);
  else if (x->state == X_REQUEST && !x->req_done && (x->down_bp || !x->down->reading))
    arm_body(x); /* not read because the upstream is slow: not the client's doing */
  else if (x->state == X_REQUEST && !x->req_done)
    body_timed_out(x);
  else if (x->state == X_REQUEST && !x->res_head)
    reply_error(x, 504, PC_DECISION_ERROR, PC_REASON_TIMEOUT, "the upstream did not answer in time",
                0);
}

static void on_timer(uv_timer_t *t) {
  pc_l7_t *x = t->data;
  timer_fired(t);
  settle(x);
}

/* Can client bytes be parsed now? Not before the request went onwards, nor
 * after the request ended (the next one waits for this answer), nor while
 * the upstream's queue is full; and no next request starts while the
 * client has not read what it was already sent (a client that pipelines and
 * never reads would otherwise make the answers queue up without bound). */
static int blocked(const pc_l7_t *x) {
  if (x->state == X_HEAD) return pc_stream_queued(x->down) > PC_STREAM_HIGH_WATER;
  if (x->state != X_REQUEST) return 1;
  return !x->ex.call || x->req_done || x->down_bp;
}

static void request_done(pc_l7_t *x) {
  x->req_done = 1;
  pc_upcall_end(x->ex.call);
  if (!x->res_head)
    arm(x, x->env.gen->cfg->http.response_timeout_ms, on_timer);
  else
    disarm(x); /* the body deadline */
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
      x->ex.t_start = uv_hrtime();
      if (!x->timer_on) arm(x, x->env.gen->cfg->http.request_timeout_ms, on_timer);
    }
    if (rc == PC_H1_MORE) break;
    if (rc == PC_H1_HEAD) {
      begin_request(x);
    } else if (rc == PC_H1_DONE) {
      request_done(x);
    } else {
      int st = x->req.status;
      if (x->state == X_REQUEST && x->ex.call) {
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

static void begin_request(pc_l7_t *x) {
  const pc_h1_msg_t *m = &x->req.msg;
  disarm(x);
  x->state = X_REQUEST;
  char detail[160];
  if (pc_exchange_begin(&x->ex, &x->env, m->method_str, m->method_len, m->target, m->path_len,
                        detail, sizeof(detail)) != PC_REASON_NONE) {
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
  if ((m->upgrade || m->method == HTTP_CONNECT) &&
      pc_upcall_uses_h2(x->env.w, x->ex.gen, x->ex.lc, 0)) {
    reply_error(x, 502, PC_DECISION_ERROR, PC_REASON_PROTOCOL,
                "Upgrade and CONNECT cannot be carried over HTTP/2 to this upstream", 0);
    return;
  }
  go(x);
}

/* ---- the response (upcall.h) ------------------------------------------- */

static void put_fields(pc_jbuf_t *o, const nghttp2_nv *nv, size_t n) {
  for (size_t i = 0; i < n; i++) {
    pc_jbuf_raw(o, (const char *)nv[i].name, nv[i].namelen);
    pc_jbuf_raw(o, ": ", 2);
    pc_jbuf_raw(o, (const char *)nv[i].value, nv[i].valuelen);
    pc_jbuf_raw(o, "\r\n", 2);
  }
}

/* Interim answers (100 Continue, 103 Early Hints) are relayed to HTTP/1.1
 * clients; HTTP/1.0 has none. */
static void k_on_info(void *user, int status, const nghttp2_nv *nv, size_t n) {
  pc_l7_t *x = user;
  if (status == 100) continued(x);
  if (x->req.msg.minor != 1 || x->res_head) return;
  x->out.len = 0;
  pc_jbuf_printf(&x->out, "HTTP/1.1 %d %s\r\n", status, pc_h1_phrase(status));
  put_fields(&x->out, nv, n);
  pc_jbuf_raw(&x->out, "\r\n", 2);
  put(x, x->out.data, x->out.len);
  later(x);
}

/* The response head, framed for this client: the length the upstream gave,
 * else chunked (HTTP/1.1) or the connection's end (HTTP/1.0). A response to
 * HEAD, a 204 or a 304 keeps its framing fields but has no body to frame. */
static void k_on_head(void *user, int status, const nghttp2_nv *nv, size_t n, int end) {
  pc_l7_t *x = user;
  const pc_h1_msg_t *q = &x->req.msg;
  if (x->ex.upstream_ms < 0) x->ex.upstream_ms = (double)(uv_hrtime() - x->ex.t_sent) / 1e6;
  if (x->await_continue) {
    /* A final answer instead of 100 Continue: the client will not send the
     * body (RFC 9110 10.1.1); no body deadline runs, and the connection
     * closes after this answer. */
    x->await_continue = 0;
    x->close_after = 1;
    disarm(x);
  }
  if (x->req_done) disarm(x); /* else the body deadline stays */
  x->res_head = x->res_any = 1;
  x->ex.status = status;
  if (x->env.w->draining || !x->req_done) x->close_after = 1;
  int bodiless = q->method == HTTP_HEAD || status == 204 || status == 304;
  int has_len = 0;
  for (size_t i = 0; i < n; i++)
    if (nv[i].namelen == 14 && memcmp(nv[i].name, "content-length", 14) == 0) has_len = 1;
  x->out.len = 0;
  pc_jbuf_printf(&x->out, "HTTP/1.1 %d %s\r\n", status, pc_h1_phrase(status));
  put_fields(&x->out, nv, n);
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
  put(x, x->out.data, x->out.len);
  later(x);
}

static void k_on_data(void *user, const uint8_t *data, size_t len) {
  pc_l7_t *x = user;
  touch(x);
  if (x->inbound)
    PC_STAT_ADD(x->env.l->stats.bytes_to_peer, len);
  else
    PC_STAT_ADD(x->env.l->stats.bytes_from_peer, len);
  if (write_body(x, (const char *)data, len, x->out_chunked) == 0) x->ex.res_bytes += len;
  /* The upstream may send more as the client takes the bytes. */
  if (pc_stream_queued(x->down) + x->dq.len > PC_STREAM_HIGH_WATER)
    x->unconsumed += len;
  else
    pc_upcall_consumed(x->ex.call, len);
  later(x);
}

static void k_on_end(void *user, const nghttp2_nv *nv, size_t n) {
  pc_l7_t *x = user;
  if (x->out_chunked) {
    /* Trailers fit in the last chunk's trailer section. */
    x->out.len = 0;
    pc_jbuf_raw(&x->out, "0\r\n", 3);
    put_fields(&x->out, nv, n);
    pc_jbuf_raw(&x->out, "\r\n", 2);
    put(x, x->out.data, x->out.len);
    x->out_chunked = 0;
  }
  if (!x->req_done) x->close_after = 1;
  log_request(x, x->ex.status, PC_DECISION_ALLOW, PC_REASON_NONE);
  int close = x->close_after;
  end_request(x);
  if (close) {
    close_gently(x);
  } else {
    x->state = X_HEAD;
    process(x);
  }
  later(x);
}

/* A request the upstream never processed (a stale pooled connection, a
 * refused stream) is sent again if it had no body. */
static int retryable(const pc_l7_t *x) {
  const pc_h1_msg_t *q = &x->req.msg;
  return !x->res_any && x->ex.retries < MAX_RETRIES && x->req_done && x->ex.req_bytes == 0 &&
         !q->chunked && (!q->has_length || q->length == 0) && !q->upgrade &&
         q->method != HTTP_CONNECT;
}

static void k_on_fail(void *user, int status, pc_reason_t r, const char *detail, int retry) {
  pc_l7_t *x = user;
  if (retry && retryable(x)) {
    pc_exchange_release_call(&x->ex);
    x->ex.retries++;
    disarm(x);
    go(x);
  } else if (status > 0) {
    reply_error(x, status, pc_exchange_fail_decision(r), r, detail, 0);
  } else {
    /* The response was cut: a truncated body must not look complete. */
    log_request(x, x->ex.status, PC_DECISION_ERROR, PC_REASON_PROTOCOL);
    end_request(x);
    finish(x, "reset", 1);
  }
  later(x);
}

static void k_on_sent(void *user, size_t n) {
  pc_l7_t *x = user;
  x->call_queued = n > x->call_queued ? 0 : x->call_queued - n;
  if (x->down_bp && x->call_queued < PC_STREAM_LOW_WATER) {
    x->down_bp = 0;
    process(x);
  }
  later(x);
}

/* ---- tunnels (101 to an Upgrade, 2xx to CONNECT) ------------------------ */

static void on_splice_done(pc_splice_t *sp, int reset, int err) {
  (void)err;
  pc_l7_t *x = pc_container_of(sp, pc_l7_t, splice);
  x->ex.req_bytes += sp->bytes[0];
  x->ex.res_bytes += sp->bytes[1];
  log_request(x, x->ex.status, PC_DECISION_ALLOW, PC_REASON_NONE);
  finish(x, reset ? "reset" : "eof", reset);
}

static pc_l7_t *of_tun(pc_stream_t *s) { return s->owner; }

static void tun_on_data(pc_stream_t *s, const char *buf, size_t len) {
  pc_l7_t *x = of_tun(s);
  touch(x);
  if (x->inbound)
    PC_STAT_ADD(x->env.l->stats.bytes_to_peer, len);
  else
    PC_STAT_ADD(x->env.l->stats.bytes_from_peer, len);
  pc_splice_on_data(&x->splice, s, buf, len);
}
static void tun_on_eof(pc_stream_t *s) { pc_splice_on_eof(&of_tun(s)->splice, s); }
static void tun_on_error(pc_stream_t *s, int err) {
  pc_splice_on_error(&of_tun(s)->splice, s, err);
}
static void tun_on_drain(pc_stream_t *s) { pc_splice_on_drain(&of_tun(s)->splice, s); }
static void tun_on_shutdown(pc_stream_t *s, int status) {
  pc_splice_on_shutdown(&of_tun(s)->splice, s, status);
}
static void tun_on_handshake(pc_stream_t *s, int status) {
  (void)s;
  (void)status;
}
static const pc_stream_cbs_t tun_cbs = {tun_on_data,  tun_on_eof,      tun_on_error,
                                        tun_on_drain, tun_on_shutdown, tun_on_handshake};

/* From here on bytes pass untouched both ways. */
static void k_on_tunnel(void *user, int status, pc_upconn_t *up, const char *head, size_t head_len,
                        const char *rest, size_t rest_len) {
  pc_l7_t *x = user;
  if (x->ex.upstream_ms < 0) x->ex.upstream_ms = (double)(uv_hrtime() - x->ex.t_sent) / 1e6;
  x->tun = up;
  up->s.cbs = &tun_cbs;
  up->s.owner = x;
  x->state = X_TUNNEL;
  x->res_head = x->res_any = 1;
  x->ex.status = status;
  disarm(x);
  put(x, head, head_len);
  if (rest_len) {
    put(x, rest, rest_len);
    x->ex.res_bytes += rest_len;
  }
  flush_queue(x);
  if (x->in_len) {
    pc_stream_write(&up->s, x->in, x->in_len);
    x->ex.req_bytes += x->in_len;
    x->in_len = 0;
  }
  pc_splice_start(&x->splice, x->down, &up->s, on_splice_done);
}

static const pc_upcall_cbs_t call_cbs = {k_on_info, k_on_head, k_on_data,  k_on_end,
                                         k_on_fail, k_on_sent, k_on_tunnel};

/* ---- onwards ------------------------------------------------------------ */

/* The head went onwards: the upstream owes an answer once the request is
 * whole; before that the client owes its body (the body deadline), unless
 * it waits for 100 Continue: until the upstream answers, that wait is the
 * upstream's. */
static void arm_sent(pc_l7_t *x, int tunnel) {
  if (x->state != X_REQUEST) return; /* answered already (a failed call) */
  if (x->req_done) {
    arm(x, x->env.gen->cfg->http.response_timeout_ms, on_timer);
  } else if (tunnel || x->res_head) {
    return;
  } else if (x->req.msg.expect_100 && !x->ex.req_bytes) {
    x->await_continue = 1;
    arm(x, x->env.gen->cfg->http.response_timeout_ms, on_timer);
  } else {
    arm_body(x);
  }
}

/* The request goes onwards: its HTTP/1.1 head as written for the upstream
 * (head_out), and, only when an HTTP/2 upstream takes it, the neutral
 * fields: pseudo-headers from the request line and Host, field names
 * lowercased, hop-by-hop fields and any x-forwarded-client-cert from the
 * peer dropped, ours added. */
static void go(pc_l7_t *x) {
  const pc_h1_msg_t *m = &x->req.msg;
  pc_upreq_t req = {
      .end = x->req_done || (!m->chunked && (!m->has_length || m->length == 0)),
      .tunnel = m->upgrade || m->method == HTTP_CONNECT,
      .h1_head = x->head_out.data,
      .h1_head_len = x->head_out.len,
      .h1_chunked = m->chunked,
  };
  if (!pc_upcall_uses_h2(x->env.w, x->ex.gen, x->ex.lc, 0)) {
    /* Over HTTP/1.1 the head goes as written: the fields are not needed. */
    nghttp2_nv method = {(uint8_t *)":method", (uint8_t *)m->method_str, 7, m->method_len, 0};
    req.nv = &method;
    req.n = 1;
    pc_exchange_send(&x->ex, &x->env, &req, &call_cbs, x);
    arm_sent(x, req.tunnel);
    return;
  }
  const pc_h1_field_t *host = pc_h1_find(m, "host");
  pc_jbuf_t *names = &x->names;
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
  req.nv = nv;
  req.n = n;
  pc_exchange_send(&x->ex, &x->env, &req, &call_cbs, x);
  free(nv);
  free(off);
  names->len = 0;
  arm_sent(x, req.tunnel);
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
    PC_STAT_ADD(x->env.l->stats.bytes_from_peer, len);
  else
    PC_STAT_ADD(x->env.l->stats.bytes_to_peer, len);
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

int pc_l7_at_boundary(const pc_l7_t *x) {
  if (x->in_len) return 0; /* pipelined bytes of a next request */
  if (x->state == X_HEAD) return !x->head_started;
  return x->state == X_REQUEST && x->req_done;
}

void pc_l7_drain(pc_l7_t *x) {
  if (x->state == X_HEAD && !x->head_started && !x->in_len && !x->ex.call) {
    close_gently(x);
    settle(x);
  } else if (x->state == X_REQUEST) {
    x->close_after = 1;
  }
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
    log_request(x, x->ex.status, PC_DECISION_ERROR, PC_REASON_NONE);
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
  if (x->state == X_REQUEST) log_request(x, x->ex.status, PC_DECISION_ERROR, PC_REASON_NONE);
  finish(x, "reset", 1);
}

void pc_l7_on_drain(pc_l7_t *x) {
  if (x->state == X_TUNNEL) {
    pc_splice_on_drain(&x->splice, x->down);
    return;
  }
  if (x->ex.call && x->unconsumed) {
    size_t n = x->unconsumed;
    x->unconsumed = 0;
    pc_upcall_consumed(x->ex.call, n);
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
  const pc_listener_cfg_t *l = pc_config_counterpart(g->cfg, env->lc);
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
  x->defer.run = run_deferred;
  x->on_done = on_done;
  x->arg = arg;
  pc_exchange_init(&x->ex);
  const pc_config_t *cfg = env->gen->cfg;
  x->lim = (pc_h1_limits_t){cfg->http.max_request_line, cfg->http.max_header_bytes,
                            cfg->http.max_headers};
  pc_h1_init(&x->req, 1, &x->lim, on_req_body, x);
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
  pc_worker_undefer(x->env.w, &x->defer);
  pc_exchange_release_call(&x->ex);
  if (x->tun) {
    pc_upconn_t *up = x->tun;
    x->tun = NULL;
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
  pc_exchange_end(&x->ex);
  free(x->in);
  free(x->xfcc);
  pc_jbuf_free(&x->head_out);
  pc_jbuf_free(&x->out);
  pc_jbuf_free(&x->dq);
  pc_jbuf_free(&x->names);
  free(x);
}

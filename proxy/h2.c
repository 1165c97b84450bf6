#include "h2.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <nghttp2/nghttp2.h>

#include "compat.h"
#include "deadline.h"
#include "h1.h"
#include "h2io.h"
#include "h2req.h"
#include "log.h"
#include "exchange.h"
#include "upcall.h"

/* How long a client gets to read a closing GOAWAY before the socket closes. */
#define LINGER_MS 1000
/* A stale pooled connection makes a body-less request go again at most this
 * often. */
/* A request is sent at most three times: the retries cover a stale pooled
 * connection and a failed connect (README "Service names"). */
#define MAX_RETRIES 2
/* Abuse budgets (the sidecar's own counts; README "HTTP/2 and gRPC"). Each
 * allows BUDGET_BASE, plus a credit (control frames: streams the client
 * opened and DATA frames we sent, which a client answers with
 * WINDOW_UPDATEs; empty DATA: streams opened; resets: streams that ended
 * normally), plus one per second of the connection's age: a well-behaved
 * client never comes near, a flood crosses it within its first few hundred
 * frames. */
#define BUDGET_BASE 100

typedef struct h2s h2s_t;

struct pc_h2 {
  pc_stream_t *down;
  pc_l7_env_t env;
  int inbound;
  void (*on_done)(void *, const char *, int);
  void *arg;
  nghttp2_session *ss;
  uv_timer_t timer; /* response-head deadlines; the closing linger */
  uint8_t rechecked;
  uint64_t timer_due; /* loop time the timer is set for, while active */
  h2s_t *streams;     /* open streams, newest first */
  uint32_t nstreams;
  pc_jbuf_t out; /* frames collected for the client */
  char *xfcc;    /* inbound: "x-forwarded-client-cert: ...\r\n" */
  pc_h2req_limits_t rq_lim;
  pc_deferred_t defer; /* settle after this loop iteration's I/O (see later()) */
  uint64_t t0;         /* loop time at start, ms */
  uint64_t opened, completed, ctrl_frames, empty_data, resets_in, resets_out, data_sent;
  pc_h2_goaway_t goaway_why; /* why our GOAWAY was sent (PROTOCOL: nghttp2's own) */
  /* frame walk (count_unknown): preface bytes to skip, then per frame its
   * 9-byte header as it arrives and the payload bytes left to skip */
  uint32_t fw_skip, fw_hlen;
  uint8_t fw_hdr[9];
  size_t conn_consume; /* received bytes of closed streams to give back */
  unsigned done : 1, closing : 1, peer_done : 1, shut_done : 1, peer_eof : 1, goaway : 1,
      in_settle : 1, again : 1, send_bp : 1, linger : 1, in_recv : 1,
      scan : 1; /* some stream has window to give back or an upstream to resume */
};

struct h2s {
  pc_h2_t *h;
  int32_t id;
  h2s_t *prev, *next;
  pc_h2req_t rq;        /* the request head as it arrives */
  pc_exchange_t ex;     /* the exchange (exchange.h) */
  size_t res_consume;   /* response bytes the client took */
  nghttp2_nv *trailers; /* response trailers to relay */
  size_t ntrailers;
  char *tdata;
  size_t to_consume; /* body bytes passed on, to give back to the client's window */
  /* the response as it goes out */
  char *rb;
  size_t rb_off, rb_len, rb_cap;
  uint64_t due;              /* loop time of the response-head deadline; 0: none */
  uint64_t body_due;         /* loop time by which the next request body byte is due; 0: none */
  unsigned body_expired : 1, /* answered 408: reset once that answer is out */
      req_end : 1, res_head : 1, res_any : 1, res_end : 1, answered : 1, submitted : 1,
      deferred : 1, reset_by_peer : 1, we_reset : 1,
      malformed : 1,      /* nghttp2 reset the stream for a protocol error of the client's */
      await_continue : 1, /* expect: 100-continue, no body byte yet, no answer yet: the
                             upstream owes the next move (response deadline) */
      body_unwanted : 1;  /* a final answer came instead of 100 Continue */
};

static void settle(pc_h2_t *h);
static void stream_free(h2s_t *s);

static void run_deferred(pc_deferred_t *d) { settle(pc_container_of(d, pc_h2_t, defer)); }

/* From the upstreams' callbacks: frames for the client go out once, after
 * every upstream that answered in this loop iteration has been heard, in
 * one write instead of one per frame (worker.h pc_worker_defer). */
static void later(pc_h2_t *h) {
  if (!h->done && !h->closing) pc_worker_defer(h->env.w, &h->defer);
}

static void touch(pc_h2_t *h) { *h->env.last_active = uv_now(h->timer.loop); }

static void finish(pc_h2_t *h, const char *how, int reset) {
  if (h->done) return;
  h->done = 1;
  uv_timer_stop(&h->timer);
  h->on_done(h->arg, how, reset);
}

/* ---- GOAWAY and the abuse budgets --------------------------------------- */

static void goaway(pc_h2_t *h, pc_h2_goaway_t why, uint32_t code, const char *what) {
  if (h->goaway) return;
  h->goaway = 1;
  h->goaway_why = why; /* counted when the frame goes out (on_frame_send) */
  if (why == PC_H2_GOAWAY_LIMIT)
    pc_log(PC_LOG_WARN, "listener %s: HTTP/2 client %s (%s): %s; GOAWAY ENHANCE_YOUR_CALM",
           h->env.lc->name, h->env.peer_addr, h->env.peer_id ? h->env.peer_id : "-", what);
  else if (why == PC_H2_GOAWAY_PROTOCOL)
    pc_log(PC_LOG_INFO, "listener %s: HTTP/2 client %s: %s; GOAWAY", h->env.lc->name,
           h->env.peer_addr, what);
  if (why == PC_H2_GOAWAY_DRAIN) {
    nghttp2_submit_goaway(h->ss, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(h->ss),
                          NGHTTP2_NO_ERROR, NULL, 0);
    return;
  }
  nghttp2_session_terminate_session(h->ss, code);
}

static uint64_t budget(const pc_h2_t *h, uint64_t credit) {
  return BUDGET_BASE + credit + (uv_now(h->timer.loop) - h->t0) / 1000;
}

static void check_budgets(pc_h2_t *h) {
  if (h->goaway) return;
  if (h->ctrl_frames > budget(h, h->opened + h->data_sent))
    goaway(h, PC_H2_GOAWAY_LIMIT, NGHTTP2_ENHANCE_YOUR_CALM,
           "too many control frames (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, unknown types)");
  else if (h->empty_data > budget(h, h->opened))
    goaway(h, PC_H2_GOAWAY_LIMIT, NGHTTP2_ENHANCE_YOUR_CALM, "too many empty DATA frames");
  else if (h->resets_in > budget(h, h->completed))
    goaway(h, PC_H2_GOAWAY_LIMIT, NGHTTP2_ENHANCE_YOUR_CALM,
           "too many streams reset before their response (rapid reset)");
  else if (h->resets_out > budget(h, h->completed))
    goaway(h, PC_H2_GOAWAY_LIMIT, NGHTTP2_ENHANCE_YOUR_CALM,
           "made the sidecar reset too many streams");
}

/* ---- answers ------------------------------------------------------------ */

static int grpc_code(int status, pc_reason_t r) {
  switch (r) {
  case PC_REASON_NOT_ALLOWED: return status == 403 ? 7 : 14; /* PERMISSION_DENIED / UNAVAILABLE */
  case PC_REASON_TIMEOUT: return 4;                          /* DEADLINE_EXCEEDED */
  case PC_REASON_LIMIT: return 8;                            /* RESOURCE_EXHAUSTED */
  case PC_REASON_PROTOCOL: return status == 400 || status == 431 ? 13 : 14;
  default: return status >= 500 ? 14 : 13; /* UNAVAILABLE / INTERNAL */
  }
}

/* grpc-message is percent-encoded (gRPC over HTTP/2, "Responses"). */
static void grpc_message(pc_jbuf_t *b, const char *s) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c <= 0x7e && c != '%')
      pc_jbuf_raw(b, s, 1);
    else
      pc_jbuf_printf(b, "%%%02X", c);
  }
}

static ssize_t read_res(nghttp2_session *ss, int32_t id, uint8_t *buf, size_t length,
                        uint32_t *flags, nghttp2_data_source *src, void *user);

static int submit_response(h2s_t *s, const nghttp2_nv *nv, size_t n, int has_body) {
  nghttp2_data_provider prd = {.source = {.ptr = s}, .read_callback = read_res};
  s->submitted = 1;
  return nghttp2_submit_response(s->h->ss, s->id, nv, n, has_body ? &prd : NULL);
}

#define NV(n, v, vl)                                                                               \
  { (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, (vl), NGHTTP2_NV_FLAG_NONE }

static void release_call(h2s_t *s);

/* The sidecar answers stream s itself (refusal, upstream failure). */
static void reply(h2s_t *s, int status, pc_decision_t d, pc_reason_t r, const char *detail) {
  pc_h2_t *h = s->h;
  release_call(s);
  s->answered = 1;
  s->due = s->body_due = 0;
  s->ex.decision = d;
  s->ex.reason = r;
  if (s->submitted) { /* a response already started (its status stays logged): cut it */
    nghttp2_submit_rst_stream(h->ss, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_INTERNAL_ERROR);
    s->we_reset = 1;
    return;
  }
  s->ex.status = status;
  char st[8];
  int stn = snprintf(st, sizeof(st), "%d", status);
  if (s->rq.grpc) {
    s->ex.grpc_status = grpc_code(status, r);
    char gs[8];
    int gsn = snprintf(gs, sizeof(gs), "%d", s->ex.grpc_status);
    pc_jbuf_t msg = {0};
    if (r != PC_REASON_NONE) pc_jbuf_printf(&msg, "%s: ", pc_reason_word(r));
    grpc_message(&msg, detail ? detail : "");
    nghttp2_nv nv[] = {NV(":status", "200", 3), NV("content-type", "application/grpc", 16),
                       NV("grpc-status", gs, (size_t)gsn),
                       NV("grpc-message", msg.data ? msg.data : "", msg.len)};
    submit_response(s, nv, PC_ARRAY_SIZE(nv), 0);
    pc_jbuf_free(&msg);
    s->ex.status = 200;
    return;
  }
  pc_jbuf_t body = {0};
  pc_h1_error_body(&body, status, r == PC_REASON_NONE ? "" : pc_reason_word(r), detail);
  s->rb_off = s->rb_len = 0;
  if (body.len > s->rb_cap) {
    s->rb_cap = body.len;
    s->rb = pc_realloc(s->rb, s->rb_cap);
  }
  memcpy(s->rb, body.data, body.len);
  s->rb_len = body.len;
  s->res_end = 1;
  char cl[24];
  int cln = snprintf(cl, sizeof(cl), "%zu", body.len);
  pc_jbuf_free(&body);
  nghttp2_nv nv[] = {NV(":status", st, (size_t)stn), NV("content-type", "application/json", 16),
                     NV("content-length", cl, (size_t)cln)};
  submit_response(s, nv, PC_ARRAY_SIZE(nv), 1);
}

/* Response bytes for DATA frames, as the client's window allows. */
static ssize_t read_res(nghttp2_session *ss, int32_t id, uint8_t *buf, size_t length,
                        uint32_t *flags, nghttp2_data_source *src, void *user) {
  (void)ss;
  (void)id;
  (void)user;
  h2s_t *s = src->ptr;
  size_t n = s->rb_len < length ? s->rb_len : length;
  if (n) memcpy(buf, s->rb + s->rb_off, n);
  s->rb_off += n;
  s->rb_len -= n;
  if (s->rb_len == 0) s->rb_off = 0;
  s->ex.res_bytes += n;
  if (s->ex.call) s->res_consume += n;
  if (n) s->h->scan = 1;
  if (s->rb_len == 0 && s->res_end) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    if (s->ntrailers && nghttp2_submit_trailer(s->h->ss, s->id, s->trailers, s->ntrailers) == 0)
      *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    return (ssize_t)n;
  }
  if (n == 0) {
    s->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  return (ssize_t)n;
}

static void res_more(h2s_t *s) {
  if (s->deferred && s->submitted) {
    s->deferred = 0;
    nghttp2_session_resume_data(s->h->ss, s->id);
  }
}

static void res_append(h2s_t *s, const char *data, size_t len) {
  if (s->rb_off + s->rb_len + len > s->rb_cap) {
    if (s->rb_off) {
      memmove(s->rb, s->rb + s->rb_off, s->rb_len);
      s->rb_off = 0;
    }
    if (s->rb_len + len > s->rb_cap) {
      s->rb_cap = s->rb_len + len;
      s->rb = pc_realloc(s->rb, s->rb_cap);
    }
  }
  if (len) memcpy(s->rb + s->rb_off + s->rb_len, data, len);
  s->rb_len += len;
}

/* ---- the access log ----------------------------------------------------- */

static void log_stream(h2s_t *s) {
  if (s->ex.logged) return;
  if (!s->rq.done) {
    /* nghttp2 reset a malformed head (a refusal, with its reason); a head
     * the client never finished is not a request. */
    if (!s->malformed) return;
    pc_exchange_name(&s->ex, s->rq.method, s->rq.method_len, s->rq.path,
                     s->rq.path ? pc_h2req_path_len(&s->rq) : 0);
    s->ex.decision = PC_DECISION_DENY;
    s->ex.reason = PC_REASON_PROTOCOL;
  }
  /* A stream that ended without a whole response is an error unless a
   * refusal or the sidecar's own answer already said what it was. */
  if (s->ex.decision == PC_DECISION_ALLOW && !s->answered && !(s->res_end && s->rb_len == 0))
    s->ex.decision = PC_DECISION_ERROR;
  pc_exchange_log(&s->ex, &s->h->env, PC_HTTP_2);
}

/* ---- deadlines ---------------------------------------------------------- */

static void on_timer(uv_timer_t *t);

/* One timer for all of a connection's response-head deadlines: armed for
 * the earliest, so setting one is O(1) and only a firing scans the streams. */
static void arm_due(pc_h2_t *h, uint64_t due) {
  if (!due || (uv_is_active((uv_handle_t *)&h->timer) && h->timer_due <= due)) return;
  uint64_t now = uv_now(h->timer.loop);
  h->timer_due = due;
  h->rechecked = 0;
  uv_timer_start(&h->timer, on_timer, due > now ? due - now : 0, 0);
}

static void arm_timer(pc_h2_t *h) {
  uint64_t first = 0;
  for (h2s_t *s = h->streams; s; s = s->next) {
    if (s->due && (!first || s->due < first)) first = s->due;
    if (s->body_due && (!first || s->body_due < first)) first = s->body_due;
  }
  arm_due(h, first);
}

/* A stream's request body stopped arriving. If the client has no window
 * left to send in, the wait is ours (the upstream is slow): not its fault.
 * Otherwise reply() answers 408, or resets a response already begun, and
 * releases the call, which resets the upstream's request: the app must not
 * take the cut-off request as whole. */
static void body_timed_out(h2s_t *s, uint64_t now) {
  pc_h2_t *h = s->h;
  uint64_t ms = h->env.gen->cfg->http.body_timeout_ms;
  if (nghttp2_session_get_stream_local_window_size(h->ss, s->id) <= 0 ||
      nghttp2_session_get_local_window_size(h->ss) <= 0) {
    s->body_due = now + ms;
    return;
  }
  pc_log(PC_LOG_INFO, "listener %s: HTTP/2 request body from %s stalled for %llu ms (timeout)",
         h->env.lc->name, h->env.peer_addr, (unsigned long long)ms);
  s->body_expired = 1;
  reply(s, 408, PC_DECISION_DENY, PC_REASON_TIMEOUT, "the request body did not arrive in time");
}

static void on_timer(uv_timer_t *t) {
  pc_h2_t *h = t->data;
  if (h->linger) {
    finish(h, "eof", 0);
    return;
  }
  uint64_t now = uv_now(t->loop);
  int expired = 0;
  for (h2s_t *s = h->streams; s; s = s->next)
    if ((s->due && s->due <= now) || (s->body_due && s->body_due <= now)) expired = 1;
  if (expired && pc_deadline_recheck(t, on_timer, &h->rechecked)) return;
  h->rechecked = 0;
  for (h2s_t *s = h->streams; s; s = s->next) {
    if (s->body_due && s->body_due <= now && !s->req_end && !s->answered)
      body_timed_out(s, now);
    else if (s->due && s->due <= now && !s->res_head)
      reply(s, 504, PC_DECISION_ERROR, PC_REASON_TIMEOUT, "the upstream did not answer in time");
  }
  arm_timer(h);
  settle(h);
}

static int expects_continue(const nghttp2_nv *nv, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (nv[i].namelen == 6 && memcmp(nv[i].name, "expect", 6) == 0)
      return nv[i].valuelen == 12 &&
             strncasecmp((const char *)nv[i].value, "100-continue", 12) == 0;
  return 0;
}

/* The client may now send its body (100 Continue came, or it sent body
 * bytes without waiting): the body deadline replaces the upstream's. */
static void continued(h2s_t *s) {
  if (!s->await_continue) return;
  s->await_continue = 0;
  if (!s->res_head) s->due = 0;
  if (!s->req_end && !s->answered) {
    s->body_due = uv_now(s->h->timer.loop) + s->h->env.gen->cfg->http.body_timeout_ms;
    arm_due(s->h, s->body_due);
  }
}

/* ---- the upstream (upcall.h) ------------------------------------------- */

static void release_call(h2s_t *s) { pc_exchange_release_call(&s->ex); }

/* ---- requests ----------------------------------------------------------- */

static h2s_t *stream_of(pc_h2_t *h, int32_t id) {
  return nghttp2_session_get_stream_user_data(h->ss, id);
}

static int on_begin_headers(nghttp2_session *ss, const nghttp2_frame *f, void *user) {
  (void)ss;
  pc_h2_t *h = user;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  h2s_t *s = pc_calloc(1, sizeof(*s));
  s->h = h;
  s->id = f->hd.stream_id;
  pc_exchange_init(&s->ex);
  s->ex.t_start = uv_hrtime();
  s->next = h->streams;
  if (h->streams) h->streams->prev = s;
  h->streams = s;
  h->nstreams++;
  h->opened++;
  PC_STAT_INC(h->env.l->stats.h2_streams);
  nghttp2_session_set_stream_user_data(h->ss, s->id, s);
  return 0;
}

static int on_header(nghttp2_session *ss, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *user) {
  (void)ss;
  (void)flags;
  pc_h2_t *h = user;
  h2s_t *s = stream_of(h, f->hd.stream_id);
  if (s) pc_h2req_field(&s->rq, &h->rq_lim, name, nlen, value, vlen);
  return 0;
}

/* ---- the response ------------------------------------------------------- */

static int grpc_status_nv(const nghttp2_nv *nv, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (nv[i].namelen == 11 && memcmp(nv[i].name, "grpc-status", 11) == 0) {
      int v = 0;
      if (nv[i].valuelen == 0 || nv[i].valuelen > 3) return -1;
      for (size_t j = 0; j < nv[i].valuelen; j++) {
        if (nv[i].value[j] < '0' || nv[i].value[j] > '9') return -1;
        v = v * 10 + (nv[i].value[j] - '0');
      }
      return v;
    }
  return -1;
}

/* ":status" (formatted into st) followed by the upstream's fields; the
 * caller frees the array. */
static nghttp2_nv *with_status(int status, char st[8], const nghttp2_nv *nv, size_t n) {
  nghttp2_nv *out = pc_calloc(n + 1, sizeof(*out));
  int stn = snprintf(st, 8, "%d", status);
  out[0] = (nghttp2_nv)NV(":status", st, (size_t)stn);
  memcpy(out + 1, nv, n * sizeof(*nv));
  return out;
}

/* An interim answer (100 Continue, 103 Early Hints) goes to the client as
 * a HEADERS frame of its own, before the response. */
static void c_on_info(void *user, int status, const nghttp2_nv *nv, size_t n) {
  h2s_t *s = user;
  if (s->submitted || s->answered) return;
  if (status == 100) continued(s);
  char st[8];
  nghttp2_nv *out = with_status(status, st, nv, n);
  nghttp2_submit_headers(s->h->ss, NGHTTP2_FLAG_NONE, s->id, NULL, out, n + 1, NULL);
  free(out);
  later(s->h);
}

static void c_on_head(void *user, int status, const nghttp2_nv *nv, size_t n, int end) {
  h2s_t *s = user;
  if (s->ex.upstream_ms < 0) s->ex.upstream_ms = (double)(uv_hrtime() - s->ex.t_sent) / 1e6;
  s->res_head = 1;
  s->res_any = 1;
  s->due = 0;
  if (s->await_continue) {
    /* A final answer instead of 100 Continue: the client will not send the
     * body (RFC 9110 10.1.1); once the answer is out the stream is reset
     * with NO_ERROR (on_frame_send), and no body deadline runs. */
    s->await_continue = 0;
    s->body_unwanted = 1;
  }
  s->ex.status = status;
  if (end) s->ex.grpc_status = grpc_status_nv(nv, n); /* trailers-only */
  char st[8];
  nghttp2_nv *out = with_status(status, st, nv, n);
  submit_response(s, out, n + 1, !end && !s->rq.is_head && status != 204 && status != 304);
  free(out);
  later(s->h);
}

static void c_on_data(void *user, const uint8_t *data, size_t len) {
  h2s_t *s = user;
  touch(s->h);
  if (s->h->inbound)
    PC_STAT_ADD(s->h->env.l->stats.bytes_to_peer, len);
  else
    PC_STAT_ADD(s->h->env.l->stats.bytes_from_peer, len);
  if (s->answered) {
    s->res_consume += len;
    s->h->scan = 1;
  } else {
    res_append(s, (const char *)data, len);
    res_more(s);
  }
  later(s->h);
}

static void c_on_end(void *user, const nghttp2_nv *nv, size_t n) {
  h2s_t *s = user;
  if (n) {
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
      bytes += nv[i].namelen + nv[i].valuelen;
    s->tdata = pc_malloc(bytes + 1);
    s->trailers = pc_calloc(n, sizeof(*s->trailers));
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
      memcpy(s->tdata + off, nv[i].name, nv[i].namelen);
      memcpy(s->tdata + off + nv[i].namelen, nv[i].value, nv[i].valuelen);
      s->trailers[i] =
          (nghttp2_nv){(uint8_t *)s->tdata + off, (uint8_t *)s->tdata + off + nv[i].namelen,
                       nv[i].namelen, nv[i].valuelen, NGHTTP2_NV_FLAG_NONE};
      off += nv[i].namelen + nv[i].valuelen;
    }
    s->ntrailers = n;
    s->ex.grpc_status = grpc_status_nv(nv, n);
  }
  s->res_end = 1;
  s->ex.decision = PC_DECISION_ALLOW;
  s->ex.reason = PC_REASON_NONE;
  res_more(s);
  later(s->h);
}

static void c_on_sent(void *user, size_t n) {
  h2s_t *s = user;
  s->to_consume += n;
  s->h->scan = 1;
  later(s->h);
}

static void go(h2s_t *s);

static void c_on_fail(void *user, int status, pc_reason_t r, const char *detail, int retry) {
  h2s_t *s = user;
  pc_h2_t *h = s->h;
  if (retry && s->ex.req_bytes == 0 && !s->res_any && s->req_end && s->ex.retries < MAX_RETRIES) {
    release_call(s);
    s->ex.retries++;
    s->due = 0;
    go(s);
  } else {
    reply(s, status > 0 ? status : 502, pc_exchange_fail_decision(r), r, detail);
  }
  later(h);
}

/* No tunnel: CONNECT is refused (h2req.h) and Upgrade is no HTTP/2 field. */
static const pc_upcall_cbs_t call_cbs = {c_on_info, c_on_head, c_on_data, c_on_end,
                                         c_on_fail, c_on_sent, NULL};

/* Onwards: the request's head as neutral fields (pseudo-headers, then the
 * kept fields, the joined cookie, te and x-forwarded-client-cert). */
static void go(h2s_t *s) {
  pc_h2_t *h = s->h;
  nghttp2_nv *nv = pc_calloc(pc_h2req_nv_cap(&s->rq), sizeof(*nv));
  char cl[24];
  pc_upreq_t req = {.nv = nv, .end = s->req_end, .prefer_h2 = 1};
  req.n = pc_h2req_nv(&s->rq, nv, h->inbound ? h->xfcc : NULL, cl);
  pc_exchange_send(&s->ex, &h->env, &req, &call_cbs, s);
  int wait_continue = expects_continue(nv, req.n);
  free(nv);
  if (s->req_end && !s->res_head) {
    s->due = uv_now(h->timer.loop) + h->env.gen->cfg->http.response_timeout_ms;
    arm_due(h, s->due);
  } else if (!s->req_end && !s->answered && !s->res_head && wait_continue && !s->ex.req_bytes) {
    /* The client waits for 100 Continue before it sends the body: until
     * the upstream answers, the wait is the upstream's. */
    s->await_continue = 1;
    s->due = uv_now(h->timer.loop) + h->env.gen->cfg->http.response_timeout_ms;
    arm_due(h, s->due);
  } else if (!s->req_end && !s->answered) {
    s->body_due = uv_now(h->timer.loop) + h->env.gen->cfg->http.body_timeout_ms;
    arm_due(h, s->body_due);
  }
}

/* The head is complete: decide, then borrow an upstream. */
static void begin_request(h2s_t *s, int end_stream) {
  pc_h2_t *h = s->h;
  s->req_end = end_stream != 0;
  pc_h2req_finish(&s->rq);
  const pc_h2req_t *r = &s->rq;
  if (r->bad_status) {
    pc_exchange_name(&s->ex, r->method, r->method_len, r->path, r->path ? pc_h2req_path_len(r) : 0);
    reply(s, r->bad_status, PC_DECISION_DENY,
          r->bad_status == 431 ? PC_REASON_LIMIT : PC_REASON_PROTOCOL, r->bad_detail);
    return;
  }
  char detail[160];
  if (pc_exchange_begin(&s->ex, &h->env, r->method, r->method_len, r->path, pc_h2req_path_len(r),
                        detail, sizeof(detail)) != PC_REASON_NONE) {
    reply(s, 403, PC_DECISION_DENY, PC_REASON_NOT_ALLOWED, detail);
    return;
  }
  go(s);
}

static void request_end(h2s_t *s) {
  if (s->req_end) return;
  s->req_end = 1;
  s->body_due = 0;
  s->await_continue = 0;
  if (!s->ex.call) return;
  pc_upcall_end(s->ex.call);
  if (!s->res_head) {
    s->due = uv_now(s->h->timer.loop) + s->h->env.gen->cfg->http.response_timeout_ms;
    arm_due(s->h, s->due);
  }
}

static int on_data_chunk(nghttp2_session *ss, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *user) {
  (void)ss;
  (void)flags;
  pc_h2_t *h = user;
  h2s_t *s = stream_of(h, id);
  touch(h);
  if (h->inbound)
    PC_STAT_ADD(h->env.l->stats.bytes_from_peer, len);
  else
    PC_STAT_ADD(h->env.l->stats.bytes_to_peer, len);
  if (!s || s->answered || s->res_end || !s->rq.done) {
    /* Nobody wants these bytes; the window they took is given back. */
    if (s) {
      s->to_consume += len;
      h->scan = 1;
    } else {
      h->conn_consume += len;
    }
    return 0;
  }
  s->ex.req_bytes += len;
  if (len) continued(s); /* it did not wait for 100 Continue */
  /* Progress moves the deadline; the timer, set for an earlier one, finds
   * it when it fires (arm_timer). */
  if (s->body_due && len)
    s->body_due = uv_now(h->timer.loop) + h->env.gen->cfg->http.body_timeout_ms;
  if (s->ex.call) pc_upcall_send(s->ex.call, (const char *)data, len);
  return 0;
}

static int on_frame_recv(nghttp2_session *ss, const nghttp2_frame *f, void *user) {
  (void)ss;
  pc_h2_t *h = user;
  touch(h);
  h2s_t *s = f->hd.stream_id ? stream_of(h, f->hd.stream_id) : NULL;
  switch (f->hd.type) {
  case NGHTTP2_HEADERS:
    if (!s) break;
    if (!s->rq.done) {
      begin_request(s, f->hd.flags & NGHTTP2_FLAG_END_STREAM);
    } else if (s->rq.bad_status && !s->answered) {
      /* trailers over the limits: the request is refused after all */
      reply(s, s->rq.bad_status, PC_DECISION_DENY, PC_REASON_LIMIT, s->rq.bad_detail);
    } else if (f->hd.flags & NGHTTP2_FLAG_END_STREAM) {
      request_end(s);
    }
    break;
  case NGHTTP2_DATA:
    /* Empty: no data bytes, padding aside (hd.length counts the padding
     * and its length field, padlen both). */
    if (f->hd.length <= f->data.padlen && !(f->hd.flags & NGHTTP2_FLAG_END_STREAM)) h->empty_data++;
    if (s && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) request_end(s);
    break;
  case NGHTTP2_PING: /* ACKs too: the sidecar never sends a PING to be answered */
  case NGHTTP2_PRIORITY:
  case NGHTTP2_WINDOW_UPDATE: h->ctrl_frames++; break;
  case NGHTTP2_SETTINGS:
    if (!(f->hd.flags & NGHTTP2_FLAG_ACK)) h->ctrl_frames++;
    break;
  case NGHTTP2_RST_STREAM:
    PC_STAT_INC(h->env.l->stats.h2_resets[1][f->rst_stream.error_code < PC_H2_ERROR_CODES
                                                 ? f->rst_stream.error_code
                                                 : NGHTTP2_INTERNAL_ERROR]);
    if (s && !(s->res_end && s->rb_len == 0)) {
      s->reset_by_peer = 1;
      h->resets_in++;
    }
    break;
  default: break;
  }
  check_budgets(h);
  return 0;
}

static int on_frame_send(nghttp2_session *ss, const nghttp2_frame *f, void *user) {
  (void)ss;
  pc_h2_t *h = user;
  if (f->hd.type == NGHTTP2_DATA) h->data_sent++;
  if ((f->hd.type == NGHTTP2_DATA || f->hd.type == NGHTTP2_HEADERS) &&
      (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
    /* A 408 for a body that stopped, or a final answer to a client that
     * waited for 100 Continue, is out: the client need not send the rest
     * (RFC 9113 8.1), and the stream ends here. */
    h2s_t *s = stream_of(h, f->hd.stream_id);
    if (s && (s->body_expired || s->body_unwanted) && !s->req_end && !s->we_reset) {
      s->we_reset = 1;
      nghttp2_submit_rst_stream(h->ss, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_NO_ERROR);
    }
  }
  if (f->hd.type == NGHTTP2_GOAWAY) {
    /* Ours (goaway(), pc_h2_revoke) or nghttp2's own for a connection
     * error of the client's: each is counted, nghttp2's logged here. */
    if (!h->goaway) {
      h->goaway = 1;
      h->goaway_why = PC_H2_GOAWAY_PROTOCOL;
      pc_log(PC_LOG_INFO, "listener %s: HTTP/2 client %s: protocol error (%s); GOAWAY",
             h->env.lc->name, h->env.peer_addr, pc_h2_error_word(f->goaway.error_code));
    }
    PC_STAT_INC(h->env.l->stats.h2_goaways[h->goaway_why]);
  }
  if (f->hd.type == NGHTTP2_RST_STREAM) {
    uint32_t code = f->rst_stream.error_code;
    PC_STAT_INC(
        h->env.l->stats.h2_resets[0][code < PC_H2_ERROR_CODES ? code : NGHTTP2_INTERNAL_ERROR]);
    /* Resets nghttp2 sends for the client's mistakes count against it. */
    h2s_t *s = stream_of(h, f->hd.stream_id);
    if (!s || !s->we_reset) h->resets_out++;
    if (s && !s->we_reset) s->malformed = 1;
    check_budgets(h);
  }
  return 0;
}

static int on_stream_close(nghttp2_session *ss, int32_t id, uint32_t code, void *user) {
  (void)ss;
  (void)code;
  pc_h2_t *h = user;
  h2s_t *s = stream_of(h, id);
  if (!s) return 0;
  nghttp2_session_set_stream_user_data(h->ss, id, NULL);
  if (s->res_end && s->rb_len == 0 && !s->reset_by_peer) h->completed++;
  stream_free(s);
  return 0;
}

/* ---- the connection ----------------------------------------------------- */

static void stream_free(h2s_t *s) {
  pc_h2_t *h = s->h;
  log_stream(s);
  release_call(s);
  h->conn_consume += s->to_consume;
  if (s->prev)
    s->prev->next = s->next;
  else
    h->streams = s->next;
  if (s->next) s->next->prev = s->prev;
  h->nstreams--;
  PC_STAT_DEC(h->env.l->stats.h2_streams);
  pc_exchange_end(&s->ex);
  pc_h2req_free(&s->rq);
  free(s->trailers);
  free(s->tdata);
  free(s->rb);
  free(s);
}

static void close_gently(pc_h2_t *h) {
  if (h->closing) return;
  h->closing = 1;
  h->peer_done = pc_stream_discard(h->down);
  pc_stream_shutdown(h->down, 0);
}

static int write_out(pc_h2_t *h) {
  if (!h->out.len) return 0;
  size_t n = h->out.len;
  h->out.len = 0;
  if (pc_stream_write(h->down, h->out.data, n) == 0) return 0;
  finish(h, "reset", 1);
  return -1;
}

/* End of every callback into this module: give back windows, send frames
 * while the client reads them, resume upstreams the client caught up with,
 * and close once nghttp2 has nothing left to do. */
static void settle(pc_h2_t *h) {
  if (h->done || h->closing || h->in_recv) return; /* pc_h2_on_data settles after mem_recv */
  if (h->in_settle) {
    h->again = 1;
    return;
  }
  h->in_settle = 1;
  do {
    h->again = 0;
    int scan = h->scan;
    h->scan = 0;
    for (h2s_t *s = scan ? h->streams : NULL; s; s = s->next)
      if (s->ex.call && s->res_consume) {
        size_t n = s->res_consume;
        s->res_consume = 0;
        pc_upcall_consumed(s->ex.call, n);
      }
    for (h2s_t *s = scan ? h->streams : NULL; s; s = s->next)
      if (s->to_consume) {
        nghttp2_session_consume(h->ss, s->id, s->to_consume);
        s->to_consume = 0;
      }
    if (h->conn_consume) {
      nghttp2_session_consume_connection(h->ss, h->conn_consume);
      h->conn_consume = 0;
    }
    unsigned bp = h->send_bp;
    int err = 0, rc = pc_h2io_send(h->ss, h->down, &h->out, &bp, &err);
    h->send_bp = bp;
    if (rc != PC_H2IO_OK) {
      if (rc == PC_H2IO_SESSION)
        pc_log(PC_LOG_WARN, "listener %s: HTTP/2: %s", h->env.lc->name, nghttp2_strerror(err));
      h->in_settle = 0;
      finish(h, "reset", 1);
      return;
    }
    /* What the send took from the streams' response buffers is window to
     * give back to their upstreams (and upstreams to resume): another pass. */
    if (h->scan) h->again = 1;
    /* The client does not read: stop reading it (its frames would only
     * make us queue more answers). */
    if (h->send_bp && h->down->reading)
      pc_stream_read_stop(h->down);
    else if (!h->send_bp && !h->down->reading && nghttp2_session_want_read(h->ss))
      pc_stream_read_start(h->down);
  } while (h->again && !h->done);
  h->in_settle = 0;
  if (h->done) return;
  /* An idle connection keeps no output buffer (it goes to the worker's
   * cache, or back to malloc if it grew). */
  if (!h->nstreams && !h->out.len && h->out.data) pc_jbuf_release(&h->out);
  if (!nghttp2_session_want_read(h->ss) && !nghttp2_session_want_write(h->ss)) {
    close_gently(h);
    return;
  }
  if (h->peer_eof && h->nstreams == 0) finish(h, "eof", 0);
}

/* nghttp2 skips frames of types it does not know without telling us, so the
 * client's bytes are walked frame by frame (headers only) to count those
 * with the control frames. */
static void count_unknown(pc_h2_t *h, const uint8_t *p, size_t len) {
  while (len) {
    if (h->fw_skip) {
      size_t n = len < h->fw_skip ? len : h->fw_skip;
      h->fw_skip -= (uint32_t)n;
      p += n;
      len -= n;
      continue;
    }
    h->fw_hdr[h->fw_hlen++] = *p++;
    len--;
    if (h->fw_hlen < 9) continue;
    h->fw_hlen = 0;
    h->fw_skip = (uint32_t)h->fw_hdr[0] << 16 | (uint32_t)h->fw_hdr[1] << 8 | h->fw_hdr[2];
    if (h->fw_hdr[3] > NGHTTP2_CONTINUATION) h->ctrl_frames++;
  }
}

void pc_h2_on_data(pc_h2_t *h, const char *buf, size_t len) {
  if (h->done || h->closing) return;
  count_unknown(h, (const uint8_t *)buf, len);
  h->in_recv = 1;
  ssize_t rv = nghttp2_session_mem_recv(h->ss, (const uint8_t *)buf, len);
  h->in_recv = 0;
  if (h->done) return;
  if (rv >= 0) check_budgets(h);
  if (rv < 0) {
    /* Fatal to the session: nghttp2 can no longer frame a GOAWAY, so write
     * one by hand (RFC 9113 6.8), then close. */
    int flood = rv == NGHTTP2_ERR_FLOODED || rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS ||
                rv == NGHTTP2_ERR_TOO_MANY_SETTINGS;
    uint32_t code = flood ? NGHTTP2_ENHANCE_YOUR_CALM : NGHTTP2_PROTOCOL_ERROR;
    if (!h->goaway) {
      h->goaway = 1;
      PC_STAT_INC(h->env.l->stats.h2_goaways[flood ? PC_H2_GOAWAY_LIMIT : PC_H2_GOAWAY_PROTOCOL]);
      pc_log(flood ? PC_LOG_WARN : PC_LOG_INFO, "listener %s: HTTP/2 client %s: %s; GOAWAY %s",
             h->env.lc->name, h->env.peer_addr, nghttp2_strerror((int)rv),
             flood ? "ENHANCE_YOUR_CALM" : "PROTOCOL_ERROR");
      int32_t last = nghttp2_session_get_last_proc_stream_id(h->ss);
      uint8_t f[17] = {0, 0, 8, NGHTTP2_GOAWAY, 0, 0, 0, 0, 0};
      f[9] = (uint8_t)(last >> 24) & 0x7f;
      f[10] = (uint8_t)(last >> 16);
      f[11] = (uint8_t)(last >> 8);
      f[12] = (uint8_t)last;
      f[16] = (uint8_t)code;
      /* Whatever nghttp2 framed before the error goes first. */
      const uint8_t *data;
      ssize_t n;
      while ((n = nghttp2_session_mem_send(h->ss, &data)) > 0)
        pc_jbuf_raw(&h->out, (const char *)data, (size_t)n);
      pc_jbuf_raw(&h->out, (const char *)f, sizeof(f));
      if (write_out(h)) return;
    }
    close_gently(h);
    return;
  }
  settle(h);
}

void pc_h2_on_eof(pc_h2_t *h) {
  if (h->closing) {
    h->peer_done = 1;
    if (h->shut_done) finish(h, "eof", 0);
    return;
  }
  h->peer_eof = 1;
  if (h->nstreams == 0) finish(h, "eof", 0);
}

void pc_h2_on_error(pc_h2_t *h, int err) {
  (void)err;
  finish(h, "reset", 1);
}

void pc_h2_on_drain(pc_h2_t *h) {
  h->send_bp = 0;
  settle(h);
}

void pc_h2_on_shutdown(pc_h2_t *h, int status) {
  if (!h->closing) return;
  h->shut_done = 1;
  if (h->peer_done || status < 0) {
    finish(h, status < 0 ? "reset" : "eof", status < 0);
    return;
  }
  h->linger = 1;
  uv_timer_start(&h->timer, on_timer, LINGER_MS, 0);
}

void pc_h2_revoke(pc_h2_t *h) {
  if (h->done || h->closing || h->goaway) return;
  h->goaway = 1;
  h->goaway_why = PC_H2_GOAWAY_REVOKED;
  nghttp2_session_terminate_session(h->ss, NGHTTP2_NO_ERROR);
  settle(h); /* the GOAWAY goes out before the connection closes */
}

void pc_h2_drain(pc_h2_t *h) {
  if (h->done || h->closing) return;
  goaway(h, PC_H2_GOAWAY_DRAIN, NGHTTP2_NO_ERROR, "draining");
  settle(h);
  if (!h->done && !h->closing && h->nstreams == 0) {
    write_out(h);
    close_gently(h);
  }
}

pc_h2_t *pc_h2_start(pc_stream_t *down, const pc_l7_env_t *env,
                     void (*on_done)(void *, const char *, int), void *arg, const char *pre,
                     size_t pre_len) {
  pc_h2_t *h = pc_calloc(1, sizeof(*h));
  h->down = down;
  h->env = *env;
  h->inbound = env->lc->direction == PC_DIR_INBOUND;
  h->on_done = on_done;
  h->arg = arg;
  if (h->inbound) h->xfcc = pc_l7_make_xfcc(down, env);
  h->rq_lim = (pc_h2req_limits_t){env->gen->cfg->http.max_headers,
                                  env->gen->cfg->http.max_header_bytes, h->inbound};
  uv_timer_init(&env->w->loop, &h->timer);
  h->timer.data = h;
  h->t0 = uv_now(&env->w->loop);
  h->fw_skip = PC_H2_PREFACE_LEN;
  h->defer.run = run_deferred;
  nghttp2_session_callbacks *cb;
  nghttp2_session_callbacks_new(&cb);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
  nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
  nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
  nghttp2_option *opt;
  nghttp2_option_new(&opt);
  /* Windows are given back as the bytes leave us (settle), not on arrival. */
  nghttp2_option_set_no_auto_window_update(opt, 1);
  const pc_config_t *cfg = env->gen->cfg;
  nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
  if (nghttp2_session_server_new2(&h->ss, cb, h, opt) != 0) pc_fatal("out of memory");
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cb);
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, cfg->http2.max_concurrent_streams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, cfg->http2.stream_window},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, cfg->http.max_header_bytes},
  };
  nghttp2_submit_settings(h->ss, NGHTTP2_FLAG_NONE, iv, PC_ARRAY_SIZE(iv));
  nghttp2_session_set_local_window_size(h->ss, NGHTTP2_FLAG_NONE, 0,
                                        (int32_t)cfg->http2.connection_window);
  pc_stream_read_start(down);
  if (pre_len) pc_h2_on_data(h, pre, pre_len);
  if (!h->done) settle(h);
  return h;
}

int pc_h2_close(pc_h2_t *h, uv_close_cb close_cb, void *data) {
  h->done = 1;
  pc_worker_undefer(h->env.w, &h->defer);
  while (h->streams)
    stream_free(h->streams);
  uv_timer_stop(&h->timer);
  h->timer.data = data;
  uv_close((uv_handle_t *)&h->timer, close_cb);
  return 1;
}

void pc_h2_free(pc_h2_t *h) {
  if (!h) return;
  nghttp2_session_del(h->ss);
  free(h->xfcc);
  pc_jbuf_free(&h->out);
  free(h);
}

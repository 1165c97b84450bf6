/*
 * pc-loadgen - HTTP/1.1 load generator over plaintext or mTLS for the
 * side-by-side benchmark (bench/README.md).
 *
 *   pc-loadgen --mode closed|open|connrate|bulk|idle --target IP:PORT
 *              [--tls --ca F --cert F --key F [--tls12]] [--threads N] [--conns N]
 *              [--duration S] [--warmup S] [--rate R] [--bytes N] [--upload]
 *              [--inflight N] [--hold S] [--grace S] [--path P] [--label L]
 *
 *   closed    --conns keep-alive connections, each sending its next request
 *             as soon as the previous response is complete.
 *   open      --rate requests/s spread evenly over --conns connections; the
 *             latency of a request counts from its SCHEDULED send time, so a
 *             stalled connection is charged for every request it delays
 *             (no coordinated omission).
 *   connrate  --conns concurrent loops of: connect, full handshake (no
 *             resumption: no tickets, no session cache), one request with
 *             "Connection: close", wait for the server's close. With
 *             --resume, each thread offers the latest TLS 1.3 session it
 *             received (a ticket arrives with every connection, resumed or
 *             not), so the handshakes are resumptions; "resumed" in the
 *             result counts those the server accepted.
 *   bulk      one connection moving --bytes: a GET /bulk?bytes=N download,
 *             or with --upload a POST /sink of N bytes.
 *   idle      open --conns connections (at most --inflight per thread
 *             being set up), one request on each, then print "ready ..." and
 *             hold them until a line (or EOF) on stdin, or --hold seconds.
 *
 * Results: one JSON object on stdout at the end. Latencies are recorded in
 * microseconds in log-linear histograms (hist.h). Every run is bounded in
 * time: a watchdog exits 3 if the run overstays --duration by 60 s (idle:
 * the setup phase only).
 */
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <llhttp.h>
#include <uv.h>

#include "bconn.h"
#include "hist.h"

#define MAX_THREADS 64
#define NS 1000000000ull
#define MS 1000000ull
#define DEFAULT_CIPHERS                                                                            \
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"

enum { M_CLOSED, M_OPEN, M_CONNRATE, M_BULK, M_IDLE };
static const char *const mode_names[] = {"closed", "open", "connrate", "bulk", "idle"};

enum { C_CONNECTING, C_OPEN, C_AWAIT_EOF, C_IDLE };

static struct {
  int mode;
  const char *target;
  struct sockaddr_in addr;
  int tls, tls12, resume;
  const char *ca, *cert, *key, *ciphers, *path, *label;
  int threads, conns, inflight, upload;
  double duration, warmup, rate, grace, hold;
  uint64_t bytes;
} opt = {.mode = -1,
         .ciphers = DEFAULT_CIPHERS,
         .path = "/",
         .label = "",
         .threads = 2,
         .conns = 64,
         .inflight = 64,
         .duration = 10,
         .warmup = 1,
         .rate = 1000,
         .grace = 2,
         .hold = -1,
         .bytes = 1ull << 30};

static SSL_CTX *ctx;
static uint64_t t0, t_warm, t_end, interval_ns;
static char req_small[256], req_close[256], req_bulk[256];
static size_t req_small_len, req_close_len, req_bulk_len;
static char blob[64 * 1024];
static atomic_int stop_flag, workers_settled;
static llhttp_settings_t settings;

typedef struct worker worker;

typedef struct {
  bc_conn bc; /* first: a bc_conn pointer is a client pointer */
  worker *w;
  llhttp_t parser;
  int slot, state, busy, failed;
  uint64_t started, opened, sent_at, body, up_left, t_req, t_first, t_done;
} client;

struct worker {
  int id;
  uv_loop_t loop;
  uv_thread_t tid;
  uv_async_t wake;
  uv_timer_t tick;
  uv_poll_t tpoll;
  int tfd, finished, stopping, settled;
  uint64_t armed;
  client **slots;
  uint64_t *sched; /* open loop: next scheduled send per slot */
  int nslots, first, to_open, setting_up;
  hist_t hist, hs;
  uint64_t done, done_total, errors, reconnects, timeouts, unsent, established, failed, lost;
  uint64_t resumed;     /* --resume: handshakes the server resumed */
  SSL_SESSION *session; /* --resume: the latest session received */
  uint64_t bytes, t_req, t_first, t_done;
  char tlsdesc[96];
};

static worker workers[MAX_THREADS];

static void start_client(worker *w, int slot);

/* --resume: keep the thread's latest session (the SSL's loop thread). */
static int on_new_session(SSL *ssl, SSL_SESSION *sess) {
  client *c = (client *)SSL_get_app_data(ssl);
  if (!c) return 0;
  SSL_SESSION_free(c->w->session);
  c->w->session = sess;
  return 1;
}
static void finish(worker *w);

static uint64_t now_ns(void) { return uv_hrtime(); }

static void on_alarm(int sig) {
  static const char msg[] = "pc-loadgen: watchdog: run overstayed its time limit\n";
  if (write(2, msg, sizeof(msg) - 1) < 0) { /* nothing more to do */
  }
  _exit(3);
}

static void record(hist_t *h, uint64_t ns) { hist_add(h, (ns + 500) / 1000); }

static void settle(worker *w) {
  if (w->settled) return;
  w->settled = 1;
  atomic_fetch_add(&workers_settled, 1);
}

static void send_request(client *c, const char *req, size_t len, uint64_t at) {
  c->sent_at = at;
  c->busy = 1;
  if (bc_write(&c->bc, req, len, 1) < 0) {
    c->failed = 1;
    c->w->errors++;
    bc_close(&c->bc, 0);
  }
}

/* Open loop: send every request whose time has come on the idle
 * connections, then arm the timer for the earliest one still ahead. */
static void pump(worker *w) {
  uint64_t now = now_ns(), next = 0;
  if (w->stopping) return;
  for (int i = 0; i < w->nslots; i++) {
    client *c = w->slots[i];
    uint64_t s = w->sched[i];
    if (s >= t_end) continue;
    if (c && c->state == C_OPEN && !c->busy && !c->bc.closing) {
      if (s <= now) {
        w->sched[i] = s + interval_ns;
        send_request(c, req_small, req_small_len, s);
        continue;
      }
      if (!next || s < next) next = s;
    }
  }
  if (next && next != w->armed) {
    struct itimerspec its = {{0, 0}, {(time_t)(next / NS), (long)(next % NS)}};
    timerfd_settime(w->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    w->armed = next;
  }
}

static void on_tfd(uv_poll_t *p, int status, int events) {
  worker *w = p->data;
  uint64_t n;
  if (read(w->tfd, &n, sizeof(n)) < 0) { /* spurious wake-up */
  }
  w->armed = 0;
  pump(w);
}

static void pump_upload(client *c) {
  while (c->up_left > 0 && bc_queued(&c->bc) < BC_HIGH_WATER && !c->bc.closing) {
    size_t n = c->up_left < sizeof(blob) ? (size_t)c->up_left : sizeof(blob);
    if (bc_write(&c->bc, blob, n, 1) < 0) {
      c->w->errors++;
      bc_close(&c->bc, 0);
      return;
    }
    c->up_left -= n;
  }
}

static void on_open(bc_conn *bc) {
  client *c = (client *)bc;
  worker *w = c->w;
  uint64_t now = now_ns();
  c->opened = now;
  c->state = C_OPEN;
  if (!w->tlsdesc[0]) bc_describe(bc, w->tlsdesc, sizeof(w->tlsdesc));
  if (bc->ssl && SSL_session_reused(bc->ssl) && c->started >= t_warm && now < t_end) w->resumed++;
  switch (opt.mode) {
  case M_CLOSED:
  case M_IDLE: send_request(c, req_small, req_small_len, now); break;
  case M_OPEN: pump(w); break;
  case M_CONNRATE:
    if (c->started >= t_warm && now < t_end) record(&w->hs, now - c->started);
    send_request(c, req_close, req_close_len, now);
    break;
  case M_BULK:
    c->t_req = now;
    if (opt.upload) {
      char head[160];
      int n = snprintf(head, sizeof(head),
                       "POST /sink HTTP/1.1\r\nHost: payments-api\r\nContent-Type: "
                       "application/octet-stream\r\nContent-Length: %" PRIu64 "\r\n\r\n",
                       opt.bytes);
      c->busy = 1;
      if (bc_write(bc, head, (size_t)n, 0) < 0) {
        w->errors++;
        bc_close(bc, 0);
        return;
      }
      c->up_left = opt.bytes;
      pump_upload(c);
    } else {
      send_request(c, req_bulk, req_bulk_len, now);
    }
    break;
  }
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  client *c = p->data;
  if (!c->body) c->t_first = now_ns();
  c->body += len;
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  client *c = p->data;
  worker *w = c->w;
  uint64_t now = now_ns();
  int keep = llhttp_should_keep_alive(p);
  if (c->bc.closing) return 0;
  if (!c->busy) { /* a response nobody asked for */
    w->errors++;
    c->failed = 1;
    bc_close(&c->bc, 0);
    return -1;
  }
  c->busy = 0;
  w->done_total++;
  switch (opt.mode) {
  case M_CLOSED:
    if (now >= t_warm && now < t_end) {
      record(&w->hist, now - c->sent_at);
      w->done++;
    }
    if (!keep) {
      bc_close(&c->bc, 1);
      return 0;
    }
    if (!w->stopping) send_request(c, req_small, req_small_len, now);
    break;
  case M_OPEN:
    if (c->sent_at >= t_warm && c->sent_at < t_end) {
      record(&w->hist, now - c->sent_at);
      w->done++;
    }
    if (!keep) {
      bc_close(&c->bc, 1);
      return 0;
    }
    if (w->stopping) {
      int busy = 0;
      for (int i = 0; i < w->nslots; i++)
        busy |= w->slots[i] && w->slots[i]->busy;
      if (!busy) finish(w);
    } else {
      pump(w);
    }
    break;
  case M_CONNRATE:
    if (c->started >= t_warm && now < t_end) {
      record(&w->hist, now - c->started);
      w->done++;
    }
    c->state = C_AWAIT_EOF;
    c->t_done = now;
    break;
  case M_BULK:
    w->bytes = c->body;
    w->t_req = c->t_req;
    w->t_first = c->t_first;
    w->t_done = now;
    w->done = 1;
    finish(w);
    break;
  case M_IDLE:
    c->state = C_IDLE;
    w->established++;
    w->setting_up--;
    if (w->to_open > 0) {
      w->to_open--;
      start_client(w, w->nslots - w->to_open - 1);
    }
    if (w->established + w->failed == (uint64_t)w->nslots) settle(w);
    break;
  }
  return 0;
}

static void on_data(bc_conn *bc, const char *p, size_t n) {
  client *c = (client *)bc;
  llhttp_errno_t err = llhttp_execute(&c->parser, p, n);
  if (err != HPE_OK && !bc->closing) {
    c->w->errors++;
    c->failed = 1;
    bc_close(bc, 0);
  }
}

static void lose(client *c) {
  worker *w = c->w;
  if (opt.mode == M_IDLE) {
    if (c->state == C_IDLE) {
      w->lost++;
    } else {
      w->failed++;
      w->setting_up--;
      if (w->to_open > 0) {
        w->to_open--;
        start_client(w, w->nslots - w->to_open - 1);
      }
      if (w->established + w->failed == (uint64_t)w->nslots) settle(w);
    }
  } else if (!w->stopping) {
    w->errors++;
  }
  c->failed = 1;
}

static void on_eof(bc_conn *bc) {
  client *c = (client *)bc;
  if (c->state == C_AWAIT_EOF) {
    bc_close(bc, 0);
    return;
  }
  lose(c);
  bc_close(bc, 0);
}

static void on_error(bc_conn *bc, int err) {
  client *c = (client *)bc;
  static _Thread_local int reported;
  if (!reported && !c->w->stopping) {
    reported = 1;
    fprintf(stderr, "pc-loadgen: connection error: %s\n",
            err == BC_ETLS ? bc_last_tls_error() : uv_strerror(err));
  }
  if (c->state == C_AWAIT_EOF) { /* the request already counted; a reset at the end is fine */
    bc_close(bc, 0);
    return;
  }
  lose(c);
  bc_close(bc, 0);
}

static void on_drain(bc_conn *bc) {
  client *c = (client *)bc;
  if (opt.mode == M_BULK && opt.upload) pump_upload(c);
}

static void on_closed(bc_conn *bc) {
  client *c = (client *)bc;
  worker *w = c->w;
  int slot = c->slot, failed = c->failed;
  if (opt.mode == M_OPEN && c->busy && c->sent_at >= t_warm && c->sent_at < t_end) w->unsent++;
  if (w->slots[slot] == c) w->slots[slot] = NULL;
  free(c);
  if (w->finished || w->stopping) return;
  switch (opt.mode) {
  case M_CLOSED:
  case M_OPEN:
  case M_CONNRATE:
    if (!failed) { /* a clean close: straight on; after an error, the next tick */
      if (opt.mode != M_CONNRATE) w->reconnects++;
      start_client(w, slot);
    }
    break;
  case M_BULK:
    if (!w->done) finish(w);
    break;
  default: break;
  }
}

static const bc_ops ops = {on_open, on_data, on_eof, on_error, on_drain, on_closed};

static void start_client(worker *w, int slot) {
  client *c = calloc(1, sizeof(*c));
  if (!c) abort();
  c->w = w;
  c->slot = slot;
  c->started = now_ns();
  w->slots[slot] = c;
  llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
  c->parser.data = c;
  if (bc_init(&c->bc, &w->loop, &ops, ctx, 0) < 0) abort();
  if (c->bc.ssl) SSL_set_app_data(c->bc.ssl, c);
  if (opt.resume && w->session) SSL_set_session(c->bc.ssl, w->session);
  if (opt.mode == M_IDLE) w->setting_up++;
  int rc = bc_connect(&c->bc, (const struct sockaddr *)&opt.addr);
  if (rc < 0) {
    lose(c);
    bc_close(&c->bc, 0);
  }
}

static void on_close_handle(uv_handle_t *h) {}

static void finish(worker *w) {
  if (w->finished) return;
  w->finished = 1;
  uint64_t now = now_ns();
  if (opt.mode == M_OPEN) {
    /* Requests that never went out, or never came back, by now: their
     * latency is at least this long (lower bounds, counted as unsent). */
    for (int i = 0; i < w->nslots; i++) {
      client *c = w->slots[i];
      if (c && c->busy && c->sent_at >= t_warm && c->sent_at < t_end) {
        record(&w->hist, now - c->sent_at);
        w->timeouts++;
        c->busy = 0;
      }
      for (uint64_t s = w->sched[i]; s < t_end; s += interval_ns)
        if (s >= t_warm) {
          record(&w->hist, now - s);
          w->unsent++;
        }
    }
  }
  for (int i = 0; i < w->nslots; i++)
    if (w->slots[i]) bc_close(&w->slots[i]->bc, 1);
  uv_close((uv_handle_t *)&w->wake, on_close_handle);
  uv_close((uv_handle_t *)&w->tick, on_close_handle);
  if (w->tfd >= 0) uv_close((uv_handle_t *)&w->tpoll, on_close_handle);
  settle(w);
}

static void on_wake(uv_async_t *a) {
  worker *w = a->data;
  if (!atomic_load(&stop_flag) || w->stopping) return;
  w->stopping = 1;
  if (opt.mode == M_OPEN) {
    for (int i = 0; i < w->nslots; i++)
      if (w->slots[i] && w->slots[i]->busy) return; /* the tick waits out the grace period */
  }
  finish(w);
}

static void on_tick(uv_timer_t *t) {
  worker *w = t->data;
  uint64_t now = now_ns();
  if (w->finished) return;
  if (w->stopping) {
    if (now >= t_end + (uint64_t)(opt.grace * NS)) finish(w);
    return;
  }
  for (int i = 0; i < w->nslots; i++) {
    client *c = w->slots[i];
    if (!c) {
      if (opt.mode == M_CLOSED || opt.mode == M_OPEN || opt.mode == M_CONNRATE) {
        if (opt.mode != M_CONNRATE) w->reconnects++;
        start_client(w, i);
      }
      continue;
    }
    if (c->bc.closing) continue;
    if (c->state == C_AWAIT_EOF && now - c->t_done > 1 * NS) {
      bc_close(&c->bc, 0); /* the server never closed: move on */
    } else if (c->state == C_CONNECTING && now - c->started > 10 * NS) {
      lose(c);
      bc_close(&c->bc, 0);
    }
  }
}

static void run_worker(void *arg) {
  worker *w = arg;
  if (opt.mode == M_IDLE) {
    int n = w->nslots < opt.inflight ? w->nslots : opt.inflight;
    w->to_open = w->nslots - n;
    for (int i = 0; i < n; i++)
      start_client(w, i);
    if (w->nslots == 0) settle(w);
  } else {
    for (int i = 0; i < w->nslots; i++)
      start_client(w, i);
  }
  if (opt.mode == M_OPEN) pump(w);
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

static void json_hist(FILE *f, const char *name, const hist_t *h) {
  fprintf(f,
          "\"%s\":{\"count\":%" PRIu64 ",\"p50\":%" PRIu64 ",\"p90\":%" PRIu64 ",\"p99\":%" PRIu64
          ",\"p999\":%" PRIu64 ",\"max\":%" PRIu64 ",\"min\":%" PRIu64 ",\"mean\":%.1f}",
          name, h->count, hist_percentile(h, 50), hist_percentile(h, 90), hist_percentile(h, 99),
          hist_percentile(h, 99.9), h->max, h->count ? h->min : 0, hist_mean(h));
}

static void usage(void) {
  fprintf(stderr,
          "usage: pc-loadgen --mode closed|open|connrate|bulk|idle --target IP:PORT [--tls --ca F "
          "--cert F --key F [--tls12] [--resume]] [--threads N] [--conns N] [--duration S] "
          "[--warmup S] "
          "[--rate R] [--bytes N] [--upload] [--inflight N] [--hold S] [--grace S] [--path P] "
          "[--label L]\n");
  exit(2);
}

static void parse_args(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--tls") == 0) {
      opt.tls = 1;
      continue;
    }
    if (strcmp(a, "--tls12") == 0) {
      opt.tls12 = 1;
      continue;
    }
    if (strcmp(a, "--resume") == 0) {
      opt.resume = 1;
      continue;
    }
    if (strcmp(a, "--upload") == 0) {
      opt.upload = 1;
      continue;
    }
    if (i + 1 >= argc) usage();
    const char *v = argv[++i];
    if (strcmp(a, "--mode") == 0) {
      for (int m = 0; m < 5; m++)
        if (strcmp(v, mode_names[m]) == 0) opt.mode = m;
    } else if (strcmp(a, "--target") == 0)
      opt.target = v;
    else if (strcmp(a, "--ca") == 0)
      opt.ca = v;
    else if (strcmp(a, "--cert") == 0)
      opt.cert = v;
    else if (strcmp(a, "--key") == 0)
      opt.key = v;
    else if (strcmp(a, "--ciphers") == 0)
      opt.ciphers = v;
    else if (strcmp(a, "--path") == 0)
      opt.path = v;
    else if (strcmp(a, "--label") == 0)
      opt.label = v;
    else if (strcmp(a, "--threads") == 0)
      opt.threads = atoi(v);
    else if (strcmp(a, "--conns") == 0)
      opt.conns = atoi(v);
    else if (strcmp(a, "--inflight") == 0)
      opt.inflight = atoi(v);
    else if (strcmp(a, "--duration") == 0)
      opt.duration = atof(v);
    else if (strcmp(a, "--warmup") == 0)
      opt.warmup = atof(v);
    else if (strcmp(a, "--rate") == 0)
      opt.rate = atof(v);
    else if (strcmp(a, "--grace") == 0)
      opt.grace = atof(v);
    else if (strcmp(a, "--hold") == 0)
      opt.hold = atof(v);
    else if (strcmp(a, "--bytes") == 0)
      opt.bytes = strtoull(v, NULL, 10);
    else
      usage();
  }
  if (opt.mode < 0 || !opt.target || opt.threads < 1 || opt.threads > MAX_THREADS ||
      opt.conns < 1 || opt.inflight < 1 || opt.duration <= 0 || opt.warmup < 0 ||
      opt.warmup >= opt.duration || opt.rate <= 0 || opt.bytes == 0)
    usage();
  if (opt.tls && (!opt.ca || !opt.cert || !opt.key)) usage();
  char host[64];
  const char *colon = strrchr(opt.target, ':');
  if (!colon || (size_t)(colon - opt.target) >= sizeof(host)) usage();
  memcpy(host, opt.target, (size_t)(colon - opt.target));
  host[colon - opt.target] = '\0';
  if (uv_ip4_addr(host, atoi(colon + 1), &opt.addr) != 0) usage();
  if (opt.mode == M_BULK) opt.conns = opt.threads = 1;
  if (opt.conns < opt.threads) opt.threads = opt.conns;
}

static double cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* Sleeps until all workers settled or the deadline, whichever is first. */
static void wait_settled(uint64_t deadline) {
  while (atomic_load(&workers_settled) < opt.threads && now_ns() < deadline) {
    struct timespec ts = {0, 5 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}

static void stop_workers(void) {
  atomic_store(&stop_flag, 1);
  for (int i = 0; i < opt.threads; i++)
    uv_async_send(&workers[i].wake);
  for (int i = 0; i < opt.threads; i++)
    uv_thread_join(&workers[i].tid);
}

int main(int argc, char **argv) {
  parse_args(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGALRM, on_alarm);
  uint64_t nofile = bc_raise_nofile();
  if (opt.mode == M_IDLE && nofile < (uint64_t)opt.conns + 64)
    fprintf(stderr, "pc-loadgen: warning: RLIMIT_NOFILE %" PRIu64 " < %d connections\n", nofile,
            opt.conns);
  bc_global_init();
  if (opt.tls && !(ctx = bc_tls_ctx(0, opt.cert, opt.key, opt.ca, opt.ciphers, opt.tls12)))
    return 1;
  if (ctx && opt.resume) {
    SSL_CTX_clear_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  }
  memset(blob, 'u', sizeof(blob));
  req_small_len = (size_t)snprintf(req_small, sizeof(req_small),
                                   "GET %s HTTP/1.1\r\nHost: payments-api\r\n\r\n", opt.path);
  req_close_len = (size_t)snprintf(
      req_close, sizeof(req_close),
      "GET %s HTTP/1.1\r\nHost: payments-api\r\nConnection: close\r\n\r\n", opt.path);
  req_bulk_len = (size_t)snprintf(
      req_bulk, sizeof(req_bulk),
      "GET /bulk?bytes=%" PRIu64 " HTTP/1.1\r\nHost: payments-api\r\n\r\n", opt.bytes);
  llhttp_settings_init(&settings);
  settings.on_body = on_body;
  settings.on_message_complete = on_message_complete;

  /* The watchdog: a wedged run must not hold up the suite. */
  alarm((unsigned)ceil(opt.duration + opt.grace) + 60);

  t0 = now_ns();
  t_warm = t0 + (uint64_t)(opt.warmup * NS);
  t_end = t0 + (uint64_t)(opt.duration * NS);
  if (opt.mode == M_IDLE || opt.mode == M_BULK) t_warm = t0;
  interval_ns = (uint64_t)((double)opt.conns * NS / opt.rate);
  double cpu0 = cpu_seconds();

  int first = 0;
  for (int i = 0; i < opt.threads; i++) {
    worker *w = &workers[i];
    w->id = i;
    w->nslots = opt.conns / opt.threads + (i < opt.conns % opt.threads);
    w->first = first;
    first += w->nslots;
    w->slots = calloc((size_t)w->nslots, sizeof(*w->slots));
    w->sched = calloc((size_t)w->nslots, sizeof(*w->sched));
    if (!w->slots || !w->sched) abort();
    for (int s = 0; s < w->nslots; s++) /* connection g's first request at g / rate */
      w->sched[s] = t0 + (uint64_t)((double)(w->first + s) * NS / opt.rate);
    hist_init(&w->hist);
    hist_init(&w->hs);
    w->tfd = -1;
    if (uv_loop_init(&w->loop) != 0 || uv_async_init(&w->loop, &w->wake, on_wake) != 0 ||
        uv_timer_init(&w->loop, &w->tick) != 0)
      abort();
    w->wake.data = w->tick.data = w;
    uv_timer_start(&w->tick, on_tick, 100, 100);
    if (opt.mode == M_OPEN) {
      w->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
      if (w->tfd < 0 || uv_poll_init(&w->loop, &w->tpoll, w->tfd) != 0) abort();
      w->tpoll.data = w;
      uv_poll_start(&w->tpoll, UV_READABLE, on_tfd);
    }
  }
  for (int i = 0; i < opt.threads; i++)
    if (uv_thread_create(&workers[i].tid, run_worker, &workers[i]) != 0) abort();

  double setup_s = 0;
  if (opt.mode == M_IDLE) {
    wait_settled(t_end);
    setup_s = (double)(now_ns() - t0) / NS;
    uint64_t est = 0, failed = 0;
    for (int i = 0; i < opt.threads; i++) { /* racy reads, for the progress line only */
      est += workers[i].established;
      failed += workers[i].failed;
    }
    printf("ready established=%" PRIu64 " failed=%" PRIu64 " setup_s=%.2f\n", est, failed, setup_s);
    fflush(stdout);
    alarm(0);
    if (opt.hold < 0) {
      char line[64];
      if (!fgets(line, sizeof(line), stdin)) { /* EOF also releases */
      }
    } else {
      struct timespec ts = {(time_t)opt.hold, (long)((opt.hold - floor(opt.hold)) * 1e9)};
      nanosleep(&ts, NULL);
    }
    alarm(60);
  } else {
    wait_settled(t_end);
  }
  stop_workers();
  uint64_t t_stop = now_ns();
  double cpu = cpu_seconds() - cpu0;

  worker tot;
  memset(&tot, 0, sizeof(tot));
  hist_init(&tot.hist);
  hist_init(&tot.hs);
  const char *tlsdesc = "";
  for (int i = 0; i < opt.threads; i++) {
    worker *w = &workers[i];
    hist_merge(&tot.hist, &w->hist);
    hist_merge(&tot.hs, &w->hs);
    tot.done += w->done;
    tot.done_total += w->done_total;
    tot.errors += w->errors;
    tot.reconnects += w->reconnects;
    tot.timeouts += w->timeouts;
    tot.unsent += w->unsent;
    tot.established += w->established;
    tot.failed += w->failed;
    tot.lost += w->lost;
    tot.resumed += w->resumed;
    if (!tlsdesc[0]) tlsdesc = w->tlsdesc;
  }
  double window = opt.duration - opt.warmup;
  FILE *f = stdout;
  fprintf(f,
          "{\"mode\":\"%s\",\"label\":\"%s\",\"target\":\"%s\",\"tls\":%s,\"tls_session\":\"%s\","
          "\"threads\":%d,\"conns\":%d,\"duration_s\":%.3f,\"warmup_s\":%.3f,\"errors\":%" PRIu64
          ",\"loadgen_cpu_s\":%.3f,\"wall_s\":%.3f,",
          mode_names[opt.mode], opt.label, opt.target, opt.tls ? "true" : "false", tlsdesc,
          opt.threads, opt.conns, opt.duration, opt.warmup, tot.errors, cpu,
          (double)(t_stop - t0) / NS);
  switch (opt.mode) {
  case M_CLOSED:
  case M_OPEN:
    fprintf(f,
            "\"requests\":%" PRIu64 ",\"requests_total\":%" PRIu64 ",\"reconnects\":%" PRIu64
            ",\"rps\":%.1f,",
            tot.done, tot.done_total, tot.reconnects, (double)tot.done / window);
    if (opt.mode == M_OPEN)
      fprintf(f, "\"rate_target\":%.1f,\"timeouts\":%" PRIu64 ",\"unsent\":%" PRIu64 ",", opt.rate,
              tot.timeouts, tot.unsent);
    json_hist(f, "latency_us", &tot.hist);
    break;
  case M_CONNRATE:
    fprintf(f,
            "\"connections\":%" PRIu64 ",\"connections_total\":%" PRIu64 ",\"conns_per_s\":%.1f,"
            "\"resumed\":%" PRIu64 ",",
            tot.done, tot.done_total, (double)tot.done / window, tot.resumed);
    json_hist(f, "latency_us", &tot.hist);
    fputc(',', f);
    json_hist(f, "handshake_us", &tot.hs);
    break;
  case M_BULK: {
    worker *w = &workers[0];
    double secs = w->done ? (double)(w->t_done - w->t_req) / NS : 0;
    fprintf(f,
            "\"direction\":\"%s\",\"bytes_requested\":%" PRIu64 ",\"bytes\":%" PRIu64
            ",\"complete\":%s,\"seconds\":%.3f,\"mb_per_s\":%.1f,\"ttfb_us\":%.0f",
            opt.upload ? "up" : "down", opt.bytes,
            opt.upload ? (w->done ? opt.bytes : 0) : w->bytes, w->done ? "true" : "false", secs,
            secs > 0 ? (double)opt.bytes / secs / 1e6 : 0.0,
            w->done && !opt.upload ? (double)(w->t_first - w->t_req) / 1e3 : 0.0);
    break;
  }
  case M_IDLE:
    fprintf(f,
            "\"established\":%" PRIu64 ",\"failed\":%" PRIu64 ",\"lost\":%" PRIu64
            ",\"setup_s\":%.3f",
            tot.established, tot.failed, tot.lost, setup_s);
    break;
  }
  fprintf(f, "}\n");
  fflush(f);
  return 0;
}

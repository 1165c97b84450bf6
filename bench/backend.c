/*
 * pc-backend - the plaintext (or mTLS) HTTP/1.1 app every benchmark row
 * forwards to.
 *
 *   pc-backend --listen 127.0.0.1:PORT [--tls-listen 127.0.0.1:PORT --cert F --key F --ca F]
 *              [--threads N] [--ciphers LIST]
 *
 * N threads (default 2), each with its own libuv loop and its own
 * SO_REUSEPORT socket per listen address, so the kernel spreads connections.
 * Requests (keep-alive, pipelining-safe for the small ones, Connection: close
 * honoured):
 *   GET /bulk?bytes=N   200 with an N-byte body streamed under backpressure
 *   POST /sink          body read and dropped, then 200 with "ok\n"
 *   anything else       200 with a fixed 100-byte body
 * --tls-listen serves the same over mTLS (BoringSSL): the "backend-tls" row.
 * Exits 0 on SIGTERM or SIGINT.
 */
#include <errno.h>
#include <pthread.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <llhttp.h>
#include <uv.h>

#include "bconn.h"

#define MAX_THREADS 64
#define DEFAULT_CIPHERS                                                                            \
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"

#define SMALL_BODY 100
static const char small_head[] = "HTTP/1.1 200 OK\r\n"
                                 "Content-Type: text/plain\r\n"
                                 "Content-Length: 100\r\n"
                                 "\r\n";
static char small_response[sizeof(small_head) - 1 + SMALL_BODY];
static const char sink_response[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";

static char blob[64 * 1024];

typedef struct {
  uv_loop_t loop;
  uv_thread_t tid;
  uv_tcp_t plain, tls;
  int has_tls;
} worker_t;

typedef struct {
  bc_conn bc; /* first: a bc_conn pointer is a session pointer */
  llhttp_t parser;
  char url[256];
  size_t url_len;
  uint64_t bulk_left;
  int close_after;
} session_t;

static llhttp_settings_t settings;
static SSL_CTX *tls_ctx;
static struct sockaddr_in plain_addr, tls_addr;

static void pump_bulk(session_t *s) {
  while (s->bulk_left > 0 && bc_queued(&s->bc) < BC_HIGH_WATER) {
    size_t n = s->bulk_left < sizeof(blob) ? (size_t)s->bulk_left : sizeof(blob);
    if (bc_write(&s->bc, blob, n, 1) < 0) {
      bc_close(&s->bc, 0);
      return;
    }
    s->bulk_left -= n;
  }
  if (s->bulk_left == 0 && s->close_after) bc_shutdown(&s->bc);
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  session_t *s = p->data;
  size_t room = sizeof(s->url) - 1 - s->url_len;
  if (len > room) len = room;
  memcpy(s->url + s->url_len, at, len);
  s->url_len += len;
  s->url[s->url_len] = '\0';
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  session_t *s = p->data;
  int rc;
  s->close_after = !llhttp_should_keep_alive(p);
  if (strncmp(s->url, "/bulk?bytes=", 12) == 0) {
    char head[160];
    s->bulk_left = strtoull(s->url + 12, NULL, 10);
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     "Content-Length: %" PRIu64 "\r\n\r\n",
                     s->bulk_left);
    rc = bc_write(&s->bc, head, (size_t)n, 0);
    s->url_len = 0;
    if (rc < 0) return -1;
    pump_bulk(s);
    return 0;
  }
  if (strcmp(s->url, "/sink") == 0)
    rc = bc_write(&s->bc, sink_response, sizeof(sink_response) - 1, 1);
  else
    rc = bc_write(&s->bc, small_response, sizeof(small_response), 1);
  s->url_len = 0;
  if (rc < 0) return -1;
  if (s->close_after) bc_shutdown(&s->bc);
  return 0;
}

static void on_data(bc_conn *c, const char *p, size_t n) {
  session_t *s = (session_t *)c;
  if (c->shutting) return;
  llhttp_errno_t err = llhttp_execute(&s->parser, p, n);
  if (err != HPE_OK && !c->closing) bc_close(c, 0);
}

static void on_eof(bc_conn *c) { bc_close(c, 0); }
static void on_error(bc_conn *c, int err) { bc_close(c, 0); }
static void on_drain(bc_conn *c) { pump_bulk((session_t *)c); }
static void on_closed(bc_conn *c) { free(c); }

static const bc_ops ops = {NULL, on_data, on_eof, on_error, on_drain, on_closed};

static void on_connection(uv_stream_t *listener, int status) {
  if (status < 0) return;
  session_t *s = calloc(1, sizeof(*s));
  if (!s) abort();
  int is_tls = listener->data != NULL;
  if (bc_init(&s->bc, listener->loop, &ops, is_tls ? tls_ctx : NULL, 1) < 0) abort();
  llhttp_init(&s->parser, HTTP_REQUEST, &settings);
  s->parser.data = s;
  if (bc_accept(&s->bc, listener) < 0) bc_close(&s->bc, 0);
}

static int listen_on(uv_loop_t *loop, uv_tcp_t *h, const struct sockaddr_in *addr, void *tag) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd < 0) return -errno;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0 ||
      bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) != 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  int rc = uv_tcp_init(loop, h);
  if (rc == 0) rc = uv_tcp_open(h, fd);
  if (rc == 0) {
    h->data = tag;
    rc = uv_listen((uv_stream_t *)h, 4096, on_connection);
  }
  return rc;
}

static void run_worker(void *arg) {
  worker_t *w = arg;
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

static int parse_addr(const char *s, struct sockaddr_in *out) {
  char host[64];
  const char *colon = strrchr(s, ':');
  if (!colon || (size_t)(colon - s) >= sizeof(host)) return -1;
  memcpy(host, s, (size_t)(colon - s));
  host[colon - s] = '\0';
  return uv_ip4_addr(host, atoi(colon + 1), out);
}

static void usage(void) {
  fprintf(stderr, "usage: pc-backend --listen IP:PORT [--tls-listen IP:PORT --cert F --key F "
                  "--ca F] [--threads N] [--ciphers LIST]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *listen_s = NULL, *tls_s = NULL, *cert = NULL, *key = NULL, *ca = NULL;
  const char *ciphers = DEFAULT_CIPHERS;
  int nthreads = 2;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) usage();
    if (strcmp(a, "--listen") == 0)
      listen_s = v;
    else if (strcmp(a, "--tls-listen") == 0)
      tls_s = v;
    else if (strcmp(a, "--cert") == 0)
      cert = v;
    else if (strcmp(a, "--key") == 0)
      key = v;
    else if (strcmp(a, "--ca") == 0)
      ca = v;
    else if (strcmp(a, "--threads") == 0)
      nthreads = atoi(v);
    else if (strcmp(a, "--ciphers") == 0)
      ciphers = v;
    else
      usage();
    i++;
  }
  if (!listen_s || nthreads < 1 || nthreads > MAX_THREADS) usage();
  if (parse_addr(listen_s, &plain_addr) != 0) usage();
  if (tls_s && (parse_addr(tls_s, &tls_addr) != 0 || !cert || !key || !ca)) usage();

  signal(SIGPIPE, SIG_IGN);
  bc_raise_nofile();
  bc_global_init();
  memset(blob, 'x', sizeof(blob));
  memcpy(small_response, small_head, sizeof(small_head) - 1);
  memset(small_response + sizeof(small_head) - 1, 'b', SMALL_BODY - 1);
  small_response[sizeof(small_response) - 1] = '\n';
  llhttp_settings_init(&settings);
  settings.on_url = on_url;
  settings.on_message_complete = on_message_complete;
  if (tls_s && !(tls_ctx = bc_tls_ctx(1, cert, key, ca, ciphers, 0))) return 1;

  /* Workers never see SIGTERM/SIGINT: the main thread waits for them. */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);

  static worker_t workers[MAX_THREADS];
  for (int i = 0; i < nthreads; i++) {
    worker_t *w = &workers[i];
    int rc = uv_loop_init(&w->loop);
    if (rc == 0) rc = listen_on(&w->loop, &w->plain, &plain_addr, NULL);
    if (rc == 0 && tls_s) rc = listen_on(&w->loop, &w->tls, &tls_addr, tls_ctx);
    if (rc != 0) {
      fprintf(stderr, "pc-backend: cannot listen: %s\n", uv_strerror(rc));
      return 1;
    }
  }
  for (int i = 0; i < nthreads; i++)
    if (uv_thread_create(&workers[i].tid, run_worker, &workers[i]) != 0) {
      fprintf(stderr, "pc-backend: cannot start thread\n");
      return 1;
    }
  fprintf(stderr, "pc-backend: listening on %s%s%s with %d threads\n", listen_s,
          tls_s ? " and mTLS on " : "", tls_s ? tls_s : "", nthreads);
  int sig = 0;
  sigwait(&set, &sig);
  return 0;
}

#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "bufcache.h"
#include "compat.h"

/* Written by the main thread (start, and every config reload), read on every
 * line by every worker and the admin server: relaxed atomics, since each is a
 * value on its own (a line written under the old level during a reload is
 * fine; a torn or never-reloaded read is not). */
static _Atomic int min_level = PC_LOG_INFO;
static _Atomic int access_on = 1;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;
static const char *level_words[] = {"debug", "info", "warn", "error"};

_Noreturn void pc_fatal(const char *what) {
  fprintf(stderr, "portcullis: fatal: %s\n", what);
  abort();
}

void *pc_malloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) pc_fatal("out of memory");
  return p;
}

void *pc_calloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (!p) pc_fatal("out of memory");
  return p;
}

void *pc_realloc(void *p, size_t n) {
  p = realloc(p, n ? n : 1);
  if (!p) pc_fatal("out of memory");
  return p;
}

char *pc_strdup(const char *s) {
  char *p = strdup(s);
  if (!p) pc_fatal("out of memory");
  return p;
}

void pc_log_init(pc_log_level_t lvl, int access_enabled) {
  atomic_store_explicit(&min_level, (int)lvl, memory_order_relaxed);
  atomic_store_explicit(&access_on, access_enabled, memory_order_relaxed);
}

int pc_log_level_parse(const char *s, pc_log_level_t *out) {
  for (size_t i = 0; i < PC_ARRAY_SIZE(level_words); i++) {
    if (strcmp(s, level_words[i]) == 0) {
      *out = (pc_log_level_t)i;
      return 0;
    }
  }
  return -1;
}

static void reserve(pc_jbuf_t *b, size_t extra) {
  size_t need = b->len + extra + 1;
  if (need <= b->cap) return;
  if (b->cap == 0) {
    b->data = pc_bufcache_get(need, &b->cap);
    return;
  }
  size_t cap = b->cap;
  while (cap < need)
    cap *= 2;
  b->data = pc_realloc(b->data, cap);
  b->cap = cap;
}

void pc_jbuf_free(pc_jbuf_t *b) {
  free(b->data);
  memset(b, 0, sizeof(*b));
}

void pc_jbuf_release(pc_jbuf_t *b) {
  pc_bufcache_put(b->data, b->cap);
  memset(b, 0, sizeof(*b));
}

void pc_jbuf_raw(pc_jbuf_t *b, const char *s, size_t n) {
  reserve(b, n);
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

/* The attribute lets callers' formats be checked through it (clang's
 * -Wformat-nonliteral, part of -Wformat=2, asks for it). */
__attribute__((format(printf, 2, 0))) static void jbuf_vprintf(pc_jbuf_t *b, const char *fmt,
                                                               va_list ap) {
  va_list ap2;
  va_copy(ap2, ap);
  int n = vsnprintf(NULL, 0, fmt, ap2);
  va_end(ap2);
  if (n < 0) return;
  reserve(b, (size_t)n);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  b->len += (size_t)n;
}

void pc_jbuf_printf(pc_jbuf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  jbuf_vprintf(b, fmt, ap);
  va_end(ap);
}

void pc_jbuf_str(pc_jbuf_t *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  reserve(b, n * 6 + 2);
  char *o = b->data + b->len;
  *o++ = '"';
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      *o++ = '\\';
      *o++ = (char)c;
    } else if (c < 0x20 || c >= 0x7f) {
      /* Non-ASCII is escaped byte-wise: peer bytes need not be valid UTF-8 and
       * the log must stay valid JSON whatever they are. */
      memcpy(o, "\\u00", 4);
      o[4] = hex[c >> 4];
      o[5] = hex[c & 15];
      o += 6;
    } else {
      *o++ = (char)c;
    }
  }
  *o++ = '"';
  *o = '\0';
  b->len = (size_t)(o - b->data);
}

static void comma(pc_jbuf_t *b) {
  if (b->len && b->data[b->len - 1] != '{' && b->data[b->len - 1] != '[') pc_jbuf_raw(b, ",", 1);
}

void pc_jbuf_kv_str(pc_jbuf_t *b, const char *key, const char *value) {
  comma(b);
  pc_jbuf_str(b, key, strlen(key));
  pc_jbuf_raw(b, ":", 1);
  if (value)
    pc_jbuf_str(b, value, strlen(value));
  else
    pc_jbuf_raw(b, "null", 4);
}

void pc_jbuf_kv_u64(pc_jbuf_t *b, const char *key, uint64_t value) {
  comma(b);
  pc_jbuf_str(b, key, strlen(key));
  pc_jbuf_printf(b, ":%llu", (unsigned long long)value);
}

void pc_jbuf_kv_i64(pc_jbuf_t *b, const char *key, int64_t value) {
  comma(b);
  pc_jbuf_str(b, key, strlen(key));
  pc_jbuf_printf(b, ":%lld", (long long)value);
}

void pc_jbuf_kv_bool(pc_jbuf_t *b, const char *key, int value) {
  comma(b);
  pc_jbuf_str(b, key, strlen(key));
  pc_jbuf_printf(b, ":%s", value ? "true" : "false");
}

void pc_log_utc(time_t t, char *out, size_t n) {
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

void pc_jbuf_now(pc_jbuf_t *b) {
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  pc_jbuf_printf(b, "\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\"", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
}

static void write_all(int fd, const char *data, size_t len) {
  size_t off = 0;
  while (off < len) {
    ssize_t n = write(fd, data + off, len - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return; /* a closed log pipe must not take the proxy down */
    }
    off += (size_t)n;
  }
}

/* ---- the writer thread ---------------------------------------------------
 * Once started, lines are appended to an in-memory queue per stream under
 * write_lock (a memcpy, never a syscall) and one thread writes them out, in
 * batches when they come faster than one write. A worker therefore never
 * waits for a slow or stalled stdout pipe; past log.buffer_bytes waiting
 * lines are dropped and counted instead. Since only the writer writes while
 * it runs, lines never interleave even when a batch exceeds PIPE_BUF. */

#define STOP_WAIT_S 2

static struct {
  pthread_t thread;
  pthread_cond_t wake;
  int running, stop;
  pc_jbuf_t q[2]; /* [0] stdout, [1] stderr */
  size_t max;     /* bytes that may wait */
  uint64_t dropped;
} wr = {.wake = PTHREAD_COND_INITIALIZER, .max = 16u << 20};

void pc_log_set_buffer(size_t bytes) {
  pthread_mutex_lock(&write_lock);
  wr.max = bytes;
  pthread_mutex_unlock(&write_lock);
}

static void *writer_main(void *arg) {
  (void)arg;
  pc_jbuf_t mine[2] = {{0}, {0}};
  pthread_mutex_lock(&write_lock);
  for (;;) {
    while (wr.q[0].len + wr.q[1].len == 0 && !wr.stop)
      pthread_cond_wait(&wr.wake, &write_lock);
    if (wr.q[0].len + wr.q[1].len == 0) break; /* stopping, and nothing is left */
    for (int i = 0; i < 2; i++) {
      pc_jbuf_t t = wr.q[i];
      wr.q[i] = mine[i];
      mine[i] = t;
    }
    pthread_mutex_unlock(&write_lock);
    for (int i = 0; i < 2; i++) {
      write_all(i ? STDERR_FILENO : STDOUT_FILENO, mine[i].data, mine[i].len);
      mine[i].len = 0;
      if (mine[i].cap > (1u << 20)) pc_jbuf_free(&mine[i]); /* after a burst */
    }
    pthread_mutex_lock(&write_lock);
  }
  pthread_mutex_unlock(&write_lock);
  pc_jbuf_free(&mine[0]);
  pc_jbuf_free(&mine[1]);
  return NULL;
}

void pc_log_start_writer(void) {
  pthread_mutex_lock(&write_lock);
  static int hooked;
  if (!wr.running) {
    wr.stop = 0;
    if (pthread_create(&wr.thread, NULL, writer_main, NULL) != 0)
      pc_fatal("cannot start the log writer");
    wr.running = 1;
  }
  pthread_mutex_unlock(&write_lock);
  /* Early returns from main (a failed start) still write what was queued. */
  if (!hooked++) atexit(pc_log_stop_writer);
}

void pc_log_stop_writer(void) {
  pthread_mutex_lock(&write_lock);
  if (!wr.running || wr.stop) { /* not running, or a stop already gave up on it */
    pthread_mutex_unlock(&write_lock);
    return;
  }
  wr.stop = 1;
  pthread_cond_signal(&wr.wake);
  pthread_mutex_unlock(&write_lock);
  /* A log pipe nobody reads must not keep the process from exiting: after
   * STOP_WAIT_S the rest is abandoned (the writer stays blocked in write). */
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += STOP_WAIT_S;
  if (pthread_timedjoin_np(wr.thread, NULL, &until) != 0) return;
  pthread_mutex_lock(&write_lock);
  wr.running = 0;
  pc_jbuf_free(&wr.q[0]);
  pc_jbuf_free(&wr.q[1]);
  pthread_mutex_unlock(&write_lock);
}

uint64_t pc_log_dropped(void) {
  pthread_mutex_lock(&write_lock);
  uint64_t n = wr.dropped;
  pthread_mutex_unlock(&write_lock);
  return n;
}

static void emit(int fd, pc_jbuf_t *b) {
  pc_jbuf_raw(b, "\n", 1);
  pthread_mutex_lock(&write_lock);
  if (!wr.running) {
    write_all(fd, b->data, b->len);
  } else if (wr.q[0].len + wr.q[1].len + b->len > wr.max) {
    wr.dropped++;
  } else {
    if (wr.q[0].len + wr.q[1].len == 0) pthread_cond_signal(&wr.wake);
    pc_jbuf_raw(&wr.q[fd == STDERR_FILENO], b->data, b->len);
  }
  pthread_mutex_unlock(&write_lock);
}

void pc_log(pc_log_level_t lvl, const char *fmt, ...) {
  if ((int)lvl < atomic_load_explicit(&min_level, memory_order_relaxed)) return;
  pc_jbuf_t msg = {0}, b = {0};
  va_list ap;
  va_start(ap, fmt);
  jbuf_vprintf(&msg, fmt, ap);
  va_end(ap);
  pc_jbuf_raw(&b, "{\"time\":", 8);
  pc_jbuf_now(&b);
  pc_jbuf_kv_str(&b, "level", level_words[lvl]);
  pc_jbuf_kv_str(&b, "msg", msg.data ? msg.data : "");
  pc_jbuf_raw(&b, "}", 1);
  emit(STDERR_FILENO, &b);
  pc_jbuf_free(&msg);
  pc_jbuf_free(&b);
}

/* The fields every access line starts with, connection or request. */
static void access_head(pc_jbuf_t *b, const char *listener, const char *direction, const char *peer,
                        const char *app, const char *peer_id) {
  pc_jbuf_raw(b, "{\"time\":", 8);
  pc_jbuf_now(b);
  pc_jbuf_kv_str(b, "listener", listener);
  pc_jbuf_kv_str(b, "direction", direction);
  pc_jbuf_kv_str(b, "peer", peer);
  pc_jbuf_kv_str(b, "app", app);
  pc_jbuf_kv_str(b, "peer_id", peer_id);
}

/* "resumed": true|false after a handshake, null without one. */
static void kv_resumed(pc_jbuf_t *b, const char *tls_version, int resumed) {
  if (tls_version)
    pc_jbuf_kv_bool(b, "resumed", resumed);
  else
    pc_jbuf_raw(b, ",\"resumed\":null", 15);
}

void pc_log_access(const pc_access_rec_t *r) {
  if (!atomic_load_explicit(&access_on, memory_order_relaxed)) return;
  pc_jbuf_t b = {0};
  access_head(&b, r->listener, r->direction, r->peer, r->app, r->peer_id);
  pc_jbuf_kv_str(&b, "decision", r->decision);
  pc_jbuf_kv_str(&b, "reason", r->reason == PC_REASON_NONE ? NULL : pc_reason_word(r->reason));
  pc_jbuf_kv_str(&b, "close", r->close);
  pc_jbuf_kv_u64(&b, "bytes_from_peer", r->bytes_from_peer);
  pc_jbuf_kv_u64(&b, "bytes_to_peer", r->bytes_to_peer);
  pc_jbuf_printf(&b, ",\"duration_ms\":%.3f", r->duration_ms);
  pc_jbuf_kv_str(&b, "tls_version", r->tls_version);
  pc_jbuf_kv_str(&b, "cipher", r->cipher);
  pc_jbuf_kv_str(&b, "endpoint", r->endpoint);
  kv_resumed(&b, r->tls_version, r->resumed);
  pc_jbuf_raw(&b, "}", 1);
  emit(STDOUT_FILENO, &b);
  pc_jbuf_free(&b);
}

void pc_log_request(const pc_request_rec_t *r) {
  if (!atomic_load_explicit(&access_on, memory_order_relaxed)) return;
  pc_jbuf_t b = {0};
  access_head(&b, r->listener, r->direction, r->peer, r->app, r->peer_id);
  pc_jbuf_raw(&b, ",\"method\":", 10);
  if (r->method)
    pc_jbuf_str(&b, r->method, r->method_len);
  else
    pc_jbuf_raw(&b, "null", 4);
  pc_jbuf_raw(&b, ",\"path\":", 8);
  if (r->path)
    pc_jbuf_str(&b, r->path, r->path_len);
  else
    pc_jbuf_raw(&b, "null", 4);
  pc_jbuf_kv_str(&b, "protocol", r->protocol);
  pc_jbuf_kv_i64(&b, "status", r->status);
  if (r->grpc_status >= 0)
    pc_jbuf_kv_i64(&b, "grpc_status", r->grpc_status);
  else
    pc_jbuf_raw(&b, ",\"grpc_status\":null", 19);
  pc_jbuf_kv_str(&b, "decision", r->decision);
  pc_jbuf_kv_str(&b, "reason", r->reason == PC_REASON_NONE ? NULL : pc_reason_word(r->reason));
  pc_jbuf_kv_u64(&b, "request_bytes", r->request_bytes);
  pc_jbuf_kv_u64(&b, "response_bytes", r->response_bytes);
  pc_jbuf_printf(&b, ",\"duration_ms\":%.3f", r->duration_ms);
  if (r->upstream_ms >= 0)
    pc_jbuf_printf(&b, ",\"upstream_ms\":%.3f", r->upstream_ms);
  else
    pc_jbuf_raw(&b, ",\"upstream_ms\":null", 19);
  pc_jbuf_kv_str(&b, "tls_version", r->tls_version);
  pc_jbuf_kv_str(&b, "cipher", r->cipher);
  pc_jbuf_kv_str(&b, "endpoint", r->endpoint);
  kv_resumed(&b, r->tls_version, r->resumed);
  pc_jbuf_raw(&b, "}", 1);
  emit(STDOUT_FILENO, &b);
  pc_jbuf_release(&b);
}

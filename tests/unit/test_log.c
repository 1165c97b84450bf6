/*
 * test_log.c - JSON building: string escaping of arbitrary (peer-controlled)
 * bytes, key/value helpers, whole access-log and event lines, and the writer
 * thread against a stalled stdout.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bufcache.h"
#include "check.h"
#include "log.h"
#include "reason.h"

/* --- a strict little JSON validator (RFC 8259, ASCII output only) -------- */

static const char *json_value(const char *p, const char *end);

static const char *json_ws(const char *p, const char *end) {
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
    p++;
  return p;
}

static int hexdig(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static const char *json_string(const char *p, const char *end) {
  if (p >= end || *p != '"') return NULL;
  for (p++; p < end; p++) {
    unsigned char c = (unsigned char)*p;
    if (c == '"') return p + 1;
    if (c < 0x20 || c >= 0x7f) return NULL; /* escaped output is pure ASCII */
    if (c != '\\') continue;
    if (++p >= end) return NULL;
    if (*p == 'u') {
      if (end - p < 5 || !hexdig(p[1]) || !hexdig(p[2]) || !hexdig(p[3]) || !hexdig(p[4]))
        return NULL;
      p += 4;
    } else if (!strchr("\"\\/bfnrt", *p)) {
      return NULL;
    }
  }
  return NULL;
}

static const char *json_number(const char *p, const char *end) {
  const char *s = p;
  if (p < end && *p == '-') p++;
  if (p >= end || *p < '0' || *p > '9') return NULL;
  if (*p == '0')
    p++;
  else
    while (p < end && *p >= '0' && *p <= '9')
      p++;
  if (p < end && *p == '.') {
    p++;
    const char *d = p;
    while (p < end && *p >= '0' && *p <= '9')
      p++;
    if (p == d) return NULL;
  }
  return p > s ? p : NULL;
}

static const char *json_object(const char *p, const char *end) {
  p = json_ws(p + 1, end);
  if (p < end && *p == '}') return p + 1;
  for (;;) {
    p = json_string(json_ws(p, end), end);
    if (!p) return NULL;
    p = json_ws(p, end);
    if (p >= end || *p != ':') return NULL;
    p = json_value(p + 1, end);
    if (!p) return NULL;
    p = json_ws(p, end);
    if (p < end && *p == ',') {
      p++;
      continue;
    }
    return p < end && *p == '}' ? p + 1 : NULL;
  }
}

static const char *json_value(const char *p, const char *end) {
  p = json_ws(p, end);
  if (p >= end) return NULL;
  if (*p == '{') return json_object(p, end);
  if (*p == '"') return json_string(p, end);
  if ((size_t)(end - p) >= 4 && memcmp(p, "null", 4) == 0) return p + 4;
  if ((size_t)(end - p) >= 4 && memcmp(p, "true", 4) == 0) return p + 4;
  if ((size_t)(end - p) >= 5 && memcmp(p, "false", 5) == 0) return p + 5;
  return json_number(p, end);
}

/* Non-zero if s[0..n) is exactly one JSON value (surrounding spaces allowed). */
static int json_valid(const char *s, size_t n) {
  const char *p = json_value(s, s + n);
  return p && json_ws(p, s + n) == s + n;
}

/* --- pc_jbuf_str ---------------------------------------------------------- */

static void expect_str(const char *in, size_t n, const char *want) {
  pc_jbuf_t b = {0};
  pc_jbuf_str(&b, in, n);
  CHECK_MEM_EQ(b.data, b.len, want);
  CHECK_MSG(b.data && b.data[b.len] == '\0', "jbuf not NUL-terminated after \"%s\"", want);
  CHECK_MSG(json_valid(b.data, b.len), "not valid JSON: %s", b.data ? b.data : "(null)");
  pc_jbuf_free(&b);
}

#define EXPECT_STR(lit, want) expect_str(lit, sizeof(lit) - 1, want)

static void test_str(void) {
  EXPECT_STR("", "\"\"");
  EXPECT_STR("plain text 123", "\"plain text 123\"");
  EXPECT_STR("spiffe://cluster.local/ns/web/sa/x", "\"spiffe://cluster.local/ns/web/sa/x\"");
  EXPECT_STR("a\"b", "\"a\\\"b\"");
  EXPECT_STR("\"", "\"\\\"\"");
  EXPECT_STR("a\\b", "\"a\\\\b\"");
  EXPECT_STR("\\", "\"\\\\\"");
  EXPECT_STR("\\\"", "\"\\\\\\\"\"");
  EXPECT_STR("\n", "\"\\u000a\"");
  EXPECT_STR("a\r\nb", "\"a\\u000d\\u000ab\"");
  EXPECT_STR("\t", "\"\\u0009\"");
  EXPECT_STR("\x01\x1f", "\"\\u0001\\u001f\"");
  EXPECT_STR("\x1b[31m", "\"\\u001b[31m\"");
  EXPECT_STR("\x7f", "\"\\u007f\"");
  EXPECT_STR("\x80", "\"\\u0080\"");
  EXPECT_STR("\xff", "\"\\u00ff\"");
  EXPECT_STR("caf\xc3\xa9", "\"caf\\u00c3\\u00a9\"");
  EXPECT_STR("\xe2\x80\xa8", "\"\\u00e2\\u0080\\u00a8\""); /* U+2028 */
  EXPECT_STR("\xc0\xaf", "\"\\u00c0\\u00af\"");            /* overlong '/' */
  EXPECT_STR("a\0b", "\"a\\u0000b\"");
  EXPECT_STR("\0", "\"\\u0000\"");
  EXPECT_STR("\0\0", "\"\\u0000\\u0000\"");
  EXPECT_STR(" ~/", "\" ~/\"");
  EXPECT_STR("}\",\"x\":\"", "\"}\\\",\\\"x\\\":\\\"\""); /* injection attempt */

  /* Only n bytes are read. */
  expect_str("abcdef", 3, "\"abc\"");
  expect_str("abc", 0, "\"\"");

  /* Every byte value, one by one, and all 256 in a row. */
  char all[256];
  for (int c = 0; c < 256; c++)
    all[c] = (char)c;
  for (int c = 0; c < 256; c++) {
    char want[16];
    if (c == '"' || c == '\\')
      snprintf(want, sizeof(want), "\"\\%c\"", c);
    else if (c < 0x20 || c >= 0x7f)
      snprintf(want, sizeof(want), "\"\\u00%02x\"", c);
    else
      snprintf(want, sizeof(want), "\"%c\"", c);
    expect_str(&all[c], 1, want);
  }
  pc_jbuf_t b = {0};
  pc_jbuf_str(&b, all, sizeof(all));
  CHECK(json_valid(b.data, b.len));
  CHECK(memchr(b.data, '\n', b.len) == NULL);
  /* 32 + 1 (DEL) + 128 high bytes as \u00XX, two escaped with '\', the rest as is. */
  CHECK_INT_EQ(b.len, 2 + 161 * 6 + 2 * 2 + (256 - 161 - 2));
  pc_jbuf_free(&b);

  /* Appending to a buffer that already holds data, and growth across the
   * initial capacity. */
  pc_jbuf_raw(&b, "[", 1);
  for (int i = 0; i < 100; i++) {
    if (i) pc_jbuf_raw(&b, ",", 1);
    pc_jbuf_str(&b, "\x01\"", 2);
  }
  pc_jbuf_raw(&b, "]", 1);
  CHECK_INT_EQ(b.len, 2 + 99 + 100 * 10);
  static const char head[] = "[\"\\u0001\\\"\",\"\\u0001\\\"\",";
  CHECK(b.data && strncmp(b.data, head, sizeof(head) - 1) == 0);
  pc_jbuf_free(&b);
  CHECK(b.data == NULL && b.len == 0 && b.cap == 0);
}

static void test_kv(void) {
  pc_jbuf_t b = {0};
  pc_jbuf_raw(&b, "{", 1);
  pc_jbuf_kv_str(&b, "a", "x");
  pc_jbuf_kv_str(&b, "b", NULL);
  pc_jbuf_kv_u64(&b, "n", 18446744073709551615ull);
  pc_jbuf_kv_str(&b, "k\"ey", "v\nal");
  pc_jbuf_kv_u64(&b, "z", 0);
  pc_jbuf_raw(&b, "}", 1);
  CHECK_MEM_EQ(b.data, b.len,
               "{\"a\":\"x\",\"b\":null,\"n\":18446744073709551615,\"k\\\"ey\":\"v\\u000aal\","
               "\"z\":0}");
  CHECK(json_valid(b.data, b.len));
  pc_jbuf_free(&b);

  pc_jbuf_printf(&b, "%s=%d", "x", 42);
  pc_jbuf_printf(&b, "%.0s", "ignored");
  CHECK_MEM_EQ(b.data, b.len, "x=42");
  pc_jbuf_free(&b);

  pc_jbuf_now(&b);
  /* "YYYY-MM-DDTHH:MM:SS.mmmZ" */
  CHECK_INT_EQ(b.len, 26);
  CHECK(b.len == 26 && b.data[0] == '"' && b.data[5] == '-' && b.data[11] == 'T' &&
        b.data[20] == '.' && b.data[24] == 'Z' && b.data[25] == '"');
  pc_jbuf_free(&b);
}

static void test_level_parse(void) {
  pc_log_level_t l = PC_LOG_ERROR;
  CHECK_INT_EQ(pc_log_level_parse("debug", &l), 0);
  CHECK_INT_EQ(l, PC_LOG_DEBUG);
  CHECK_INT_EQ(pc_log_level_parse("info", &l), 0);
  CHECK_INT_EQ(l, PC_LOG_INFO);
  CHECK_INT_EQ(pc_log_level_parse("warn", &l), 0);
  CHECK_INT_EQ(l, PC_LOG_WARN);
  CHECK_INT_EQ(pc_log_level_parse("error", &l), 0);
  CHECK_INT_EQ(l, PC_LOG_ERROR);
  CHECK_INT_EQ(pc_log_level_parse("INFO", &l), -1);
  CHECK_INT_EQ(pc_log_level_parse("warning", &l), -1);
  CHECK_INT_EQ(pc_log_level_parse("", &l), -1);
}

/* Runs fn with fd redirected into a temporary file; returns what was written
 * (caller frees) and its length. */
static char *capture(int fd, void (*fn)(void), size_t *len) {
  FILE *tmp = tmpfile();
  if (!tmp) return NULL;
  fflush(NULL);
  int saved = dup(fd);
  dup2(fileno(tmp), fd);
  fn();
  dup2(saved, fd);
  close(saved);
  off_t n = lseek(fileno(tmp), 0, SEEK_END);
  if (n < 0) n = 0;
  char *buf = calloc(1, (size_t)n + 1);
  *len = pread(fileno(tmp), buf, (size_t)n, 0) == (ssize_t)n ? (size_t)n : 0;
  fclose(tmp);
  return buf;
}

static void log_access_hostile(void) {
  pc_access_rec_t rec = {
      .listener = "api",
      .direction = "inbound",
      .peer = "10.0.0.1:5555",
      .app = "127.0.0.1:8080",
      .peer_id = "spiffe://x/\"},\n{\"evil\":1",
      .decision = "deny",
      .reason = PC_REASON_NOT_ALLOWED,
      .close = "handshake",
      .tls_version = NULL,
      .cipher = NULL,
      .bytes_from_peer = 1,
      .bytes_to_peer = 2,
      .duration_ms = 1.5,
  };
  pc_log_init(PC_LOG_INFO, 1);
  pc_log_access(&rec);
  pc_log_init(PC_LOG_INFO, 0);
  pc_log_access(&rec); /* access off: nothing */
  pc_log_init(PC_LOG_INFO, 1);
}

static void log_events(void) {
  pc_log_init(PC_LOG_WARN, 1);
  pc_log(PC_LOG_INFO, "filtered %d", 1);
  pc_log(PC_LOG_WARN, "kept \"%s\"\n%c", "q", 1);
  pc_log(PC_LOG_ERROR, "%s", "");
  pc_log_init(PC_LOG_INFO, 1);
}

static void test_lines(void) {
  size_t n = 0;
  char *out = capture(STDOUT_FILENO, log_access_hostile, &n);
  CHECK(out != NULL);
  if (out) {
    CHECK_INT_EQ(n > 0 ? out[n - 1] : 0, '\n');
    char *nl = memchr(out, '\n', n);
    CHECK_MSG(nl == out + n - 1, "access log: expected exactly one line, got \"%s\"", out);
    CHECK_MSG(json_valid(out, n), "access log line is not JSON: %s", out);
    CHECK_STR_CONTAINS(out, "\"peer_id\":\"spiffe://x/\\\"},\\u000a{\\\"evil\\\":1\"");
    CHECK_STR_CONTAINS(out, "\"reason\":\"not_allowed\"");
    CHECK_STR_CONTAINS(out, "\"decision\":\"deny\"");
    CHECK_STR_CONTAINS(out, "\"tls_version\":null");
    CHECK_STR_CONTAINS(out, "\"bytes_from_peer\":1,\"bytes_to_peer\":2,\"duration_ms\":1.500");
    CHECK(strncmp(out, "{\"time\":\"", 9) == 0);
  }
  free(out);

  out = capture(STDERR_FILENO, log_events, &n);
  CHECK(out != NULL);
  if (out) {
    char *first = out, *second = memchr(out, '\n', n);
    CHECK_MSG(second != NULL, "expected two event lines, got \"%s\"", out);
    if (second) {
      *second++ = '\0';
      char *third = strchr(second, '\n');
      CHECK(third && third[1] == '\0');
      if (third) *third = '\0';
      CHECK_MSG(json_valid(first, strlen(first)), "event line is not JSON: %s", first);
      CHECK_MSG(json_valid(second, strlen(second)), "event line is not JSON: %s", second);
      CHECK_STR_CONTAINS(first, "\"level\":\"warn\",\"msg\":\"kept \\\"q\\\"\\u000a\\u0001\"}");
      CHECK_STR_CONTAINS(second, "\"level\":\"error\",\"msg\":\"\"}");
    }
    CHECK(strstr(out, "filtered") == NULL);
  }
  free(out);
}

/* --- the writer thread ------------------------------------------------------ */

typedef struct {
  int fd;
  char *data;
  size_t len, cap;
} sink_t;

static void *drain_pipe(void *arg) {
  sink_t *k = arg;
  char buf[65536];
  ssize_t n;
  while ((n = read(k->fd, buf, sizeof(buf))) > 0) {
    if (k->len + (size_t)n > k->cap) {
      k->cap = (k->len + (size_t)n) * 2;
      k->data = realloc(k->data, k->cap);
    }
    memcpy(k->data + k->len, buf, (size_t)n);
    k->len += (size_t)n;
  }
  return NULL;
}

/* stdout is a pipe nobody reads: the writer blocks on it, yet logging
 * returns at once; past the queue limit lines are dropped and counted; once
 * the pipe is read, every line not dropped arrives whole and in order. */
static void test_writer_stalled_stdout(void) {
  enum { LINES = 80000 }; /* about 24 MB of lines: more than the 16 MiB queue */
  int p[2];
  CHECK(pipe(p) == 0);
  fflush(NULL);
  int saved = dup(STDOUT_FILENO);
  dup2(p[1], STDOUT_FILENO);
  close(p[1]);
  pc_log_init(PC_LOG_INFO, 1);
  pc_log_start_writer();
  pc_access_rec_t rec = {.listener = "api",
                         .direction = "inbound",
                         .peer = "10.0.0.1:5555",
                         .app = "127.0.0.1:8080",
                         .peer_id = "spiffe://td/ns/web/sa/frontend",
                         .decision = "allow",
                         .close = "eof",
                         .tls_version = "TLSv1.3",
                         .cipher = "TLS_AES_128_GCM_SHA256",
                         .duration_ms = 1.0};
  for (uint64_t i = 0; i < LINES; i++) {
    rec.bytes_from_peer = i;
    pc_log_access(&rec);
  }
  uint64_t dropped = pc_log_dropped();
  CHECK_MSG(dropped > 0, "no line dropped with %d lines queued behind a stalled pipe", LINES);
  CHECK_MSG(dropped < LINES, "every line dropped");
  sink_t k = {.fd = p[0]};
  pthread_t reader;
  CHECK(pthread_create(&reader, NULL, drain_pipe, &k) == 0);
  pc_log_stop_writer();
  dup2(saved, STDOUT_FILENO); /* the pipe's last write end closes: the reader sees EOF */
  close(saved);
  pthread_join(reader, NULL);
  close(p[0]);
  size_t lines = 0;
  int64_t last = -1;
  int ordered = 1, valid = 1;
  for (size_t off = 0; off < k.len;) {
    char *nl = memchr(k.data + off, '\n', k.len - off);
    if (!nl) {
      valid = 0;
      break;
    }
    size_t n = (size_t)(nl - (k.data + off));
    if (!json_valid(k.data + off, n)) valid = 0;
    const char *f = memmem(k.data + off, n, "\"bytes_from_peer\":", 18);
    int64_t v = f ? strtoll(f + 18, NULL, 10) : -1;
    if (v <= last) ordered = 0;
    last = v;
    lines++;
    off += n + 1;
  }
  CHECK_MSG(valid, "a line written by the writer is cut or not JSON");
  CHECK_MSG(ordered, "lines arrived out of order");
  CHECK_INT_EQ(lines + dropped, LINES);
  free(k.data);
  /* After the writer stopped, lines are written directly again. */
  size_t n = 0;
  char *out = capture(STDOUT_FILENO, log_access_hostile, &n);
  CHECK(out != NULL && n > 0 && out[n - 1] == '\n');
  free(out);
}

/* The per-thread buffer cache behind pc_jbuf_release and pc_h1_trim: bounded
 * in count and in buffer size, most recently given back first. */
static void test_bufcache(void) {
  pc_bufcache_drain();
  CHECK_INT_EQ(pc_bufcache_cached(), 0);
  size_t cap = 0;
  void *a = pc_bufcache_get(100, &cap);
  CHECK_INT_EQ(cap, PC_BUFCACHE_SIZE);
  memset(a, 'a', cap); /* all of it is ours (ASan checks) */
  pc_bufcache_put(a, cap);
  CHECK_INT_EQ(pc_bufcache_cached(), 1);
  CHECK(pc_bufcache_get(PC_BUFCACHE_SIZE, &cap) == a);
  CHECK_INT_EQ(pc_bufcache_cached(), 0);
  /* A request larger than a cached buffer gets its own, and a buffer of any
   * other size is freed when given back. */
  void *big = pc_bufcache_get(PC_BUFCACHE_SIZE + 1, &cap);
  CHECK_INT_EQ(cap, PC_BUFCACHE_SIZE + 1);
  pc_bufcache_put(big, cap);
  CHECK_INT_EQ(pc_bufcache_cached(), 0);
  pc_bufcache_put(a, PC_BUFCACHE_SIZE);
  pc_bufcache_put(NULL, PC_BUFCACHE_SIZE);
  CHECK_INT_EQ(pc_bufcache_cached(), 1);
  /* Never more than PC_BUFCACHE_MAX, whatever is given back. */
  for (int i = 0; i < PC_BUFCACHE_MAX + 5; i++)
    pc_bufcache_put(malloc(PC_BUFCACHE_SIZE), PC_BUFCACHE_SIZE);
  CHECK_INT_EQ(pc_bufcache_cached(), PC_BUFCACHE_MAX);
  pc_bufcache_drain();
  CHECK_INT_EQ(pc_bufcache_cached(), 0);

  /* A jbuf takes its first buffer from the cache and can give it back; one
   * that grew past the cached size is freed instead. */
  pc_jbuf_t b = {0};
  pc_jbuf_raw(&b, "x", 1);
  CHECK_INT_EQ(b.cap, PC_BUFCACHE_SIZE);
  void *first = b.data;
  pc_jbuf_release(&b);
  CHECK(b.data == NULL && b.len == 0 && b.cap == 0);
  CHECK_INT_EQ(pc_bufcache_cached(), 1);
  pc_jbuf_raw(&b, "y", 1);
  CHECK(b.data == first);
  CHECK_INT_EQ(pc_bufcache_cached(), 0);
  char chunk[PC_BUFCACHE_SIZE];
  memset(chunk, 'z', sizeof(chunk));
  pc_jbuf_raw(&b, chunk, sizeof(chunk));
  CHECK(b.cap > PC_BUFCACHE_SIZE);
  CHECK_INT_EQ(b.len, PC_BUFCACHE_SIZE + 1);
  CHECK(b.data[0] == 'y' && b.data[b.len - 1] == 'z' && b.data[b.len] == '\0');
  pc_jbuf_release(&b);
  CHECK_INT_EQ(pc_bufcache_cached(), 0);
  pc_jbuf_release(&b); /* empty: nothing to give back */
  CHECK_INT_EQ(pc_bufcache_cached(), 0);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  /* The validator itself must be able to say no. */
  CHECK(json_valid("\"a\"", 3));
  CHECK(!json_valid("\"a\nb\"", 5));
  CHECK(!json_valid("\"a\\x\"", 5));
  CHECK(!json_valid("\"a\"\"", 4));
  CHECK(!json_valid("{\"a\":}", 6));

  test_str();
  test_kv();
  test_level_parse();
  test_lines();
  test_writer_stalled_stdout();
  test_bufcache();
  pc_bufcache_drain();
  return CHECK_DONE("test_log");
}

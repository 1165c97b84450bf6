/*
 * test_adminreq.c - the admin endpoint's request reader (adminreq.h): the
 * method and path of a whole request however its bytes are split, and 400,
 * 414 and 431 exactly at the limits.
 */
#include <stdlib.h>
#include <string.h>

#include "adminreq.h"
#include "check.h"

/* Feeds s (n bytes) in pieces of at most piece bytes (0: one piece) to a
 * fresh reader; returns the status after the last piece, and checks that
 * the reader said 0 until then. */
static int feed(pc_adminreq_t *r, const char *s, size_t n, size_t piece) {
  pc_adminreq_init(r);
  size_t pos = 0;
  int st = 0;
  do {
    size_t k = piece && piece < n - pos ? piece : n - pos;
    CHECK_INT_EQ(st, 0);
    st = pc_adminreq_feed(r, s + pos, k);
    pos += k;
  } while (pos < n && st == 0);
  CHECK_MSG(pos == n, "status %d after %zu of %zu bytes", st, pos, n);
  return st;
}

static int feed_str(pc_adminreq_t *r, const char *s, size_t piece) {
  return feed(r, s, strlen(s), piece);
}

static void test_whole_requests(void) {
  static const size_t pieces[] = {0, 1, 2, 7};
  for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++) {
    pc_adminreq_t r;
    CHECK_INT_EQ(feed_str(&r, "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", pieces[i]), 200);
    CHECK_INT_EQ(pc_adminreq_method(&r), HTTP_GET);
    CHECK_STR_EQ(pc_adminreq_path(&r), "/healthz");

    CHECK_INT_EQ(feed_str(&r, "HEAD /metrics?name[]=a&b=%3F HTTP/1.0\r\n\r\n", pieces[i]), 200);
    CHECK_INT_EQ(pc_adminreq_method(&r), HTTP_HEAD);
    CHECK_STR_EQ(pc_adminreq_path(&r), "/metrics");

    /* A body is read to its end before the request counts as whole. */
    CHECK_INT_EQ(feed_str(&r, "POST /ready HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", pieces[i]),
                 200);
    CHECK_INT_EQ(pc_adminreq_method(&r), HTTP_POST);
    CHECK_STR_EQ(pc_adminreq_path(&r), "/ready");
  }

  /* Not whole yet: the head or the body is still missing. */
  pc_adminreq_t r;
  CHECK_INT_EQ(feed_str(&r, "GET / HTTP/1.1\r\nHost: a\r\n", 0), 0);
  CHECK_INT_EQ(feed_str(&r, "POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabc", 0), 0);

  /* Bytes after the request are never read, and the status stays. */
  CHECK_INT_EQ(feed_str(&r, "GET /certs HTTP/1.1\r\n\r\nGARBAGE\r\n\r\n", 0), 200);
  CHECK_INT_EQ(pc_adminreq_feed(&r, "\0\0\0", 3), 200);
  CHECK_STR_EQ(pc_adminreq_path(&r), "/certs");
}

/* A literal and its length, NULs included. */
#define LIT(s)                                                                                     \
  { s, sizeof(s) - 1 }

static void test_malformed(void) {
  static const struct {
    const char *s;
    size_t n;
  } bad[] = {
      LIT("GARBAGE\r\n\r\n"),
      LIT("GET / HTTP/1.1\r\nA\r\n\r\n"), /* a field without a colon */
      LIT("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
      LIT("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
      LIT("GET / HTTP/1.1\nHost: a\n\n"), /* bare LF */
      LIT("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
      LIT("GET /\0 HTTP/1.1\r\n\r\n"),
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    pc_adminreq_t r;
    CHECK_INT_EQ(feed(&r, bad[i].s, bad[i].n, 0), 400);
    CHECK_INT_EQ(pc_adminreq_feed(&r, "GET / HTTP/1.1\r\n\r\n", 18), 400);
  }
}

/* "GET " + a target of n bytes + " HTTP/1.1\r\n\r\n", malloc'd. */
static char *with_target(size_t n, size_t *len) {
  *len = 4 + n + 13;
  char *s = malloc(*len + 1);
  if (!s) abort();
  memcpy(s, "GET /", 5);
  memset(s + 5, 'a', n - 1);
  memcpy(s + 4 + n, " HTTP/1.1\r\n\r\n", 14);
  return s;
}

static void test_limits(void) {
  pc_adminreq_t r;
  size_t len;
  /* The target and its NUL fit in PC_ADMINREQ_MAX_URL bytes, or 414. */
  char *s = with_target(PC_ADMINREQ_MAX_URL - 1, &len);
  CHECK_INT_EQ(feed(&r, s, len, 0), 200);
  CHECK_INT_EQ(strlen(pc_adminreq_path(&r)), PC_ADMINREQ_MAX_URL - 1);
  free(s);
  s = with_target(PC_ADMINREQ_MAX_URL, &len);
  CHECK_INT_EQ(feed(&r, s, len, 0), 414);
  CHECK_INT_EQ(feed(&r, s, len, 100), 414);
  free(s);

  /* A head of exactly PC_ADMINREQ_MAX_HEAD bytes passes; one byte more is
   * 431, however it arrives. */
  char head[PC_ADMINREQ_MAX_HEAD + 1];
  const char *start = "GET / HTTP/1.1\r\nX: ";
  size_t sl = strlen(start);
  for (size_t extra = 0; extra <= 1; extra++) {
    size_t total = PC_ADMINREQ_MAX_HEAD + extra;
    memcpy(head, start, sl);
    memset(head + sl, 'v', total - sl - 4);
    memcpy(head + total - 4, "\r\n\r\n", 4);
    CHECK_INT_EQ(feed(&r, head, total, 0), extra ? 431 : 200);
    CHECK_INT_EQ(feed(&r, head, total, 4096), extra ? 431 : 200);
  }
  /* The limit is on the head: a body may take the total past it. */
  pc_adminreq_init(&r);
  const char *post = "POST / HTTP/1.1\r\nContent-Length: 9000\r\n\r\n";
  CHECK_INT_EQ(pc_adminreq_feed(&r, post, strlen(post)), 0);
  char body[9000];
  memset(body, 'b', sizeof(body));
  CHECK_INT_EQ(pc_adminreq_feed(&r, body, sizeof(body)), 200);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  test_whole_requests();
  test_malformed();
  test_limits();
  return CHECK_DONE("test_adminreq");
}

/*
 * test_h1.c - the strict HTTP/1.1 parser and head rewriting (h1.h).
 *
 * Every case runs three ways: the whole input in one feed, one byte per feed,
 * and seven bytes per feed; the verdict, the status, the bytes that belong to
 * the message and the decoded body must not depend on how the bytes arrive.
 * Rejections carry the status the sidecar answers with: 400 or 431 for a
 * request, 502 for a response.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bufcache.h"
#include "check.h"
#include "h1.h"
#include "log.h"

#define S(lit) lit, sizeof(lit) - 1

static const pc_h1_limits_t lim_default = {8192, 65536, 100};

/* A parser plus what came out of it. */
typedef struct {
  pc_h1_parser_t p;
  pc_jbuf_t body;
  int result;   /* the last verdict */
  int heads;    /* PC_H1_HEAD seen */
  size_t used;  /* bytes that belong to the message */
  int finished; /* pc_h1_finish gave the verdict */
} h1_t;

static void on_body_cb(void *user, const char *data, size_t len) { pc_jbuf_raw(user, data, len); }

static void h1_open(h1_t *h, int is_request, const pc_h1_limits_t *lim, uint8_t req_method) {
  memset(h, 0, sizeof(*h));
  pc_h1_init(&h->p, is_request, lim, on_body_cb, &h->body);
  h->p.req_method = req_method;
}

static void h1_close(h1_t *h) {
  pc_h1_free(&h->p);
  pc_jbuf_free(&h->body);
}

/* Feeds s[0..n) in pieces of step bytes (0: all at once) until the message
 * ends, is refused, or the input runs out; then, if eof, the peer "closes". */
static int h1_run(h1_t *h, const char *s, size_t n, size_t step, int eof) {
  size_t pos = 0;
  int r = PC_H1_MORE;
  for (int guard = 0; guard < 100000; guard++) {
    size_t k = step && step < n - pos ? step : n - pos;
    size_t used = (size_t)-1;
    r = pc_h1_feed(&h->p, s + pos, k, &used);
    CHECK_MSG(used <= k, "pc_h1_feed used %zu of %zu bytes", used, k);
    if (used > k) break;
    pos += used;
    if (r == PC_H1_HEAD) {
      h->heads++;
      CHECK_MSG(h->heads == 1, "PC_H1_HEAD returned %d times for one message", h->heads);
      continue;
    }
    if (r == PC_H1_DONE || r == PC_H1_ERROR) break;
    CHECK_MSG(r == PC_H1_MORE, "pc_h1_feed returned %d", r);
    CHECK_MSG(used == k, "PC_H1_MORE after using %zu of %zu bytes", used, k);
    if (pos >= n) {
      if (eof) {
        r = pc_h1_finish(&h->p);
        h->finished = 1;
      }
      break;
    }
  }
  h->result = r;
  h->used = pos;
  return r;
}

static const char *result_name(int r) {
  switch (r) {
  case PC_H1_MORE: return "MORE";
  case PC_H1_HEAD: return "HEAD";
  case PC_H1_DONE: return "DONE";
  case PC_H1_ERROR: return "ERROR";
  default: return "?";
  }
}

/* ---- table-driven requests and responses --------------------------------- */

typedef struct {
  const char *in;
  size_t len;
  int result;       /* PC_H1_DONE, PC_H1_ERROR or PC_H1_MORE */
  int status;       /* PC_H1_ERROR: the status */
  long used;        /* PC_H1_DONE: bytes of the first message; -1: all */
  const char *body; /* PC_H1_DONE: the decoded body */
  size_t body_len;
  uint8_t req_method; /* responses: the request's method */
  int eof;            /* the peer closes after the input */
} msg_case_t;

#define OK(lit, bodylit)                                                                           \
  { S(lit), PC_H1_DONE, 0, -1, S(bodylit), HTTP_GET, 0 }
#define OK_USED(lit, used, bodylit)                                                                \
  { S(lit), PC_H1_DONE, 0, used, S(bodylit), HTTP_GET, 0 }
#define BAD(lit, st)                                                                               \
  { S(lit), PC_H1_ERROR, st, 0, NULL, 0, HTTP_GET, 0 }
#define BAD_EOF(lit, st)                                                                           \
  { S(lit), PC_H1_ERROR, st, 0, NULL, 0, HTTP_GET, 1 }
#define R_OK(m, lit, bodylit)                                                                      \
  { S(lit), PC_H1_DONE, 0, -1, S(bodylit), m, 0 }
#define R_OK_USED(m, lit, used, bodylit)                                                           \
  { S(lit), PC_H1_DONE, 0, used, S(bodylit), m, 0 }
#define R_EOF(m, lit, result, st, bodylit)                                                         \
  { S(lit), result, st, -1, S(bodylit), m, 1 }
#define R_BAD(lit)                                                                                 \
  { S(lit), PC_H1_ERROR, 502, 0, NULL, 0, HTTP_GET, 0 }

#define GET_A "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
#define HOST "Host: a\r\n"
/* 4,100 bytes: past the 4 KiB a chunk extension may take */
#define EXT100                                                                                     \
  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" \
  "aaaaaa"
#define LONG_EXT                                                                                   \
  EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100       \
      EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100   \
          EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100 EXT100      \
              EXT100 EXT100 EXT100 EXT100

static const msg_case_t request_cases[] = {
    /* Valid. */
    OK(GET_A, ""),
    OK("GET /x/y?z=1&w=%20 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n", ""),
    OK("POST /u HTTP/1.1\r\n" HOST "Content-Length: 11\r\n\r\nhello world", "hello world"),
    OK("POST /u HTTP/1.1\r\n" HOST "Content-Length: 7\r\n\r\n\0\r\n\xff\n\r\0", "\0\r\n\xff\n\r\0"),
    OK("POST /u HTTP/1.1\r\n" HOST "Content-Length: 0\r\n\r\n", ""),
    OK("POST /u HTTP/1.1\r\n" HOST "Content-Length: 007\r\n\r\n1234567", "1234567"),
    OK("POST /u HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n"
       "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
       "hello world"),
    OK("POST /u HTTP/1.1\r\n" HOST "transfer-encoding: Chunked\r\n\r\n"
       "A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n",
       "0123456789abcdefghij"),
    /* Chunk extensions, with and without values. */
    OK("POST /u HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n"
       "5;name=value\r\nhello\r\n1;a;b=\"q\"\r\n!\r\n0;last\r\n\r\n",
       "hello!"),
    /* A trailer section. */
    OK("POST /u HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n"
       "3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n",
       "abc"),
    /* Empty lines before the request line are tolerated (RFC 9112 2.2). */
    OK("\r\n" GET_A, ""),
    OK("\r\n\r\n\r\n" GET_A, ""),
    OK("GET / HTTP/1.0\r\n\r\n", ""),
    OK("GET / HTTP/1.0\r\nUser-Agent: x\r\n\r\n", ""),
    OK("OPTIONS * HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", ""),
    OK("CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n", ""),
    /* Dots that are not dot-segments. */
    OK("GET /a/...b HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /.well-known/x HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /a/b;v=1/..c HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /a%20b/%2e%2ex HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /a/..b/c. HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /a/... HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /a/%2e%2e%2e/b HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET /a/.x/b HTTP/1.1\r\n" HOST "\r\n", ""),
    /* Dot-segments in the query are not in the path. */
    OK("GET /a?x=/../b HTTP/1.1\r\n" HOST "\r\n", ""),
    OK("GET / HTTP/1.1\r\n" HOST "X-Empty:\r\nX-Tab: a\tb\r\n\r\n", ""),

    /* Pipelined: the first message ends where the second starts. */
    OK_USED(GET_A "GET /b HTTP/1.1\r\nHost: b\r\n\r\n", sizeof(GET_A) - 1, ""),
    OK_USED("POST /u HTTP/1.1\r\n" HOST "Content-Length: 3\r\n\r\nabc" GET_A,
            sizeof("POST /u HTTP/1.1\r\n" HOST "Content-Length: 3\r\n\r\nabc") - 1, "abc"),
    OK_USED("POST /u HTTP/1.1\r\n" HOST
            "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" GET_A,
            sizeof("POST /u HTTP/1.1\r\n" HOST
                   "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n") -
                1,
            "abc"),
    /* After CONNECT or an upgrade the rest is not HTTP. */
    OK_USED("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01\0",
            sizeof("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n") - 1, ""),
    OK_USED(
        "GET /ws HTTP/1.1\r\n" HOST "Upgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05",
        sizeof("GET /ws HTTP/1.1\r\n" HOST "Upgrade: websocket\r\nConnection: upgrade\r\n\r\n") - 1,
        ""),
    /* h2c is never switched to: the message ends after the head all the same. */
    OK_USED("GET / HTTP/1.1\r\n" HOST "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" GET_A,
            sizeof("GET / HTTP/1.1\r\n" HOST
                   "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n") -
                1,
            ""),
    /* An unfinished request is not an error until the peer closes. */
    {S("GET / HTTP/1.1\r\nHost: a\r\n"), PC_H1_MORE, 0, -1, S(""), HTTP_GET, 0},
    {S("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab"), PC_H1_MORE, 0, -1, S("ab"),
     HTTP_GET, 0},
    BAD_EOF("GET / HTTP/1.1\r\nHost: a\r\n", 400),
    BAD_EOF("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab", 400),
    BAD_EOF("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 400),
    {S(""), PC_H1_MORE, 0, -1, S(""), HTTP_GET, 1},

    /* Framing: Content-Length and Transfer-Encoding. */
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        "0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 5\r\ncontent-length: 5\r\n\r\nhello", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 5, 5\r\n\r\nhello", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: abc\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: -1\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: +5\r\n\r\nhello", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 0x5\r\n\r\nhello", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 5 5\r\n\r\nhello", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length:\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Content-Length: 99999999999999999999\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: gzip\r\n\r\nabc", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 5\r\n\r\nhello", 400),
    /* obs-fold and lines that start with whitespace. */
    BAD("GET / HTTP/1.1\r\n" HOST "X-A: a\r\n b\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\n" HOST "X-A: a\r\n\tb\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\n\tHost: a\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\n \r\n" HOST "\r\n", 400),
    /* Host. */
    BAD("GET / HTTP/1.1\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nX-Host: a\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    BAD("GET / HTTP/1.0\r\nHost: a\r\nHOST: b\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert : x\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n1;" LONG_EXT
        "\r\nx\r\n0\r\n\r\n",
        400),
    BAD("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400),
    /* Chunked framing. */
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n"
        "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX0\r\n\r\n", 400),
    /* llhttp 8.1 alone skips "XX" up to the line end */
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST
        "Transfer-Encoding: chunked\r\n\r\n5;a\x01\r\nhello\r\n0\r\n\r\n",
        400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
    BAD("POST / HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400),
    /* Line endings and NUL in the head. */
    BAD("GET / HTTP/1.1\nHost: a\n\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    BAD("GET / HTTP/1.1\r\nX-A: a\nb\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\nX-A: a\rb\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/1.1\r\n" HOST "\r\r\n", 400),
    BAD("\n" GET_A, 400),
    BAD("GET /\0 HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/1.1\r\n" HOST "X-A: a\0b\r\n\r\n", 400),
    BAD("\0" GET_A, 400),
    /* Versions and HTTP/2. */
    BAD("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    BAD("GET / HTTP/2.0\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/1.2\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/3.0\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/0.9\r\n" HOST "\r\n", 400),
    BAD("GET /\r\n\r\n", 400),
    /* Request-target forms. */
    BAD("GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    BAD("GET x/y HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET * HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("CONNECT /x HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
    /* authority-form only: no fragment, query, bytes outside uri-host or
     * non-numeric port (found by fuzz_h1). */
    BAD("CONNECT a.com#x:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("CONNECT a.com?x:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("CONNECT a\xd5.com:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("CONNECT a.com:44x HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("CONNECT a.com: HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("CONNECT :443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("CONNECT a.com:443444 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 400),
    BAD("GET /a/../b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /./a HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/%2e%2e/b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/.%2E/b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/%2E/b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/%2e%2E HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /.. HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/. HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/..?x=1 HTTP/1.1\r\n" HOST "\r\n", 400),
    /* what an app that decodes or strips ";params" first would resolve */
    BAD("GET /a/%2e%2e%2fb HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/..%2Fb HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/..;/b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/.;x=1/b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a%5c..%5cb HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a%5Cb HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a/..//b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a#b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("GET /a?x#b HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD(" GET / HTTP/1.1\r\n" HOST "\r\n", 400),
    BAD("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400),
    /* Other field syntax. */
    BAD("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\n" HOST ": x\r\n\r\n", 400),
    BAD("GET / HTTP/1.1\r\n:\r\n" HOST "\r\n", 400),
    BAD("GET / HTTP/1.1\r\n" HOST "Upgrade: websocket\r\nUpgrade: websocket\r\n"
        "Connection: upgrade\r\n\r\n",
        400),
};

static const msg_case_t response_cases[] = {
    R_OK(HTTP_GET, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "hello"),
    R_OK(HTTP_POST, "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", ""),
    R_OK(HTTP_GET, "HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nhi", "hi"),
    R_OK(HTTP_GET,
         "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;x=y\r\npedia\r\n"
         "0\r\n\r\n",
         "Wikipedia"),
    /* Delimited by the connection's end. */
    R_EOF(HTTP_GET, "HTTP/1.1 200 OK\r\n\r\nuntil the end", PC_H1_DONE, 0, "until the end"),
    R_EOF(HTTP_GET, "HTTP/1.0 200 OK\r\nServer: x\r\n\r\nold", PC_H1_DONE, 0, "old"),
    R_EOF(HTTP_GET, "HTTP/1.1 200 OK\r\n\r\n", PC_H1_DONE, 0, ""),
    {S("HTTP/1.1 200 OK\r\n\r\nmore to come"), PC_H1_MORE, 0, -1, S("more to come"), HTTP_GET, 0},
    /* Cut short. */
    R_EOF(HTTP_GET, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", PC_H1_ERROR, 502,
          "hello"),
    R_EOF(HTTP_GET, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", PC_H1_ERROR,
          502, "hel"),
    R_EOF(HTTP_GET, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n", PC_H1_ERROR, 502, ""),
    R_EOF(HTTP_GET, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", PC_H1_ERROR, 502, ""),
    R_EOF(HTTP_GET, "", PC_H1_MORE, 0, ""),
    /* No body whatever the head says. */
    R_OK_USED(HTTP_HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
              sizeof("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n") - 1, ""),
    R_OK_USED(HTTP_HEAD, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
              sizeof("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") - 1, ""),
    R_OK_USED(HTTP_HEAD, "HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
              sizeof("HTTP/1.1 200 OK\r\n\r\n") - 1, ""),
    R_OK(HTTP_GET, "HTTP/1.1 204 No Content\r\n\r\n", ""),
    R_OK_USED(HTTP_GET, "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
              sizeof("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n") - 1, ""),
    R_OK(HTTP_GET, "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", ""),
    R_OK_USED(HTTP_GET, "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\nHTTP/1.1 200",
              sizeof("HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n") - 1, ""),
    R_OK_USED(HTTP_GET,
              "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
              sizeof("HTTP/1.1 100 Continue\r\n\r\n") - 1, ""),
    R_OK(HTTP_GET, "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", ""),
    R_OK_USED(HTTP_GET, "HTTP/1.1 102 Processing\r\nContent-Length: 3\r\n\r\nabc",
              sizeof("HTTP/1.1 102 Processing\r\nContent-Length: 3\r\n\r\n") - 1, ""),
    R_OK_USED(HTTP_GET, "HTTP/1.1 150 Other\r\nContent-Length: 3\r\n\r\nabc",
              sizeof("HTTP/1.1 150 Other\r\nContent-Length: 3\r\n\r\n") - 1, ""),
    R_OK_USED(
        HTTP_GET,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        "\x81\x05hello",
        sizeof("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               "Connection: upgrade\r\n\r\n") -
            1,
        ""),
    /* A 2xx to CONNECT starts the tunnel; any other answer is an ordinary message. */
    R_OK_USED(HTTP_CONNECT, "HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01",
              sizeof("HTTP/1.1 200 Connection established\r\n\r\n") - 1, ""),
    R_OK_USED(HTTP_CONNECT, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
              sizeof("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n") - 1, ""),
    R_OK(HTTP_CONNECT, "HTTP/1.1 407 Proxy Auth\r\nContent-Length: 4\r\n\r\ndeny", "deny"),
    /* Two responses in one read: the second is the caller's to judge. */
    R_OK_USED(HTTP_GET,
              "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Length: "
              "2\r\n\r\nho",
              sizeof("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi") - 1, "hi"),
    R_OK_USED(HTTP_GET,
              "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
              "HTTP/1.1 200 OK\r\n\r\n",
              sizeof("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n") -
                  1,
              "hi"),
    /* Malformed: always 502. */
    R_BAD("HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("FOO/1.1 200 OK\r\n\r\n"),
    R_BAD("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    R_BAD("HTTP/1.1 200 OK\r\nContent-Length: 0\r\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\n Content-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"),
    R_BAD("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"),
    R_BAD("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX\r\n0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiX0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\nX-A: \0\r\nContent-Length: 0\r\n\r\n"),
    R_BAD("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    R_BAD("HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 0\r\n\r\n"),
};

static void describe(char *out, size_t n, const char *in, size_t len) {
  size_t o = 0;
  for (size_t i = 0; i < len && o + 5 < n; i++) {
    unsigned char c = (unsigned char)in[i];
    if (c >= 0x20 && c < 0x7f && c != '\\')
      out[o++] = (char)c;
    else
      o += (size_t)snprintf(out + o, n - o, "\\x%02x", c);
  }
  out[o < n ? o : n - 1] = '\0';
}

static void run_case(int is_request, size_t idx, const msg_case_t *c, size_t step) {
  char what[200];
  describe(what, sizeof(what), c->in, c->len);
  h1_t h;
  h1_open(&h, is_request, &lim_default, c->req_method);
  int r = h1_run(&h, c->in, c->len, step, c->eof);
  CHECK_MSG(r == c->result, "%s case %zu step %zu \"%s\": %s, expected %s (status %d, %s)",
            is_request ? "request" : "response", idx, step, what, result_name(r),
            result_name(c->result), h.p.status, h.p.detail ? h.p.detail : "-");
  if (r == c->result && r == PC_H1_ERROR) {
    CHECK_MSG(h.p.status == c->status, "%s case %zu step %zu \"%s\": status %d, expected %d",
              is_request ? "request" : "response", idx, step, what, h.p.status, c->status);
    CHECK_MSG(h.p.detail && *h.p.detail, "case %zu: no detail", idx);
    /* Refused stays refused. */
    size_t used;
    CHECK_INT_EQ(pc_h1_feed(&h.p, "x", 1, &used), PC_H1_ERROR);
  }
  if (r == c->result && r == PC_H1_DONE) {
    size_t want = c->used < 0 ? c->len : (size_t)c->used;
    CHECK_MSG(h.used == want, "%s case %zu step %zu \"%s\": used %zu, expected %zu",
              is_request ? "request" : "response", idx, step, what, h.used, want);
    CHECK_MSG(h.heads == 1, "case %zu step %zu: %d heads", idx, step, h.heads);
    CHECK(pc_h1_complete(&h.p));
    size_t used = 99;
    CHECK_INT_EQ(pc_h1_feed(&h.p, "x", 1, &used), PC_H1_DONE);
    CHECK_INT_EQ(used, 0);
  }
  if (r == c->result && c->body && r != PC_H1_ERROR) {
    int same = h.body.len == c->body_len &&
               (!c->body_len || memcmp(h.body.data, c->body, c->body_len) == 0);
    CHECK_MSG(same, "%s case %zu step %zu \"%s\": body of %zu bytes, expected %zu",
              is_request ? "request" : "response", idx, step, what, h.body.len, c->body_len);
    CHECK_INT_EQ(h.p.body_bytes, h.body.len);
  }
  h1_close(&h);
}

static void test_tables(void) {
  static const size_t steps[] = {0, 1, 7};
  for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]); s++) {
    for (size_t i = 0; i < sizeof(request_cases) / sizeof(request_cases[0]); i++)
      run_case(1, i, &request_cases[i], steps[s]);
    for (size_t i = 0; i < sizeof(response_cases) / sizeof(response_cases[0]); i++)
      run_case(0, i, &response_cases[i], steps[s]);
  }
}

/* ---- what the head says --------------------------------------------------- */

/* Parses one request head (all at once); returns the parser after PC_H1_HEAD. */
static int parse_head(h1_t *h, int is_request, const char *s, size_t n, uint8_t req_method) {
  h1_open(h, is_request, &lim_default, req_method);
  size_t used = 0;
  int r = pc_h1_feed(&h->p, s, n, &used);
  h->result = r;
  h->used = used;
  return r;
}

static void expect_field(const pc_h1_msg_t *m, const char *name, const char *value) {
  const pc_h1_field_t *f = pc_h1_find(m, name);
  CHECK_MSG(f != NULL, "field %s missing", name);
  if (f) CHECK_MEM_EQ(f->value, f->value_len, value);
}

static void test_request_fields(void) {
  h1_t h;
  static const char get[] = "GET /x/y?z=1 HTTP/1.1\r\nHost:  example.com  \r\n"
                            "Accept: */*\r\nx-multi: a\r\nX-Multi: b\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 1, S(get), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.used, sizeof(get) - 1);
  const pc_h1_msg_t *m = &h.p.msg;
  CHECK_INT_EQ(m->method, HTTP_GET);
  CHECK_MEM_EQ(m->method_str, m->method_len, "GET");
  CHECK_MEM_EQ(m->target, m->target_len, "/x/y?z=1");
  CHECK_INT_EQ(m->path_len, 4);
  CHECK_INT_EQ(m->minor, 1);
  CHECK_INT_EQ(m->keep_alive, 1);
  CHECK_INT_EQ(m->upgrade, 0);
  CHECK_INT_EQ(m->expect_100, 0);
  CHECK_INT_EQ(m->chunked, 0);
  CHECK_INT_EQ(m->has_length, 0);
  CHECK_INT_EQ(m->nfields, 4);
  if (m->nfields == 4) {
    CHECK_MEM_EQ(m->fields[0].name, m->fields[0].name_len, "Host");
    CHECK_MEM_EQ(m->fields[0].value, m->fields[0].value_len, "example.com");
    CHECK_MEM_EQ(m->fields[2].name, m->fields[2].name_len, "x-multi");
    CHECK_MEM_EQ(m->fields[3].name, m->fields[3].name_len, "X-Multi");
    CHECK_MEM_EQ(m->fields[3].value, m->fields[3].value_len, "b");
  }
  expect_field(m, "HOST", "example.com");
  expect_field(m, "accept", "*/*");
  expect_field(m, "X-MULTI", "a"); /* the first one */
  CHECK(pc_h1_find(m, "Hos") == NULL);
  CHECK(pc_h1_find(m, "Hostx") == NULL);
  CHECK(pc_h1_find(m, "") == NULL);
  /* Views point into the parser's own head buffer, not into the input. */
  CHECK(m->target >= h.p.head && m->target + m->target_len <= h.p.head + h.p.head_len);
  CHECK(m->method_str >= h.p.head && m->method_str + 3 <= h.p.head + h.p.head_len);
  for (size_t i = 0; i < m->nfields; i++)
    CHECK(m->fields[i].name >= h.p.head &&
          m->fields[i].value + m->fields[i].value_len <= h.p.head + h.p.head_len);
  CHECK(pc_h1_complete(&h.p)); /* no body: complete with the head */
  size_t used = 9;
  CHECK_INT_EQ(pc_h1_feed(&h.p, GET_A, sizeof(GET_A) - 1, &used), PC_H1_DONE);
  CHECK_INT_EQ(used, 0);
  CHECK(pc_h1_complete(&h.p));
  /* Trim mid-message keeps everything the views point into. */
  pc_h1_trim(&h.p);
  CHECK(h.p.head != NULL && m->fields != NULL);
  expect_field(m, "accept", "*/*");
  /* Reset, then trim between messages: the buffers go to this thread's
   * cache, and the next message on the same parser takes them back. */
  pc_h1_reset(&h.p);
  CHECK(!pc_h1_complete(&h.p));
  size_t cached = pc_bufcache_cached();
  void *old_head = h.p.head, *old_fields = m->fields;
  pc_h1_trim(&h.p);
  CHECK(h.p.head == NULL && m->fields == NULL);
  CHECK_INT_EQ(pc_bufcache_cached(), cached + 2);
  static const char post[] = "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n"
                             "Expect: 100-Continue\r\n\r\n";
  CHECK_INT_EQ(pc_h1_feed(&h.p, post, 10, &used), PC_H1_MORE);
  CHECK_INT_EQ(pc_bufcache_cached(), cached + 1);
  CHECK(h.p.head == old_head || h.p.head == (void *)old_fields); /* reused, not new */
  pc_h1_trim(&h.p);                                              /* a head in progress is kept */
  CHECK(h.p.head != NULL);
  CHECK_INT_EQ(pc_h1_feed(&h.p, post + 10, sizeof(post) - 11, &used), PC_H1_HEAD);
  CHECK_INT_EQ(used, sizeof(post) - 11);
  CHECK_INT_EQ(m->method, HTTP_POST);
  CHECK_MEM_EQ(m->method_str, m->method_len, "POST");
  CHECK_MEM_EQ(m->target, m->target_len, "/upload");
  CHECK_INT_EQ(m->path_len, 7);
  CHECK_INT_EQ(m->has_length, 1);
  CHECK_INT_EQ(m->length, 12);
  CHECK_INT_EQ(m->chunked, 0);
  CHECK_INT_EQ(m->expect_100, 1);
  CHECK_INT_EQ(m->nfields, 3);
  CHECK(!pc_h1_complete(&h.p));
  h1_close(&h);

  static const char chunked[] = "PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 1, S(chunked), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.method, HTTP_PUT);
  CHECK_INT_EQ(h.p.msg.chunked, 1);
  CHECK_INT_EQ(h.p.msg.has_length, 0);
  CHECK_INT_EQ(h.p.msg.expect_100, 0);
  h1_close(&h);

  /* path_len for the special forms. */
  CHECK_INT_EQ(parse_head(&h, 1, S("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.method, HTTP_OPTIONS);
  CHECK_MEM_EQ(h.p.msg.target, h.p.msg.target_len, "*");
  CHECK_INT_EQ(h.p.msg.path_len, 1);
  h1_close(&h);
  CHECK_INT_EQ(parse_head(&h, 1, S("CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"), 0),
               PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.method, HTTP_CONNECT);
  CHECK_MEM_EQ(h.p.msg.target, h.p.msg.target_len, "db:5432");
  CHECK_INT_EQ(h.p.msg.path_len, 7);
  h1_close(&h);
  CHECK_INT_EQ(parse_head(&h, 1, S("GET /?a HTTP/1.1\r\nHost: a\r\n\r\n"), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.path_len, 1);
  h1_close(&h);
  CHECK_INT_EQ(parse_head(&h, 1, S("GET /a/b? HTTP/1.1\r\nHost: a\r\n\r\n"), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.path_len, 4);
  h1_close(&h);
  CHECK_INT_EQ(parse_head(&h, 1, S("DELETE /a/b?x?y HTTP/1.1\r\nHost: a\r\n\r\n"), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.method, HTTP_DELETE);
  CHECK_INT_EQ(h.p.msg.path_len, 4);
  h1_close(&h);
  /* Leading empty lines are not part of the head. */
  CHECK_INT_EQ(parse_head(&h, 1, S("\r\n\r\nGET /l HTTP/1.1\r\nHost: a\r\n\r\n"), 0), PC_H1_HEAD);
  CHECK_MEM_EQ(h.p.msg.target, h.p.msg.target_len, "/l");
  CHECK_INT_EQ(h.used, sizeof("\r\n\r\nGET /l HTTP/1.1\r\nHost: a\r\n\r\n") - 1);
  h1_close(&h);
}

static void test_keep_alive_upgrade(void) {
  static const struct {
    const char *in;
    int keep, upgrade, minor;
  } cases[] = {
      {"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 0, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", 0, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n", 0, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nConnection: x\r\nConnection: close\r\n\r\n", 0, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n", 1, 0, 1},
      {"GET / HTTP/1.0\r\n\r\n", 0, 0, 0},
      {"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 1, 0, 0},
      {"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 1, 0, 0},
      {"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", 0, 0, 0},
      /* Upgrades. */
      {"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1, 1, 1},
      {"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, upgrade\r\nUpgrade: "
       "websocket\r\n\r\n",
       1, 1, 1},
      {"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", 1, 0, 1},
      {"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", 1, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
       "HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
       1, 0, 1},
      {"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: H2C\r\nConnection: Upgrade\r\n\r\n", 1, 0, 1},
      {"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
       "Content-Length: 5\r\n\r\n",
       1, 0, 1},
      {"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
       "Transfer-Encoding: chunked\r\n\r\n",
       1, 0, 1},
      {"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
       "Content-Length: 0\r\n\r\n",
       1, 1, 1},
      /* RFC 9110 7.8: a server ignores Upgrade in an HTTP/1.0 request. */
      {"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 0, 0, 0},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    h1_t h;
    int r = parse_head(&h, 1, cases[i].in, strlen(cases[i].in), 0);
    CHECK_MSG(r == PC_H1_HEAD, "keep/upgrade case %zu: %s (%s)", i, result_name(r),
              h.p.detail ? h.p.detail : "-");
    CHECK_MSG(h.p.msg.keep_alive == cases[i].keep, "keep/upgrade case %zu: keep_alive %d", i,
              h.p.msg.keep_alive);
    CHECK_MSG(h.p.msg.upgrade == cases[i].upgrade, "keep/upgrade case %zu: upgrade %d", i,
              h.p.msg.upgrade);
    CHECK_MSG(h.p.msg.minor == cases[i].minor, "keep/upgrade case %zu: minor %d", i, h.p.msg.minor);
    h1_close(&h);
  }

  /* An upgrade with a body: the body is delivered and the message ends there. */
  static const char up_body[] = "POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                                "Connection: upgrade\r\nContent-Length: 5\r\n\r\nhello" GET_A;
  h1_t h;
  h1_open(&h, 1, &lim_default, 0);
  CHECK_INT_EQ(h1_run(&h, S(up_body), 0, 0), PC_H1_DONE);
  CHECK_INT_EQ(h.p.msg.upgrade, 0);
  CHECK_INT_EQ(h.used, sizeof(up_body) - 1 - (sizeof(GET_A) - 1));
  CHECK_MEM_EQ(h.body.data, h.body.len, "hello");
  h1_close(&h);

  /* Responses: keep-alive and until_close. */
  static const struct {
    const char *in;
    uint8_t req_method;
    int keep, until_close, status;
    const char *phrase;
  } res[] = {
      {"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", HTTP_GET, 1, 0, 200, "OK"},
      {"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", HTTP_GET, 0, 0, 200,
       "OK"},
      {"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", HTTP_GET, 0, 0, 200, "OK"},
      {"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", HTTP_GET, 1, 0,
       200, "OK"},
      {"HTTP/1.1 404 Not Found\r\n\r\n", HTTP_GET, 1, 1, 404, "Not Found"},
      {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", HTTP_GET, 1, 0, 200, "OK"},
      {"HTTP/1.1 200 OK\r\n\r\n", HTTP_HEAD, 1, 0, 200, "OK"},
      {"HTTP/1.1 204 No Content\r\n\r\n", HTTP_GET, 1, 0, 204, "No Content"},
      {"HTTP/1.1 304 Not Modified\r\n\r\n", HTTP_GET, 1, 0, 304, "Not Modified"},
      {"HTTP/1.1 100 Continue\r\n\r\n", HTTP_POST, 1, 0, 100, "Continue"},
      {"HTTP/1.1 200 OK\r\n\r\n", HTTP_CONNECT, 1, 0, 200, "OK"},
      {"HTTP/1.1 503 Service Unavailable\r\n\r\n", HTTP_CONNECT, 1, 1, 503, "Service Unavailable"},
      {"HTTP/1.1 599 x y  z\r\nContent-Length: 0\r\n\r\n", HTTP_GET, 1, 0, 599, "x y  z"},
  };
  for (size_t i = 0; i < sizeof(res) / sizeof(res[0]); i++) {
    int r = parse_head(&h, 0, res[i].in, strlen(res[i].in), res[i].req_method);
    CHECK_MSG(r == PC_H1_HEAD, "response case %zu: %s (%s)", i, result_name(r),
              h.p.detail ? h.p.detail : "-");
    CHECK_MSG(h.p.msg.status == res[i].status, "response case %zu: status %d", i, h.p.msg.status);
    CHECK_MSG(h.p.msg.keep_alive == res[i].keep, "response case %zu: keep_alive %d", i,
              h.p.msg.keep_alive);
    CHECK_MSG(h.p.msg.until_close == res[i].until_close, "response case %zu: until_close %d", i,
              h.p.msg.until_close);
    CHECK_MEM_EQ(h.p.msg.phrase, h.p.msg.phrase_len, res[i].phrase);
    h1_close(&h);
  }
}

/* ---- limits --------------------------------------------------------------- */

/* A request whose request line is exactly line_len bytes (without CRLF). */
static char *request_with_line(size_t line_len, const char *rest) {
  const char *pre = "GET /", *post = " HTTP/1.1";
  size_t fixed = strlen(pre) + strlen(post);
  size_t pad = line_len > fixed ? line_len - fixed : 0;
  size_t n = fixed + pad + 2 + strlen(rest);
  char *s = malloc(n + 1);
  if (!s) abort();
  size_t o = 0;
  memcpy(s + o, pre, strlen(pre));
  o += strlen(pre);
  memset(s + o, 'a', pad);
  o += pad;
  memcpy(s + o, post, strlen(post));
  o += strlen(post);
  memcpy(s + o, "\r\n", 2);
  o += 2;
  memcpy(s + o, rest, strlen(rest));
  o += strlen(rest);
  s[o] = '\0';
  return s;
}

/* A request with nfields header fields whose head is exactly head_len bytes
 * (head_len 0: whatever it takes). */
static char *request_with_fields(size_t nfields, size_t head_len) {
  pc_jbuf_t b = {0};
  pc_jbuf_raw(&b, "GET / HTTP/1.1\r\nHost: a\r\n", 25);
  for (size_t i = 1; i < nfields; i++)
    pc_jbuf_printf(&b, "X-F%zu: v\r\n", i);
  if (head_len) {
    /* Pad with one more field so that the head has exactly head_len bytes. */
    size_t need = head_len - b.len - 2;
    if (need >= 4) {
      pc_jbuf_raw(&b, "X:", 2);
      for (size_t i = 0; i < need - 4; i++)
        pc_jbuf_raw(&b, "p", 1);
      pc_jbuf_raw(&b, "\r\n", 2);
    }
  }
  pc_jbuf_raw(&b, "\r\n", 2);
  pc_jbuf_raw(&b, "", 1);
  return b.data;
}

static void expect_verdict(const char *what, const pc_h1_limits_t *lim, int is_request,
                           const char *s, int result, int status) {
  static const size_t steps[] = {0, 1, 5};
  for (size_t k = 0; k < 3; k++) {
    h1_t h;
    h1_open(&h, is_request, lim, HTTP_GET);
    int r = h1_run(&h, s, strlen(s), steps[k], 0);
    CHECK_MSG(r == result, "%s (step %zu): %s, expected %s (%s)", what, steps[k], result_name(r),
              result_name(result), h.p.detail ? h.p.detail : "-");
    if (r == PC_H1_ERROR)
      CHECK_MSG(h.p.status == status, "%s (step %zu): status %d, expected %d", what, steps[k],
                h.p.status, status);
    h1_close(&h);
  }
}

static void test_limits(void) {
  const pc_h1_limits_t lim = {64, 512, 8};
  char *s;
  s = request_with_line(64, "Host: a\r\n\r\n");
  expect_verdict("request line of exactly max_line", &lim, 1, s, PC_H1_DONE, 0);
  free(s);
  s = request_with_line(65, "Host: a\r\n\r\n");
  expect_verdict("request line of max_line + 1", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);
  s = request_with_line(400, "Host: a\r\n\r\n");
  expect_verdict("request line far over max_line", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);
  /* Unfinished but already too long: refused before the line ends. */
  s = request_with_line(100, "");
  s[70] = '\0';
  expect_verdict("unfinished request line over max_line", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);
  /* Empty lines before the request line do not count against it. */
  s = request_with_line(64, "Host: a\r\n\r\n");
  {
    char *t = malloc(strlen(s) + 5);
    strcpy(t, "\r\n\r\n");
    strcat(t, s);
    expect_verdict("empty lines + request line of max_line", &lim, 1, t, PC_H1_DONE, 0);
    free(t);
  }
  free(s);

  s = request_with_fields(8, 0);
  expect_verdict("exactly max_fields fields", &lim, 1, s, PC_H1_DONE, 0);
  free(s);
  s = request_with_fields(9, 0);
  expect_verdict("max_fields + 1 fields", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);
  s = request_with_fields(40, 0);
  expect_verdict("many fields", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);

  s = request_with_fields(2, 512);
  CHECK_INT_EQ(strlen(s), 512);
  expect_verdict("head of exactly max_head", &lim, 1, s, PC_H1_DONE, 0);
  free(s);
  s = request_with_fields(2, 513);
  CHECK_INT_EQ(strlen(s), 513);
  expect_verdict("head of max_head + 1", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);
  s = request_with_fields(2, 5000);
  expect_verdict("head far over max_head", &lim, 1, s, PC_H1_ERROR, 431);
  free(s);

  /* A one-field limit: Host alone is fine, a second field is not. */
  const pc_h1_limits_t one = {64, 512, 1};
  expect_verdict("one field of one", &one, 1, "GET / HTTP/1.1\r\nHost: a\r\n\r\n", PC_H1_DONE, 0);
  expect_verdict("two fields of one", &one, 1, "GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n",
                 PC_H1_ERROR, 431);

  /* The same limits on responses answer 502. */
  expect_verdict("status line over max_line", &lim, 0,
                 "HTTP/1.1 200 OKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKK"
                 "\r\nContent-Length: 0\r\n\r\n",
                 PC_H1_ERROR, 502);
  s = request_with_fields(20, 0);
  {
    /* Turn the request line into a status line. */
    char *t = malloc(strlen(s) + 32);
    strcpy(t, "HTTP/1.1 200 OK\r\n");
    strcat(t, strstr(s, "\r\n") + 2);
    expect_verdict("response with too many fields", &lim, 0, t, PC_H1_ERROR, 502);
    free(t);
  }
  free(s);
}

/* ---- head rewriting ------------------------------------------------------- */

/* Re-parses out with a fresh parser: the head must come back whole. */
static int reparse(h1_t *h, int is_request, const pc_jbuf_t *out, uint8_t req_method) {
  static const pc_h1_limits_t big = {1 << 16, 1 << 20, 1000};
  h1_open(h, is_request, &big, req_method);
  size_t used = 0;
  int r = pc_h1_feed(&h->p, out->data, out->len, &used);
  CHECK_MSG(r == PC_H1_HEAD, "re-parse: %s (%s) of \"%.*s\"", result_name(r),
            h->p.detail ? h->p.detail : "-", (int)out->len, out->data);
  CHECK_MSG(used == out->len, "re-parse used %zu of %zu", used, out->len);
  return r;
}

static size_t count_fields(const pc_h1_msg_t *m, const char *name) {
  size_t n = 0;
  for (size_t i = 0; i < m->nfields; i++)
    n += strlen(name) == m->fields[i].name_len &&
         strncasecmp(m->fields[i].name, name, m->fields[i].name_len) == 0;
  return n;
}

static int ends_with(const pc_jbuf_t *b, const char *suffix) {
  size_t n = strlen(suffix);
  return b->len >= n && memcmp(b->data + b->len - n, suffix, n) == 0;
}

static void test_write_head(void) {
  static const char req[] = "GET /p?q=1 HTTP/1.1\r\n"
                            "Host: h\r\n"
                            "Connection: keep-alive, X-Hop, x-other\r\n"
                            "Keep-Alive: timeout=5\r\n"
                            "Proxy-Connection: keep-alive\r\n"
                            "TE: trailers\r\n"
                            "Trailer: X-Sum\r\n"
                            "X-Hop: 1\r\n"
                            "x-hop: 2\r\n"
                            "X-OTHER: 3\r\n"
                            "Upgrade: websocket\r\n"
                            "HTTP2-Settings: abc\r\n"
                            "X-Forwarded-Client-Cert: By=a\r\n"
                            "x-forwarded-client-cert: By=b\r\n"
                            "X-Keep: yes\r\n"
                            "Accept:   */*   \r\n"
                            "Connection: x-second\r\n"
                            "X-Second: gone\r\n"
                            "\r\n";
  h1_t h, r;
  pc_jbuf_t out = {0};
  CHECK_INT_EQ(parse_head(&h, 1, S(req), 0), PC_H1_HEAD);

  pc_h1_write_head(&h.p, &out, 0, NULL);
  CHECK_MEM_EQ(out.data, out.len,
               "GET /p?q=1 HTTP/1.1\r\n"
               "Host: h\r\n"
               "X-Forwarded-Client-Cert: By=a\r\n"
               "x-forwarded-client-cert: By=b\r\n"
               "X-Keep: yes\r\n"
               "Accept: */*\r\n"
               "\r\n");
  if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) {
    CHECK_INT_EQ(r.p.msg.method, HTTP_GET);
    CHECK_MEM_EQ(r.p.msg.target, r.p.msg.target_len, "/p?q=1");
    CHECK_INT_EQ(r.p.msg.nfields, 5);
  }
  h1_close(&r);
  out.len = 0;

  pc_h1_write_head(&h.p, &out, PC_H1_OUT_DROP_XFCC, NULL);
  CHECK_MEM_EQ(out.data, out.len,
               "GET /p?q=1 HTTP/1.1\r\nHost: h\r\nX-Keep: yes\r\nAccept: */*\r\n\r\n");
  out.len = 0;

  /* The sidecar's own XFCC goes after the peer's fields were dropped. */
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_DROP_XFCC,
                   "x-forwarded-client-cert: By=spiffe://td/ns/a/sa/b\r\nx-extra: 1\r\n");
  CHECK(ends_with(&out, "x-forwarded-client-cert: By=spiffe://td/ns/a/sa/b\r\nx-extra: 1\r\n\r\n"));
  if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) {
    CHECK_INT_EQ(count_fields(&r.p.msg, "x-forwarded-client-cert"), 1);
    expect_field(&r.p.msg, "X-Forwarded-Client-Cert", "By=spiffe://td/ns/a/sa/b");
    expect_field(&r.p.msg, "x-extra", "1");
    CHECK_INT_EQ(r.p.msg.nfields, 5);
  }
  h1_close(&r);
  out.len = 0;

  /* The '_' spelling, which CGI-style apps read as the same header, goes too. */
  {
    static const char req2[] = "GET / HTTP/1.1\r\nHost: h\r\nX_Forwarded_Client-Cert: By=u\r\n\r\n";
    h1_t u;
    CHECK_INT_EQ(parse_head(&u, 1, S(req2), 0), PC_H1_HEAD);
    pc_h1_write_head(&u.p, &out, PC_H1_OUT_DROP_XFCC, NULL);
    CHECK_MEM_EQ(out.data, out.len, "GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    out.len = 0;
    h1_close(&u);
  }

  /* Each flag adds its line; hop-by-hop fields stay out either way. */
  static const struct {
    unsigned flags;
    const char *name, *value;
  } flag_cases[] = {
      {PC_H1_OUT_CLOSE, "connection", "close"},
      {PC_H1_OUT_KEEPALIVE, "connection", "keep-alive"},
      {PC_H1_OUT_CHUNKED, "transfer-encoding", "chunked"},
      {PC_H1_OUT_LENGTH, "content-length", "0"},
      {PC_H1_OUT_UPGRADE, "connection", "upgrade"},
  };
  for (size_t i = 0; i < sizeof(flag_cases) / sizeof(flag_cases[0]); i++) {
    pc_h1_write_head(&h.p, &out, flag_cases[i].flags, NULL);
    CHECK(ends_with(&out, "\r\n\r\n"));
    if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) {
      const pc_h1_msg_t *m = &r.p.msg;
      CHECK_MSG(count_fields(m, flag_cases[i].name) == 1, "flag %u: %zu %s fields",
                flag_cases[i].flags, count_fields(m, flag_cases[i].name), flag_cases[i].name);
      expect_field(m, flag_cases[i].name, flag_cases[i].value);
      int up = flag_cases[i].flags == PC_H1_OUT_UPGRADE;
      CHECK_INT_EQ(count_fields(m, "upgrade"), up);
      if (up) expect_field(m, "upgrade", "websocket");
      CHECK_INT_EQ(m->nfields, 6 + up);
      static const char *const hop[] = {"keep-alive", "proxy-connection", "te",
                                        "trailer",    "http2-settings",   "x-hop",
                                        "x-other",    "x-second"};
      for (size_t j = 0; j < sizeof(hop) / sizeof(hop[0]); j++)
        CHECK_MSG(count_fields(m, hop[j]) == 0, "flag %u: %s forwarded", flag_cases[i].flags,
                  hop[j]);
      if (flag_cases[i].flags != PC_H1_OUT_CHUNKED)
        CHECK_INT_EQ(count_fields(m, "transfer-encoding"), 0);
    }
    h1_close(&r);
    out.len = 0;
  }
  /* Conflicting connection flags still make one Connection field. */
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_CLOSE | PC_H1_OUT_KEEPALIVE, NULL);
  if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) CHECK_INT_EQ(count_fields(&r.p.msg, "connection"), 1);
  h1_close(&r);
  out.len = 0;
  h1_close(&h);

  /* Content-Length and Transfer-Encoding of the original never pass through:
   * the proxy re-frames the body. */
  static const char post[] = "POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nX-A: b\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 1, S(post), 0), PC_H1_HEAD);
  pc_h1_write_head(&h.p, &out, 0, NULL);
  CHECK_MEM_EQ(out.data, out.len, "POST /u HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\r\n");
  out.len = 0;
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_LENGTH, NULL);
  CHECK_MEM_EQ(out.data, out.len,
               "POST /u HTTP/1.1\r\nHost: h\r\nX-A: b\r\ncontent-length: 12\r\n\r\n");
  if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) {
    CHECK_INT_EQ(r.p.msg.has_length, 1);
    CHECK_INT_EQ(r.p.msg.length, 12);
  }
  h1_close(&r);
  out.len = 0;
  h1_close(&h);

  static const char chunked[] =
      "POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: h\r\nconnection: Close\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 1, S(chunked), 0), PC_H1_HEAD);
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_CHUNKED | PC_H1_OUT_CLOSE, NULL);
  if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) {
    CHECK_INT_EQ(r.p.msg.chunked, 1);
    CHECK_INT_EQ(r.p.msg.keep_alive, 0);
    CHECK_INT_EQ(count_fields(&r.p.msg, "transfer-encoding"), 1);
    CHECK_INT_EQ(count_fields(&r.p.msg, "connection"), 1);
    CHECK_INT_EQ(r.p.msg.nfields, 3);
  }
  h1_close(&r);
  out.len = 0;
  h1_close(&h);

  /* HTTP/1.0 requests stay 1.0. */
  CHECK_INT_EQ(parse_head(&h, 1, S("GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), 0),
               PC_H1_HEAD);
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_KEEPALIVE, NULL);
  CHECK_MEM_EQ(out.data, out.len, "GET /old HTTP/1.0\r\nconnection: keep-alive\r\n\r\n");
  out.len = 0;
  h1_close(&h);

  /* Responses always say HTTP/1.1 and keep the phrase. */
  static const char res[] = "HTTP/1.0 404 Not Found Here\r\nServer: s\r\nConnection: close\r\n"
                            "Content-Length: 3\r\nKeep-Alive: x\r\nSet-Cookie: a=b\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 0, S(res), HTTP_GET), PC_H1_HEAD);
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_LENGTH, NULL);
  CHECK_MEM_EQ(out.data, out.len,
               "HTTP/1.1 404 Not Found Here\r\nServer: s\r\nSet-Cookie: a=b\r\n"
               "content-length: 3\r\n\r\n");
  if (reparse(&r, 0, &out, HTTP_GET) == PC_H1_HEAD) {
    CHECK_INT_EQ(r.p.msg.status, 404);
    CHECK_MEM_EQ(r.p.msg.phrase, r.p.msg.phrase_len, "Not Found Here");
    CHECK_INT_EQ(r.p.msg.minor, 1);
  }
  h1_close(&r);
  out.len = 0;
  h1_close(&h);

  static const char sw[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 0, S(sw), HTTP_GET), PC_H1_HEAD);
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_UPGRADE, NULL);
  if (reparse(&r, 0, &out, HTTP_GET) == PC_H1_HEAD) {
    CHECK_INT_EQ(r.p.msg.status, 101);
    expect_field(&r.p.msg, "upgrade", "websocket");
    expect_field(&r.p.msg, "connection", "upgrade");
    expect_field(&r.p.msg, "sec-websocket-accept", "x");
    CHECK_INT_EQ(r.p.msg.nfields, 3);
  }
  h1_close(&r);
  out.len = 0;
  h1_close(&h);

  /* A switch to websocket goes on without the h2c the client also offered:
   * the sidecar never switches to cleartext HTTP/2, so neither may the app. */
  static const char both[] =
      "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: h2c, websocket\r\n"
      "Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQ\r\n"
      "Sec-WebSocket-Version: 13\r\n\r\n";
  CHECK_INT_EQ(parse_head(&h, 1, S(both), 0), PC_H1_HEAD);
  CHECK_INT_EQ(h.p.msg.upgrade, 1);
  pc_h1_write_head(&h.p, &out, PC_H1_OUT_UPGRADE, NULL);
  if (reparse(&r, 1, &out, 0) == PC_H1_HEAD) {
    expect_field(&r.p.msg, "upgrade", "websocket");
    expect_field(&r.p.msg, "connection", "upgrade");
    CHECK(pc_h1_find(&r.p.msg, "http2-settings") == NULL);
    CHECK_INT_EQ(r.p.msg.nfields, 4); /* host, upgrade, sec-websocket-version, connection */
  }
  h1_close(&r);
  out.len = 0;
  h1_close(&h);

  /* The head is appended: what the buffer held stays in front. */
  CHECK_INT_EQ(parse_head(&h, 1, S(GET_A), 0), PC_H1_HEAD);
  pc_jbuf_raw(&out, "PREFIX", 6);
  pc_h1_write_head(&h.p, &out, 0, NULL);
  CHECK_MEM_EQ(out.data, out.len, "PREFIX" GET_A);
  out.len = 0;
  h1_close(&h);
  pc_jbuf_free(&out);
}

/* A head that is refused is never first reported as a valid head. */
static void test_refused_heads(void) {
  static const char *const heads[] = {
      "PRI * HTTP/2.0\r\n\r\n",
      "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
      "GET / HTTP/1.2\r\nHost: a\r\n\r\n",
      "GET / HTTP/1.1\r\n\r\n",
      "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
      "GET /a/../b HTTP/1.1\r\nHost: a\r\n\r\n",
      "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
  };
  for (size_t i = 0; i < sizeof(heads) / sizeof(heads[0]); i++) {
    for (size_t step = 0; step <= 1; step++) {
      h1_t h;
      h1_open(&h, 1, &lim_default, 0);
      int r = h1_run(&h, heads[i], strlen(heads[i]), step, 0);
      CHECK_MSG(h.heads == 0 && r == PC_H1_ERROR && h.p.status == 400,
                "refused head %zu (step %zu): %d heads, %s, status %d, method \"%.*s\"", i, step,
                h.heads, result_name(r), h.p.status, (int)h.p.msg.method_len,
                h.p.msg.method_str ? h.p.msg.method_str : "");
      h1_close(&h);
    }
  }
}

/* A Connection option naming a field the message cannot do without. */
static void test_write_head_connection_host(void) {
  static const char req[] = "GET / HTTP/1.1\r\nHost: h\r\nConnection: host\r\n\r\n";
  h1_t h, r;
  pc_jbuf_t out = {0};
  /* Either the request is refused up front or what is forwarded is valid. */
  if (parse_head(&h, 1, S(req), 0) == PC_H1_HEAD) {
    pc_h1_write_head(&h.p, &out, 0, NULL);
    reparse(&r, 1, &out, 0);
    h1_close(&r);
  } else {
    CHECK_INT_EQ(h.result, PC_H1_ERROR);
    CHECK_INT_EQ(h.p.status, 400);
  }
  h1_close(&h);
  pc_jbuf_free(&out);
}

/* ---- error responses ------------------------------------------------------ */

static void test_error_response(void) {
  static const struct {
    int status, keep;
    const char *reason, *detail, *phrase, *body;
  } cases[] = {
      {400, 0, "bad_request", "bare LF", "Bad Request",
       "{\"status\":400,\"reason\":\"bad_request\",\"detail\":\"bare LF\"}"},
      {403, 1, "not_allowed", "GET /admin", "Forbidden",
       "{\"status\":403,\"reason\":\"not_allowed\",\"detail\":\"GET /admin\"}"},
      {408, 0, "timeout", "", "Request Timeout",
       "{\"status\":408,\"reason\":\"timeout\",\"detail\":\"\"}"},
      {431, 0, "too_large", "request head too large", "Request Header Fields Too Large",
       "{\"status\":431,\"reason\":\"too_large\",\"detail\":\"request head too large\"}"},
      {502, 1, "upstream", "malformed response", "Bad Gateway",
       "{\"status\":502,\"reason\":\"upstream\",\"detail\":\"malformed response\"}"},
      {503, 0, "draining", "x", "Service Unavailable",
       "{\"status\":503,\"reason\":\"draining\",\"detail\":\"x\"}"},
      {504, 0, "timeout", "no response", "Gateway Timeout",
       "{\"status\":504,\"reason\":\"timeout\",\"detail\":\"no response\"}"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    pc_jbuf_t out = {0};
    pc_h1_error_response(&out, cases[i].status, cases[i].reason, cases[i].detail, cases[i].keep);
    char line[128];
    snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\n", cases[i].status, cases[i].phrase);
    CHECK_MSG(out.len > strlen(line) && memcmp(out.data, line, strlen(line)) == 0,
              "error response %zu starts \"%.*s\"", i, (int)(out.len < 40 ? out.len : 40),
              out.data);
    h1_t h;
    h1_open(&h, 0, &lim_default, HTTP_GET);
    int r = h1_run(&h, out.data, out.len, 0, 0);
    CHECK_MSG(r == PC_H1_DONE, "error response %zu: %s", i, result_name(r));
    CHECK_INT_EQ(h.used, out.len);
    CHECK_INT_EQ(h.p.msg.status, cases[i].status);
    CHECK_MEM_EQ(h.p.msg.phrase, h.p.msg.phrase_len, cases[i].phrase);
    CHECK_INT_EQ(h.p.msg.has_length, 1);
    CHECK_INT_EQ(h.p.msg.length, h.body.len);
    expect_field(&h.p.msg, "content-type", "application/json");
    CHECK_INT_EQ(count_fields(&h.p.msg, "connection"), cases[i].keep ? 0 : 1);
    if (!cases[i].keep) expect_field(&h.p.msg, "connection", "close");
    CHECK_INT_EQ(h.p.msg.keep_alive, cases[i].keep);
    CHECK_INT_EQ(h.p.msg.nfields, cases[i].keep ? 2 : 3);
    /* The body: one JSON object (and a newline). */
    size_t blen = strlen(cases[i].body);
    CHECK_MSG(h.body.len >= blen && memcmp(h.body.data, cases[i].body, blen) == 0 &&
                  (h.body.len == blen || (h.body.len == blen + 1 && h.body.data[blen] == '\n')),
              "error response %zu body \"%.*s\"", i, (int)h.body.len, h.body.data);
    h1_close(&h);
    pc_jbuf_free(&out);
  }

  /* Peer-controlled detail stays inside the JSON body: no header injection. */
  pc_jbuf_t out = {0};
  pc_h1_error_response(&out, 400, "bad_request", "a\r\nSet-Cookie: x=y\r\n\r\n\"}", 0);
  h1_t h;
  h1_open(&h, 0, &lim_default, HTTP_GET);
  CHECK_INT_EQ(h1_run(&h, out.data, out.len, 0, 0), PC_H1_DONE);
  CHECK_INT_EQ(h.used, out.len);
  CHECK_INT_EQ(h.p.msg.nfields, 3);
  CHECK(pc_h1_find(&h.p.msg, "set-cookie") == NULL);
  CHECK_INT_EQ(h.p.msg.length, h.body.len);
  int ctl = 0;
  for (size_t i = 0; i + 1 < h.body.len; i++)
    ctl |= (unsigned char)h.body.data[i] < 0x20;
  CHECK_MSG(!ctl, "control byte in the JSON body \"%.*s\"", (int)h.body.len, h.body.data);
  h1_close(&h);
  pc_jbuf_free(&out);

  /* NULL reason and detail are empty strings. */
  pc_h1_error_response(&out, 503, NULL, NULL, 1);
  CHECK_STR_CONTAINS(out.data ? out.data : "", "\"reason\":\"\"");
  pc_jbuf_free(&out);

  CHECK_STR_EQ(pc_h1_phrase(400), "Bad Request");
  CHECK_STR_EQ(pc_h1_phrase(403), "Forbidden");
  CHECK_STR_EQ(pc_h1_phrase(408), "Request Timeout");
  CHECK_STR_EQ(pc_h1_phrase(431), "Request Header Fields Too Large");
  CHECK_STR_EQ(pc_h1_phrase(502), "Bad Gateway");
  CHECK_STR_EQ(pc_h1_phrase(503), "Service Unavailable");
  CHECK_STR_EQ(pc_h1_phrase(504), "Gateway Timeout");
  CHECK_STR_EQ(pc_h1_phrase(799), "Unknown");
}

/* ---- one parser, many messages -------------------------------------------- */

static void test_pipeline_reuse(void) {
  /* Three requests in one buffer, parsed in turn by one parser. */
  static const char in[] = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                           "POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                           "\r\n" /* tolerated before the next request line */
                           "PUT /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "2\r\nde\r\n0\r\n\r\n";
  static const char *const targets[] = {"/1", "/2", "/3"};
  static const char *const bodies[] = {"", "abc", "de"};
  for (size_t step = 0; step <= 3; step += 3) {
    h1_t h;
    h1_open(&h, 1, &lim_default, 0);
    size_t pos = 0;
    for (int k = 0; k < 3; k++) {
      h.heads = 0;
      h.body.len = 0;
      int r = h1_run(&h, in + pos, sizeof(in) - 1 - pos, step, 0);
      CHECK_MSG(r == PC_H1_DONE, "pipeline message %d step %zu: %s (%s)", k, step, result_name(r),
                h.p.detail ? h.p.detail : "-");
      CHECK_MEM_EQ(h.p.msg.target, h.p.msg.target_len, targets[k]);
      CHECK_MEM_EQ(h.body.data ? h.body.data : "", h.body.len, bodies[k]);
      pos += h.used;
      pc_h1_reset(&h.p);
    }
    CHECK_INT_EQ(pos, sizeof(in) - 1);
    h1_close(&h);
  }

  /* A refused request does not poison the next one after reset. */
  h1_t h;
  h1_open(&h, 1, &lim_default, 0);
  CHECK_INT_EQ(h1_run(&h, S("GET / HTTP/1.1\n\n"), 0, 0), PC_H1_ERROR);
  pc_h1_reset(&h.p);
  h.heads = 0;
  CHECK_INT_EQ(h1_run(&h, S(GET_A), 0, 0), PC_H1_DONE);
  CHECK_INT_EQ(h.p.status, 0);
  CHECK(h.p.detail == NULL);
  h1_close(&h);

  /* Response parser reused with a different request method each time. */
  h1_open(&h, 0, &lim_default, HTTP_HEAD);
  static const char two[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
                            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz";
  CHECK_INT_EQ(h1_run(&h, S(two), 0, 0), PC_H1_DONE);
  size_t first = h.used;
  CHECK_INT_EQ(first, sizeof("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n") - 1);
  pc_h1_reset(&h.p);
  h.p.req_method = HTTP_GET;
  h.heads = 0;
  CHECK_INT_EQ(h1_run(&h, two + first, sizeof(two) - 1 - first, 0, 0), PC_H1_DONE);
  CHECK_INT_EQ(h.used, sizeof(two) - 1 - first);
  CHECK_MEM_EQ(h.body.data, h.body.len, "xyz");
  h1_close(&h);

  /* Trailers do not end up among the head's fields. */
  static const char tr[] = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "1\r\nx\r\n0\r\nContent-Length: 5\r\nX-T: 1\r\n\r\n";
  h1_open(&h, 1, &lim_default, 0);
  CHECK_INT_EQ(h1_run(&h, S(tr), 0, 0), PC_H1_DONE);
  CHECK_INT_EQ(h.p.msg.nfields, 2);
  CHECK_INT_EQ(h.p.msg.chunked, 1);
  CHECK_INT_EQ(h.p.msg.has_length, 0);
  for (size_t i = 0; i < h.p.msg.nfields; i++)
    CHECK_MSG(h.p.msg.fields[i].name >= h.p.head &&
                  h.p.msg.fields[i].name < h.p.head + h.p.head_len,
              "field %zu \"%.*s\" points outside the head buffer", i,
              (int)h.p.msg.fields[i].name_len, h.p.msg.fields[i].name);
  h1_close(&h);

  /* Trailer fields count against the limits like head fields: a client must
   * not grow the field table without bound. */
  const pc_h1_limits_t lim = {64, 512, 8};
  pc_jbuf_t b = {0};
  pc_jbuf_printf(&b, "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "1\r\nx\r\n0\r\n");
  for (int i = 0; i < 2000; i++)
    pc_jbuf_printf(&b, "X-%d: v\r\n", i);
  pc_jbuf_raw(&b, "\r\n", 2);
  h1_open(&h, 1, &lim, 0);
  int r = h1_run(&h, b.data, b.len, 0, 0);
  CHECK_MSG(r == PC_H1_DONE || (r == PC_H1_ERROR && (h.p.status == 431 || h.p.status == 400)),
            "2000 trailer fields: %s status %d", result_name(r), h.p.status);
  CHECK_MSG(h.p.msg.nfields <= lim.max_fields, "2000 trailer fields: nfields %zu > max_fields %u",
            h.p.msg.nfields, lim.max_fields);
  h1_close(&h);
  pc_jbuf_free(&b);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  test_tables();
  test_request_fields();
  test_keep_alive_upgrade();
  test_limits();
  test_write_head();
  test_refused_heads();
  test_write_head_connection_host();
  test_error_response();
  test_pipeline_reuse();
  pc_bufcache_drain();
  return CHECK_DONE("test_h1");
}

/*
 * test_h2req.c - one HTTP/2 request head: collected, checked, translated
 * (h2req.h).
 *
 * Fields go in as nghttp2 (HTTP messaging checks on) would deliver them:
 * lowercase names, pseudo-headers first, no CR, LF or NUL in any value. A
 * refused head carries 400 or 431 and a reason. The HTTP/1.1 head is
 * compared byte for byte and then parsed by the strict HTTP/1 parser (h1.h),
 * which must see the same method, target and host; the onward HTTP/2 field
 * list is compared entry by entry and must fit in pc_h2req_nv_cap entries.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bufcache.h"
#include "check.h"
#include "h1.h"
#include "h2req.h"
#include "log.h"

static const pc_h2req_limits_t lim_default = {100, 65536, 0};
static const pc_h2req_limits_t lim_inbound = {100, 65536, 1};

typedef struct {
  const char *name, *value;
} kv_t;

/* Feeds the {NULL, NULL}-terminated fields of kv. */
static void feed(pc_h2req_t *r, const pc_h2req_limits_t *lim, const kv_t *kv) {
  for (; kv->name; kv++)
    pc_h2req_field(r, lim, (const uint8_t *)kv->name, strlen(kv->name), (const uint8_t *)kv->value,
                   strlen(kv->value));
}

/* A fresh request from kv, finished; returns pc_h2req_finish's verdict. */
static int run(pc_h2req_t *r, const pc_h2req_limits_t *lim, const kv_t *kv) {
  memset(r, 0, sizeof(*r));
  feed(r, lim, kv);
  int st = pc_h2req_finish(r);
  CHECK_INT_EQ(st, r->bad_status);
  CHECK_MSG(r->done, "pc_h2req_finish did not mark the request done");
  if (st) CHECK_MSG(r->bad_detail && *r->bad_detail, "status %d without a reason", st);
  if (!st) CHECK_MSG(r->bad_detail == NULL, "accepted, but a reason is set: %s", r->bad_detail);
  return st;
}

#define KV(...)                                                                                    \
  (const kv_t[]) {                                                                                 \
    __VA_ARGS__, { NULL, NULL }                                                                    \
  }

/* The usual pseudo-headers of a GET for path on authority a. */
#define GET_(path)                                                                                 \
  {":method", "GET"}, {":scheme", "https"}, {":authority", "a"}, { ":path", path }

/* Expects status st for the fields; name is what the failure report shows. */
static void expect(const char *name, const pc_h2req_limits_t *lim, const kv_t *kv, int st) {
  pc_h2req_t r;
  int got = run(&r, lim, kv);
  CHECK_MSG(got == st, "%s: status %d, expected %d (%s)", name, got, st,
            r.bad_detail ? r.bad_detail : "no reason");
  pc_h2req_free(&r);
}

/* The same, and the reason must mention what was wrong. */
static void expect_why(const char *name, const kv_t *kv, int st, const char *why) {
  pc_h2req_t r;
  int got = run(&r, &lim_default, kv);
  CHECK_MSG(got == st, "%s: status %d, expected %d", name, got, st);
  CHECK_MSG(r.bad_detail && strstr(r.bad_detail, why), "%s: reason \"%s\" does not mention \"%s\"",
            name, r.bad_detail ? r.bad_detail : "(none)", why);
  pc_h2req_free(&r);
}

/* ---- verdicts --------------------------------------------------------------- */

static void test_accepts(void) {
  pc_h2req_t r;
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "GET"}, {":scheme", "https"}, {":authority", "example.com:8443"},
                      {":path", "/a/b?x=1&y=/../z"}, {"accept", "*/*"}, {"x-a", ""})),
               0);
  CHECK_STR_EQ(r.method, "GET");
  CHECK_INT_EQ(r.method_len, 3);
  CHECK_STR_EQ(r.scheme, "https");
  CHECK_INT_EQ(r.scheme_len, 5);
  CHECK_STR_EQ(r.authority, "example.com:8443");
  CHECK_INT_EQ(r.authority_len, 16);
  CHECK_STR_EQ(r.path, "/a/b?x=1&y=/../z");
  CHECK_INT_EQ(r.path_len, 16);
  CHECK(r.host == NULL);
  CHECK_INT_EQ(pc_h2req_path_len(&r), 4);
  CHECK_MEM_EQ(r.fields.data, r.fields.len, "accept: */*\r\nx-a: \r\n");
  CHECK_INT_EQ(r.nfields, 6);
  CHECK_INT_EQ(r.bytes, (7 + 3 + 4) + (7 + 5 + 4) + (10 + 16 + 4) + (5 + 16 + 4) + (6 + 3 + 4) +
                            (3 + 0 + 4));
  CHECK_INT_EQ(r.has_len, 0);
  CHECK_INT_EQ(r.grpc, 0);
  CHECK_INT_EQ(r.te_trailers, 0);
  CHECK_INT_EQ(r.is_head, 0);
  CHECK_INT_EQ(r.cookie.len, 0);
  pc_h2req_free(&r);

  /* host alone names the target; :authority and host may differ in case only. */
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "GET"}, {":scheme", "http"}, {":path", "/"}, {"host", "b:80"})),
               0);
  CHECK_STR_EQ(r.host, "b:80");
  CHECK(r.authority == NULL);
  CHECK_INT_EQ(r.fields.len, 0);
  pc_h2req_free(&r);
  expect("host equal to :authority", &lim_default, KV(GET_("/"), {"host", "a"}), 0);
  expect("host differs in case only", &lim_default,
         KV({":method", "GET"}, {":scheme", "https"}, {":authority", "Example.COM"}, {":path", "/"},
            {"host", "example.com"}),
         0);
  expect("IP literal", &lim_default,
         KV({":method", "GET"}, {":scheme", "https"}, {":authority", "[::1]:8080"}, {":path", "/"}),
         0);

  CHECK_INT_EQ(
      run(&r, &lim_default,
          KV({":method", "HEAD"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/h"})),
      0);
  CHECK_INT_EQ(r.is_head, 1);
  pc_h2req_free(&r);
  /* "HEADX" is not HEAD (and no method at all). */
  CHECK_INT_EQ(
      run(&r, &lim_default,
          KV({":method", "HEADX"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/h"})),
      400);
  CHECK_INT_EQ(r.is_head, 0);
  pc_h2req_free(&r);

  /* Dots that are not dot-segments, and dot-segments in the query. */
  expect("/a/...b", &lim_default, KV(GET_("/a/...b")), 0);
  expect("/.well-known/x", &lim_default, KV(GET_("/.well-known/x")), 0);
  expect("/a/..b/c.", &lim_default, KV(GET_("/a/..b/c.")), 0);
  expect("/a?x=/../b", &lim_default, KV(GET_("/a?x=/../b")), 0);
  expect("/a?x=%2f", &lim_default, KV(GET_("/a?x=%2f")), 0);
  expect("OPTIONS *", &lim_default,
         KV({":method", "OPTIONS"}, {":scheme", "https"}, {":authority", "a"}, {":path", "*"}), 0);
}

static void test_refusals(void) {
  /* :authority and host. */
  expect(":authority differs from host", &lim_default, KV(GET_("/"), {"host", "b"}), 400);
  expect(":authority is a prefix of host", &lim_default, KV(GET_("/"), {"host", "ab"}), 400);
  expect("host is a prefix of :authority", &lim_default,
         KV({":method", "GET"}, {":scheme", "https"}, {":authority", "ab"}, {":path", "/"},
            {"host", "a"}),
         400);
  expect("neither :authority nor host", &lim_default,
         KV({":method", "GET"}, {":scheme", "https"}, {":path", "/"}), 400);
  expect("two host fields", &lim_default,
         KV({":method", "GET"}, {":scheme", "https"}, {":path", "/"}, {"host", "a"}, {"host", "a"}),
         400);
  expect("two host fields with :authority", &lim_default,
         KV(GET_("/"), {"host", "a"}, {"host", "a"}), 400);
  static const char *const bad_authority[] = {"user@a", "a/b", "a b", "a\"b", "a\\b", "a{b}",
                                              "a<b",    "a^b", "a`b", "a|b",  "a#b"};
  for (size_t i = 0; i < sizeof(bad_authority) / sizeof(bad_authority[0]); i++) {
    expect(bad_authority[i], &lim_default,
           KV({":method", "GET"}, {":scheme", "https"}, {":authority", bad_authority[i]},
              {":path", "/"}),
           400);
    /* The same through host alone. */
    expect(bad_authority[i], &lim_default,
           KV({":method", "GET"}, {":scheme", "https"}, {":path", "/"}, {"host", bad_authority[i]}),
           400);
  }

  /* Paths a prefix rule could be walked around with, and non-origin forms. */
  static const char *const bad_path[] = {
      "/a/../b",   "/..",        "/a/..",     "/a/./b",    "/.",        "/a/%2e%2e/b",
      "/a/%2E./b", "/a/.%2e",    "/a/..;x/b", "/a/.;/b",   "/a%2fb",    "/a%2Fb",
      "/a%5cb",    "/a%5Cb",     "/a\\b",     "/a#frag",   "a/b",       "",
      "**",        "http://a/b", "//..",      "/a/%2e/b/", "/a/%2e%2E/"};
  for (size_t i = 0; i < sizeof(bad_path) / sizeof(bad_path[0]); i++)
    expect(bad_path[i], &lim_default, KV(GET_(bad_path[i])), 400);

  /* "*" is OPTIONS' only. */
  expect("GET *", &lim_default, KV(GET_("*")), 400);
  expect("POST *", &lim_default,
         KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"}, {":path", "*"}), 400);
  expect("options * (the method is case-sensitive)", &lim_default,
         KV({":method", "options"}, {":scheme", "https"}, {":authority", "a"}, {":path", "*"}),
         400);

  /* CONNECT has no :path (RFC 9113 8.5): not served over HTTP/2. */
  expect("CONNECT", &lim_default, KV({":method", "CONNECT"}, {":authority", "a:443"}), 400);
  expect("no :method", &lim_default, KV({":scheme", "https"}, {":authority", "a"}, {":path", "/"}),
         400);

  /* Each refusal says why. */
  expect_why("neither", KV({":method", "GET"}, {":scheme", "https"}, {":path", "/"}), 400,
             "no :authority or host");
  expect_why("differ", KV(GET_("/"), {"host", "b"}), 400, "differ");
  expect_why("bad authority",
             KV({":method", "GET"}, {":scheme", "https"}, {":authority", "a@b"}, {":path", "/"}),
             400, ":authority");
  expect_why("bad path", KV(GET_("/a/../b")), 400, ":path");
  expect_why("GET *", KV(GET_("*")), 400, "OPTIONS");
  expect_why("CONNECT", KV({":method", "CONNECT"}, {":authority", "a:443"}), 400, "CONNECT");
  expect_why("two hosts", KV(GET_("/"), {"host", "a"}, {"host", "a"}), 400, "host");
  /* Methods the HTTP/1 parser would refuse are refused here too. */
  expect_why("unknown method",
             KV({":method", "FROB"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/"}),
             400, "unknown method");
  expect_why("lowercase get",
             KV({":method", "get"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/"}), 400,
             "unknown method");
  expect_why("PRI",
             KV({":method", "PRI"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/"}), 400,
             "unknown method");
  expect("PROPFIND (WebDAV, in llhttp's table)", &lim_default,
         KV({":method", "PROPFIND"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/d"}),
         0);

  /* The first reason stays. */
  pc_h2req_t r;
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "GET"}, {":scheme", "https"}, {":path", "/"}, {"host", "a"},
                      {"host", "b c"})),
               400);
  CHECK_STR_EQ(r.bad_detail, "more than one host field");
  pc_h2req_free(&r);
}

/* ---- limits ----------------------------------------------------------------- */

static void test_limits(void) {
  /* GET_("/") counts (7+3+4) + (7+5+4) + (10+1+4) + (5+1+4) = 55 bytes, 4 fields. */
  const pc_h2req_limits_t five = {5, 65536, 0};
  expect("5 fields of 5", &five, KV(GET_("/"), {"x", "1"}), 0);
  expect("6 fields of 5", &five, KV(GET_("/"), {"x", "1"}, {"y", "2"}), 431);
  /* Cookie crumbs, te, content-length and host count like any field. */
  expect("6 fields with crumbs", &five, KV(GET_("/"), {"cookie", "a"}, {"cookie", "b"}), 431);
  expect("6 fields with te", &five, KV(GET_("/"), {"te", "trailers"}, {"host", "a"}), 431);

  /* Bytes: name + value + 4 per field, pseudo-headers included. */
  const pc_h2req_limits_t b64 = {100, 64, 0};
  expect("64 bytes of 64", &b64, KV(GET_("/"), {"x", "1234"}), 0);    /* 55 + 1+4+4 */
  expect("65 bytes of 64", &b64, KV(GET_("/"), {"x", "12345"}), 431); /* 55 + 1+5+4 */
  expect("65 bytes, long name", &b64, KV(GET_("/"), {"xy", "1234"}), 431);
  const pc_h2req_limits_t b54 = {100, 54, 0};
  expect("55 bytes of pseudo-headers", &b54, KV(GET_("/")), 431);

  pc_h2req_t r;
  CHECK_INT_EQ(run(&r, &five, KV(GET_("/"), {"x", "1"}, {"y", "2"})), 431);
  CHECK_STR_CONTAINS(r.bad_detail, "limit");
  CHECK_INT_EQ(r.nfields, 6);
  /* Nothing past the limit is kept. */
  CHECK_MEM_EQ(r.fields.data, r.fields.len, "x: 1\r\n");
  pc_h2req_free(&r);

  /* 431 wins over a later 400. */
  CHECK_INT_EQ(run(&r, &five, KV(GET_("/../"), {"host", "b"}, {"y", "2"}, {"z", "3"})), 431);
  pc_h2req_free(&r);

  /* Trailers are counted against the same limits, and never kept. */
  memset(&r, 0, sizeof(r));
  feed(&r, &five, KV(GET_("/"), {"x", "1"}));
  CHECK_INT_EQ(pc_h2req_finish(&r), 0);
  feed(&r, &five, KV({"cookie", "t"}));
  CHECK_INT_EQ(r.nfields, 6);
  CHECK_INT_EQ(r.bad_status, 431);
  CHECK_MEM_EQ(r.fields.data, r.fields.len, "x: 1\r\n");
  CHECK_INT_EQ(r.cookie.len, 0);
  pc_h2req_free(&r);
  memset(&r, 0, sizeof(r));
  feed(&r, &lim_default, KV(GET_("/")));
  CHECK_INT_EQ(pc_h2req_finish(&r), 0);
  feed(&r, &lim_default,
       KV({"grpc-status", "0"}, {"content-type", "application/grpc"}, {"content-length", "7"},
          {"te", "trailers"}, {"host", "z"}));
  CHECK_INT_EQ(r.bad_status, 0);
  CHECK_INT_EQ(r.nfields, 9);
  CHECK_INT_EQ(r.fields.len, 0);
  CHECK_INT_EQ(r.grpc, 0);
  CHECK_INT_EQ(r.has_len, 0);
  CHECK_INT_EQ(r.te_trailers, 0);
  CHECK(r.host == NULL);
  pc_h2req_free(&r);

  /* A large field table stays exact. */
  memset(&r, 0, sizeof(r));
  const pc_h2req_limits_t big = {1000, 1 << 20, 0};
  feed(&r, &big, KV(GET_("/")));
  for (int i = 0; i < 500; i++) {
    char name[16];
    snprintf(name, sizeof(name), "x-%d", i);
    feed(&r, &big, KV({name, "v"}));
  }
  CHECK_INT_EQ(pc_h2req_finish(&r), 0);
  CHECK_INT_EQ(r.nfields, 504);
  CHECK_INT_EQ(pc_h2req_nv_cap(&r), 8 + 500);
  pc_h2req_free(&r);
}

/* ---- what is kept, and how -------------------------------------------------- */

static void test_kept(void) {
  pc_h2req_t r;
  /* Cookie crumbs (RFC 9113 8.2.3), in order, joined with "; ". */
  CHECK_INT_EQ(
      run(&r, &lim_default,
          KV(GET_("/"), {"cookie", "a=1"}, {"x", "y"}, {"cookie", "b=2"}, {"cookie", "c=3; d=4"})),
      0);
  CHECK_MEM_EQ(r.cookie.data, r.cookie.len, "a=1; b=2; c=3; d=4");
  CHECK_MEM_EQ(r.fields.data, r.fields.len, "x: y\r\n");
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"cookie", "only=1"})), 0);
  CHECK_MEM_EQ(r.cookie.data, r.cookie.len, "only=1");
  pc_h2req_free(&r);
  /* An empty crumb (nghttp2 lets "cookie: " through) adds nothing: the
   * joined value must not end in "; " (RFC 9113 8.2.1: no trailing
   * whitespace; an HTTP/1 parser trims it, an HTTP/2 upstream refuses it). */
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"cookie", ""}, {"cookie", "a=1"})), 0);
  CHECK_MEM_EQ(r.cookie.data, r.cookie.len, "a=1");
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"cookie", "a=1"}, {"cookie", ""})), 0);
  CHECK_MEM_EQ(r.cookie.data, r.cookie.len, "a=1");
  pc_h2req_free(&r);
  CHECK_INT_EQ(
      run(&r, &lim_default, KV(GET_("/"), {"cookie", "a=1"}, {"cookie", ""}, {"cookie", "b=2"})),
      0);
  CHECK_MEM_EQ(r.cookie.data, r.cookie.len, "a=1; b=2");
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"cookie", ""})), 0);
  CHECK_INT_EQ(r.cookie.len, 0);
  pc_h2req_free(&r);

  /* te: trailers is a flag, not a field. */
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"te", "trailers"})), 0);
  CHECK_INT_EQ(r.te_trailers, 1);
  CHECK_INT_EQ(r.fields.len, 0);
  pc_h2req_free(&r);

  /* content-length is kept as a number, not as a field. */
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                      {":path", "/"}, {"content-length", "12345"})),
               0);
  CHECK_INT_EQ(r.has_len, 1);
  CHECK_INT_EQ(r.length, 12345);
  CHECK_INT_EQ(r.fields.len, 0);
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                      {":path", "/"}, {"content-length", "0"})),
               0);
  CHECK_INT_EQ(r.has_len, 1);
  CHECK_INT_EQ(r.length, 0);
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                      {":path", "/"}, {"content-length", "9223372036854775807"})),
               0);
  CHECK_INT_EQ(r.length, INT64_MAX);
  pc_h2req_free(&r);
  /* nghttp2 takes any number of digits up to INT64_MAX's value, leading
   * zeros included ("000...0001" is 1): the length must be the same. */
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                      {":path", "/"}, {"content-length", "007"})),
               0);
  CHECK_INT_EQ(r.length, 7);
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                      {":path", "/"}, {"content-length", "00000000000000000001"})),
               0);
  CHECK_MSG(r.length == 1, "content-length 00000000000000000001 (20 digits) read as %llu",
            (unsigned long long)r.length);
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default,
                   KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                      {":path", "/"}, {"content-length", "0000000000000000000000000042"})),
               0);
  CHECK_MSG(r.length == 42, "content-length 0000000000000000000000000042 (28 digits) read as %llu",
            (unsigned long long)r.length);
  pc_h2req_free(&r);

  /* gRPC is recognised by its content-type, which stays a field. */
  static const struct {
    const char *ct;
    int grpc;
  } ct[] = {{"application/grpc", 1},     {"application/grpc+proto", 1},
            {"application/grpc-web", 1}, {"application/json", 0},
            {"application/grp", 0},      {"text/application/grpc", 0},
            {"application/grpcx", 1},    {"", 0}};
  for (size_t i = 0; i < sizeof(ct) / sizeof(ct[0]); i++) {
    CHECK_INT_EQ(run(&r, &lim_default,
                     KV({":method", "POST"}, {":scheme", "http"}, {":authority", "a"},
                        {":path", "/pkg.Svc/M"}, {"content-type", ct[i].ct})),
                 0);
    CHECK_MSG(r.grpc == ct[i].grpc, "content-type \"%s\": grpc %d, expected %d", ct[i].ct, r.grpc,
              ct[i].grpc);
    char line[64];
    snprintf(line, sizeof(line), "content-type: %s\r\n", ct[i].ct);
    CHECK_MEM_EQ(r.fields.data, r.fields.len, line);
    pc_h2req_free(&r);
  }
  /* Only content-type says so. */
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"accept", "application/grpc"})), 0);
  CHECK_INT_EQ(r.grpc, 0);
  pc_h2req_free(&r);

  /* A peer's x-forwarded-client-cert: dropped inbound, in any spelling. */
  static const char *const xfcc[] = {"x-forwarded-client-cert", "x_forwarded_client_cert",
                                     "X-Forwarded-Client-Cert", "x-forwarded_client-cert",
                                     "X_FORWARDED_CLIENT_CERT"};
  for (size_t i = 0; i < sizeof(xfcc) / sizeof(xfcc[0]); i++) {
    CHECK_INT_EQ(run(&r, &lim_inbound, KV(GET_("/"), {xfcc[i], "By=spiffe://evil"}, {"x", "1"})),
                 0);
    CHECK_MSG(r.fields.len == 6 && memcmp(r.fields.data, "x: 1\r\n", 6) == 0,
              "%s kept inbound: \"%.*s\"", xfcc[i], (int)r.fields.len,
              r.fields.data ? r.fields.data : "");
    CHECK_INT_EQ(r.nfields, 6); /* still counted */
    pc_h2req_free(&r);
    CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {xfcc[i], "By=spiffe://ok"})), 0);
    char line[80];
    snprintf(line, sizeof(line), "%s: By=spiffe://ok\r\n", xfcc[i]);
    CHECK_MEM_EQ(r.fields.data, r.fields.len, line);
    pc_h2req_free(&r);
  }
  /* Near misses are other fields. */
  static const char *const not_xfcc[] = {"x-forwarded-client-certs", "x-forwarded-client-cer",
                                         "x-forwarded-client", "xforwarded-client-cert",
                                         "x-forwarded-client.cert"};
  for (size_t i = 0; i < sizeof(not_xfcc) / sizeof(not_xfcc[0]); i++) {
    CHECK_INT_EQ(run(&r, &lim_inbound, KV(GET_("/"), {not_xfcc[i], "v"})), 0);
    char line[80];
    snprintf(line, sizeof(line), "%s: v\r\n", not_xfcc[i]);
    CHECK_MEM_EQ(r.fields.data, r.fields.len, line);
    pc_h2req_free(&r);
  }

  /* path_len: up to '?'. */
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/p?"))), 0);
  CHECK_INT_EQ(pc_h2req_path_len(&r), 2);
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/p/q"))), 0);
  CHECK_INT_EQ(pc_h2req_path_len(&r), 4);
  pc_h2req_free(&r);
  CHECK_INT_EQ(run(&r, &lim_default, KV({":method", "CONNECT"}, {":authority", "a:1"})), 400);
  CHECK_INT_EQ(pc_h2req_path_len(&r), 0);
  pc_h2req_free(&r);

  /* free zeroes, so a second free and a reuse are safe. */
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"), {"cookie", "a"}, {"x", "y"})), 0);
  pc_h2req_free(&r);
  CHECK(r.method == NULL && r.path == NULL && r.fields.data == NULL && r.cookie.data == NULL);
  CHECK(r.nfields == 0 && r.bytes == 0 && r.done == 0 && r.bad_status == 0);
  pc_h2req_free(&r);
}

/* ---- the HTTP/1.1 head ------------------------------------------------------ */

static const pc_h1_limits_t h1_lim = {8192, 65536, 100};

/* Parses head with a fresh strict request parser: it must be one complete,
 * valid head with r's method, target and host, and the framing asked for
 * (length: the Content-Length, -1 for none). */
static void reparse(const char *what, const pc_h2req_t *r, const pc_jbuf_t *head, int chunked,
                    long long length) {
  pc_h1_parser_t p;
  pc_h1_init(&p, 1, &h1_lim, NULL, NULL);
  size_t used = 0;
  int res = pc_h1_feed(&p, head->data, head->len, &used);
  CHECK_MSG(res == PC_H1_HEAD, "%s: pc_h1_feed returned %d (%s)", what, res,
            p.detail ? p.detail : "");
  if (res == PC_H1_HEAD) {
    const pc_h1_msg_t *m = &p.msg;
    CHECK_MSG(used == head->len, "%s: parser used %zu of %zu bytes", what, used, head->len);
    CHECK_MEM_EQ(m->method_str, m->method_len, r->method);
    CHECK_MEM_EQ(m->target, m->target_len, r->path);
    CHECK_INT_EQ(m->path_len, pc_h2req_path_len(r));
    CHECK_INT_EQ(m->minor, 1);
    const pc_h1_field_t *h = pc_h1_find(m, "host");
    CHECK_MSG(h != NULL, "%s: no host", what);
    if (h) CHECK_MEM_EQ(h->value, h->value_len, r->authority ? r->authority : r->host);
    CHECK_INT_EQ(m->chunked, chunked);
    CHECK_INT_EQ(m->has_length, length >= 0);
    if (length >= 0) CHECK_INT_EQ(m->length, length);
  }
  pc_h1_free(&p);
}

/* The HTTP/1.1 head an HTTP/1.1 upstream gets for r: its onward fields
 * (pc_h2req_nv), written as HTTP/1.1 (pc_h1_head_from_nv). */
static void h1_head(const pc_h2req_t *r, pc_jbuf_t *out, const char *xfcc, int end_stream,
                    int *chunked) {
  nghttp2_nv *nv = calloc(pc_h2req_nv_cap(r), sizeof(*nv));
  char cl[24];
  size_t n = pc_h2req_nv(r, nv, xfcc, cl);
  pc_h1_head_from_nv(out, nv, n, end_stream, chunked);
  free(nv);
}

/* Builds the head of kv (which must be accepted) and compares it. */
static void h1_case(const char *what, const pc_h2req_limits_t *lim, const kv_t *kv,
                    const char *extra, int end_stream, const char *want, int want_chunked) {
  pc_h2req_t r;
  int st = run(&r, lim, kv);
  CHECK_MSG(st == 0, "%s: refused with %d", what, st);
  if (st == 0) {
    pc_jbuf_t out = {0};
    pc_jbuf_raw(&out, "KEEP", 4); /* the head is appended */
    int chunked = 7;
    h1_head(&r, &out, extra, end_stream, &chunked);
    CHECK_MSG(out.len >= 4 && memcmp(out.data, "KEEP", 4) == 0, "%s: the buffer was not appended",
              what);
    CHECK_MEM_EQ(out.data + 4, out.len - 4, want);
    CHECK_MSG(chunked == want_chunked, "%s: *chunked %d, expected %d", what, chunked, want_chunked);
    pc_jbuf_t head = {0};
    pc_jbuf_raw(&head, out.data + 4, out.len - 4);
    const char *cl = strstr(want, "content-length: ");
    reparse(what, &r, &head, want_chunked, cl ? atoll(cl + 16) : -1);
    pc_jbuf_free(&head);
    pc_jbuf_free(&out);
  }
  pc_h2req_free(&r);
}

#define XFCC_LINE "x-forwarded-client-cert: By=spiffe://td/ns/a/sa/b\r\n"

static void test_h1_head(void) {
  h1_case("GET, no body", &lim_default,
          KV({":method", "GET"}, {":scheme", "https"}, {":authority", "example.com"},
             {":path", "/x?y=1"}, {"accept", "*/*"}, {"user-agent", "t/1"}),
          NULL, 1,
          "GET /x?y=1 HTTP/1.1\r\nhost: example.com\r\naccept: */*\r\nuser-agent: t/1\r\n\r\n", 0);
  h1_case("POST with content-length", &lim_default,
          KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"},
             {"content-type", "text/plain"}, {"content-length", "5"}),
          NULL, 0,
          "POST /u HTTP/1.1\r\nhost: a\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n",
          0);
  /* A length sent with the head stays even when the stream ended with it. */
  h1_case("POST content-length 0, end_stream", &lim_default,
          KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"},
             {"content-length", "0"}),
          NULL, 1, "POST /u HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n", 0);
  h1_case("POST with a body, no length", &lim_default,
          KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"}), NULL,
          0, "POST /u HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n", 1);
  h1_case("GET with a body, no length", &lim_default, KV(GET_("/g")), NULL, 0,
          "GET /g HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n", 1);
  h1_case("POST ended with its head", &lim_default,
          KV({":method", "POST"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"}), NULL,
          1, "POST /u HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n", 0);
  h1_case("PUT ended with its head", &lim_default,
          KV({":method", "PUT"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"}), NULL,
          1, "PUT /u HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n", 0);
  h1_case("PATCH ended with its head", &lim_default,
          KV({":method", "PATCH"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"}),
          NULL, 1, "PATCH /u HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n", 0);
  h1_case("GET ended with its head", &lim_default, KV(GET_("/")), NULL, 1,
          "GET / HTTP/1.1\r\nhost: a\r\n\r\n", 0);
  static const char *const quiet[] = {"HEAD", "DELETE", "OPTIONS", "TRACE"};
  for (size_t i = 0; i < sizeof(quiet) / sizeof(quiet[0]); i++) {
    char want[64];
    snprintf(want, sizeof(want), "%s /q HTTP/1.1\r\nhost: a\r\n\r\n", quiet[i]);
    h1_case(quiet[i], &lim_default,
            KV({":method", quiet[i]}, {":scheme", "https"}, {":authority", "a"}, {":path", "/q"}),
            NULL, 1, want, 0);
  }
  h1_case("OPTIONS *", &lim_default,
          KV({":method", "OPTIONS"}, {":scheme", "https"}, {":authority", "a"}, {":path", "*"}),
          NULL, 1, "OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n", 0);
  /* host alone; cookie after the fields; extra after the cookie, before the
   * framing; te and a dropped xfcc nowhere. */
  h1_case("host, cookie, te, extra", &lim_inbound,
          KV({":method", "POST"}, {":scheme", "http"}, {":path", "/pkg.Svc/M"},
             {"host", "svc:50051"}, {"content-type", "application/grpc"}, {"cookie", "a=1"},
             {"te", "trailers"}, {"x-forwarded-client-cert", "By=spiffe://evil"}, {"cookie", "b=2"},
             {"grpc-timeout", "1S"}),
          XFCC_LINE, 0,
          "POST /pkg.Svc/M HTTP/1.1\r\nhost: svc:50051\r\ncontent-type: application/grpc\r\n"
          "grpc-timeout: 1S\r\ncookie: a=1; b=2\r\n" XFCC_LINE "transfer-encoding: chunked\r\n\r\n",
          1);
  h1_case("extra and a length", &lim_default,
          KV({":method", "PUT"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/u"},
             {"content-length", "3"}),
          XFCC_LINE, 0, "PUT /u HTTP/1.1\r\nhost: a\r\n" XFCC_LINE "content-length: 3\r\n\r\n", 0);
  /* :authority wins over an equal host (which is not repeated). */
  h1_case(":authority and host", &lim_default,
          KV({":method", "GET"}, {":scheme", "https"}, {":authority", "A.example"}, {":path", "/"},
             {"host", "a.example"}),
          NULL, 1, "GET / HTTP/1.1\r\nhost: A.example\r\n\r\n", 0);
}

/* ---- the onward HTTP/2 fields ----------------------------------------------- */

static void check_nv(const char *what, const pc_h2req_t *r, const nghttp2_nv *nv, size_t n,
                     const kv_t *want) {
  size_t nwant = 0;
  while (want[nwant].name)
    nwant++;
  CHECK_MSG(n == nwant, "%s: %zu fields, expected %zu", what, n, nwant);
  CHECK_MSG(n <= pc_h2req_nv_cap(r), "%s: %zu fields, cap %zu", what, n, pc_h2req_nv_cap(r));
  for (size_t i = 0; i < n && i < nwant; i++) {
    CHECK_MEM_EQ((const char *)nv[i].name, nv[i].namelen, want[i].name);
    CHECK_MEM_EQ((const char *)nv[i].value, nv[i].valuelen, want[i].value);
    CHECK_INT_EQ(nv[i].flags, NGHTTP2_NV_FLAG_NONE);
  }
}

static void test_nv(void) {
  pc_h2req_t r;
  char cl[24];
  /* Everything at once. */
  CHECK_INT_EQ(
      run(&r, &lim_inbound,
          KV({":method", "POST"}, {":scheme", "https"}, {":authority", "svc:443"},
             {":path", "/pkg.Svc/M?x=a:b"}, {"content-type", "application/grpc"}, {"cookie", "a=1"},
             {"x-colon", "a: b: c"}, {"te", "trailers"},
             {"x_forwarded_client_cert", "By=spiffe://evil"}, {"cookie", "b=2"}, {"x-empty", ""},
             {"content-length", "42"}, {"host", "svc:443"}, {"grpc-timeout", "1S"})),
      0);
  size_t cap = pc_h2req_nv_cap(&r);
  CHECK_INT_EQ(cap, 8 + 4);
  nghttp2_nv *nv = calloc(cap, sizeof(*nv));
  size_t n = pc_h2req_nv(&r, nv, XFCC_LINE, cl);
  check_nv("all", &r, nv, n,
           KV({":method", "POST"}, {":scheme", "https"}, {":authority", "svc:443"},
              {":path", "/pkg.Svc/M?x=a:b"}, {"content-type", "application/grpc"},
              {"x-colon", "a: b: c"}, {"x-empty", ""}, {"grpc-timeout", "1S"},
              {"cookie", "a=1; b=2"}, {"te", "trailers"},
              {"x-forwarded-client-cert", "By=spiffe://td/ns/a/sa/b"}, {"content-length", "42"}));
  /* Exactly the cap when every optional entry is there. */
  CHECK_INT_EQ(n, cap);
  free(nv);
  pc_h2req_free(&r);

  /* Pseudo-headers only; host stands in for :authority, "http" for a
   * missing :scheme. */
  CHECK_INT_EQ(run(&r, &lim_default, KV({":method", "GET"}, {":path", "/"}, {"host", "h:1"})), 0);
  cap = pc_h2req_nv_cap(&r);
  CHECK_INT_EQ(cap, 8);
  nv = calloc(cap, sizeof(*nv));
  n = pc_h2req_nv(&r, nv, NULL, cl);
  check_nv("minimal", &r, nv, n,
           KV({":method", "GET"}, {":scheme", "http"}, {":authority", "h:1"}, {":path", "/"}));
  free(nv);
  pc_h2req_free(&r);

  /* The peer's xfcc goes on when not dropped (outbound), and a big length. */
  CHECK_INT_EQ(
      run(&r, &lim_default,
          KV({":method", "PUT"}, {":scheme", "http"}, {":authority", "a"}, {":path", "/u"},
             {"x-forwarded-client-cert", "By=x"}, {"content-length", "9223372036854775807"})),
      0);
  cap = pc_h2req_nv_cap(&r);
  nv = calloc(cap, sizeof(*nv));
  n = pc_h2req_nv(&r, nv, NULL, cl);
  check_nv("outbound", &r, nv, n,
           KV({":method", "PUT"}, {":scheme", "http"}, {":authority", "a"}, {":path", "/u"},
              {"x-forwarded-client-cert", "By=x"}, {"content-length", "9223372036854775807"}));
  free(nv);
  pc_h2req_free(&r);

  /* An empty xfcc value. */
  CHECK_INT_EQ(run(&r, &lim_default, KV(GET_("/"))), 0);
  nv = calloc(pc_h2req_nv_cap(&r), sizeof(*nv));
  n = pc_h2req_nv(&r, nv, "x-forwarded-client-cert: \r\n", cl);
  check_nv("empty xfcc", &r, nv, n,
           KV({":method", "GET"}, {":scheme", "https"}, {":authority", "a"}, {":path", "/"},
              {"x-forwarded-client-cert", ""}));
  free(nv);
  pc_h2req_free(&r);

  /* Many fields: the cap grows with them and is never exceeded. */
  memset(&r, 0, sizeof(r));
  const pc_h2req_limits_t big = {1000, 1 << 20, 1};
  feed(&r, &big, KV(GET_("/"), {"te", "trailers"}, {"cookie", "c"}, {"content-length", "1"}));
  for (int i = 0; i < 300; i++) {
    char name[16], value[16];
    snprintf(name, sizeof(name), "x-%d", i);
    snprintf(value, sizeof(value), "v:%d", i);
    feed(&r, &big, KV({name, value}));
  }
  CHECK_INT_EQ(pc_h2req_finish(&r), 0);
  cap = pc_h2req_nv_cap(&r);
  CHECK_INT_EQ(cap, 308);
  nv = calloc(cap, sizeof(*nv));
  n = pc_h2req_nv(&r, nv, XFCC_LINE, cl);
  CHECK_INT_EQ(n, 308);
  int order_ok = n == 308;
  for (int i = 0; order_ok && i < 300; i++) {
    char name[16], value[16];
    snprintf(name, sizeof(name), "x-%d", i);
    snprintf(value, sizeof(value), "v:%d", i);
    order_ok = nv[4 + i].namelen == strlen(name) && !memcmp(nv[4 + i].name, name, strlen(name)) &&
               nv[4 + i].valuelen == strlen(value) &&
               !memcmp(nv[4 + i].value, value, strlen(value));
  }
  CHECK_MSG(order_ok, "300 fields: not all kept in order");
  free(nv);
  pc_h2req_free(&r);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  test_accepts();
  test_refusals();
  test_limits();
  test_kept();
  test_h1_head();
  test_nv();
  pc_bufcache_drain();
  return CHECK_DONE("test_h2req");
}

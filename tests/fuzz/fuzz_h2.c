/*
 * fuzz_h2.c - HTTP/2 request heads (h2req.h) as a real nghttp2 server
 * session delivers them, from arbitrary client bytes.
 *
 * Input: byte 0 chooses raw input (bit 0 set: the client preface is not
 * prepended), small limits (bit 1: 8 fields, 256 bytes; else 100 and
 * 65536), drop_xfcc (bit 2), whether the sidecar's own
 * x-forwarded-client-cert line goes into the translated heads (bit 3),
 * whether the server sends its SETTINGS first (bit 4) and the size of each
 * response body (bits 5-7: 0..28 bytes); byte 1 chooses where the stream is
 * split (0: one piece; n: pieces of n bytes); the rest is what the client
 * sends, after "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" unless bit 0 says raw.
 *
 * The session is an nghttp2 server with its HTTP messaging checks on, as
 * h2.c runs it: every request stream gets a pc_h2req_t, every decoded field
 * goes to pc_h2req_field, the request's HEADERS frame to pc_h2req_finish,
 * and every stream gets a response (the refusal status, or 200) with a small
 * body, so that the send path runs too. The stream is fed piece by piece,
 * the session's output drained after each, until it ends or nghttp2 gives
 * up; everything is freed (LeakSanitizer must see nothing).
 *
 * Besides not crashing, read independently of h2req.c from the fields as
 * nghttp2 delivered them: the verdict is exactly what the rules give (431
 * once the count or the bytes, name + value + 4 per field, pass a limit;
 * 400 for a second host, no :method or :path, a method llhttp does not know
 * (and PRI, CONNECT), :authority differing from
 * host, neither, an authority with characters a uri-host cannot have, a
 * path that is not origin-form or has a dot-segment, an encoded slash or
 * backslash, a backslash or a '#', "*" for anything but OPTIONS; else 0);
 * the content-length kept is the number nghttp2 read; the grpc and te flags
 * match the fields. For an accepted request: the HTTP/1.1 head is one valid
 * head to a fresh strict parser (h1.h), with the same method, target and
 * host, the kept fields in order, the cookie
 * crumbs joined, the extra line, and framing that matches content-length
 * and END_STREAM; the HTTP/2 list fits pc_h2req_nv_cap, has the
 * pseudo-headers first, lowercase non-empty names, values without CR, LF,
 * NUL or leading/trailing whitespace (RFC 9113 8.2.1), and is exactly the
 * fields expected. Trailers are kept nowhere, but still counted.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <nghttp2/nghttp2.h>

#include "h1.h"
#include "h2req.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

static const pc_h1_limits_t lim_big = {1 << 20, 1 << 22, 100000};

#define PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define XFCC_NAME "x-forwarded-client-cert"
#define XFCC_VALUE "By=spiffe://td/ns/a/sa/b"
#define XFCC_LINE XFCC_NAME ": " XFCC_VALUE "\r\n"

static const char body_bytes[] = "0123456789abcdefghijklmnopqrstuvwxyz";

/* One field as nghttp2 delivered it (value may be empty). */
typedef struct {
  char *name, *value;
  size_t nlen, vlen;
} field_t;

typedef struct req {
  struct req *next, *prev;
  int32_t id;
  pc_h2req_t rq;
  field_t *f; /* the head's fields, in order */
  size_t nf, fcap;
  uint64_t trailer_fields, trailer_bytes;
  size_t body_left; /* response body bytes still to send */
} req_t;

typedef struct {
  pc_h2req_limits_t lim;
  int extra;        /* pass XFCC_LINE to the translations */
  size_t body_size; /* of each response */
  req_t *reqs;      /* every request not yet freed */
} ctx_t;

static void req_free(ctx_t *c, req_t *q) {
  if (q->prev)
    q->prev->next = q->next;
  else
    c->reqs = q->next;
  if (q->next) q->next->prev = q->prev;
  for (size_t i = 0; i < q->nf; i++) {
    free(q->f[i].name);
    free(q->f[i].value);
  }
  free(q->f);
  pc_h2req_free(&q->rq);
  free(q);
}

static char *dup_span(const uint8_t *p, size_t n) {
  char *s = malloc(n + 1);
  ASSERT(s);
  if (n) memcpy(s, p, n);
  s[n] = '\0';
  return s;
}

static int span_eq(const char *p, size_t n, const char *lit) {
  return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

static int f_is(const field_t *f, const char *name) { return span_eq(f->name, f->nlen, name); }

/* x-forwarded-client-cert with any case and any mix of '-' and '_'. */
static int xfcc_like(const char *n, size_t len) {
  const char *w = XFCC_NAME;
  if (len != strlen(w)) return 0;
  for (size_t i = 0; i < len; i++) {
    char a = n[i];
    if (a >= 'A' && a <= 'Z') a = (char)(a - 'A' + 'a');
    if (!(a == w[i] || (w[i] == '-' && a == '_'))) return 0;
  }
  return 1;
}

/* The first field called name, or NULL. */
static const field_t *find(const req_t *q, const char *name) {
  for (size_t i = 0; i < q->nf; i++)
    if (f_is(&q->f[i], name)) return &q->f[i];
  return NULL;
}

/* Is f one of the fields the translations carry as they are? */
static int kept(const ctx_t *c, const field_t *f) {
  if (f->nlen && f->name[0] == ':') return 0;
  if (f_is(f, "host") || f_is(f, "content-length") || f_is(f, "te") || f_is(f, "cookie")) return 0;
  return !(c->lim.drop_xfcc && xfcc_like(f->name, f->nlen));
}

/* The cookie crumbs that say something, joined with "; ". */
static void join_cookie(const req_t *q, pc_jbuf_t *out) {
  for (size_t i = 0; i < q->nf; i++) {
    if (!f_is(&q->f[i], "cookie") || q->f[i].vlen == 0) continue;
    if (out->len) pc_jbuf_raw(out, "; ", 2);
    pc_jbuf_raw(out, q->f[i].value, q->f[i].vlen);
  }
}

/* Content-length as nghttp2 reads it: digits, any number of them, at most
 * INT64_MAX. */
static uint64_t read_length(const field_t *f) {
  uint64_t v = 0;
  ASSERT(f->vlen > 0);
  for (size_t i = 0; i < f->vlen; i++) {
    ASSERT(f->value[i] >= '0' && f->value[i] <= '9');
    ASSERT(v <= (uint64_t)INT64_MAX / 10);
    v = v * 10 + (uint64_t)(f->value[i] - '0');
    ASSERT(v <= (uint64_t)INT64_MAX);
  }
  return v;
}

/* uri-host [":" port] characters (RFC 9110 7.2, RFC 3986 3.2.2). */
static int authority_chars_ok(const char *v, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)v[i];
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')) continue;
    if (!ch || !strchr("-._~!$&'()*+,;=%:[]", ch)) return 0;
  }
  return 1;
}

static int pct(const char *s, size_t n, size_t i, char a, char b) {
  return i + 2 < n && s[i] == '%' && s[i + 1] == a && (s[i + 2] | 0x20) == b;
}

/* Origin-form, no fragment, and in the part before '?' no backslash, no
 * encoded '/' or '\', no segment that is "." or ".." (plain or encoded)
 * before an optional ";params". */
static int path_ok(const char *s, size_t n) {
  if (n == 0 || s[0] != '/' || memchr(s, '#', n)) return 0;
  const char *qm = memchr(s, '?', n);
  size_t end = qm ? (size_t)(qm - s) : n;
  for (size_t i = 0; i < end; i++)
    if (s[i] == '\\' || pct(s, end, i, '2', 'f') || pct(s, end, i, '5', 'c')) return 0;
  size_t i = 0;
  while (i < end) {
    size_t j = i + 1, dots = 0, other = 0;
    while (j < end && s[j] != '/' && s[j] != ';') {
      if (s[j] == '.') {
        dots++;
        j++;
      } else if (pct(s, end, j, '2', 'e')) {
        dots++;
        j += 3;
      } else {
        other = 1;
        j++;
      }
    }
    if (!other && (dots == 1 || dots == 2)) return 0;
    while (j < end && s[j] != '/')
      j++;
    i = j;
  }
  return 1;
}

/* Methods the HTTP/1 parser knows (llhttp's HTTP method map). */
static int h1_method(const char *m, size_t n) {
#define PC_NAME(num, name, string) #string,
  static const char *const names[] = {HTTP_METHOD_MAP(PC_NAME)};
#undef PC_NAME
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
    if (span_eq(m, n, names[i])) return 1;
  return 0;
}

/* The verdict the rules give for the head's fields (see the top). */
static int expected_status(const ctx_t *c, const req_t *q) {
  uint64_t n = 0, bytes = 0;
  int hosts = 0;
  for (size_t i = 0; i < q->nf; i++) {
    const field_t *f = &q->f[i];
    n++;
    bytes += f->nlen + f->vlen + 4;
    if (n > c->lim.max_fields || bytes > c->lim.max_bytes) return 431;
    if (f_is(f, "host") && ++hosts == 2) return 400;
  }
  const field_t *m = find(q, ":method"), *p = find(q, ":path"), *a = find(q, ":authority"),
                *h = find(q, "host");
  if (!m || !p) return 400;
  if (!h1_method(m->value, m->vlen) || span_eq(m->value, m->vlen, "PRI") ||
      span_eq(m->value, m->vlen, "CONNECT"))
    return 400;
  if (a && h && (a->vlen != h->vlen || strncasecmp(a->value, h->value, a->vlen) != 0)) return 400;
  if (!a && !h) return 400;
  if (!authority_chars_ok(a ? a->value : h->value, a ? a->vlen : h->vlen)) return 400;
  int star = p->vlen == 1 && p->value[0] == '*';
  if (!star && !path_ok(p->value, p->vlen)) return 400;
  if (star && !span_eq(m->value, m->vlen, "OPTIONS")) return 400;
  return 0;
}

static int value_ok(const uint8_t *v, size_t n) {
  if (n == 0) return 1;
  if (memchr(v, '\r', n) || memchr(v, '\n', n) || memchr(v, '\0', n)) return 0;
  return (v[0] != ' ' && v[0] != '\t' && v[n - 1] != ' ' && v[n - 1] != '\t');
}

static void nv_is(const nghttp2_nv *nv, const char *name, const char *value, size_t vlen) {
  ASSERT(nv->namelen == strlen(name) && memcmp(nv->name, name, nv->namelen) == 0);
  ASSERT(nv->valuelen == vlen && (vlen == 0 || memcmp(nv->value, value, vlen) == 0));
}

/* The onward HTTP/2 fields. */
static void check_nv(const ctx_t *c, const req_t *q, const pc_jbuf_t *cookie) {
  const pc_h2req_t *r = &q->rq;
  size_t cap = pc_h2req_nv_cap(r);
  nghttp2_nv *nv = calloc(cap, sizeof(*nv));
  ASSERT(nv);
  char cl[24];
  size_t n = pc_h2req_nv(r, nv, c->extra ? XFCC_LINE : NULL, cl);
  ASSERT(n <= cap && n >= 4);
  int regular = 0;
  for (size_t i = 0; i < n; i++) {
    ASSERT(nv[i].namelen > 0 && nv[i].name);
    for (size_t j = 0; j < nv[i].namelen; j++)
      ASSERT(!(nv[i].name[j] >= 'A' && nv[i].name[j] <= 'Z'));
    if (nv[i].name[0] == ':')
      ASSERT(!regular);
    else
      regular = 1;
    ASSERT(nv[i].valuelen == 0 || nv[i].value);
    ASSERT(value_ok(nv[i].value, nv[i].valuelen));
  }
  const field_t *m = find(q, ":method"), *s = find(q, ":scheme"), *a = find(q, ":authority"),
                *h = find(q, "host"), *p = find(q, ":path"), *len = find(q, "content-length");
  size_t k = 0;
  nv_is(&nv[k++], ":method", m->value, m->vlen);
  nv_is(&nv[k++], ":scheme", s ? s->value : "http", s ? s->vlen : 4);
  nv_is(&nv[k++], ":authority", a ? a->value : h->value, a ? a->vlen : h->vlen);
  nv_is(&nv[k++], ":path", p->value, p->vlen);
  for (size_t i = 0; i < q->nf; i++) {
    if (!kept(c, &q->f[i])) continue;
    ASSERT(k < n);
    ASSERT(nv[k].namelen == q->f[i].nlen && memcmp(nv[k].name, q->f[i].name, q->f[i].nlen) == 0);
    ASSERT(nv[k].valuelen == q->f[i].vlen &&
           (q->f[i].vlen == 0 || memcmp(nv[k].value, q->f[i].value, q->f[i].vlen) == 0));
    k++;
  }
  if (cookie->len) {
    ASSERT(k < n);
    nv_is(&nv[k++], "cookie", cookie->data, cookie->len);
  }
  if (find(q, "te")) {
    ASSERT(k < n);
    nv_is(&nv[k++], "te", "trailers", 8);
  }
  if (c->extra) {
    ASSERT(k < n);
    nv_is(&nv[k++], XFCC_NAME, XFCC_VALUE, strlen(XFCC_VALUE));
  }
  if (len) {
    ASSERT(k < n);
    char want[24];
    int wl = snprintf(want, sizeof(want), "%llu", (unsigned long long)read_length(len));
    nv_is(&nv[k++], "content-length", want, (size_t)wl);
  }
  ASSERT(k == n);
  free(nv);
}

/* The HTTP/1.1 head, parsed again by a fresh strict parser. */
static void check_h1(const ctx_t *c, const req_t *q, const pc_jbuf_t *cookie, int end_stream) {
  const pc_h2req_t *r = &q->rq;
  pc_jbuf_t out = {0};
  int chunked = -1;
  nghttp2_nv *nv = calloc(pc_h2req_nv_cap(r), sizeof(*nv));
  char cl[24];
  size_t n = pc_h2req_nv(r, nv, c->extra ? XFCC_LINE : NULL, cl);
  pc_h1_head_from_nv(&out, nv, n, end_stream, &chunked);
  free(nv);
  ASSERT(chunked == 0 || chunked == 1);
  ASSERT(out.len >= 4 && memcmp(out.data + out.len - 4, "\r\n\r\n", 4) == 0);
  const field_t *m = find(q, ":method"), *a = find(q, ":authority"), *h = find(q, "host"),
                *p = find(q, ":path"), *len = find(q, "content-length");
  /* The request line is the method, the path and the version, as they are. */
  ASSERT(out.len > m->vlen + 1 + p->vlen + 11);
  ASSERT(memcmp(out.data, m->value, m->vlen) == 0 && out.data[m->vlen] == ' ');
  ASSERT(memcmp(out.data + m->vlen + 1, p->value, p->vlen) == 0);
  ASSERT(memcmp(out.data + m->vlen + 1 + p->vlen, " HTTP/1.1\r\n", 11) == 0);
  ASSERT(h1_method(m->value, m->vlen)); /* others were refused */

  pc_h1_parser_t hp;
  pc_h1_init(&hp, 1, &lim_big, NULL, NULL);
  size_t used = 0;
  ASSERT(pc_h1_feed(&hp, out.data, out.len, &used) == PC_H1_HEAD);
  ASSERT(used == out.len);
  const pc_h1_msg_t *msg = &hp.msg;
  ASSERT(msg->minor == 1);
  ASSERT(span_eq(msg->method_str, msg->method_len, r->method));
  ASSERT(msg->method_len == m->vlen && memcmp(msg->method_str, m->value, m->vlen) == 0);
  ASSERT(msg->target_len == p->vlen && memcmp(msg->target, p->value, p->vlen) == 0);
  ASSERT(msg->path_len == pc_h2req_path_len(r));
  /* host first, then the kept fields, cookie, the extra line, framing. */
  size_t k = 0;
  ASSERT(msg->nfields >= 1);
  const pc_h1_field_t *g = &msg->fields[k++];
  ASSERT(span_eq(g->name, g->name_len, "host"));
  const field_t *want_host = a ? a : h;
  ASSERT(g->value_len == want_host->vlen && memcmp(g->value, want_host->value, g->value_len) == 0);
  for (size_t i = 0; i < q->nf; i++) {
    if (!kept(c, &q->f[i])) continue;
    ASSERT(k < msg->nfields);
    g = &msg->fields[k++];
    ASSERT(g->name_len == q->f[i].nlen && memcmp(g->name, q->f[i].name, g->name_len) == 0);
    ASSERT(g->value_len == q->f[i].vlen &&
           (g->value_len == 0 || memcmp(g->value, q->f[i].value, g->value_len) == 0));
  }
  if (cookie->len) {
    ASSERT(k < msg->nfields);
    g = &msg->fields[k++];
    ASSERT(span_eq(g->name, g->name_len, "cookie"));
    ASSERT(g->value_len == cookie->len && memcmp(g->value, cookie->data, cookie->len) == 0);
  }
  if (c->extra) {
    ASSERT(k < msg->nfields);
    g = &msg->fields[k++];
    ASSERT(span_eq(g->name, g->name_len, XFCC_NAME) && span_eq(g->value, g->value_len, XFCC_VALUE));
  }
  /* Framing: the length the client declared, else chunks if a body
   * follows, else nothing or a zero length. */
  if (len) {
    ASSERT(msg->has_length && !msg->chunked && msg->length == read_length(len) && !chunked);
  } else if (!end_stream) {
    ASSERT(msg->chunked && !msg->has_length && chunked == 1);
  } else {
    ASSERT(!msg->chunked && !chunked && (!msg->has_length || msg->length == 0));
  }
  ASSERT(msg->nfields == k + (msg->has_length || msg->chunked));
  ASSERT(pc_h1_find(msg, "te") == NULL);
  pc_h1_free(&hp);
  pc_jbuf_free(&out);
}

/* The request's HEADERS frame arrived: finish and check the head. */
static void on_request(ctx_t *c, req_t *q, int end_stream) {
  pc_h2req_t *r = &q->rq;
  int st = pc_h2req_finish(r);
  ASSERT(st == r->bad_status && r->done);
  ASSERT(st == expected_status(c, q));
  if (st) {
    ASSERT(r->bad_detail && *r->bad_detail);
    return;
  }
  ASSERT(r->bad_detail == NULL);
  ASSERT(r->nfields == q->nf);
  const field_t *m = find(q, ":method"), *p = find(q, ":path"), *len = find(q, "content-length"),
                *te = find(q, "te");
  ASSERT(r->method_len == m->vlen && memcmp(r->method, m->value, m->vlen) == 0);
  ASSERT(r->path_len == p->vlen && memcmp(r->path, p->value, p->vlen) == 0);
  ASSERT(r->is_head == span_eq(m->value, m->vlen, "HEAD"));
  ASSERT(r->has_len == (len != NULL));
  if (len) ASSERT(r->length == read_length(len));
  ASSERT(r->te_trailers == (te != NULL));
  int grpc = 0;
  for (size_t i = 0; i < q->nf; i++)
    if (f_is(&q->f[i], "content-type") && q->f[i].vlen >= 16 &&
        memcmp(q->f[i].value, "application/grpc", 16) == 0)
      grpc = 1;
  ASSERT(r->grpc == grpc);
  const char *qm = memchr(p->value, '?', p->vlen);
  ASSERT(pc_h2req_path_len(r) == (qm ? (size_t)(qm - p->value) : p->vlen));

  pc_jbuf_t cookie = {0};
  join_cookie(q, &cookie);
  check_h1(c, q, &cookie, end_stream);
  check_nv(c, q, &cookie);
  pc_jbuf_free(&cookie);
}

/* ---- nghttp2 callbacks ------------------------------------------------------- */

static ssize_t read_body(nghttp2_session *ss, int32_t id, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *user) {
  (void)ss;
  (void)id;
  (void)user;
  req_t *q = src->ptr;
  size_t k = q->body_left < len ? q->body_left : len;
  if (k) memcpy(buf, body_bytes, k);
  q->body_left -= k;
  if (q->body_left == 0) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)k;
}

static void respond(ctx_t *c, nghttp2_session *ss, req_t *q) {
  char status[4];
  snprintf(status, sizeof(status), "%03d", q->rq.bad_status ? q->rq.bad_status : 200);
  nghttp2_nv nv[] = {
      {(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"content-type", (uint8_t *)"text/plain", 12, 10, NGHTTP2_NV_FLAG_NONE},
  };
  q->body_left = c->body_size;
  nghttp2_data_provider prd = {.source = {.ptr = q}, .read_callback = read_body};
  (void)nghttp2_submit_response(ss, q->id, nv, 2, &prd);
}

static int on_begin_headers(nghttp2_session *ss, const nghttp2_frame *f, void *user) {
  ctx_t *c = user;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  ASSERT(nghttp2_session_get_stream_user_data(ss, f->hd.stream_id) == NULL);
  req_t *q = calloc(1, sizeof(*q));
  ASSERT(q);
  q->id = f->hd.stream_id;
  q->next = c->reqs;
  if (c->reqs) c->reqs->prev = q;
  c->reqs = q;
  ASSERT(nghttp2_session_set_stream_user_data(ss, q->id, q) == 0);
  return 0;
}

static int on_header(nghttp2_session *ss, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *user) {
  (void)flags;
  ctx_t *c = user;
  req_t *q = nghttp2_session_get_stream_user_data(ss, f->hd.stream_id);
  if (!q) return 0;
  /* What nghttp2 promises h2req.h. */
  ASSERT(nlen > 0);
  for (size_t i = 0; i < nlen; i++)
    ASSERT(!(name[i] >= 'A' && name[i] <= 'Z') && name[i] != '\r' && name[i] != '\n');
  ASSERT(value_ok(value, vlen));
  pc_h2req_t *r = &q->rq;
  if (r->done) { /* trailers: counted, never kept */
    size_t fl = r->fields.len, ck = r->cookie.len;
    int bad = r->bad_status;
    pc_h2req_field(r, &c->lim, name, nlen, value, vlen);
    q->trailer_fields++;
    q->trailer_bytes += nlen + vlen + 4;
    ASSERT(r->fields.len == fl && r->cookie.len == ck);
    ASSERT(!bad || r->bad_status == bad);
    if (q->nf + q->trailer_fields > c->lim.max_fields) ASSERT(r->bad_status);
    return 0;
  }
  if (q->nf == q->fcap) {
    q->fcap = q->fcap ? q->fcap * 2 : 16;
    q->f = realloc(q->f, q->fcap * sizeof(*q->f));
    ASSERT(q->f);
  }
  q->f[q->nf++] = (field_t){dup_span(name, nlen), dup_span(value, vlen), nlen, vlen};
  pc_h2req_field(r, &c->lim, name, nlen, value, vlen);
  ASSERT(r->nfields == q->nf);
  return 0;
}

static int on_frame_recv(nghttp2_session *ss, const nghttp2_frame *f, void *user) {
  ctx_t *c = user;
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  req_t *q = nghttp2_session_get_stream_user_data(ss, f->hd.stream_id);
  if (!q || q->rq.done) return 0;
  ASSERT(f->headers.cat == NGHTTP2_HCAT_REQUEST);
  on_request(c, q, (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0);
  respond(c, ss, q);
  return 0;
}

static int on_stream_close(nghttp2_session *ss, int32_t id, uint32_t code, void *user) {
  (void)code;
  ctx_t *c = user;
  req_t *q = nghttp2_session_get_stream_user_data(ss, id);
  if (!q) return 0;
  nghttp2_session_set_stream_user_data(ss, id, NULL);
  req_free(c, q);
  return 0;
}

/* Sends what the session has queued; returns -1 once nghttp2 gives up. */
static int drain(nghttp2_session *ss) {
  for (int guard = 0; guard < 100000; guard++) {
    const uint8_t *out;
    ssize_t n = nghttp2_session_mem_send(ss, &out);
    if (n < 0) return -1;
    if (n == 0) return 0;
  }
  abort(); /* the session never stops writing */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  const uint8_t mode = data[0], split = data[1];
  ctx_t c = {0};
  c.lim = mode & 2 ? (pc_h2req_limits_t){8, 256, 0} : (pc_h2req_limits_t){100, 65536, 0};
  c.lim.drop_xfcc = (mode >> 2) & 1;
  c.extra = (mode >> 3) & 1;
  c.body_size = (size_t)(mode >> 5) * 4;

  const size_t pre = mode & 1 ? 0 : sizeof(PREFACE) - 1;
  const size_t n = pre + size - 2;
  uint8_t *in = malloc(n ? n : 1);
  ASSERT(in);
  memcpy(in, PREFACE, pre);
  memcpy(in + pre, data + 2, size - 2);

  nghttp2_session_callbacks *cb;
  ASSERT(nghttp2_session_callbacks_new(&cb) == 0);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
  nghttp2_option *opt;
  ASSERT(nghttp2_option_new(&opt) == 0);
  nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
  nghttp2_session *ss;
  ASSERT(nghttp2_session_server_new2(&ss, cb, &c, opt) == 0);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cb);
  if (mode & 16) {
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 65535},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, c.lim.max_bytes},
    };
    ASSERT(nghttp2_submit_settings(ss, NGHTTP2_FLAG_NONE, iv, 3) == 0);
  }

  size_t pos = 0;
  int ok = drain(ss) == 0;
  while (ok && pos < n) {
    size_t k = split && split < n - pos ? split : n - pos;
    ssize_t used = nghttp2_session_mem_recv(ss, in + pos, k);
    if (used < 0) break;
    ASSERT((size_t)used == k); /* nothing pauses the session */
    pos += k;
    ok = drain(ss) == 0;
  }

  nghttp2_session_del(ss); /* calls no stream-close callbacks */
  while (c.reqs)
    req_free(&c, c.reqs);
  free(in);
  return 0;
}

/*
 * fuzz_h1.c - the strict HTTP/1.1 parser (h1.h) on arbitrary byte streams.
 *
 * Input: byte 0 chooses the direction (bit 0 set: responses), the method of
 * the request a response answers (bits 1-2), small or default limits (bit 3)
 * and the pc_h1_write_head flags (bits 4-7); byte 1 chooses where the stream
 * is split (0: one piece; n: pieces of 1..n bytes); the rest is the stream,
 * parsed message after message until it runs out or is refused.
 *
 * Besides not crashing: *used never exceeds what was fed; every view of a
 * parsed head lies inside the parser's head buffer and agrees with the
 * limits and the strict rules; a refusal carries 400/431 (requests) or 502
 * (responses); decoded body bytes never exceed the bytes consumed and match
 * Content-Length; and every head pc_h1_write_head produces is accepted by a
 * fresh parser with the same method, target, status and end-to-end fields
 * (an Upgrade kept for a protocol switch as its tokens without h2c).
 */
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "h1.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

static const pc_h1_limits_t lim_small = {64, 512, 8};
static const pc_h1_limits_t lim_default = {8192, 65536, 100};
static const pc_h1_limits_t lim_big = {1 << 20, 1 << 22, 100000};

static const uint8_t req_methods[4] = {HTTP_GET, HTTP_HEAD, HTTP_CONNECT, HTTP_POST};

#define XFCC_LINE "x-forwarded-client-cert: By=spiffe://td/ns/a/sa/b\r\n"

typedef struct {
  const char *piece; /* the bytes of the current pc_h1_feed call */
  size_t piece_len;
  uint64_t total; /* decoded body bytes of the current message */
} body_ctx_t;

static void on_body(void *user, const char *data, size_t len) {
  body_ctx_t *b = user;
  /* Decoded bytes are a part of what was fed in this call. */
  ASSERT(b->piece && data >= b->piece && len <= b->piece_len &&
         (size_t)(data - b->piece) <= b->piece_len - len);
  b->total += len;
}

static int inside(const pc_h1_parser_t *p, const char *s, size_t n) {
  return s >= p->head && s <= p->head + p->head_len && n <= (size_t)(p->head + p->head_len - s);
}

static int name_eq(const pc_h1_field_t *f, const char *name) {
  return strlen(name) == f->name_len && strncasecmp(f->name, name, f->name_len) == 0;
}

static size_t count(const pc_h1_msg_t *m, const char *name) {
  size_t n = 0;
  for (size_t i = 0; i < m->nfields; i++)
    n += name_eq(&m->fields[i], name);
  return n;
}

/* Is name one of the comma-separated tokens of some Connection field? */
static int named_by_connection(const pc_h1_msg_t *m, const char *name, size_t nlen) {
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    if (!name_eq(f, "connection")) continue;
    size_t a = 0;
    while (a <= f->value_len) {
      size_t b = a;
      while (b < f->value_len && f->value[b] != ',')
        b++;
      size_t s = a, e = b;
      while (s < e && (f->value[s] == ' ' || f->value[s] == '\t'))
        s++;
      while (e > s && (f->value[e - 1] == ' ' || f->value[e - 1] == '\t'))
        e--;
      if (e - s == nlen && nlen && strncasecmp(f->value + s, name, nlen) == 0) return 1;
      a = b + 1;
    }
  }
  return 0;
}

/* x-forwarded-client-cert with any mix of '-' and '_' (read independently). */
static int xfcc_like(const pc_h1_field_t *f) {
  const char *w = "x-forwarded-client-cert";
  if (f->name_len != strlen(w)) return 0;
  for (size_t i = 0; i < f->name_len; i++) {
    char a = (char)tolower((unsigned char)f->name[i]);
    if (!(a == w[i] || (w[i] == '-' && a == '_'))) return 0;
  }
  return 1;
}

/* Would pc_h1_write_head drop f (h1.h's list, read independently)? */
static int dropped(const pc_h1_msg_t *m, const pc_h1_field_t *f, unsigned flags) {
  static const char *const hop[] = {
      "connection",     "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
      "content-length", "upgrade",    "http2-settings"};
  if ((flags & PC_H1_OUT_UPGRADE) && name_eq(f, "upgrade")) return 0;
  for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
    if (name_eq(f, hop[i])) return 1;
  if ((flags & PC_H1_OUT_DROP_XFCC) && xfcc_like(f)) return 1;
  /* Host stays even when Connection names it. */
  return !name_eq(f, "host") && named_by_connection(m, f->name, f->name_len);
}

/* What an Upgrade field kept for a protocol switch must go on as (h1.h): its
 * comma-separated tokens, trimmed of SP/HTAB, empty ones and h2c left out,
 * joined by ", ". Written to out (the caller frees it). */
static void upgrade_expected(const pc_h1_field_t *f, pc_jbuf_t *out) {
  size_t a = 0, kept = 0;
  while (a <= f->value_len) {
    size_t b = a;
    while (b < f->value_len && f->value[b] != ',')
      b++;
    size_t s = a, e = b;
    while (s < e && (f->value[s] == ' ' || f->value[s] == '\t'))
      s++;
    while (e > s && (f->value[e - 1] == ' ' || f->value[e - 1] == '\t'))
      e--;
    if (e > s && !(e - s == 3 && strncasecmp(f->value + s, "h2c", 3) == 0)) {
      if (kept++) pc_jbuf_raw(out, ", ", 2);
      pc_jbuf_raw(out, f->value + s, e - s);
    }
    a = b + 1;
  }
}

/* A "." or ".." path segment, plain or percent-encoded. */
static int dot_segment(const char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    size_t j = i + 1, dots = 0, other = 0;
    while (j < n && s[j] != '/') {
      if (s[j] == '.') {
        dots++;
        j++;
      } else if (j + 2 < n && s[j] == '%' && s[j + 1] == '2' && (s[j + 2] | 0x20) == 'e') {
        dots++;
        j += 3;
      } else {
        other = 1;
        j++;
      }
    }
    if (!other && (dots == 1 || dots == 2)) return 1;
    i = j;
  }
  return 0;
}

static int bodiless_response(uint8_t req_method, int status) {
  return req_method == HTTP_HEAD || status < 200 || status == 204 || status == 304 ||
         (req_method == HTTP_CONNECT && status < 300);
}

/* What a valid head looks like, however it was reached. */
static void check_head(const pc_h1_parser_t *p, const pc_h1_limits_t *lim) {
  const pc_h1_msg_t *m = &p->msg;
  ASSERT(p->head_len <= lim->max_head);
  ASSERT(m->nfields <= lim->max_fields);
  ASSERT(m->minor == 0 || m->minor == 1);
  ASSERT(!(m->chunked && m->has_length));
  ASSERT(!m->chunked || m->minor == 1);
  ASSERT(count(m, "content-length") <= 1 && count(m, "transfer-encoding") <= 1);
  ASSERT(m->has_length == (count(m, "content-length") == 1));
  ASSERT(m->chunked == (count(m, "transfer-encoding") == 1));
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    ASSERT(f->name_len > 0);
    ASSERT(inside(p, f->name, f->name_len) && inside(p, f->value, f->value_len));
    ASSERT(!memchr(f->name, '\r', f->name_len) && !memchr(f->name, '\n', f->name_len));
    ASSERT(!memchr(f->value, '\r', f->value_len) && !memchr(f->value, '\n', f->value_len));
    ASSERT(!memchr(f->value, '\0', f->value_len));
  }
  if (p->is_request) {
    ASSERT(m->method_len > 0 && inside(p, m->method_str, m->method_len));
    const char *name = llhttp_method_name((llhttp_method_t)m->method);
    ASSERT(strlen(name) == m->method_len && memcmp(name, m->method_str, m->method_len) == 0);
    ASSERT(m->target_len > 0 && inside(p, m->target, m->target_len));
    ASSERT(m->target_len <= lim->max_line);
    ASSERT(m->path_len <= m->target_len);
    ASSERT(!memchr(m->target, '#', m->target_len));
    if (m->method == HTTP_CONNECT) {
      ASSERT(!memchr(m->target, '/', m->target_len) && memchr(m->target, ':', m->target_len));
      /* uri-host ":" port, read independently of the parser. */
      size_t last = 0;
      for (size_t i = 0; i < m->target_len; i++) {
        unsigned char c = (unsigned char)m->target[i];
        ASSERT(isalnum(c) || (c && strchr("-._~!$&'()*+,;=%:[]", c)));
        if (c == ':') last = i;
      }
      ASSERT(last > 0 && last + 1 < m->target_len && m->target_len - last - 1 <= 5);
      for (size_t i = last + 1; i < m->target_len; i++)
        ASSERT(isdigit((unsigned char)m->target[i]));
      ASSERT(!m->chunked && !m->has_length);
    } else if (m->target_len == 1 && m->target[0] == '*') {
      ASSERT(m->method == HTTP_OPTIONS);
    } else {
      ASSERT(m->target[0] == '/');
      const char *q = memchr(m->target, '?', m->target_len);
      ASSERT(m->path_len == (q ? (size_t)(q - m->target) : m->target_len));
      ASSERT(!dot_segment(m->target, m->path_len));
    }
    /* Connection semantics, read independently. */
    ASSERT(m->keep_alive == (!named_by_connection(m, "close", 5) &&
                             (m->minor == 1 || named_by_connection(m, "keep-alive", 10))));
    const pc_h1_field_t *ex = NULL;
    for (size_t i = 0; i < m->nfields && !ex; i++)
      if (name_eq(&m->fields[i], "expect")) ex = &m->fields[i];
    ASSERT(m->expect_100 ==
           (ex && ex->value_len == 12 && strncasecmp(ex->value, "100-continue", 12) == 0));
    /* A protocol switch needs Connection: upgrade, one Upgrade, HTTP/1.1
     * (RFC 9110 7.8) and no body. */
    if (m->upgrade)
      ASSERT(named_by_connection(m, "upgrade", 7) && count(m, "upgrade") == 1 && m->minor == 1);
    ASSERT(count(m, "host") <= 1);
    ASSERT(m->minor == 0 || count(m, "host") == 1);
    ASSERT(!m->upgrade || (!m->chunked && !(m->has_length && m->length > 0)));
    ASSERT(!m->until_close);
  } else {
    ASSERT(m->status >= 100 && m->status <= 599);
    ASSERT(!m->phrase || inside(p, m->phrase, m->phrase_len));
    ASSERT(!m->until_close || (!m->chunked && !m->has_length));
    ASSERT(!m->until_close || !bodiless_response(p->req_method, m->status));
  }
}

/* Rewrites the head and parses the result again with a fresh parser. */
static void check_rewrite(const pc_h1_parser_t *p, unsigned sel) {
  const pc_h1_msg_t *m = &p->msg;
  unsigned flags = 0;
  const char *extra = NULL;
  if (sel & 1) flags |= PC_H1_OUT_CLOSE;
  if (sel & 2) flags |= PC_H1_OUT_KEEPALIVE;
  if (sel & 4) {
    flags |= PC_H1_OUT_DROP_XFCC;
    extra = XFCC_LINE;
  }
  /* Framing the caller may ask for: a length or chunks, never both, never on
   * CONNECT, chunks only where HTTP/1.1 is sent. */
  int upgrade = p->is_request ? m->upgrade : m->status == 101;
  if ((sel & 8) && !(p->is_request && m->method == HTTP_CONNECT) && !upgrade) {
    if (m->has_length)
      flags |= PC_H1_OUT_LENGTH;
    else if (!p->is_request || m->minor == 1)
      flags |= PC_H1_OUT_CHUNKED;
  }
  if (upgrade && (sel & 1))
    flags = (flags & ~(unsigned)(PC_H1_OUT_CLOSE | PC_H1_OUT_KEEPALIVE)) | PC_H1_OUT_UPGRADE;

  pc_jbuf_t out = {0};
  pc_h1_write_head(p, &out, flags, extra);
  ASSERT(out.len >= 4 && memcmp(out.data + out.len - 4, "\r\n\r\n", 4) == 0);

  pc_h1_parser_t q;
  pc_h1_init(&q, p->is_request, &lim_big, NULL, NULL);
  q.req_method = p->req_method;
  size_t used = 0;
  int r = pc_h1_feed(&q, out.data, out.len, &used);
  ASSERT(r == PC_H1_HEAD);
  ASSERT(used == out.len);
  const pc_h1_msg_t *n = &q.msg;
  if (p->is_request) {
    ASSERT(n->method == m->method && n->minor == m->minor);
    ASSERT(n->target_len == m->target_len && memcmp(n->target, m->target, m->target_len) == 0);
    ASSERT(n->path_len == m->path_len);
  } else {
    ASSERT(n->status == m->status && n->minor == 1);
    size_t a = m->phrase ? m->phrase_len : 0, b = n->phrase ? n->phrase_len : 0;
    ASSERT(a == b && (a == 0 || memcmp(n->phrase, m->phrase, a) == 0));
  }
  /* The end-to-end fields, in order, then what the flags and extra add. */
  size_t j = 0;
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    if (dropped(m, f, flags)) continue;
    ASSERT(j < n->nfields);
    const pc_h1_field_t *g = &n->fields[j++];
    ASSERT(g->name_len == f->name_len && memcmp(g->name, f->name, f->name_len) == 0);
    if ((flags & PC_H1_OUT_UPGRADE) && name_eq(f, "upgrade")) {
      pc_jbuf_t want = {0};
      upgrade_expected(f, &want);
      ASSERT(g->value_len == want.len &&
             (want.len == 0 || memcmp(g->value, want.data, want.len) == 0));
      pc_jbuf_free(&want);
    } else {
      ASSERT(g->value_len == f->value_len && memcmp(g->value, f->value, f->value_len) == 0);
    }
  }
  size_t added = !!(flags & PC_H1_OUT_LENGTH) + !!(flags & PC_H1_OUT_CHUNKED) +
                 !!(flags & (PC_H1_OUT_UPGRADE | PC_H1_OUT_CLOSE | PC_H1_OUT_KEEPALIVE)) +
                 (extra != NULL);
  ASSERT(n->nfields == j + added);
  ASSERT(count(n, "content-length") == !!(flags & PC_H1_OUT_LENGTH));
  ASSERT(count(n, "transfer-encoding") == !!(flags & PC_H1_OUT_CHUNKED));
  ASSERT(count(n, "keep-alive") == 0 && count(n, "proxy-connection") == 0);
  ASSERT(count(n, "te") == 0 && count(n, "trailer") == 0 && count(n, "http2-settings") == 0);
  if (flags & PC_H1_OUT_LENGTH) ASSERT(n->has_length && n->length == m->length);
  if (flags & PC_H1_OUT_DROP_XFCC) ASSERT(count(n, "x-forwarded-client-cert") == 1);
  if (!(flags & PC_H1_OUT_UPGRADE)) ASSERT(count(n, "upgrade") == 0);
  pc_h1_free(&q);
  pc_jbuf_free(&out);
}

static uint32_t rng;

static size_t next_piece(uint8_t split, size_t left) {
  if (split == 0) return left;
  rng = rng * 1103515245u + 12345u;
  size_t k = 1 + (rng >> 16) % split;
  return k < left ? k : left;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  const uint8_t mode = data[0], split = data[1];
  const int is_request = !(mode & 1);
  const uint8_t req_method = req_methods[(mode >> 1) & 3];
  const pc_h1_limits_t *lim = mode & 8 ? &lim_small : &lim_default;
  const unsigned sel = mode >> 4;
  const char *in = (const char *)data + 2;
  const size_t n = size - 2;
  rng = split * 2654435761u + (uint32_t)n;

  body_ctx_t body = {0};
  pc_h1_parser_t p;
  pc_h1_init(&p, is_request, lim, on_body, &body);
  size_t pos = 0;
  for (int msgs = 0; msgs < 10000; msgs++) {
    p.req_method = req_method;
    body.total = 0;
    const size_t start = pos;
    int heads = 0, r = PC_H1_MORE;
    size_t head_fields = 0;
    for (;;) {
      size_t k = next_piece(split, n - pos), used = (size_t)-1;
      body.piece = in + pos;
      body.piece_len = k;
      r = pc_h1_feed(&p, in + pos, k, &used);
      ASSERT(used <= k);
      pos += used;
      ASSERT(body.total <= pos - start);
      ASSERT(p.body_bytes == body.total);
      if (r == PC_H1_HEAD) {
        ASSERT(heads++ == 0);
        ASSERT(used > 0);
        check_head(&p, lim);
        check_rewrite(&p, sel);
        head_fields = p.msg.nfields;
        continue;
      }
      if (r == PC_H1_DONE || r == PC_H1_ERROR) break;
      ASSERT(r == PC_H1_MORE && used == k);
      if (pos == n) {
        /* The peer closes. */
        r = pc_h1_finish(&p);
        if (r == PC_H1_MORE) ASSERT(heads == 0 && body.total == 0);
        if (r == PC_H1_DONE) ASSERT(heads == 1 && !is_request && p.msg.until_close);
        break;
      }
    }
    if (r == PC_H1_ERROR) {
      ASSERT(is_request ? p.status == 400 || p.status == 431 : p.status == 502);
      ASSERT(p.detail && *p.detail);
      size_t used = 7;
      ASSERT(pc_h1_feed(&p, in, n, &used) == PC_H1_ERROR);
      break;
    }
    if (r != PC_H1_DONE) break; /* the stream ran out */
    ASSERT(heads == 1 && pos > start);
    /* Trailers are not head fields: the head's fields are still the head's. */
    ASSERT(p.msg.nfields == head_fields);
    for (size_t i = 0; i < p.msg.nfields; i++)
      ASSERT(inside(&p, p.msg.fields[i].name, p.msg.fields[i].name_len));
    ASSERT(pc_h1_complete(&p));
    size_t used = 7;
    ASSERT(pc_h1_feed(&p, in + pos, n - pos, &used) == PC_H1_DONE && used == 0);
    /* The body the head announced, no more and no less. */
    const pc_h1_msg_t *m = &p.msg;
    int bodiless =
        is_request ? !m->chunked && !m->has_length : bodiless_response(req_method, m->status);
    if (bodiless)
      ASSERT(body.total == 0);
    else if (m->has_length)
      ASSERT(body.total == m->length);
    pc_h1_reset(&p);
    if (pos == n) break;
  }
  pc_h1_free(&p);
  return 0;
}

#include "h2req.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "compat.h"
#include "h1.h"

static char *copy_span(const uint8_t *p, size_t n) {
  char *c = pc_malloc(n + 1);
  if (n) memcpy(c, p, n);
  c[n] = '\0';
  return c;
}

static int eq(const uint8_t *p, size_t n, const char *lit) {
  return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

static void set_bad(pc_h2req_t *r, int status, const char *detail) {
  if (!r->bad_status) {
    r->bad_status = status;
    r->bad_detail = detail;
  }
}

/* A pseudo-header nghttp2 let through once; a repeat would be its bug. */
static void keep(char **dst, size_t *dlen, const uint8_t *v, size_t vlen) {
  free(*dst);
  *dst = copy_span(v, vlen);
  *dlen = vlen;
}

void pc_h2req_field(pc_h2req_t *r, const pc_h2req_limits_t *lim, const uint8_t *name, size_t nlen,
                    const uint8_t *value, size_t vlen) {
  r->nfields++;
  r->bytes += (uint32_t)(nlen + vlen + 4);
  if (r->nfields > lim->max_fields || r->bytes > lim->max_bytes) {
    set_bad(r, 431, "the request's header fields exceed the sidecar's limits");
    return;
  }
  if (r->done || r->bad_status) return; /* trailers are counted, then dropped */
  if (nlen && name[0] == ':') {
    if (eq(name, nlen, ":method")) {
      keep(&r->method, &r->method_len, value, vlen);
      r->is_head = eq(value, vlen, "HEAD");
    } else if (eq(name, nlen, ":path")) {
      keep(&r->path, &r->path_len, value, vlen);
    } else if (eq(name, nlen, ":scheme")) {
      keep(&r->scheme, &r->scheme_len, value, vlen);
    } else if (eq(name, nlen, ":authority")) {
      keep(&r->authority, &r->authority_len, value, vlen);
    }
    return;
  }
  if (eq(name, nlen, "host")) {
    if (r->host) set_bad(r, 400, "more than one host field");
    keep(&r->host, &r->host_len, value, vlen);
    return;
  }
  if (eq(name, nlen, "content-length")) {
    uint64_t v = 0;
    /* nghttp2 checked the digits and that the value fits in int64, leading
     * zeros and all: every digit counts (reading only some turned
     * "000...066" into 0, and the body into a second, unchecked request). */
    for (size_t i = 0; i < vlen; i++)
      v = v * 10 + (uint64_t)(value[i] - '0');
    r->has_len = 1;
    r->length = v;
    return;
  }
  if (eq(name, nlen, "te")) { /* "trailers" (nghttp2 allows nothing else): hop-by-hop */
    r->te_trailers = 1;
    return;
  }
  if (eq(name, nlen, "cookie")) {
    if (vlen == 0) return; /* an empty crumb would leave a stray "; " */
    if (r->cookie.len) pc_jbuf_raw(&r->cookie, "; ", 2);
    pc_jbuf_raw(&r->cookie, (const char *)value, vlen);
    return;
  }
  if (lim->drop_xfcc && pc_h1_is_xfcc((const char *)name, nlen)) return;
  if (eq(name, nlen, "content-type") && vlen >= 16 && memcmp(value, "application/grpc", 16) == 0)
    r->grpc = 1;
  pc_jbuf_raw(&r->fields, (const char *)name, nlen);
  pc_jbuf_raw(&r->fields, ": ", 2);
  pc_jbuf_raw(&r->fields, (const char *)value, vlen);
  pc_jbuf_raw(&r->fields, "\r\n", 2);
}

/* Methods an HTTP/1 client could send us: llhttp's table (which the HTTP/1
 * parser accepts), less CONNECT (no :path over HTTP/2) and PRI (the
 * preface's). Any other method is refused over HTTP/2 as it is over
 * HTTP/1, so that both codecs let the same requests through. */
static int known_method(const char *m, size_t len) {
  static const char *const names[] = {
#define PC_METHOD_NAME(num, name, string) #string,
      HTTP_METHOD_MAP(PC_METHOD_NAME)
#undef PC_METHOD_NAME
  };
  if ((len == 7 && memcmp(m, "CONNECT", 7) == 0) || (len == 3 && memcmp(m, "PRI", 3) == 0))
    return 0;
  for (size_t i = 0; i < PC_ARRAY_SIZE(names); i++)
    if (strlen(names[i]) == len && memcmp(names[i], m, len) == 0) return 1;
  return 0;
}

int pc_h2req_finish(pc_h2req_t *r) {
  r->done = 1;
  if (r->bad_status) return r->bad_status;
  if (!r->method || !r->path) /* CONNECT has no :path */
    set_bad(r, 400, "CONNECT is not supported over HTTP/2");
  else if (!known_method(r->method, r->method_len))
    set_bad(r, 400, "unknown method");
  else if (r->authority && r->host &&
           (r->authority_len != r->host_len || strncasecmp(r->authority, r->host, r->host_len)))
    set_bad(r, 400, ":authority and host differ");
  else if (!r->authority && !r->host)
    set_bad(r, 400, "the request names no :authority or host");
  else if (r->authority ? !pc_h1_authority_ok(r->authority, r->authority_len)
                        : !pc_h1_authority_ok(r->host, r->host_len))
    set_bad(r, 400, "invalid :authority");
  else if (!(r->path_len == 1 && r->path[0] == '*') && !pc_h1_path_ok(r->path, r->path_len))
    set_bad(r, 400, "invalid or ambiguous :path");
  else if (r->path_len == 1 && r->path[0] == '*' && strcmp(r->method, "OPTIONS") != 0)
    set_bad(r, 400, "\"*\" is only a target for OPTIONS");
  return r->bad_status;
}

size_t pc_h2req_path_len(const pc_h2req_t *r) {
  if (!r->path) return 0;
  const char *q = memchr(r->path, '?', r->path_len);
  return q ? (size_t)(q - r->path) : r->path_len;
}

size_t pc_h2req_nv_cap(const pc_h2req_t *r) {
  size_t cap = 8; /* 4 pseudo-headers, cookie, te, xfcc, content-length */
  for (size_t i = 0; i < r->fields.len; i++)
    if (r->fields.data[i] == '\n') cap++;
  return cap;
}

static nghttp2_nv nv_of(const char *n, size_t nl, const char *v, size_t vl) {
  return (nghttp2_nv){(uint8_t *)n, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE};
}

size_t pc_h2req_nv(const pc_h2req_t *r, nghttp2_nv *nv, const char *xfcc_line, char cl[24]) {
  size_t n = 0;
  nv[n++] = nv_of(":method", 7, r->method, r->method_len);
  nv[n++] = nv_of(":scheme", 7, r->scheme ? r->scheme : "http", r->scheme ? r->scheme_len : 4);
  nv[n++] = nv_of(":authority", 10, r->authority ? r->authority : r->host,
                  r->authority ? r->authority_len : r->host_len);
  nv[n++] = nv_of(":path", 5, r->path, r->path_len);
  /* No fields: data is NULL, and NULL + 0 is undefined in C. */
  const char *p = r->fields.data, *e = p ? p + r->fields.len : NULL;
  while (p && p < e) {
    /* names carry no ':' and values no CR (nghttp2 checked both) */
    const char *colon = memchr(p, ':', (size_t)(e - p));
    const char *eol = memchr(p, '\r', (size_t)(e - p));
    if (!colon || !eol || eol < colon + 2) break;
    nv[n++] = nv_of(p, (size_t)(colon - p), colon + 2, (size_t)(eol - colon - 2));
    p = eol + 2;
  }
  if (r->cookie.len) nv[n++] = nv_of("cookie", 6, r->cookie.data, r->cookie.len);
  if (r->te_trailers) nv[n++] = nv_of("te", 2, "trailers", 8);
  if (xfcc_line) {
    size_t xl = strlen(xfcc_line); /* "x-forwarded-client-cert: V\r\n" */
    nv[n++] = nv_of(xfcc_line, 23, xfcc_line + 25, xl - 27);
  }
  if (r->has_len) {
    int len = snprintf(cl, 24, "%llu", (unsigned long long)r->length);
    nv[n++] = nv_of("content-length", 14, cl, (size_t)len);
  }
  return n;
}

void pc_h2req_free(pc_h2req_t *r) {
  free(r->method);
  free(r->path);
  free(r->authority);
  free(r->host);
  free(r->scheme);
  pc_jbuf_free(&r->fields);
  pc_jbuf_free(&r->cookie);
  memset(r, 0, sizeof(*r));
}

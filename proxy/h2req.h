/*
 * h2req.h - one HTTP/2 request head: its decoded fields collected, checked
 * and translated to the neutral fields of an onward request (upcall.h),
 * which an HTTP/1.1 upstream gets written as HTTP/1.1 (h1.h,
 * pc_h1_head_from_nv).
 *
 * nghttp2 (with its HTTP messaging checks on) has already refused what RFC
 * 9113 forbids: uppercase or invalid names, connection-specific fields, a
 * te other than "trailers", missing or repeated pseudo-headers, a
 * content-length that is not a number. What it leaves lenient
 * (LIBRARY-FACTS.md) is checked here: the decoded list's size and field
 * count against http.max_header_bytes / http.max_headers (each field counts
 * as its HTTP/1 line "name: value\r\n" would), :authority differing from
 * host, and the same request-target checks an HTTP/1 request gets
 * (pc_h1_path_ok). CONNECT is not served over HTTP/2.
 *
 * Kept: pseudo-headers, host, content-length, te, cookie crumbs (joined with
 * "; " as RFC 9113 8.2.3 asks), every other field as an HTTP/1 line; a
 * peer's x-forwarded-client-cert is dropped when asked (inbound).
 * Pure code: no I/O. Any thread, one request per thread at a time.
 */
#ifndef PC_H2REQ_H
#define PC_H2REQ_H

#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "log.h"

typedef struct {
  uint32_t max_fields, max_bytes;
  int drop_xfcc;
} pc_h2req_limits_t;

typedef struct {
  char *method, *path, *authority, *host, *scheme; /* NUL-terminated copies */
  size_t method_len, path_len, authority_len, host_len, scheme_len;
  pc_jbuf_t fields; /* "name: value\r\n" lines */
  pc_jbuf_t cookie;
  uint32_t nfields, bytes;
  uint64_t length; /* content-length, if has_len */
  unsigned has_len : 1, grpc : 1, te_trailers : 1, is_head : 1, done : 1;
  int bad_status; /* 0, or the answer the request gets: 400 or 431 */
  const char *bad_detail;
} pc_h2req_t;

/* One decoded field of the head (or of trailers, which are only counted). */
void pc_h2req_field(pc_h2req_t *r, const pc_h2req_limits_t *lim, const uint8_t *name, size_t nlen,
                    const uint8_t *value, size_t vlen);

/* The head is complete: runs the checks. Returns 0, or the status to answer
 * (bad_status; bad_detail says why). */
int pc_h2req_finish(pc_h2req_t *r);

/* Length of the path without its query (what the policy and the log see). */
size_t pc_h2req_path_len(const pc_h2req_t *r);

/* Fields for an onward HTTP/2 stream: pseudo-headers, kept fields, cookie,
 * te, then xfcc_line's field ("x-forwarded-client-cert: V\r\n", may be NULL)
 * and content-length (formatted into cl). nv needs pc_h2req_nv_cap(r)
 * entries; they point into r, xfcc_line and cl. Returns the count. */
size_t pc_h2req_nv_cap(const pc_h2req_t *r);
size_t pc_h2req_nv(const pc_h2req_t *r, nghttp2_nv *nv, const char *xfcc_line, char cl[24]);

void pc_h2req_free(pc_h2req_t *r);

#endif

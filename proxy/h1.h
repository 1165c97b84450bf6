/*
 * h1.h - strict HTTP/1.1 message parsing and head rewriting.
 *
 * llhttp does the tokenising; this module adds the RFC 9112 checks that
 * llhttp 8.1 leaves lenient (LIBRARY-FACTS.md) and the size limits. A head is
 * first collected and scanned byte by byte (bare CR or LF, NUL, a line that
 * starts with whitespace: obs-fold, line and size limits), then parsed by
 * llhttp in one piece, then checked as a whole (Host, Content-Length,
 * Transfer-Encoding, version, request-target form, dot-segments). Bodies are
 * fed straight to llhttp, which checks chunk syntax; decoded body bytes come
 * out through a callback so that the proxy re-frames them itself.
 *
 * One parser handles one message at a time: pc_h1_feed stops at the end of
 * the head and at the end of the message, so the caller keeps whatever
 * follows (a pipelined request, or bytes an upstream must not have sent).
 * Pure code: no I/O, no allocation beyond the parser's own buffers. Any
 * thread, one parser per thread at a time.
 */
#ifndef PC_H1_H
#define PC_H1_H

#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <nghttp2/nghttp2.h>

#include "log.h"

typedef struct {
  uint32_t max_line;   /* request line or status line, bytes without CRLF */
  uint32_t max_head;   /* the whole head, bytes */
  uint32_t max_fields; /* header field lines */
} pc_h1_limits_t;

typedef struct {
  const char *name, *value; /* point into the parser's head buffer */
  uint32_t name_len, value_len;
} pc_h1_field_t;

/* pc_h1_feed results. */
enum {
  PC_H1_MORE,  /* everything consumed; the message is not complete */
  PC_H1_HEAD,  /* the head is complete and valid (see msg); body may follow */
  PC_H1_DONE,  /* the message is complete */
  PC_H1_ERROR, /* malformed or over a limit: see status and detail */
};

/* What the caller must know about the message whose head was parsed. */
typedef struct {
  int minor;                /* HTTP/1.<minor>: 0 or 1 */
  uint8_t method;           /* llhttp_method_t (requests) */
  const char *method_str;   /* requests */
  uint32_t method_len;      /* requests */
  const char *target;       /* requests: the request-target as sent */
  uint32_t target_len;      /* requests */
  uint32_t path_len;        /* requests: target up to '?' */
  int status;               /* responses */
  const char *phrase;       /* responses: reason phrase */
  uint32_t phrase_len;      /* responses */
  pc_h1_field_t *fields;    /* every field line, in order */
  size_t nfields;           /* number of fields */
  unsigned chunked : 1;     /* Transfer-Encoding: chunked */
  unsigned has_length : 1;  /* Content-Length present */
  unsigned keep_alive : 1;  /* the sender wants the connection kept */
  unsigned upgrade : 1;     /* requests: a protocol switch other than h2c was asked for */
  unsigned expect_100 : 1;  /* requests: Expect: 100-continue */
  unsigned until_close : 1; /* responses: body delimited by the connection's end */
  uint64_t length;          /* Content-Length value */
} pc_h1_msg_t;

typedef struct pc_h1_parser {
  llhttp_t ll;
  const pc_h1_limits_t *lim;
  int is_request;
  int phase; /* internal */
  /* Decoded body bytes; called from inside pc_h1_feed / pc_h1_finish. */
  void (*on_body)(void *user, const char *data, size_t len);
  void *user;
  /* Responses only, set before the head arrives: the request's method (a
   * response to HEAD has no body; a 2xx to CONNECT starts a tunnel). */
  uint8_t req_method;
  pc_h1_msg_t msg;
  int status;         /* on PC_H1_ERROR: 400 or 431 (requests), 502 (responses) */
  const char *detail; /* on PC_H1_ERROR: static text */
  uint64_t body_bytes;
  /* head collection (internal) */
  char *head;
  size_t head_len, head_cap, line_start;
  uint32_t lines;
  char prev;
  size_t fcap, fbytes;             /* field table: entries, bytes */
  int head_done;                   /* llhttp finished the head (later fields are trailers) */
  uint32_t trailers;               /* trailer fields seen (dropped, but limited) */
  int ck_state, ck_digits, ck_ext; /* chunked framing check (h1.c scan_chunks) */
  int colon_seen;                  /* head scan: this field line's colon passed */
  uint64_t ck_left;
  size_t trailer_bytes;
} pc_h1_parser_t;

/* Initialises p for requests or responses; lim must outlive p. */
void pc_h1_init(pc_h1_parser_t *p, int is_request, const pc_h1_limits_t *lim,
                void (*on_body)(void *, const char *, size_t), void *user);

/* Forgets the current message (keeps buffers and settings). */
void pc_h1_reset(pc_h1_parser_t *p);

/* Consumes bytes of buf and returns one of PC_H1_*; *used is how many bytes
 * belong to the message so far (the rest is the caller's). After PC_H1_HEAD
 * the caller may inspect msg, then keeps feeding (the body; on a message
 * without body the next feed returns PC_H1_DONE at once, consuming nothing).
 * After PC_H1_DONE or PC_H1_ERROR, call pc_h1_reset before the next message. */
int pc_h1_feed(pc_h1_parser_t *p, const char *buf, size_t len, size_t *used);

/* The peer closed: returns PC_H1_DONE if that ends the message (a response
 * delimited by the connection's end), PC_H1_ERROR if the message was cut
 * short, PC_H1_MORE if no message had started. */
int pc_h1_finish(pc_h1_parser_t *p);

/* Non-zero once the message is complete (its head said there is no body, or
 * the body ended). */
int pc_h1_complete(const pc_h1_parser_t *p);

/* Field lookup: the first field called name (case-insensitive), or NULL. */
const pc_h1_field_t *pc_h1_find(const pc_h1_msg_t *m, const char *name);

/* Flags for pc_h1_write_head. */
#define PC_H1_OUT_CHUNKED 1u    /* add Transfer-Encoding: chunked */
#define PC_H1_OUT_CLOSE 2u      /* add Connection: close */
#define PC_H1_OUT_KEEPALIVE 4u  /* add Connection: keep-alive (HTTP/1.0 peers) */
#define PC_H1_OUT_UPGRADE 8u    /* keep Upgrade (less any h2c) and add Connection: upgrade */
#define PC_H1_OUT_DROP_XFCC 16u /* drop x-forwarded-client-cert (also with '_') */
#define PC_H1_OUT_LENGTH 32u    /* add Content-Length: msg.length */

/* Appends the head to send onwards: the start line (a response's always says
 * HTTP/1.1), every end-to-end field as received, minus hop-by-hop fields
 * (Connection and the fields it names, Keep-Alive, Proxy-Connection, TE,
 * Trailer, Transfer-Encoding, Content-Length, Upgrade, HTTP2-Settings), then
 * what flags ask for, then extra (complete "name: value\r\n" lines, may be
 * NULL), then the empty line. */
void pc_h1_write_head(const pc_h1_parser_t *p, pc_jbuf_t *out, unsigned flags, const char *extra);

/* Appends the HTTP/1.1 head of a request given in the neutral form of
 * upcall.h (nv: :method, :scheme, :authority, :path, then lowercase fields
 * without hop-by-hop ones): the request line from :method and :path, host
 * from :authority, every other field but te (hop-by-hop in HTTP/1.1) in
 * order, then the framing: the content-length among the fields if there
 * is one, else transfer-encoding: chunked if a body follows (!end; sets
 * *chunked), else content-length: 0 for methods that expect a body. */
void pc_h1_head_from_nv(pc_jbuf_t *out, const nghttp2_nv *nv, size_t n, int end, int *chunked);

/* Appends a complete response generated by the sidecar itself: status line,
 * content-type application/json, content-length, connection: close unless
 * keep, and the body {"status":N,"reason":"...","detail":"..."}. */
void pc_h1_error_response(pc_jbuf_t *out, int status, const char *reason, const char *detail,
                          int keep);

/* Appends just the JSON body of such a response (HTTP/2 sends it as DATA). */
void pc_h1_error_body(pc_jbuf_t *out, int status, const char *reason, const char *detail);

/* Non-zero if field f of message m must not be forwarded: a hop-by-hop field
 * as pc_h1_write_head drops them (Content-Length included: the writer
 * re-frames). */
int pc_h1_hop_by_hop(const pc_h1_msg_t *m, const pc_h1_field_t *f);

/* Non-zero if name is x-forwarded-client-cert, in any case, '_' for '-'. */
int pc_h1_is_xfcc(const char *name, size_t len);

/* The checks an HTTP/1 request-target gets, for a path that arrived another
 * way (HTTP/2 :path): origin-form ("/..."), no fragment, and nothing a prefix
 * rule could be walked around with (dot-segments, encoded slashes). */
int pc_h1_path_ok(const char *path, size_t len);

/* Non-zero if v is a valid uri-host[:port] (Host, :authority). */
int pc_h1_authority_ok(const char *v, size_t n);

/* The standard reason phrase of status ("Unknown" if not one we send). */
const char *pc_h1_phrase(int status);

/* Between messages (nothing of the next one has arrived), gives the head and
 * field buffers back to this thread's buffer cache (bufcache.h); they are
 * taken again when a message comes. Keeps an idle keep-alive connection
 * small. Does nothing mid-message. */
void pc_h1_trim(pc_h1_parser_t *p);

void pc_h1_free(pc_h1_parser_t *p);

#endif

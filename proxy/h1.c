#include "h1.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bufcache.h"
#include "compat.h"

enum { PH_HEAD, PH_BODY, PH_DONE, PH_ERROR };
/* chunked framing states (scan_chunks) */
enum {
  CK_SIZE0,
  CK_SIZE,
  CK_SIZE_WS,
  CK_EXT,
  CK_SIZE_LF,
  CK_DATA,
  CK_DATA_CR,
  CK_DATA_LF,
  CK_TRAILER0,
  CK_TRAILER,
  CK_TRAILER_LF,
  CK_END_LF,
  CK_DONE
};

static int on_method(llhttp_t *ll, const char *at, size_t n);
static int on_url(llhttp_t *ll, const char *at, size_t n);
static int on_status(llhttp_t *ll, const char *at, size_t n);
static int on_field(llhttp_t *ll, const char *at, size_t n);
static int on_value(llhttp_t *ll, const char *at, size_t n);
static int on_headers_complete(llhttp_t *ll);
static int on_body(llhttp_t *ll, const char *at, size_t n);
static int on_message_complete(llhttp_t *ll);

static const llhttp_settings_t settings = {
    .on_method = on_method,
    .on_url = on_url,
    .on_status = on_status,
    .on_header_field = on_field,
    .on_header_value = on_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static int fail(pc_h1_parser_t *p, int status, const char *detail) {
  p->phase = PH_ERROR;
  p->status = p->is_request ? status : 502;
  p->detail = detail;
  return PC_H1_ERROR;
}

void pc_h1_init(pc_h1_parser_t *p, int is_request, const pc_h1_limits_t *lim,
                void (*body_cb)(void *, const char *, size_t), void *user) {
  memset(p, 0, sizeof(*p));
  p->is_request = is_request;
  p->lim = lim;
  p->on_body = body_cb;
  p->user = user;
  pc_h1_reset(p);
}

void pc_h1_reset(pc_h1_parser_t *p) {
  pc_h1_field_t *fields = p->msg.fields;
  memset(&p->msg, 0, sizeof(p->msg));
  p->msg.fields = fields;
  p->phase = PH_HEAD;
  p->status = 0;
  p->detail = NULL;
  p->body_bytes = 0;
  p->head_len = p->line_start = 0;
  p->lines = 0;
  p->prev = 0;
  p->head_done = 0;
  p->ck_state = CK_SIZE0;
  p->ck_left = 0;
  p->ck_digits = 0;
  p->ck_ext = 0;
  p->colon_seen = 0;
  p->trailers = 0;
  p->trailer_bytes = 0;
  llhttp_init(&p->ll, p->is_request ? HTTP_REQUEST : HTTP_RESPONSE, &settings);
  p->ll.data = p;
}

void pc_h1_trim(pc_h1_parser_t *p) {
  if (p->phase != PH_HEAD || p->head_len != 0) return;
  pc_bufcache_put(p->head, p->head_cap);
  pc_bufcache_put(p->msg.fields, p->fbytes);
  p->head = NULL;
  p->msg.fields = NULL;
  p->head_cap = 0;
  p->fcap = 0;
  p->fbytes = 0;
}

void pc_h1_free(pc_h1_parser_t *p) {
  free(p->head);
  free(p->msg.fields);
  p->head = NULL;
  p->msg.fields = NULL;
}

int pc_h1_complete(const pc_h1_parser_t *p) { return p->phase == PH_DONE; }

static pc_h1_parser_t *parser_of(llhttp_t *ll) { return ll->data; }

static int on_method(llhttp_t *ll, const char *at, size_t n) {
  pc_h1_parser_t *p = parser_of(ll);
  p->msg.method_str = at;
  p->msg.method_len = (uint32_t)n;
  return 0;
}

static int on_url(llhttp_t *ll, const char *at, size_t n) {
  pc_h1_parser_t *p = parser_of(ll);
  p->msg.target = at;
  p->msg.target_len = (uint32_t)n;
  return 0;
}

static int on_status(llhttp_t *ll, const char *at, size_t n) {
  pc_h1_parser_t *p = parser_of(ll);
  p->msg.phrase = at;
  p->msg.phrase_len = (uint32_t)n;
  return 0;
}

static int on_field(llhttp_t *ll, const char *at, size_t n) {
  pc_h1_parser_t *p = parser_of(ll);
  if (p->head_done) {
    /* A trailer: dropped, but bounded like a head. */
    p->trailer_bytes += n;
    if (++p->trailers > p->lim->max_fields || p->trailer_bytes > p->lim->max_head) {
      fail(p, 431, "trailer section too large");
      return -1;
    }
    return 0;
  }
  if (p->msg.nfields == p->fcap) {
    if (p->fcap == 0) {
      p->msg.fields = pc_bufcache_get(16 * sizeof(*p->msg.fields), &p->fbytes);
    } else {
      p->fbytes *= 2;
      p->msg.fields = pc_realloc(p->msg.fields, p->fbytes);
    }
    p->fcap = p->fbytes / sizeof(*p->msg.fields);
  }
  pc_h1_field_t *f = &p->msg.fields[p->msg.nfields++];
  f->name = at;
  f->name_len = (uint32_t)n;
  f->value = at + n; /* empty until a value arrives */
  f->value_len = 0;
  return 0;
}

static int on_value(llhttp_t *ll, const char *at, size_t n) {
  pc_h1_parser_t *p = parser_of(ll);
  if (p->head_done) {
    p->trailer_bytes += n;
    if (p->trailer_bytes > p->lim->max_head) {
      fail(p, 431, "trailer section too large");
      return -1;
    }
    return 0;
  }
  pc_h1_field_t *f = &p->msg.fields[p->msg.nfields - 1];
  while (n > 0 && (at[n - 1] == ' ' || at[n - 1] == '\t'))
    n--;
  f->value = at;
  f->value_len = (uint32_t)n;
  return 0;
}

static int on_body(llhttp_t *ll, const char *at, size_t n) {
  pc_h1_parser_t *p = parser_of(ll);
  p->body_bytes += n;
  if (p->on_body) p->on_body(p->user, at, n);
  return 0;
}

static int on_message_complete(llhttp_t *ll) {
  pc_h1_parser_t *p = parser_of(ll);
  p->phase = PH_DONE;
  return HPE_PAUSED;
}

static int name_is(const pc_h1_field_t *f, const char *name) {
  return strlen(name) == f->name_len && strncasecmp(f->name, name, f->name_len) == 0;
}

const pc_h1_field_t *pc_h1_find(const pc_h1_msg_t *m, const char *name) {
  for (size_t i = 0; i < m->nfields; i++)
    if (name_is(&m->fields[i], name)) return &m->fields[i];
  return NULL;
}

static size_t count(const pc_h1_msg_t *m, const char *name) {
  size_t n = 0;
  for (size_t i = 0; i < m->nfields; i++)
    n += name_is(&m->fields[i], name);
  return n;
}

/* Calls fn for each comma-separated token of v (trimmed, may be empty). */
static int each_token(const char *v, size_t n, int (*fn)(const char *, size_t, void *), void *arg) {
  size_t i = 0;
  while (i <= n) {
    size_t j = i;
    while (j < n && v[j] != ',')
      j++;
    size_t a = i, b = j;
    while (a < b && (v[a] == ' ' || v[a] == '\t'))
      a++;
    while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t'))
      b--;
    if (b > a) {
      int r = fn(v + a, b - a, arg);
      if (r) return r;
    }
    i = j + 1;
  }
  return 0;
}

static int token_eq(const char *t, size_t n, const char *word) {
  return strlen(word) == n && strncasecmp(t, word, n) == 0;
}

typedef struct {
  int close, keep, upgrade;
} conn_tokens_t;

static int conn_token(const char *t, size_t n, void *arg) {
  conn_tokens_t *ct = arg;
  if (token_eq(t, n, "close")) ct->close = 1;
  if (token_eq(t, n, "keep-alive")) ct->keep = 1;
  if (token_eq(t, n, "upgrade")) ct->upgrade = 1;
  return 0;
}

static int not_h2c(const char *t, size_t n, void *arg) {
  (void)arg;
  return !token_eq(t, n, "h2c");
}

/* Does t name a field the Connection header lists? */
typedef struct {
  const char *name;
  size_t len;
} find_t;

static int token_is(const char *t, size_t n, void *arg) {
  find_t *f = arg;
  return n == f->len && strncasecmp(t, f->name, n) == 0;
}

static int listed_in_connection(const pc_h1_msg_t *m, const pc_h1_field_t *f) {
  find_t want = {f->name, f->name_len};
  for (size_t i = 0; i < m->nfields; i++)
    if (name_is(&m->fields[i], "connection") &&
        each_token(m->fields[i].value, m->fields[i].value_len, token_is, &want))
      return 1;
  return 0;
}

/* A path a prefix rule could be walked around with, by us or by an app that
 * decodes before it resolves: a "." or ".." segment (also percent-encoded, or
 * followed by ";params" as some servers strip them), an encoded '/' or '\',
 * or a raw '\'. */
static int evasive_path(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '\\') return 1;
    if (s[i] == '%' && i + 2 < n &&
        ((s[i + 1] == '2' && (s[i + 2] == 'f' || s[i + 2] == 'F')) ||
         (s[i + 1] == '5' && (s[i + 2] == 'c' || s[i + 2] == 'C'))))
      return 1;
  }
  size_t i = 0;
  while (i < n) {
    if (s[i] != '/') {
      i++;
      continue;
    }
    size_t j = i + 1, dots = 0, other = 0;
    while (j < n && s[j] != '/' && s[j] != ';') {
      if (s[j] == '.') {
        dots++;
        j++;
      } else if (s[j] == '%' && j + 2 < n && s[j + 1] == '2' &&
                 (s[j + 2] == 'e' || s[j + 2] == 'E')) {
        dots++;
        j += 3;
      } else {
        other = 1;
        j++;
      }
    }
    if (!other && (dots == 1 || dots == 2)) return 1;
    while (j < n && s[j] != '/')
      j++;
    i = j;
  }
  return 0;
}

/* uri-host [":" port] (RFC 9110 7.2): reg-name or IP-literal characters. */
static int authority_ok(const char *v, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)v[i];
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) continue;
    if (!strchr("-._~!$&'()*+,;=%:[]", c) || c == 0) return 0;
  }
  return 1;
}

static int check_target(pc_h1_parser_t *p) {
  pc_h1_msg_t *m = &p->msg;
  const char *t = m->target;
  size_t n = m->target_len;
  if (m->method == HTTP_CONNECT) {
    /* authority-form (RFC 9112 3.2.3): uri-host ":" port, nothing else; the
     * port is 1 to 5 digits. */
    if (n == 0 || memchr(t, '/', n) || !authority_ok(t, n)) return -1;
    const char *colon = memrchr(t, ':', n);
    size_t port_len = colon ? n - (size_t)(colon - t) - 1 : 0;
    if (!colon || colon == t || port_len == 0 || port_len > 5) return -1;
    for (size_t i = 1; i <= port_len; i++)
      if (colon[i] < '0' || colon[i] > '9') return -1;
    m->path_len = (uint32_t)n;
    return 0;
  }
  if (n == 1 && t[0] == '*') {
    if (m->method != HTTP_OPTIONS) return -1;
    m->path_len = 1;
    return 0;
  }
  if (n == 0 || t[0] != '/') return -1;
  const char *q = memchr(t, '?', n);
  const char *h = memchr(t, '#', n);
  if (h) return -1;
  m->path_len = (uint32_t)(q ? (size_t)(q - t) : n);
  if (evasive_path(t, m->path_len)) return -1;
  return 0;
}

static int digits_only(const char *s, size_t n) {
  if (n == 0 || n > 19) return 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] < '0' || s[i] > '9') return 0;
  return 1;
}

/* The whole-head checks llhttp does not make. Returns 0, or sets the error. */
static int check_head(pc_h1_parser_t *p) {
  pc_h1_msg_t *m = &p->msg;
  llhttp_t *ll = &p->ll;
  m->minor = ll->http_minor;
  if (ll->http_major != 1 || ll->http_minor > 1) return fail(p, 400, "unsupported HTTP version");
  for (size_t i = 0; i < m->nfields; i++)
    if (m->fields[i].name_len == 0) return fail(p, 400, "empty field name");
  size_t ncl = count(m, "content-length"), nte = count(m, "transfer-encoding");
  if (ncl > 1) return fail(p, 400, "more than one Content-Length");
  if (nte > 1) return fail(p, 400, "more than one Transfer-Encoding");
  if (ncl && nte) return fail(p, 400, "Content-Length with Transfer-Encoding");
  if (ncl) {
    const pc_h1_field_t *f = pc_h1_find(m, "content-length");
    if (!digits_only(f->value, f->value_len)) return fail(p, 400, "bad Content-Length");
    m->has_length = 1;
    m->length = strtoull(f->value, NULL, 10);
  }
  if (nte) {
    const pc_h1_field_t *f = pc_h1_find(m, "transfer-encoding");
    if (m->minor == 0) return fail(p, 400, "Transfer-Encoding in HTTP/1.0");
    if (!token_eq(f->value, f->value_len, "chunked"))
      return fail(p, 400, "Transfer-Encoding other than chunked");
    m->chunked = 1;
  }
  conn_tokens_t ct = {0, 0, 0};
  for (size_t i = 0; i < m->nfields; i++)
    if (name_is(&m->fields[i], "connection"))
      each_token(m->fields[i].value, m->fields[i].value_len, conn_token, &ct);
  m->keep_alive = !ct.close && (m->minor == 1 || ct.keep);
  if (p->is_request) {
    m->method = ll->method;
    size_t nhost = count(m, "host");
    if (nhost > 1) return fail(p, 400, "more than one Host");
    if (nhost == 0 && m->minor == 1) return fail(p, 400, "no Host");
    const pc_h1_field_t *host = pc_h1_find(m, "host");
    if (host && !authority_ok(host->value, host->value_len)) return fail(p, 400, "bad Host");
    if (check_target(p) != 0) return fail(p, 400, "bad request-target");
    const pc_h1_field_t *up = pc_h1_find(m, "upgrade");
    if (count(m, "upgrade") > 1) return fail(p, 400, "more than one Upgrade");
    /* HTTP/1.0 cannot switch protocols (RFC 9110 7.8); h2c is not offered. */
    if (ct.upgrade && up && m->minor == 1 && each_token(up->value, up->value_len, not_h2c, NULL))
      m->upgrade = 1;
    const pc_h1_field_t *ex = pc_h1_find(m, "expect");
    if (ex && token_eq(ex->value, ex->value_len, "100-continue")) m->expect_100 = 1;
    if (m->method == HTTP_CONNECT && (m->has_length || m->chunked))
      return fail(p, 400, "CONNECT with a body");
    /* A body before a protocol switch would be read as tunnel bytes: no switch. */
    if (m->upgrade && (m->chunked || (m->has_length && m->length > 0))) m->upgrade = 0;
  } else {
    m->status = ll->status_code;
    if (m->status < 100 || m->status > 599) return fail(p, 502, "bad status");
    int bodiless = p->req_method == HTTP_HEAD || m->status < 200 || m->status == 204 ||
                   m->status == 304 || (p->req_method == HTTP_CONNECT && m->status < 300);
    if (!bodiless && !m->chunked && !m->has_length) m->until_close = 1;
  }
  return 0;
}

static int on_headers_complete(llhttp_t *ll) {
  pc_h1_parser_t *p = parser_of(ll);
  p->head_done = 1;
  if (check_head(p) != 0) return -1;
  if (p->is_request) return p->msg.upgrade || p->msg.method == HTTP_CONNECT ? 2 : 0;
  int st = p->msg.status;
  if (st == 101 || (p->req_method == HTTP_CONNECT && st >= 200 && st < 300)) return 2;
  /* No body, whatever Content-Length or Transfer-Encoding claim (RFC 9112
   * 6.3): llhttp would read one after a 204 or 304 that announces it. */
  if (p->req_method == HTTP_HEAD || st < 200 || st == 204 || st == 304) return 1;
  return 0;
}

/* ---- chunked framing, checked byte by byte ------------------------------
 * llhttp 8.1 skips whatever follows chunk data up to the line end
 * ("5\r\nhelloXX\r\n" passes), so the framing is checked here before llhttp
 * sees the bytes: hex size (at most 16 digits), optional extensions without
 * control bytes, CRLF, exactly size bytes, CRLF; after the last chunk, trailer
 * lines (no obs-fold) and the final CRLF. */

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Returns 0, or -1 if buf breaks the framing; stops at the message's end. */
static int scan_chunks(pc_h1_parser_t *p, const char *buf, size_t len) {
  for (size_t i = 0; i < len && p->ck_state != CK_DONE; i++) {
    char c = buf[i];
    switch (p->ck_state) {
    case CK_SIZE0:
    case CK_SIZE: {
      int v = hexval(c);
      if (v >= 0) {
        if (++p->ck_digits > 16) return -1;
        p->ck_left = p->ck_left * 16 + (uint64_t)v;
        p->ck_state = CK_SIZE;
      } else if (p->ck_state == CK_SIZE0) {
        return -1;
      } else if (c == ' ' || c == '\t') {
        p->ck_state = CK_SIZE_WS;
      } else if (c == ';') {
        p->ck_state = CK_EXT;
      } else if (c == '\r') {
        p->ck_state = CK_SIZE_LF;
      } else {
        return -1;
      }
      break;
    }
    case CK_SIZE_WS:
      if (c == ';')
        p->ck_state = CK_EXT;
      else if (c != ' ' && c != '\t')
        return -1;
      break;
    case CK_EXT:
      if (++p->ck_ext > 4096) return -1; /* no use for more; bounded like a head line */
      if (c == '\r')
        p->ck_state = CK_SIZE_LF;
      else if ((unsigned char)c < 0x20 ? c != '\t' : c == 0x7f)
        return -1;
      break;
    case CK_SIZE_LF:
      if (c != '\n') return -1;
      p->ck_state = p->ck_left ? CK_DATA : CK_TRAILER0;
      p->ck_digits = 0;
      p->ck_ext = 0;
      break;
    case CK_DATA: {
      size_t take = len - i < p->ck_left ? len - i : (size_t)p->ck_left;
      p->ck_left -= take;
      i += take - 1;
      if (!p->ck_left) p->ck_state = CK_DATA_CR;
      break;
    }
    case CK_DATA_CR:
      if (c != '\r') return -1;
      p->ck_state = CK_DATA_LF;
      break;
    case CK_DATA_LF:
      if (c != '\n') return -1;
      p->ck_state = CK_SIZE0;
      break;
    case CK_TRAILER0:
      if (c == '\r')
        p->ck_state = CK_END_LF;
      else if (c == ' ' || c == '\t' || c == '\n' || c == 0)
        return -1;
      else
        p->ck_state = CK_TRAILER;
      break;
    case CK_TRAILER:
      if (c == '\r')
        p->ck_state = CK_TRAILER_LF;
      else if (c == '\n' || c == 0)
        return -1;
      break;
    case CK_TRAILER_LF:
      if (c != '\n') return -1;
      p->ck_state = CK_TRAILER0;
      break;
    case CK_END_LF:
      if (c != '\n') return -1;
      p->ck_state = CK_DONE;
      break;
    }
  }
  return 0;
}

/* Maps llhttp's verdict after a call; *used from the stop position. */
static int after_execute(pc_h1_parser_t *p, llhttp_errno_t e, const char *buf, size_t len,
                         size_t *used) {
  if (e == HPE_OK) {
    *used = len;
    return PC_H1_MORE;
  }
  if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
    const char *pos = llhttp_get_error_pos(&p->ll);
    *used = pos ? (size_t)(pos - buf) : len;
    if (*used > len) *used = len;
    p->phase = PH_DONE;
    return PC_H1_DONE;
  }
  if (p->phase == PH_ERROR) return PC_H1_ERROR; /* our own check said why */
  *used = len;
  if (e == HPE_PAUSED_H2_UPGRADE) return fail(p, 400, "HTTP/2 preface");
  if (e == HPE_INVALID_CHUNK_SIZE || e == HPE_STRICT) return fail(p, 400, "bad chunked framing");
  return fail(p, 400, p->is_request ? "malformed request" : "malformed response");
}

/* Parses the collected head in one piece. */
static int parse_head(pc_h1_parser_t *p) {
  p->msg.nfields = 0;
  llhttp_errno_t e = llhttp_execute(&p->ll, p->head, p->head_len);
  if (p->phase == PH_ERROR) return PC_H1_ERROR;
  /* llhttp takes "PRI * HTTP/2.0" and waits for the rest of the HTTP/2
   * preface without ever completing a head. */
  if (!p->head_done) return fail(p, 400, e == HPE_OK ? "HTTP/2 preface" : "malformed head");
  if (e == HPE_OK || e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
    if (e == HPE_OK) p->phase = PH_BODY;
    /* A message without body completed inside this call. */
    if (e != HPE_OK) p->phase = PH_DONE;
    return PC_H1_HEAD;
  }
  size_t used;
  return after_execute(p, e, p->head, p->head_len, &used);
}

/* Collects head bytes with the byte-level checks; returns PC_H1_MORE,
 * PC_H1_HEAD (head complete, *used bytes of buf taken) or PC_H1_ERROR. */
static int collect_head(pc_h1_parser_t *p, const char *buf, size_t len, size_t *used) {
  const pc_h1_limits_t *lim = p->lim;
  size_t i = 0;
  for (; i < len; i++) {
    char c = buf[i];
    if (c == 0) return fail(p, 400, "NUL byte");
    if (p->prev == '\r' && c != '\n') return fail(p, 400, "bare CR");
    if (c == '\n' && p->prev != '\r') return fail(p, 400, "bare LF");
    if (p->lines > 0 && p->head_len == p->line_start) {
      if (c == ' ' || c == '\t') return fail(p, 400, "line starts with whitespace (obs-fold)");
      p->colon_seen = 0;
    }
    /* "Name : value" (RFC 9112 5.1): llhttp drops the space; an app might
     * not, and would see a field we did not check (e.g. a spoofed
     * x-forwarded-client-cert). */
    if (p->lines > 0 && c == ':' && !p->colon_seen) {
      p->colon_seen = 1;
      if (p->prev == ' ' || p->prev == '\t')
        return fail(p, 400, "whitespace between field name and colon");
    }
    p->prev = c;
    if (p->head_len == p->head_cap) {
      if (p->head_cap == 0) {
        p->head = pc_bufcache_get(1024, &p->head_cap);
      } else {
        p->head_cap *= 2;
        p->head = pc_realloc(p->head, p->head_cap);
      }
    }
    p->head[p->head_len++] = c;
    if (p->head_len > lim->max_head) return fail(p, 431, "request head too large");
    if (p->lines == 0 && c != '\r' && c != '\n' && p->head_len > lim->max_line)
      return fail(p, 431, "request line too long");
    if (c != '\n') continue;
    size_t line_len = p->head_len - 2 - p->line_start;
    if (line_len == 0) {
      if (p->lines == 0) {
        /* An empty line before the request line is tolerated (RFC 9112 2.2). */
        p->head_len = 0;
        p->line_start = 0;
        continue;
      }
      *used = i + 1;
      return parse_head(p);
    }
    if (p->lines == 0 && line_len > lim->max_line) return fail(p, 431, "request line too long");
    if (p->lines > 0 && p->lines > lim->max_fields) return fail(p, 431, "too many header fields");
    p->lines++;
    p->line_start = p->head_len;
  }
  *used = len;
  return PC_H1_MORE;
}

int pc_h1_feed(pc_h1_parser_t *p, const char *buf, size_t len, size_t *used) {
  *used = 0;
  switch (p->phase) {
  case PH_HEAD: return collect_head(p, buf, len, used);
  case PH_BODY:
    if (len == 0) return PC_H1_MORE;
    if (p->msg.chunked && scan_chunks(p, buf, len) != 0) {
      *used = len;
      return fail(p, 400, "bad chunked framing");
    }
    return after_execute(p, llhttp_execute(&p->ll, buf, len), buf, len, used);
  case PH_DONE: return PC_H1_DONE;
  default: return PC_H1_ERROR;
  }
}

int pc_h1_finish(pc_h1_parser_t *p) {
  if (p->phase == PH_DONE) return PC_H1_DONE;
  if (p->phase == PH_HEAD && p->head_len == 0) return PC_H1_MORE;
  if (p->phase == PH_BODY && p->msg.until_close) {
    p->phase = PH_DONE;
    return PC_H1_DONE;
  }
  return fail(p, 400, "connection closed in the middle of a message");
}

static void put_field(pc_jbuf_t *out, const char *name, size_t nlen, const char *v, size_t vlen);

static int nv_is(const nghttp2_nv *f, const char *name, size_t len) {
  return f->namelen == len && memcmp(f->name, name, len) == 0;
}

/* Methods whose requests have no body by convention: sent without one, they
 * need no content-length: 0. */
static const char *const no_body_methods[] = {"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"};

void pc_h1_head_from_nv(pc_jbuf_t *o, const nghttp2_nv *nv, size_t n, int end, int *chunked) {
  const nghttp2_nv *method = NULL, *path = NULL, *authority = NULL;
  int has_len = 0;
  for (size_t i = 0; i < n; i++) {
    if (nv_is(&nv[i], ":method", 7))
      method = &nv[i];
    else if (nv_is(&nv[i], ":path", 5))
      path = &nv[i];
    else if (nv_is(&nv[i], ":authority", 10))
      authority = &nv[i];
    else if (nv_is(&nv[i], "content-length", 14))
      has_len = 1;
  }
  *chunked = 0;
  if (method) pc_jbuf_raw(o, (const char *)method->value, method->valuelen);
  pc_jbuf_raw(o, " ", 1);
  if (path) pc_jbuf_raw(o, (const char *)path->value, path->valuelen);
  pc_jbuf_raw(o, " HTTP/1.1\r\nhost: ", 17);
  if (authority) pc_jbuf_raw(o, (const char *)authority->value, authority->valuelen);
  pc_jbuf_raw(o, "\r\n", 2);
  for (size_t i = 0; i < n; i++) {
    const nghttp2_nv *f = &nv[i];
    if ((f->namelen && f->name[0] == ':') || nv_is(f, "te", 2)) continue;
    put_field(o, (const char *)f->name, f->namelen, (const char *)f->value, f->valuelen);
  }
  if (!has_len && !end) {
    pc_jbuf_raw(o, "transfer-encoding: chunked\r\n", 28);
    *chunked = 1;
  } else if (!has_len) {
    int quiet = 0;
    for (size_t i = 0; method && i < PC_ARRAY_SIZE(no_body_methods); i++)
      if (method->valuelen == strlen(no_body_methods[i]) &&
          memcmp(method->value, no_body_methods[i], method->valuelen) == 0)
        quiet = 1;
    if (!quiet) pc_jbuf_raw(o, "content-length: 0\r\n", 19);
  }
  pc_jbuf_raw(o, "\r\n", 2);
}

static void put_field(pc_jbuf_t *out, const char *name, size_t nlen, const char *v, size_t vlen) {
  pc_jbuf_raw(out, name, nlen);
  pc_jbuf_raw(out, ": ", 2);
  pc_jbuf_raw(out, v, vlen);
  pc_jbuf_raw(out, "\r\n", 2);
}

/* x-forwarded-client-cert, also spelled with '_' for '-' (CGI-style apps
 * map both to one variable). */
static int is_xfcc(const pc_h1_field_t *f) {
  static const char want[] = "x-forwarded-client-cert";
  if (f->name_len != sizeof(want) - 1) return 0;
  for (size_t i = 0; i < f->name_len; i++) {
    char c = f->name[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (c == '_') c = '-';
    if (c != want[i]) return 0;
  }
  return 1;
}

static int hop_by_hop(const pc_h1_msg_t *m, const pc_h1_field_t *f, unsigned flags) {
  static const char *const names[] = {
      "connection",     "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
      "content-length", "upgrade",    "http2-settings"};
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
    if (name_is(f, names[i])) return !(flags & PC_H1_OUT_UPGRADE) || !name_is(f, "upgrade");
  if ((flags & PC_H1_OUT_DROP_XFCC) && is_xfcc(f)) return 1;
  /* "Connection: host" must not make a request lose its Host. */
  return !name_is(f, "host") && listed_in_connection(m, f);
}

int pc_h1_hop_by_hop(const pc_h1_msg_t *m, const pc_h1_field_t *f) { return hop_by_hop(m, f, 0); }

int pc_h1_is_xfcc(const char *name, size_t len) {
  pc_h1_field_t f = {.name = name, .name_len = (uint32_t)len};
  return is_xfcc(&f);
}

int pc_h1_path_ok(const char *path, size_t len) {
  if (len == 0 || path[0] != '/' || memchr(path, '#', len)) return 0;
  const char *q = memchr(path, '?', len);
  return !evasive_path(path, q ? (size_t)(q - path) : len);
}

int pc_h1_authority_ok(const char *v, size_t n) { return n > 0 && authority_ok(v, n); }

/* Appends v in decimal: heads are written per request, printf is the
 * slowest thing in them. */
static void put_u64(pc_jbuf_t *out, uint64_t v) {
  char buf[20];
  size_t i = sizeof(buf);
  do {
    buf[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  pc_jbuf_raw(out, buf + i, sizeof(buf) - i);
}

/* Upgrade, kept for a protocol switch, without h2c: the sidecar never
 * switches to cleartext HTTP/2, so the app must not be offered it either
 * ("Upgrade: h2c, websocket" goes on as "upgrade: websocket"). */
typedef struct {
  pc_jbuf_t *out;
  int n;
} upgrade_out_t;

static int put_upgrade_token(const char *t, size_t n, void *arg) {
  upgrade_out_t *u = arg;
  if (token_eq(t, n, "h2c")) return 0;
  if (u->n++) pc_jbuf_raw(u->out, ", ", 2);
  pc_jbuf_raw(u->out, t, n);
  return 0;
}

static void put_upgrade(pc_jbuf_t *out, const pc_h1_field_t *f) {
  pc_jbuf_raw(out, f->name, f->name_len);
  pc_jbuf_raw(out, ": ", 2);
  upgrade_out_t u = {out, 0};
  each_token(f->value, f->value_len, put_upgrade_token, &u);
  pc_jbuf_raw(out, "\r\n", 2);
}

void pc_h1_write_head(const pc_h1_parser_t *p, pc_jbuf_t *out, unsigned flags, const char *extra) {
  const pc_h1_msg_t *m = &p->msg;
  if (p->is_request) {
    pc_jbuf_raw(out, m->method_str, m->method_len);
    pc_jbuf_raw(out, " ", 1);
    pc_jbuf_raw(out, m->target, m->target_len);
    pc_jbuf_raw(out, m->minor ? " HTTP/1.1\r\n" : " HTTP/1.0\r\n", 11);
  } else {
    pc_jbuf_raw(out, "HTTP/1.1 ", 9);
    put_u64(out, (uint64_t)m->status);
    pc_jbuf_raw(out, " ", 1);
    pc_jbuf_raw(out, m->phrase ? m->phrase : "", m->phrase ? m->phrase_len : 0);
    pc_jbuf_raw(out, "\r\n", 2);
  }
  for (size_t i = 0; i < m->nfields; i++) {
    const pc_h1_field_t *f = &m->fields[i];
    if (hop_by_hop(m, f, flags)) continue;
    if ((flags & PC_H1_OUT_UPGRADE) && name_is(f, "upgrade"))
      put_upgrade(out, f);
    else
      put_field(out, f->name, f->name_len, f->value, f->value_len);
  }
  if (flags & PC_H1_OUT_LENGTH) {
    pc_jbuf_raw(out, "content-length: ", 16);
    put_u64(out, m->length);
    pc_jbuf_raw(out, "\r\n", 2);
  }
  if (flags & PC_H1_OUT_CHUNKED) pc_jbuf_raw(out, "transfer-encoding: chunked\r\n", 28);
  if (flags & PC_H1_OUT_UPGRADE)
    pc_jbuf_raw(out, "connection: upgrade\r\n", 21);
  else if (flags & PC_H1_OUT_CLOSE)
    pc_jbuf_raw(out, "connection: close\r\n", 19);
  else if (flags & PC_H1_OUT_KEEPALIVE)
    pc_jbuf_raw(out, "connection: keep-alive\r\n", 24);
  if (extra) pc_jbuf_raw(out, extra, strlen(extra));
  pc_jbuf_raw(out, "\r\n", 2);
}

const char *pc_h1_phrase(int status) {
  switch (status) {
  case 400: return "Bad Request";
  case 403: return "Forbidden";
  case 408: return "Request Timeout";
  case 431: return "Request Header Fields Too Large";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return "Unknown";
  }
}

void pc_h1_error_body(pc_jbuf_t *out, int status, const char *reason, const char *detail) {
  pc_jbuf_printf(out, "{\"status\":%d", status);
  pc_jbuf_kv_str(out, "reason", reason ? reason : "");
  pc_jbuf_kv_str(out, "detail", detail ? detail : "");
  pc_jbuf_raw(out, "}\n", 2);
}

void pc_h1_error_response(pc_jbuf_t *out, int status, const char *reason, const char *detail,
                          int keep) {
  pc_jbuf_t body = {0};
  pc_h1_error_body(&body, status, reason, detail);
  pc_jbuf_printf(
      out, "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %zu\r\n%s\r\n",
      status, pc_h1_phrase(status), body.len, keep ? "" : "connection: close\r\n");
  pc_jbuf_raw(out, body.data, body.len);
  pc_jbuf_free(&body);
}

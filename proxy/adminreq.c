#include "adminreq.h"

#include <string.h>

static int on_url(llhttp_t *p, const char *at, size_t len) {
  pc_adminreq_t *r = p->data;
  if (r->url_too_long || r->url_len + len >= sizeof(r->url)) {
    r->url_too_long = 1;
    return 0;
  }
  memcpy(r->url + r->url_len, at, len);
  r->url_len += len;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  pc_adminreq_t *r = p->data;
  r->headers_done = 1;
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  pc_adminreq_t *r = p->data;
  r->complete = 1;
  return HPE_PAUSED; /* one request per connection: stop here */
}

void pc_adminreq_init(pc_adminreq_t *r) {
  memset(r, 0, sizeof(*r));
  llhttp_settings_init(&r->settings);
  r->settings.on_url = on_url;
  r->settings.on_headers_complete = on_headers_complete;
  r->settings.on_message_complete = on_message_complete;
  llhttp_init(&r->parser, HTTP_REQUEST, &r->settings);
  r->parser.data = r;
}

int pc_adminreq_feed(pc_adminreq_t *r, const char *buf, size_t len) {
  if (r->status) return r->status;
  r->bytes += len;
  if (!r->headers_done && r->bytes > PC_ADMINREQ_MAX_HEAD) return r->status = 431;
  llhttp_errno_t e = llhttp_execute(&r->parser, buf, len);
  if (r->complete || e == HPE_PAUSED) {
    if (r->url_too_long) return r->status = 414;
    char *q = memchr(r->url, '?', r->url_len);
    r->url[q ? (size_t)(q - r->url) : r->url_len] = '\0';
    r->method = llhttp_get_method(&r->parser);
    return r->status = 200;
  }
  if (e != HPE_OK) return r->status = 400;
  return 0;
}

int pc_adminreq_method(const pc_adminreq_t *r) { return r->method; }

const char *pc_adminreq_path(const pc_adminreq_t *r) { return r->url; }

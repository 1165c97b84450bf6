#include "upcall.h"

#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "h1up.h"
#include "h2up.h"
#include "worker.h"

struct pc_upcall {
  pc_h1call_t *h1; /* exactly one of h1 and h2 is set */
  pc_h2call_t *h2;
  const pc_upcall_cbs_t *cbs;
  void *user;
  /* "auto" over HTTP/2 only: what a fall-back to HTTP/1.1 needs */
  pc_worker_t *w;
  pc_gen_t *g;
  const pc_listener_cfg_t *lc;
  pc_metrics_t *stats;
  nghttp2_nv *nv;
  size_t n;
  char *bytes;
  struct pc_endpoint *pin;
  unsigned end : 1, body : 1, fallback : 1;
};

int pc_upcall_uses_h2(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                      int prefer_h2) {
  if (lc->direction == PC_DIR_INBOUND) return lc->app_protocol == PC_APP_H2C;
  return lc->upstream_protocol == PC_UP_H2 ||
         (lc->upstream_protocol == PC_UP_AUTO && prefer_h2 && !pc_h2up_h1_only(w, g, lc));
}

/* ---- "auto": an upstream that turns out to speak only HTTP/1.1 ---------- */

static void f_on_info(void *user, int status, const nghttp2_nv *nv, size_t n) {
  pc_upcall_t *c = user;
  if (c->cbs->on_info) c->cbs->on_info(c->user, status, nv, n);
}

static void f_on_head(void *user, int status, const nghttp2_nv *nv, size_t n, int end) {
  pc_upcall_t *c = user;
  c->cbs->on_head(c->user, status, nv, n, end);
}

static void f_on_data(void *user, const uint8_t *data, size_t len) {
  pc_upcall_t *c = user;
  c->cbs->on_data(c->user, data, len);
}

static void f_on_end(void *user, const nghttp2_nv *nv, size_t n) {
  pc_upcall_t *c = user;
  c->cbs->on_end(c->user, nv, n);
}

static void f_on_sent(void *user, size_t n) {
  pc_upcall_t *c = user;
  c->cbs->on_sent(c->user, n);
}

static void f_on_fail(void *user, int status, pc_reason_t r, const char *detail, int retry) {
  pc_upcall_t *c = user;
  if (status == PC_UPCALL_USE_H1 && !c->body) {
    /* Nothing went out yet: the same request over HTTP/1.1. */
    pc_h2call_t *k = c->h2;
    c->h2 = NULL;
    pc_h2call_release(k);
    pc_upreq_t req = {.nv = c->nv, .n = c->n, .end = c->end, .pin = c->pin};
    c->h1 = pc_h1call_start(c->w, c->g, c->lc, c->stats, &req, c->cbs, c->user);
    return;
  }
  if (status == PC_UPCALL_USE_H1) {
    status = 502;
    r = PC_REASON_PROTOCOL;
    detail = "the upstream does not speak HTTP/2";
  }
  c->cbs->on_fail(c->user, status, r, detail, retry);
}

static const pc_upcall_cbs_t fallback_cbs = {f_on_info, f_on_head, f_on_data, f_on_end,
                                             f_on_fail, f_on_sent, NULL};

/* Keeps a copy of the request's fields for a fall-back. */
static void keep_request(pc_upcall_t *c, const pc_upreq_t *req) {
  size_t bytes = 0;
  for (size_t i = 0; i < req->n; i++)
    bytes += req->nv[i].namelen + req->nv[i].valuelen;
  c->bytes = pc_malloc(bytes + 1);
  c->nv = pc_calloc(req->n + 1, sizeof(*c->nv));
  size_t off = 0;
  for (size_t i = 0; i < req->n; i++) {
    const nghttp2_nv *f = &req->nv[i];
    memcpy(c->bytes + off, f->name, f->namelen);
    memcpy(c->bytes + off + f->namelen, f->value, f->valuelen);
    c->nv[i] = (nghttp2_nv){(uint8_t *)c->bytes + off, (uint8_t *)c->bytes + off + f->namelen,
                            f->namelen, f->valuelen, NGHTTP2_NV_FLAG_NONE};
    off += f->namelen + f->valuelen;
  }
  c->n = req->n;
}

/* ---- the interface ------------------------------------------------------ */

pc_upcall_t *pc_upcall_start(pc_worker_t *w, pc_gen_t *g, const pc_listener_cfg_t *lc,
                             pc_metrics_t *stats, const pc_upreq_t *req, const pc_upcall_cbs_t *cbs,
                             void *user) {
  pc_upcall_t *c = pc_calloc(1, sizeof(*c));
  c->cbs = cbs;
  c->user = user;
  c->end = req->end != 0;
  if (req->tunnel || !pc_upcall_uses_h2(w, g, lc, req->prefer_h2)) {
    c->h1 = pc_h1call_start(w, g, lc, stats, req, cbs, user);
    return c;
  }
  if (lc->direction == PC_DIR_OUTBOUND && lc->upstream_protocol == PC_UP_AUTO) {
    c->fallback = 1;
    c->w = w;
    c->g = g;
    c->lc = lc;
    c->stats = stats;
    c->pin = req->pin;
    keep_request(c, req);
    c->h2 = pc_h2call_start(w, g, lc, stats, req->nv, req->n, req->end, req->pin, &fallback_cbs, c);
  } else {
    c->h2 = pc_h2call_start(w, g, lc, stats, req->nv, req->n, req->end, req->pin, cbs, user);
  }
  return c;
}

void pc_upcall_send(pc_upcall_t *c, const char *data, size_t len) {
  if (len) c->body = 1;
  if (c->h1)
    pc_h1call_send(c->h1, data, len);
  else if (c->h2)
    pc_h2call_send(c->h2, data, len);
}

void pc_upcall_end(pc_upcall_t *c) {
  c->end = 1;
  if (c->h1)
    pc_h1call_end(c->h1);
  else if (c->h2)
    pc_h2call_end(c->h2);
}

void pc_upcall_consumed(pc_upcall_t *c, size_t n) {
  if (c->h1)
    pc_h1call_consumed(c->h1, n);
  else if (c->h2)
    pc_h2call_consumed(c->h2, n);
}

void pc_upcall_release(pc_upcall_t *c) {
  if (c->h1) pc_h1call_release(c->h1);
  if (c->h2) pc_h2call_release(c->h2);
  free(c->nv);
  free(c->bytes);
  free(c);
}

const char *pc_upcall_peer_id(const pc_upcall_t *c) {
  return c->h1 ? pc_h1call_peer_id(c->h1) : c->h2 ? pc_h2call_peer_id(c->h2) : NULL;
}

const char *pc_upcall_tls_version(const pc_upcall_t *c) {
  return c->h1 ? pc_h1call_tls_version(c->h1) : c->h2 ? pc_h2call_tls_version(c->h2) : NULL;
}

const char *pc_upcall_endpoint(const pc_upcall_t *c) {
  return c->h1 ? pc_h1call_endpoint(c->h1) : c->h2 ? pc_h2call_endpoint(c->h2) : NULL;
}

const char *pc_upcall_cipher(const pc_upcall_t *c) {
  return c->h1 ? pc_h1call_cipher(c->h1) : c->h2 ? pc_h2call_cipher(c->h2) : NULL;
}

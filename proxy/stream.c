#include "stream.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include <openssl/err.h>

#include "compat.h"

static BIO_METHOD *bio_method;

typedef struct {
  uv_write_t req;
  pc_stream_t *s;
  size_t len;
  char data[];
} write_req_t;

/* BIO read: hand BoringSSL the unread part of the current input. */
static int bio_read(BIO *b, char *out, int len) {
  pc_stream_t *s = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (s->in_len == 0) {
    BIO_set_retry_read(b);
    return -1;
  }
  size_t n = (size_t)len < s->in_len ? (size_t)len : s->in_len;
  memcpy(out, s->in, n);
  s->in += n;
  s->in_len -= n;
  return (int)n;
}

/* BIO write: collect in the worker's output buffer; flush_out sends it. */
static int bio_write(BIO *b, const char *in, int len) {
  pc_stream_t *s = BIO_get_data(b);
  pc_scratch_t *sc = s->scratch;
  BIO_clear_retry_flags(b);
  if (sc->olen + (size_t)len > sc->ocap) {
    size_t cap = sc->ocap ? sc->ocap : 64 * 1024;
    while (cap < sc->olen + (size_t)len)
      cap *= 2;
    sc->obuf = pc_realloc(sc->obuf, cap);
    sc->ocap = cap;
  }
  memcpy(sc->obuf + sc->olen, in, (size_t)len);
  sc->olen += (size_t)len;
  return len;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }

static int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

void pc_stream_global_init(void) {
  bio_method = BIO_meth_new(BIO_get_new_index(), "portcullis-stream");
  if (!bio_method || !BIO_meth_set_read(bio_method, bio_read) ||
      !BIO_meth_set_write(bio_method, bio_write) || !BIO_meth_set_ctrl(bio_method, bio_ctrl) ||
      !BIO_meth_set_create(bio_method, bio_create))
    pc_fatal("cannot create BIO method");
}

int pc_stream_init(pc_stream_t *s, uv_loop_t *loop, pc_scratch_t *scratch,
                   const pc_stream_cbs_t *cbs, void *owner) {
  memset(s, 0, sizeof(*s));
  s->scratch = scratch;
  s->cbs = cbs;
  s->owner = owner;
  int rc = uv_tcp_init(loop, &s->tcp);
  if (rc == 0) s->initialised = 1;
  return rc;
}

size_t pc_stream_queued(const pc_stream_t *s) {
  return uv_stream_get_write_queue_size((const uv_stream_t *)&s->tcp);
}

int pc_stream_has_input(const pc_stream_t *s) {
  if (s->in_len > 0 || (s->ssl && SSL_pending(s->ssl) > 0)) return 1;
  if (!s->delivering && !s->in_pump) return 0;
  uv_os_fd_t fd;
  int n = 0;
  if (uv_fileno((const uv_handle_t *)&s->tcp, &fd) != 0) return 0;
  return ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

static void on_write(uv_write_t *req, int status) {
  write_req_t *wr = pc_container_of(req, write_req_t, req);
  pc_stream_t *s = wr->s;
  free(wr);
  if (s->closing || status == UV_ECANCELED) return;
  if (status < 0) {
    s->cbs->on_error(s, status);
    return;
  }
  if (s->above_high && pc_stream_queued(s) <= PC_STREAM_LOW_WATER) {
    s->above_high = 0;
    s->cbs->on_drain(s);
  }
}

/* Sends bytes as they are: straight to the kernel when nothing is queued,
 * otherwise (or for the rest) through a copied write request. */
static int raw_write(pc_stream_t *s, const char *buf, size_t len) {
  size_t off = 0;
  if (s->closing) return UV_ECANCELED;
  if (pc_stream_queued(s) == 0) {
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
    int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
    if (n >= 0)
      off = (size_t)n;
    else if (n != UV_EAGAIN)
      return n;
  }
  if (off < len) {
    size_t rest = len - off;
    write_req_t *wr = pc_malloc(sizeof(*wr) + rest);
    wr->s = s;
    wr->len = rest;
    memcpy(wr->data, buf + off, rest);
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)rest);
    int rc = uv_write(&wr->req, (uv_stream_t *)&s->tcp, &b, 1, on_write);
    if (rc < 0) {
      free(wr);
      return rc;
    }
    if (pc_stream_queued(s) > PC_STREAM_HIGH_WATER) s->above_high = 1;
  }
  return 0;
}

/* Sends what BoringSSL wrote into the scratch output buffer. */
static int flush_out(pc_stream_t *s) {
  pc_scratch_t *sc = s->scratch;
  if (sc->olen == 0) return 0;
  size_t n = sc->olen;
  sc->olen = 0;
  return raw_write(s, sc->obuf, n);
}

/* Keeps the unread input across a pause: the read buffer is scratch. */
static void keep_input(pc_stream_t *s) {
  if (s->in_len == 0) {
    free(s->pending);
    s->pending = NULL;
    s->pending_cap = 0;
    s->in = NULL;
    return;
  }
  if (s->in >= s->pending && s->in < s->pending + s->pending_cap) return; /* already kept */
  char *p = pc_malloc(s->in_len);
  memcpy(p, s->in, s->in_len);
  free(s->pending);
  s->pending = p;
  s->pending_cap = s->in_len;
  s->in = p;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  pc_stream_t *s = pc_container_of((uv_tcp_t *)h, pc_stream_t, tcp);
  *buf = uv_buf_init(s->scratch->rbuf, sizeof(s->scratch->rbuf));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

static void uv_reading(pc_stream_t *s, int on) {
  if (on && !s->uv_reading && !s->tcp_eof && !s->closing) {
    if (uv_read_start((uv_stream_t *)&s->tcp, alloc_cb, on_read) == 0) s->uv_reading = 1;
  } else if (!on && s->uv_reading) {
    uv_read_stop((uv_stream_t *)&s->tcp);
    s->uv_reading = 0;
  }
}

static void deliver_eof(pc_stream_t *s) {
  if (s->eof_sent || s->closing) return;
  s->eof_sent = 1;
  uv_reading(s, 0);
  s->cbs->on_eof(s);
}

/* Runs BoringSSL over the current input: the handshake first, then decrypted
 * data to on_data for as long as the owner keeps reading. */
static void tls_pump(pc_stream_t *s) {
  if (s->in_pump) return; /* resumed from inside our own on_data: the loop goes on */
  s->in_pump = 1;
  if (s->handshaking) {
    int rc = SSL_do_handshake(s->ssl);
    int frc = flush_out(s);
    if (rc == 1) {
      s->handshaking = 0;
      s->cbs->on_handshake(s, 0);
    } else if (SSL_get_error(s->ssl, rc) != SSL_ERROR_WANT_READ || frc < 0 || s->tcp_eof) {
      /* Leave the error queue for the owner's pc_tls_failure_reason. */
      s->handshaking = 0;
      s->in_pump = 0;
      uv_reading(s, 0);
      s->cbs->on_handshake(s, -1);
      return;
    }
  }
  while (!s->handshaking && s->reading && !s->closing && !s->eof_sent) {
    /* Decrypt as many records as fit before handing them on: one on_data,
     * and so one write on the other side, per read rather than per 16 KiB
     * record. */
    size_t got = 0;
    int n = 0;
    while (got < sizeof(s->scratch->pbuf)) {
      n = SSL_read(s->ssl, s->scratch->pbuf + got, (int)(sizeof(s->scratch->pbuf) - got));
      if (n <= 0) break;
      got += (size_t)n;
    }
    if (got > 0) {
      if (flush_out(s) < 0) break;
      s->cbs->on_data(s, s->scratch->pbuf, got);
      continue; /* the loop asks BoringSSL again, and meets the end or error below */
    }
    int err = SSL_get_error(s->ssl, n);
    flush_out(s);
    if (err == SSL_ERROR_WANT_READ && s->tcp_eof) {
      /* FIN without close_notify: nothing tells a complete stream from one
       * cut short, so it is no end of data. A partial record stays unread. */
      s->eof_sent = 1;
      s->truncated = 1;
      s->in_pump = 0;
      s->in_len = 0;
      s->cbs->on_error(s, PC_STREAM_ETRUNC);
      return;
    }
    if (err == SSL_ERROR_WANT_READ) break;
    if (err == SSL_ERROR_ZERO_RETURN) {
      deliver_eof(s);
      break;
    }
    s->tls_error = ERR_peek_error();
    ERR_clear_error();
    s->in_pump = 0;
    if (!s->closing) s->cbs->on_error(s, PC_STREAM_ETLS);
    return;
  }
  s->in_pump = 0;
  if (!s->closing) keep_input(s);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  pc_stream_t *s = pc_container_of((uv_tcp_t *)st, pc_stream_t, tcp);
  if (s->closing) return;
  if (nread == 0) return;
  if (nread < 0) {
    if (nread != UV_EOF) {
      s->cbs->on_error(s, (int)nread);
      return;
    }
    s->tcp_eof = 1;
    uv_reading(s, 0);
    if (!s->ssl || s->discard) {
      deliver_eof(s);
      return;
    }
    tls_pump(s);
    return;
  }
  if (s->discard) return;
  if (!s->ssl) {
    s->delivering = 1;
    s->cbs->on_data(s, buf->base, (size_t)nread);
    s->delivering = 0; /* s outlives a close until its close callback */
    return;
  }
  if (s->in_len) {
    /* Input is still kept from a pause; append rather than lose order. */
    char *p = pc_malloc(s->in_len + (size_t)nread);
    memcpy(p, s->in, s->in_len);
    memcpy(p + s->in_len, buf->base, (size_t)nread);
    free(s->pending);
    s->pending = p;
    s->pending_cap = s->in_len + (size_t)nread;
    s->in = p;
    s->in_len = s->pending_cap;
  } else {
    s->in = buf->base;
    s->in_len = (size_t)nread;
  }
  tls_pump(s);
  if (!s->closing && !s->reading && !s->handshaking && !s->discard) uv_reading(s, 0);
}

int pc_stream_start_tls(pc_stream_t *s, SSL *ssl, int is_server) {
  BIO *bio = BIO_new(bio_method);
  if (!bio) pc_fatal("out of memory");
  BIO_set_data(bio, s);
  SSL_set_bio(ssl, bio, bio);
  s->ssl = ssl;
  s->handshaking = 1;
  s->reading = 1;
  if (is_server) {
    SSL_set_accept_state(ssl);
  } else {
    SSL_set_connect_state(ssl);
    int rc = SSL_do_handshake(ssl);
    if (flush_out(s) < 0 || (rc != 1 && SSL_get_error(ssl, rc) != SSL_ERROR_WANT_READ)) return -1;
  }
  uv_reading(s, 1);
  return 0;
}

void pc_stream_read_start(pc_stream_t *s) {
  if (s->closing || s->eof_sent) return;
  s->reading = 1;
  if (s->ssl && !s->handshaking) {
    tls_pump(s);
    if (s->closing || s->eof_sent || !s->reading) return;
  }
  uv_reading(s, 1);
}

int pc_stream_discard(pc_stream_t *s) {
  s->discard = 1;
  s->reading = 0;
  s->in_len = 0;
  if (s->tcp_eof) return 1;
  uv_reading(s, 1);
  return 0;
}

void pc_stream_read_stop(pc_stream_t *s) {
  s->reading = 0;
  /* A TLS stream mid-pump stops at the loop check and keeps its input. */
  if (!s->in_pump) uv_reading(s, 0);
}

int pc_stream_write(pc_stream_t *s, const char *buf, size_t len) {
  if (!s->ssl) return raw_write(s, buf, len);
  while (len > 0) {
    int chunk = len > (1u << 30) ? (1 << 30) : (int)len;
    int n = SSL_write(s->ssl, buf, chunk);
    if (n <= 0) {
      ERR_clear_error();
      flush_out(s);
      return UV_EPROTO;
    }
    buf += n;
    len -= (size_t)n;
  }
  return flush_out(s);
}

static void on_shutdown_done(uv_shutdown_t *req, int status) {
  pc_stream_t *s = pc_container_of(req, pc_stream_t, shutdown_req);
  if (s->closing) return;
  s->cbs->on_shutdown(s, status == UV_ECANCELED ? 0 : status);
}

void pc_stream_shutdown(pc_stream_t *s, int skip_notify) {
  if (s->shutting || s->closing) return;
  s->shutting = 1;
  if (s->ssl && !skip_notify) {
    SSL_shutdown(s->ssl);
    ERR_clear_error();
    flush_out(s);
  }
  if (uv_shutdown(&s->shutdown_req, (uv_stream_t *)&s->tcp, on_shutdown_done) < 0) {
    /* Not connected any more: report it from the loop like any other error
     * would be; the owner tears the connection down. */
    s->shutting = 0;
    s->cbs->on_error(s, UV_ENOTCONN);
  }
}

/* An orderly close of a TLS stream says so with close_notify (best effort:
 * one try, no write request), unless bytes are still queued: those are lost
 * with the close, and the peer must not take what it got for the whole. */
static void notify_close(pc_stream_t *s) {
  if (!s->ssl || s->handshaking || s->shutting || !SSL_is_init_finished(s->ssl) ||
      pc_stream_queued(s) > 0)
    return;
  s->shutting = 1;
  SSL_shutdown(s->ssl);
  ERR_clear_error();
  pc_scratch_t *sc = s->scratch;
  if (sc->olen == 0) return;
  uv_buf_t b = uv_buf_init(sc->obuf, (unsigned)sc->olen);
  sc->olen = 0;
  uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
}

void pc_stream_close(pc_stream_t *s, int reset, uv_close_cb close_cb) {
  if (s->closing || !s->initialised) {
    if (!s->initialised && !s->closing) {
      s->closing = 1;
    }
    return;
  }
  if (!reset && !uv_is_closing((uv_handle_t *)&s->tcp)) notify_close(s);
  s->closing = 1;
  if (uv_is_closing((uv_handle_t *)&s->tcp)) return;
  if (!reset || uv_tcp_close_reset(&s->tcp, close_cb) != 0)
    uv_close((uv_handle_t *)&s->tcp, close_cb);
}

void pc_stream_release(pc_stream_t *s) {
  if (s->ssl) SSL_free(s->ssl);
  s->ssl = NULL;
  free(s->pending);
  s->pending = NULL;
}

void pc_stream_addr(const pc_stream_t *s, int peer, char *out, size_t n) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  int rc = peer ? uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&ss, &len)
                : uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&ss, &len);
  char ip[64] = "?";
  int port = 0;
  if (rc == 0 && ss.ss_family == AF_INET) {
    uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof(ip));
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  } else if (rc == 0 && ss.ss_family == AF_INET6) {
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;
    port = ntohs(s6->sin6_port);
    if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
      /* An IPv4 peer of a dual-stack listener: said as IPv4. */
      inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], ip, sizeof(ip));
      snprintf(out, n, "%s:%d", ip, port);
      return;
    }
    uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof(ip));
  }
  if (rc == 0 && ss.ss_family == AF_INET6)
    snprintf(out, n, "[%s]:%d", ip, port);
  else if (rc == 0)
    snprintf(out, n, "%s:%d", ip, port);
  else
    snprintf(out, n, "?");
}

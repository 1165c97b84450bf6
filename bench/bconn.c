#include "bconn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <openssl/err.h>

#define READ_BUF_SIZE (64 * 1024)

static BIO_METHOD *bio_method;
static _Thread_local char read_buf[READ_BUF_SIZE];
static _Thread_local char plain_buf[READ_BUF_SIZE];
static _Thread_local char last_tls_error[160];

/* Keeps the first queued BoringSSL error (for bc_last_tls_error) and clears the queue. */
static void take_error(void) {
  unsigned long e = ERR_get_error();
  if (e)
    ERR_error_string_n(e, last_tls_error, sizeof(last_tls_error));
  else
    snprintf(last_tls_error, sizeof(last_tls_error), "TLS failure without an error code");
  ERR_clear_error();
}

const char *bc_last_tls_error(void) { return last_tls_error; }

typedef struct {
  uv_write_t req;
  bc_conn *c;
  char *owned; /* freed on completion; NULL for stable data */
} write_req;

static void *xmalloc(size_t n) {
  void *p = malloc(n);
  if (!p) {
    fprintf(stderr, "out of memory\n");
    abort();
  }
  return p;
}

static int bio_read(BIO *b, char *out, int len) {
  bc_conn *c = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (c->in_len == 0) {
    BIO_set_retry_read(b);
    return -1;
  }
  size_t n = (size_t)len < c->in_len ? (size_t)len : c->in_len;
  memcpy(out, c->in, n);
  c->in += n;
  c->in_len -= n;
  return (int)n;
}

static int bio_write(BIO *b, const char *in, int len) {
  bc_conn *c = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (c->out_len + (size_t)len > c->out_cap) {
    size_t cap = c->out_cap ? c->out_cap : 32 * 1024;
    while (cap < c->out_len + (size_t)len)
      cap *= 2;
    char *p = realloc(c->out, cap);
    if (!p) abort();
    c->out = p;
    c->out_cap = cap;
  }
  memcpy(c->out + c->out_len, in, (size_t)len);
  c->out_len += (size_t)len;
  return len;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) { return cmd == BIO_CTRL_FLUSH; }

static int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

void bc_global_init(void) {
  bio_method = BIO_meth_new(BIO_get_new_index(), "pc-bench");
  if (!bio_method || !BIO_meth_set_read(bio_method, bio_read) ||
      !BIO_meth_set_write(bio_method, bio_write) || !BIO_meth_set_ctrl(bio_method, bio_ctrl) ||
      !BIO_meth_set_create(bio_method, bio_create)) {
    fprintf(stderr, "cannot create BIO method\n");
    abort();
  }
}

uint64_t bc_raise_nofile(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) getrlimit(RLIMIT_NOFILE, &rl);
  }
  return (uint64_t)rl.rlim_cur;
}

static void print_ssl_errors(const char *what, const char *arg) {
  char buf[256];
  unsigned long e;
  fprintf(stderr, "TLS setup: %s %s failed\n", what, arg ? arg : "");
  while ((e = ERR_get_error()) != 0) {
    ERR_error_string_n(e, buf, sizeof(buf));
    fprintf(stderr, "  %s\n", buf);
  }
}

SSL_CTX *bc_tls_ctx(int server, const char *cert_file, const char *key_file, const char *ca_file,
                    const char *ciphers, int max_tls12) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_method());
  if (!ctx) goto fail;
  if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
      !SSL_CTX_set_max_proto_version(ctx, max_tls12 ? TLS1_2_VERSION : TLS1_3_VERSION)) {
    print_ssl_errors("protocol versions", NULL);
    goto fail;
  }
  if (!SSL_CTX_set_strict_cipher_list(ctx, ciphers)) {
    print_ssl_errors("cipher list", ciphers);
    goto fail;
  }
  if (!SSL_CTX_set1_curves_list(ctx, "X25519:P-256")) {
    print_ssl_errors("groups", NULL);
    goto fail;
  }
  if (cert_file && SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
    print_ssl_errors("certificate", cert_file);
    goto fail;
  }
  if (key_file && SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
    print_ssl_errors("private key", key_file);
    goto fail;
  }
  if (ca_file) {
    if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
      print_ssl_errors("CA file", ca_file);
      goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
  }
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | (server ? SSL_OP_CIPHER_SERVER_PREFERENCE : 0));
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

int bc_init(bc_conn *c, uv_loop_t *loop, const bc_ops *ops, SSL_CTX *ctx, int is_server) {
  memset(c, 0, sizeof(*c));
  c->ops = ops;
  if (ctx) {
    c->ssl = SSL_new(ctx);
    BIO *bio = c->ssl ? BIO_new(bio_method) : NULL;
    if (!bio) {
      SSL_free(c->ssl);
      c->ssl = NULL;
      return UV_ENOMEM;
    }
    BIO_set_data(bio, c);
    SSL_set_bio(c->ssl, bio, bio); /* the SSL owns the one reference */
    if (is_server)
      SSL_set_accept_state(c->ssl);
    else
      SSL_set_connect_state(c->ssl);
  }
  int rc = uv_tcp_init(loop, &c->tcp);
  if (rc < 0) {
    SSL_free(c->ssl);
    c->ssl = NULL;
    return rc;
  }
  c->tcp.data = c;
  return 0;
}

size_t bc_queued(const bc_conn *c) {
  return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

static void fail(bc_conn *c, int err) {
  if (!c->closing) c->ops->on_error(c, err);
}

static void on_write(uv_write_t *req, int status) {
  write_req *wr = (write_req *)req;
  bc_conn *c = wr->c;
  free(wr->owned);
  free(wr);
  if (c->closing) return;
  if (status < 0) {
    fail(c, status);
    return;
  }
  if (c->above_high && bc_queued(c) <= BC_LOW_WATER) {
    c->above_high = 0;
    if (c->ops->on_drain) c->ops->on_drain(c);
  }
}

/* Queues buf for libuv: the request owns it (owned != NULL, freed on
 * completion), references it (stable) or copies it. */
static int queue_write(bc_conn *c, const char *buf, size_t len, char *owned, int stable) {
  write_req *wr = xmalloc(sizeof(*wr));
  wr->c = c;
  wr->owned = owned;
  if (!owned && !stable) {
    wr->owned = xmalloc(len);
    memcpy(wr->owned, buf, len);
    buf = wr->owned;
  }
  uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
  int rc = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
  if (rc < 0) {
    free(wr->owned);
    free(wr);
    return rc;
  }
  if (bc_queued(c) >= BC_HIGH_WATER) c->above_high = 1;
  return 0;
}

/* Writes what the kernel takes at once when nothing is queued; returns the
 * count taken (0 when something is queued) or a negative libuv code. */
static int try_direct(bc_conn *c, const char *buf, size_t len) {
  if (bc_queued(c) != 0) return 0;
  uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
  int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  return n == UV_EAGAIN ? 0 : n;
}

static int raw_write(bc_conn *c, const char *buf, size_t len, int stable) {
  int n = try_direct(c, buf, len);
  if (n < 0) return n;
  if ((size_t)n == len) return 0;
  return queue_write(c, buf + n, len - (size_t)n, NULL, stable);
}

/* Hands BoringSSL's output to the socket; the buffer moves into the write
 * request when the kernel does not take it all. */
static int flush_out(bc_conn *c) {
  if (c->out_len == 0) return 0;
  int n = try_direct(c, c->out, c->out_len);
  if (n < 0) return n;
  if ((size_t)n == c->out_len) {
    c->out_len = 0;
    return 0;
  }
  char *buf = c->out;
  size_t len = c->out_len;
  c->out = NULL;
  c->out_len = c->out_cap = 0;
  return queue_write(c, buf + n, len - (size_t)n, buf, 0);
}

static int tls_error(bc_conn *c, int ret) {
  int e = SSL_get_error(c->ssl, ret);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
  take_error();
  return BC_ETLS;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  buf->base = read_buf;
  buf->len = sizeof(read_buf);
}

/* Feeds ciphertext to BoringSSL: finishes the handshake, then delivers
 * everything it can decrypt. */
static void tls_input(bc_conn *c, const char *p, size_t n) {
  c->in = p;
  c->in_len = n;
  if (!c->open) {
    int r = SSL_do_handshake(c->ssl);
    int fr = flush_out(c);
    if (r != 1) {
      int err = tls_error(c, r);
      if (err || fr) {
        /* Send the alert BoringSSL queued before reporting. */
        c->handshake_failed = 1;
        fail(c, err ? err : fr);
      }
      return;
    }
    if (fr) {
      fail(c, fr);
      return;
    }
    c->open = 1;
    if (c->ops->on_open) c->ops->on_open(c);
    if (c->closing) return;
  }
  for (;;) {
    int r = SSL_read(c->ssl, plain_buf, sizeof(plain_buf));
    if (r > 0) {
      c->ops->on_data(c, plain_buf, (size_t)r);
      if (c->closing) return;
      continue;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) break;
    int fr = flush_out(c);
    if (e == SSL_ERROR_ZERO_RETURN && !fr) {
      c->ops->on_eof(c);
    } else {
      take_error();
      fail(c, fr ? fr : BC_ETLS);
    }
    return;
  }
  int fr = flush_out(c);
  if (fr) fail(c, fr);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  bc_conn *c = s->data;
  if (c->closing) return;
  if (nread < 0) {
    if (nread == UV_EOF)
      c->ops->on_eof(c);
    else
      fail(c, (int)nread);
    return;
  }
  if (nread == 0) return;
  if (c->ssl)
    tls_input(c, buf->base, (size_t)nread);
  else
    c->ops->on_data(c, buf->base, (size_t)nread);
}

static int start(bc_conn *c) {
  uv_tcp_nodelay(&c->tcp, 1);
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc < 0) return rc;
  if (!c->ssl) {
    c->open = 1;
    if (c->ops->on_open) c->ops->on_open(c);
    return 0;
  }
  int r = SSL_do_handshake(c->ssl); /* client: ClientHello; server: nothing to read yet */
  int err = r == 1 ? 0 : tls_error(c, r);
  int fr = flush_out(c);
  return err ? err : fr;
}

static void on_connect(uv_connect_t *req, int status) {
  bc_conn *c = req->data;
  if (c->closing) return;
  if (status < 0) {
    fail(c, status);
    return;
  }
  int rc = start(c);
  if (rc < 0) fail(c, rc);
}

int bc_connect(bc_conn *c, const struct sockaddr *addr) {
  c->connect_req.data = c;
  return uv_tcp_connect(&c->connect_req, &c->tcp, addr, on_connect);
}

int bc_accept(bc_conn *c, uv_stream_t *listener) {
  int rc = uv_accept(listener, (uv_stream_t *)&c->tcp);
  if (rc < 0) return rc;
  return start(c);
}

int bc_write(bc_conn *c, const void *p, size_t n, int stable) {
  if (c->closing || c->shutting) return UV_ECANCELED;
  if (!c->ssl) return raw_write(c, p, n, stable);
  while (n > 0) {
    int chunk = n > (1u << 30) ? 1 << 30 : (int)n;
    int r = SSL_write(c->ssl, p, chunk);
    if (r <= 0) {
      take_error();
      return BC_ETLS;
    }
    p = (const char *)p + r;
    n -= (size_t)r;
  }
  return flush_out(c);
}

static void on_closed(uv_handle_t *h) {
  bc_conn *c = h->data;
  SSL_free(c->ssl);
  c->ssl = NULL;
  free(c->out);
  c->out = NULL;
  c->ops->on_closed(c);
}

void bc_close(bc_conn *c, int graceful) {
  if (c->closing) return;
  c->closing = 1;
  if (c->ssl && (c->open || c->handshake_failed)) {
    if (graceful && c->open) SSL_shutdown(c->ssl);
    flush_out(c); /* the close_notify, or the alert of a failed handshake */
  }
  uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  bc_conn *c = req->data;
  bc_close(c, 0);
}

void bc_shutdown(bc_conn *c) {
  if (c->closing || c->shutting) return;
  if (c->ssl && c->open) {
    SSL_shutdown(c->ssl);
    flush_out(c);
  }
  c->shutting = 1;
  c->shutdown_req.data = c;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) < 0) bc_close(c, 0);
}

void bc_describe(const bc_conn *c, char *buf, size_t len) {
  if (!c->ssl) {
    snprintf(buf, len, "plaintext");
    return;
  }
  const SSL_CIPHER *ci = SSL_get_current_cipher(c->ssl);
  const char *curve = SSL_get_curve_name(SSL_get_curve_id(c->ssl));
  snprintf(buf, len, "%s %s %s", SSL_get_version(c->ssl), ci ? SSL_CIPHER_standard_name(ci) : "-",
           curve ? curve : "-");
}

/*
 * bconn.h - one TCP connection, plaintext or TLS, on a libuv loop: the
 * transport shared by the benchmark's load generator (pc-loadgen) and its
 * backend (pc-backend).
 *
 * TLS runs over BoringSSL with a custom BIO: ciphertext comes straight from
 * the libuv read buffer and goes out through uv_try_write, so the tools add
 * no copies of their own to what they measure.
 *
 * Threading: a connection belongs to the thread that runs its loop; every
 * function below must be called on that thread. The read buffers are
 * thread-local, so several loops may run in one process.
 */
#ifndef PC_BENCH_BCONN_H
#define PC_BENCH_BCONN_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>
#include <uv.h>

/* Writers stop producing above the high mark and get on_drain under the low one. */
#define BC_HIGH_WATER (256 * 1024)
#define BC_LOW_WATER (64 * 1024)

/* on_error's code for a TLS failure (handshake refused, bad record, ...). */
#define BC_ETLS (-100000)

typedef struct bc_conn bc_conn;

/* Callbacks. Each may call bc_close() on its connection; none of the
 * functions below calls one of them synchronously except from libuv
 * callbacks (reads, connects, write completions). */
typedef struct {
  /* Connected (plaintext) or handshake complete (TLS). Optional. */
  void (*on_open)(bc_conn *c);
  /* Plaintext bytes; the pointer is valid during the call only. */
  void (*on_data)(bc_conn *c, const char *p, size_t n);
  /* The peer finished sending (FIN or TLS close_notify). */
  void (*on_eof)(bc_conn *c);
  /* A connect, read, write or TLS failure: a libuv error code or BC_ETLS.
   * The connection is unusable; the callee should bc_close() it. */
  void (*on_error)(bc_conn *c, int err);
  /* The write queue, after passing BC_HIGH_WATER, fell to BC_LOW_WATER. Optional. */
  void (*on_drain)(bc_conn *c);
  /* The handle is closed and the SSL freed: the owner may free the memory
   * holding the bc_conn now (and only now). */
  void (*on_closed)(bc_conn *c);
} bc_ops;

struct bc_conn {
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  uv_shutdown_t shutdown_req;
  const bc_ops *ops;
  SSL *ssl; /* NULL: plaintext */
  /* Ciphertext being fed to BoringSSL (points into the thread's read buffer). */
  const char *in;
  size_t in_len;
  /* Ciphertext BoringSSL produced, not yet handed to the kernel or libuv. */
  char *out;
  size_t out_len, out_cap;
  unsigned open : 1, closing : 1, shutting : 1, above_high : 1, handshake_failed : 1;
  void *data; /* the owner's */
};

/* Once per process, before any other call. */
void bc_global_init(void);

/* Sets the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit. */
uint64_t bc_raise_nofile(void);

/* A server or client context pinned like the proxies under test: TLS 1.2 to
 * 1.3 (or 1.2 only with max_tls12), the given TLS 1.2 cipher list,
 * X25519:P-256, peer certificate required and verified against ca_file, no
 * session resumption (no tickets, no cache). Returns NULL (message on
 * stderr) on failure. */
SSL_CTX *bc_tls_ctx(int server, const char *cert_file, const char *key_file, const char *ca_file,
                    const char *ciphers, int max_tls12);

/* Initialises c on loop (tcp handle, TCP_NODELAY on open). ctx NULL means
 * plaintext; otherwise a fresh SSL is made (client or server role by
 * is_server). Returns 0 or a negative libuv code; on failure nothing needs
 * closing. */
int bc_init(bc_conn *c, uv_loop_t *loop, const bc_ops *ops, SSL_CTX *ctx, int is_server);

/* Client side: connects and then runs the TLS handshake; on_open or
 * on_error follows. Returns 0 or a negative libuv code (then bc_close). */
int bc_connect(bc_conn *c, const struct sockaddr *addr);

/* Server side: accepts from listener and starts reading (and the
 * handshake). Returns 0 or a negative libuv code (then bc_close). */
int bc_accept(bc_conn *c, uv_stream_t *listener);

/* Queues plaintext. Copies what the kernel does not take at once, unless
 * stable is set: then p must stay valid until the write completes (plaintext
 * only; ignored for TLS, whose records are always ours). Returns 0 or a
 * negative libuv code. */
int bc_write(bc_conn *c, const void *p, size_t n, int stable);

/* Bytes queued in libuv, not yet taken by the kernel. */
size_t bc_queued(const bc_conn *c);

/* Graceful end: TLS close_notify, then FIN once the queue is flushed, then
 * the handle closes (on_closed). */
void bc_shutdown(bc_conn *c);

/* Immediate close; pending writes are dropped. Idempotent. graceful: send a
 * TLS close_notify first, best effort. on_closed follows asynchronously. */
void bc_close(bc_conn *c, int graceful);

/* The last BoringSSL error seen on this thread, for messages. */
const char *bc_last_tls_error(void);

/* Negotiated "TLSv1.3 TLS_AES_128_GCM_SHA256 X25519" into buf, or "plaintext". */
void bc_describe(const bc_conn *c, char *buf, size_t len);

#endif

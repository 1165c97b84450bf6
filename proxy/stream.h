/*
 * stream.h - one side of a proxied connection: a libuv TCP handle, optionally
 * wrapped in TLS driven through an in-memory BIO.
 *
 * TLS never owns the socket: ciphertext read by libuv is handed to BoringSSL
 * through a custom BIO that reads straight from the worker's read buffer (no
 * copy unless the owner pauses mid-buffer), and whatever BoringSSL writes is
 * collected in the worker's output buffer and sent with uv_try_write, with
 * only the unsent tail copied into a write request.
 *
 * All functions run on the owning worker's loop thread. Callbacks are never
 * invoked from inside the call that started an operation, except on_data
 * delivery of already-decrypted bytes from pc_stream_read_start (documented
 * there). After pc_stream_close the stream invokes no callback but close_cb.
 */
#ifndef PC_STREAM_H
#define PC_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>
#include <uv.h>

/* Bytes queued on a socket above which the feeding side stops reading, and
 * below which it resumes. Per direction, so a peer that never reads costs at
 * most about HIGH plus one read of memory. */
#define PC_STREAM_HIGH_WATER (256 * 1024)
#define PC_STREAM_LOW_WATER (64 * 1024)
/* One socket read. A 64 KiB plaintext read became 65,624 bytes of TLS
 * records, more than one loopback segment (MSS about 65,480), so every write
 * went out as a full segment and a tiny one. Of 16, 32, 48, 63 and 64 KiB, 48 KiB
 * moved bulk transfers fastest both ways on the bench machine (15-30% over
 * 64 KiB; bench/README.md). */
#define PC_STREAM_READ_SIZE (48 * 1024)

/* Error code passed to on_error for a TLS failure after the handshake. */
#define PC_STREAM_ETLS (-100000)
/* Error code passed to on_error when the TLS peer ended TCP (FIN) without a
 * close_notify, possibly in the middle of a record: what it sent last may be
 * cut short (a crashed peer, or a FIN injected by someone on the path), and
 * nothing says otherwise. The owner must treat it as a reset, never as the
 * end of the data. Bytes of complete records before the FIN were delivered
 * through on_data first; a partial record is dropped. */
#define PC_STREAM_ETRUNC (-100001)

/* Per-worker scratch space shared by all streams of that worker. Only valid
 * within one callback: nothing may keep a pointer into it across loop turns. */
typedef struct {
  char rbuf[PC_STREAM_READ_SIZE]; /* socket reads land here */
  char pbuf[64 * 1024];           /* SSL_read decrypts into here, several records at a time */
  char *obuf;                     /* BoringSSL output collects here */
  size_t olen, ocap;
} pc_scratch_t;

typedef struct pc_stream pc_stream_t;

typedef struct {
  /* Plaintext bytes arrived. buf is scratch: copy what must be kept. */
  void (*on_data)(pc_stream_t *s, const char *buf, size_t len);
  /* The peer finished sending: TLS close_notify (TLS streams), FIN
   * (plaintext streams). Fires once. A TLS peer's FIN without close_notify
   * is on_error(PC_STREAM_ETRUNC) instead. */
  void (*on_eof)(pc_stream_t *s);
  /* Read or write failed: a negative libuv code, PC_STREAM_ETLS or
   * PC_STREAM_ETRUNC. */
  void (*on_error)(pc_stream_t *s, int err);
  /* The write queue fell under PC_STREAM_LOW_WATER after exceeding
   * PC_STREAM_HIGH_WATER. */
  void (*on_drain)(pc_stream_t *s);
  /* pc_stream_shutdown finished: everything queued was sent, then FIN. */
  void (*on_shutdown)(pc_stream_t *s, int status);
  /* TLS handshake finished: 0 on success, -1 on failure (see tls.h for the
   * reason). Reading continues unless the owner stops it here. */
  void (*on_handshake)(pc_stream_t *s, int status);
} pc_stream_cbs_t;

struct pc_stream {
  uv_tcp_t tcp;
  pc_scratch_t *scratch;
  const pc_stream_cbs_t *cbs;
  void *owner;
  SSL *ssl; /* NULL for plaintext; owned, freed by pc_stream_release */
  const char *in;
  size_t in_len; /* unread part of the current input (TLS) */
  char *pending; /* input kept across a pause (TLS); malloc'd */
  size_t pending_cap;
  uv_shutdown_t shutdown_req;
  uint32_t tls_error; /* BoringSSL error that ended the stream (PC_STREAM_ETLS) */
  /* eof_sent: the peer's end was reported, by on_eof or by the truncation's
   * on_error; truncated: that was PC_STREAM_ETRUNC */
  unsigned reading : 1, uv_reading : 1, handshaking : 1, tcp_eof : 1, eof_sent : 1, shutting : 1,
      closing : 1, above_high : 1, in_pump : 1, initialised : 1, discard : 1, truncated : 1,
      delivering : 1; /* inside on_data from a socket read (plain streams) */
};

/* One-time process initialisation (the BIO method). Main thread, before any
 * worker starts. */
void pc_stream_global_init(void);

/* Initialises s on loop; the TCP handle is then ready for uv_accept or
 * uv_tcp_connect. Returns 0 or a libuv error. */
int pc_stream_init(pc_stream_t *s, uv_loop_t *loop, pc_scratch_t *scratch,
                   const pc_stream_cbs_t *cbs, void *owner);

/* Starts TLS on a connected stream, taking ownership of ssl, and starts
 * reading. A client sends its ClientHello now. Returns 0, or -1 if BoringSSL
 * failed at once (no callback fires then). */
int pc_stream_start_tls(pc_stream_t *s, SSL *ssl, int is_server);

/* Starts (or resumes) delivering data. Bytes BoringSSL already decrypted or
 * buffered while paused are delivered through on_data before this returns,
 * so the owner must be ready for them; so is the end of the peer's data
 * (on_eof, or on_error(PC_STREAM_ETRUNC)) when its FIN had already come. */
void pc_stream_read_start(pc_stream_t *s);
void pc_stream_read_stop(pc_stream_t *s);

/* Queues plaintext for sending (encrypted when TLS). Copies what it cannot
 * send at once. Returns 0 or a negative libuv error (the caller decides what
 * to do; no callback fires for it). */
int pc_stream_write(pc_stream_t *s, const char *buf, size_t len);

/* Reads and drops everything until the peer closes, then fires on_eof (or
 * on_error). Used after a refusal so that the alert is not lost to an RST
 * caused by closing a socket with unread input. Returns 1 (and fires nothing)
 * if the peer has already finished sending, 0 otherwise. */
int pc_stream_discard(pc_stream_t *s);

/* Bytes accepted but not yet handed to the kernel. */
size_t pc_stream_queued(const pc_stream_t *s);

/* 1 if the peer has sent bytes not yet handed to the owner: input kept
 * across a pause or left in the read being delivered, decrypted bytes
 * BoringSSL holds, and, while s is inside the delivery of a read, bytes in
 * the kernel's receive queue (one ioctl; libuv reads them next, in the same
 * callback, when the read filled its buffer). A pooled connection with such
 * bytes must not be lent: they would be read as the next borrower's answer. */
int pc_stream_has_input(const pc_stream_t *s);

/* Sends a fatal TLS alert at once (best effort, no write request): a peer
 * refused after a handshake that completed (a resumed one, tls.h). Nothing
 * can be written on the stream afterwards; the owner closes it. */
void pc_stream_alert(pc_stream_t *s, uint8_t alert);

/* Ends the sending direction: TLS close_notify (unless skip_notify), then FIN
 * once the queue has drained; on_shutdown fires when done. Reading goes on. */
void pc_stream_shutdown(pc_stream_t *s, int skip_notify);

/* Closes the handle (with an RST when reset is non-zero); close_cb fires from
 * the loop once libuv is done with it. Safe to call from any callback, once.
 * Without reset, a TLS stream whose handshake finished and which has not
 * ended its sending yet (pc_stream_shutdown) sends close_notify first, if
 * nothing is still queued before it: an orderly close must not look like a
 * truncation (PC_STREAM_ETRUNC) to the peer. With bytes still queued, they
 * are lost, and the peer rightly sees a FIN without close_notify. */
void pc_stream_close(pc_stream_t *s, int reset, uv_close_cb close_cb);

/* Frees the SSL and any kept input; call from the close callback. */
void pc_stream_release(pc_stream_t *s);

/* "ip:port" of the remote (peer=1) or local end; "?" if unknown. */
void pc_stream_addr(const pc_stream_t *s, int peer, char *out, size_t n);

#endif

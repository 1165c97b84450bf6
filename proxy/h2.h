/*
 * h2.h - the HTTP/2 side of an HTTP listener (nghttp2): one client connection
 * carrying many requests, each on its own stream.
 *
 * Inbound: a peer whose TLS handshake settled on ALPN "h2".
 * Outbound: an app whose first bytes were the HTTP/2 connection preface
 * (prior-knowledge h2c).
 *
 * Each stream is one exchange, decided like an HTTP/1 request (l7.h): the
 * generation in force when its head completes, the allow entries' methods and
 * paths per stream (inbound), x-forwarded-client-cert replaced (inbound), one
 * access-log line per stream ("protocol": "HTTP/2"). The request goes on
 * through upcall.h, which carries it over HTTP/2 or HTTP/1.1 as the listener
 * says (for HTTP/1.1: :authority becomes Host, a body without content-length
 * is chunked; cookies split by HPACK are joined either way); interim (1xx)
 * answers are relayed as HEADERS. Answers the sidecar gives itself are JSON, or a
 * trailers-only gRPC response (grpc-status, grpc-message) when the request's
 * content-type starts with application/grpc.
 *
 * Bounds: the SETTINGS we send cap concurrent streams and the header list
 * (http2.max_concurrent_streams, http.max_header_bytes); a decoded header
 * list over http.max_header_bytes or http.max_headers is answered 431. The
 * windows we grant (http2.stream_window, http2.connection_window) are given
 * back only as the app or upstream accepts the bytes, so a stalled upstream
 * holds at most a window per stream and the connection window overall; a
 * stalled client holds at most about 64 KiB of response per stream, after
 * which that stream's upstream is not read. Floods nghttp2 1.52 does not
 * stop, or stops with another code (empty DATA frames, PING / SETTINGS /
 * PRIORITY floods, rapid resets, resets the client makes us send, too many
 * CONTINUATION frames), end the connection with GOAWAY ENHANCE_YOUR_CALM.
 *
 * The connection (conn.c) owns the pc_h2_t and routes its client stream's
 * callbacks to pc_h2_on_*, as for l7. Loop thread only.
 */
#ifndef PC_H2_H
#define PC_H2_H

#include <stddef.h>

#include "l7.h"

typedef struct pc_h2 pc_h2_t;

/* The 24 bytes every HTTP/2 client connection starts with. */
#define PC_H2_PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define PC_H2_PREFACE_LEN 24

/* Starts serving HTTP/2 on down (established). pre/pre_len: bytes already
 * read from down (the preface a sniffer saw), fed first. on_done as for
 * pc_l7_start: fires once, never from inside this call. */
pc_h2_t *pc_h2_start(pc_stream_t *down, const pc_l7_env_t *env,
                     void (*on_done)(void *arg, const char *how, int reset), void *arg,
                     const char *pre, size_t pre_len);

void pc_h2_on_data(pc_h2_t *h, const char *buf, size_t len);
void pc_h2_on_eof(pc_h2_t *h);
void pc_h2_on_error(pc_h2_t *h, int err);
void pc_h2_on_drain(pc_h2_t *h);
void pc_h2_on_shutdown(pc_h2_t *h, int status);

/* Graceful end (SIGTERM drain): GOAWAY NO_ERROR naming the last stream
 * taken; streams in flight finish, then the connection closes. */
void pc_h2_drain(pc_h2_t *h);

/* The peer lost its permission (reload, expiry): GOAWAY NO_ERROR now, just
 * before the connection is torn down; streams in flight are cut. */
void pc_h2_revoke(pc_h2_t *h);

/* As pc_l7_close / pc_l7_free. */
int pc_h2_close(pc_h2_t *h, uv_close_cb close_cb, void *data);
void pc_h2_free(pc_h2_t *h);

#endif

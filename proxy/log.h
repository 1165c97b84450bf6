/*
 * log.h - server events (JSON lines on stderr) and the per-connection access
 * log (JSON lines on stdout).
 *
 * Every line is built in memory first. Until pc_log_start_writer, each is
 * handed to the kernel with one write(2) under a mutex; after it, lines are
 * queued and a writer thread writes them, so a slow log pipe never stalls a
 * worker (lines beyond pc_log_set_buffer's limit are dropped and counted). Either way
 * lines from different threads never interleave. Any thread may call any
 * function here after pc_log_init().
 */
#ifndef PC_LOG_H
#define PC_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "reason.h"

typedef enum { PC_LOG_DEBUG, PC_LOG_INFO, PC_LOG_WARN, PC_LOG_ERROR } pc_log_level_t;

/* Sets the minimum level of server events and whether access lines are
 * written. Safe to call again (e.g. after a reload). */
void pc_log_init(pc_log_level_t min_level, int access_enabled);

/* How many bytes of lines may wait for the writer before further lines are
 * dropped (default 16 MiB). Safe to call again (e.g. after a reload). */
void pc_log_set_buffer(size_t bytes);

/* Starts the writer thread (main thread, once the config is known). */
void pc_log_start_writer(void);

/* Writes out everything queued and stops the writer; later lines are written
 * directly again. Waits at most 2 s: if stdout is stalled, what is still
 * queued then is abandoned so that the process can exit. Main thread, after
 * the workers have stopped. Idempotent. */
void pc_log_stop_writer(void);

/* Lines dropped because the writer's queue was full (stdout or stderr not
 * keeping up). */
uint64_t pc_log_dropped(void);

/* Parses "debug" | "info" | "warn" | "error". Returns 0, or -1 if unknown. */
int pc_log_level_parse(const char *s, pc_log_level_t *out);

/* Writes one server event {"time","level","msg"} to stderr if lvl passes the
 * filter; msg is printf-formatted and JSON-escaped. */
void pc_log(pc_log_level_t lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A growable byte buffer with JSON helpers. Zero-initialise to use; free with
 * pc_jbuf_free, or give the storage to this thread's buffer cache with
 * pc_jbuf_release (bufcache.h: hot paths whose thread drains it at exit). The
 * first append takes a buffer from that cache. Allocation failure aborts. */
typedef struct {
  char *data;
  size_t len, cap;
} pc_jbuf_t;

void pc_jbuf_free(pc_jbuf_t *b);
void pc_jbuf_release(pc_jbuf_t *b);
void pc_jbuf_raw(pc_jbuf_t *b, const char *s, size_t n);
void pc_jbuf_printf(pc_jbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a quoted JSON string; bytes outside printable ASCII, quotes and
 * backslashes are escaped (\u00XX), so peer-controlled bytes stay one line. */
void pc_jbuf_str(pc_jbuf_t *b, const char *s, size_t n);
/* Appends "key":"value" (or "key":null when value is NULL) with a leading comma
 * unless the buffer ends in '{'. */
void pc_jbuf_kv_str(pc_jbuf_t *b, const char *key, const char *value);
void pc_jbuf_kv_u64(pc_jbuf_t *b, const char *key, uint64_t value);
void pc_jbuf_kv_i64(pc_jbuf_t *b, const char *key, int64_t value);
void pc_jbuf_kv_bool(pc_jbuf_t *b, const char *key, int value);
/* Formats t as RFC 3339 UTC without fractions ("2026-01-31T23:59:59Z"). */
void pc_log_utc(time_t t, char *out, size_t n);

/* Appends an RFC 3339 UTC timestamp with milliseconds for the current time. */
void pc_jbuf_now(pc_jbuf_t *b);

/* One access-log record: one connection (decision allow / deny / error). */
typedef struct {
  const char *listener;
  const char *direction;            /* "inbound" | "outbound" */
  const char *peer;                 /* mTLS peer "ip:port" */
  const char *app;                  /* local app side "ip:port" */
  const char *peer_id;              /* SPIFFE ID or NULL */
  const char *decision;             /* "allow" | "deny" | "error" */
  pc_reason_t reason;               /* PC_REASON_NONE when allowed */
  const char *close;                /* how it ended */
  const char *tls_version, *cipher; /* NULL if no handshake completed */
  const char *endpoint;             /* "ip:port" connected to (endpoint.h); NULL if none */
  int resumed;                      /* the handshake resumed a session (with tls_version) */
  uint64_t bytes_from_peer, bytes_to_peer;
  double duration_ms;
} pc_access_rec_t;

/* Writes rec as one JSON line on stdout, unless access logging is off. */
void pc_log_access(const pc_access_rec_t *rec);

/* One access-log record for an HTTP request (protocol = "http"). */
typedef struct {
  const char *listener, *direction, *peer, *app, *peer_id;
  const char *method, *path; /* NULL when no request line was read */
  size_t method_len, path_len;
  const char *protocol; /* "HTTP/1.0", "HTTP/1.1", "HTTP/2"; NULL if no request was read */
  int status;           /* sent to the client; 0 if none was */
  int grpc_status;      /* gRPC status the client was sent (trailers or trailers-only); -1: none */
  const char *decision;
  pc_reason_t reason;
  uint64_t request_bytes, response_bytes; /* body bytes (tunnels: bytes each way) */
  double duration_ms;
  double upstream_ms; /* request sent -> response head; < 0: the upstream was not involved */
  const char *tls_version, *cipher;
  const char *endpoint; /* "ip:port" the request went to (endpoint.h); NULL if none */
  int resumed;          /* the TLS handshake resumed a session (with tls_version) */
} pc_request_rec_t;

/* Writes rec as one JSON line on stdout, unless access logging is off. */
void pc_log_request(const pc_request_rec_t *rec);

#endif

/*
 * config.h - the libconfig file turned into a validated, immutable snapshot.
 *
 * parse -> validate happen here; building TLS contexts and loading certificate
 * files happens in certstore/gen, which report their errors against the
 * setting lines recorded here. --check runs exactly the same path as startup.
 * A snapshot is never modified after pc_config_load returns; it is owned by
 * the generation (gen.h) that holds it.
 */
#ifndef PC_CONFIG_H
#define PC_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "log.h"
#include "policy.h"

#define PC_DEFAULT_CONFIG "/etc/portcullis/portcullis.conf"

/* Where a setting came from, for error messages: "FILE:LINE: SETTING: ...". */
typedef struct {
  int line;
  const char *path; /* static-lifetime setting path, e.g. "identity.key" */
} pc_where_t;

typedef enum { PC_DIR_INBOUND, PC_DIR_OUTBOUND } pc_direction_t;
typedef enum { PC_PROTO_TCP, PC_PROTO_HTTP } pc_protocol_t;
/* inbound app_protocol: how requests reach the local app */
typedef enum { PC_APP_HTTP1, PC_APP_H2C } pc_app_protocol_t;
/* outbound upstream_protocol: what is offered to the upstream sidecar */
typedef enum { PC_UP_AUTO, PC_UP_H2, PC_UP_HTTP1 } pc_up_protocol_t;

struct pc_route;

typedef struct pc_listener_cfg {
  char *name;
  pc_direction_t direction;
  pc_protocol_t protocol;
  pc_app_protocol_t app_protocol;     /* inbound, protocol = "http" */
  pc_up_protocol_t upstream_protocol; /* outbound, protocol = "http" */
  char *listen_str;
  struct sockaddr_storage listen;
  char *target_str;      /* inbound: forward; outbound: upstream */
  struct pc_target *tgt; /* its endpoints (endpoint.h); one reference */
  char *server_name;     /* outbound only: SNI sent upstream */
  pc_policy_t *policy;   /* inbound: allow; outbound: expect */
  int line, line_name, line_listen;
  /* transparent = true: connections arrive redirected (iptables REDIRECT)
   * and go where they were headed (route.h). Outbound: no upstream, expect
   * or server_name of its own; routes say those, per destination. Inbound:
   * no forward; tgt hands out 127.0.0.1:<original port> endpoints. */
  int transparent;
  struct pc_route *routes; /* outbound transparent: in order, first match wins */
  size_t nroutes;
  /* A route's own config (in routes[i].lc): parent is its listener, whose
   * name it shares (logs and metrics are per listener). */
  const struct pc_listener_cfg *parent;
  size_t route_index;
  int passthrough; /* a route: plain TCP relayed without TLS upstream */
} pc_listener_cfg_t;

/* One entry of an outbound transparent listener's `routes`: lc is a whole
 * listener config (protocol, upstream_protocol, server_name, expect as
 * policy; target_str = the destination text; tgt its endpoints), the rest
 * is what an original destination must match. */
typedef struct pc_route {
  pc_listener_cfg_t lc;
  int family;      /* AF_INET, AF_INET6; 0: a NAME:PORT (lc.tgt's current set) */
  uint8_t net[16]; /* network address, host bits zero */
  int bits;        /* prefix length */
  uint16_t port;   /* host order; 0: any port ("*") */
} pc_route_t;

typedef struct pc_config {
  int refs; /* pc_config_ref / pc_config_free; generations share a snapshot */
  char *file;
  char *trust_domain;
  int workers; /* resolved: never 0 */
  struct {
    char *cert, *key, *ca;
    char *key_passphrase_file; /* NULL: the key is not encrypted */
    int watch;
    uint64_t poll_interval_ms;
    uint32_t expiry_warning_hours;
    int line_cert, line_key, line_ca, line_pass;
  } identity;
  struct {
    int min_version; /* TLS1_2_VERSION or TLS1_3_VERSION */
    char *ciphers, *curves;
    int verify_depth;
    int resumption; /* TLS 1.3 session tickets, each resumption re-judged (tls.h) */
    int line_ciphers, line_curves;
  } tls;
  struct {
    char *listen_str;
    struct sockaddr_storage listen;
    int line;
    uint32_t max_connections;  /* open admin connections; beyond, closed at once */
    uint64_t write_timeout_ms; /* a response not taken by the client within: closed */
  } admin;
  struct {
    pc_log_level_t level;
    int access;
    size_t buffer_bytes; /* log lines waiting for the writer before more are dropped */
  } log;
  struct {
    uint32_t max_connections;
    uint64_t handshake_timeout_ms, connect_timeout_ms, idle_timeout_ms, drain_timeout_ms;
    uint64_t revoke_grace_ms;
    uint32_t max_pending_handshakes;        /* inbound, per listener: handshakes in progress */
    uint32_t handshake_failures_per_source; /* within throttle_window_ms: then throttled */
    uint64_t throttle_window_ms, throttle_cooldown_ms;
    uint32_t throttle_ipv6_prefix; /* leading bits of an IPv6 source throttled as one */
  } limits;
  struct { /* HTTP mode (protocol = "http") */
    uint32_t max_request_line, max_header_bytes, max_headers;
    uint64_t request_timeout_ms;  /* request head complete within: else 408 */
    uint64_t response_timeout_ms; /* response head after the request was sent: else 504 */
    uint64_t body_timeout_ms;     /* gap between request body bytes: else 408 or reset */
    uint32_t pool_max_idle;       /* idle upstream connections per listener and worker */
    uint64_t pool_idle_timeout_ms;
  } http;
  struct { /* HTTP/2 on protocol = "http" listeners */
    uint32_t max_concurrent_streams;
    uint32_t stream_window;     /* initial window we grant each stream, bytes */
    uint32_t connection_window; /* window we grant the whole connection, bytes */
  } http2;
  struct {         /* resolving NAME:PORT targets (dns.h) */
    char *servers; /* "IP:PORT,IP:PORT" replacing resolv.conf's; NULL: resolv.conf */
    uint64_t min_ttl_ms, max_ttl_ms, timeout_ms;
  } dns;
  struct { /* passive health of endpoints (endpoint.h) */
    uint64_t ejection_base_ms, ejection_max_ms;
  } health;
  pc_listener_cfg_t *listeners;
  size_t nlisteners;
} pc_config_t;

/* Reads and validates path. On success returns 0 and *out (free with
 * pc_config_free). On failure returns -1 and writes one line
 * "FILE:LINE: SETTING: what is wrong" into err (LINE 0 when the problem is not
 * on a line, e.g. an unreadable file). Loads no certificate. Any thread. */
int pc_config_load(const char *path, pc_config_t **out, char *err, size_t errlen);

/* Reference counting: a snapshot is shared by every generation built on it
 * (a certificate-only reload reuses the config). pc_config_free drops one
 * reference and frees on the last. Any thread. */
void pc_config_ref(pc_config_t *cfg);
void pc_config_free(pc_config_t *cfg);

/* Non-zero if a and b are the same socket: same name and same listen address
 * (a reload keeps such a listener's sockets open). */
int pc_config_same_listener(const pc_listener_cfg_t *a, const pc_listener_cfg_t *b);

/* The listener of cfg named name, or NULL. */
const pc_listener_cfg_t *pc_config_listener(const pc_config_t *cfg, const char *name);

/* The config in cfg that stands where lc (a listener or a route of another
 * snapshot) stood: the listener of the same name, or for a route the route
 * at the same place with the same destination of that listener. NULL if
 * cfg has none. */
const pc_listener_cfg_t *pc_config_counterpart(const pc_config_t *cfg, const pc_listener_cfg_t *lc);

/* Non-zero if connections and requests of lc go to one endpoint chosen at
 * accept (a transparent listener or a route) rather than one picked from
 * lc->tgt: a failed endpoint is then not retried elsewhere. */
int pc_config_pinned(const pc_listener_cfg_t *lc);

/* Parses "a.b.c.d:port" or "[v6]:port" into *out. Returns 0 or -1. */
int pc_config_parse_addr(const char *s, struct sockaddr_storage *out);

/* The TLS 1.2 cipher suites portcullis accepts at all: ECDHE key exchange with
 * an AEAD cipher. Non-zero if name (OpenSSL spelling) is one of them. */
int pc_config_cipher_ok(const char *name);

#endif

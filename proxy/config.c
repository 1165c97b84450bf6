#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <libconfig.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/ssl.h>
#include <uv.h>

#include "compat.h"
#include "endpoint.h"
#include "identity.h"

#define DEFAULT_CIPHERS                                                                            \
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"     \
  "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
#define DEFAULT_CURVES "X25519:P-256:P-384"

static const char *const strong_ciphers[] = {
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",   "ECDHE-RSA-CHACHA20-POLY1305",
};
static const char *const known_curves[] = {"X25519", "P-256", "P-384"};

/* Parsing state: the file name and the error sink. */
typedef struct {
  const char *file;
  char *err;
  size_t errlen;
  int failed;
} ctx_t;

static int fail(ctx_t *c, int line, const char *setting, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(ctx_t *c, int line, const char *setting, const char *fmt, ...) {
  if (c->failed) return -1; /* keep the first error: it is the one to fix */
  c->failed = 1;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  /* Values quoted from the file may hold control characters: keep the error
   * on one line. */
  for (char *p = msg; *p; p++)
    if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
  snprintf(c->err, c->errlen, "%s:%d: %s: %s", c->file, line, setting, msg);
  return -1;
}

static int line_of(const config_setting_t *s) { return s ? (int)config_setting_source_line(s) : 0; }

static const char *type_name(int t) {
  switch (t) {
  case CONFIG_TYPE_GROUP: return "a group";
  case CONFIG_TYPE_INT:
  case CONFIG_TYPE_INT64: return "an integer";
  case CONFIG_TYPE_FLOAT: return "a number";
  case CONFIG_TYPE_STRING: return "a string";
  case CONFIG_TYPE_BOOL: return "a boolean";
  case CONFIG_TYPE_ARRAY: return "an array";
  case CONFIG_TYPE_LIST: return "a list";
  default: return "something else";
  }
}

/* Every key of group g must be in allowed[]; the first stranger is an error. */
static int check_keys(ctx_t *c, const config_setting_t *g, const char *path,
                      const char *const *allowed, size_t n) {
  int count = config_setting_length(g);
  for (int i = 0; i < count; i++) {
    const config_setting_t *s = config_setting_get_elem(g, (unsigned)i);
    const char *name = config_setting_name(s);
    size_t j = 0;
    while (j < n && strcmp(allowed[j], name) != 0)
      j++;
    if (j == n) {
      char p[256];
      snprintf(p, sizeof(p), "%s%s%s", path, *path ? "." : "", name);
      return fail(c, line_of(s), p, "unknown setting");
    }
  }
  return 0;
}

static void join(char *out, size_t n, const char *path, const char *key) {
  snprintf(out, n, "%s%s%s", path, *path ? "." : "", key);
}

/* Fetches g.key expecting type; missing is fine unless required. */
static const config_setting_t *member(ctx_t *c, const config_setting_t *g, const char *path,
                                      const char *key, int type, int required) {
  char p[256];
  join(p, sizeof(p), path, key);
  const config_setting_t *s = g ? config_setting_get_member(g, key) : NULL;
  if (!s) {
    if (required) fail(c, line_of(g), p, "required setting is missing");
    return NULL;
  }
  int t = config_setting_type(s);
  int ok = t == type || (type == CONFIG_TYPE_INT && t == CONFIG_TYPE_INT64) ||
           (type == CONFIG_TYPE_LIST && t == CONFIG_TYPE_ARRAY && config_setting_length(s) == 0);
  if (!ok) {
    fail(c, line_of(s), p, "expected %s, got %s", type_name(type), type_name(t));
    return NULL;
  }
  return s;
}

static char *get_str(ctx_t *c, const config_setting_t *g, const char *path, const char *key,
                     int required, const char *dflt, int *line) {
  const config_setting_t *s = member(c, g, path, key, CONFIG_TYPE_STRING, required);
  if (line) *line = s ? line_of(s) : line_of(g);
  if (!s) return dflt && !c->failed ? pc_strdup(dflt) : NULL;
  return pc_strdup(config_setting_get_string(s));
}

static long long get_int(ctx_t *c, const config_setting_t *g, const char *path, const char *key,
                         long long dflt, long long min, long long max) {
  const config_setting_t *s = member(c, g, path, key, CONFIG_TYPE_INT, 0);
  if (!s) return dflt;
  long long v = config_setting_get_int64(s);
  if (v < min || v > max) {
    char p[256];
    join(p, sizeof(p), path, key);
    fail(c, line_of(s), p, "must be between %lld and %lld", min, max);
    return dflt;
  }
  return v;
}

static int get_bool(ctx_t *c, const config_setting_t *g, const char *path, const char *key,
                    int dflt) {
  const config_setting_t *s = member(c, g, path, key, CONFIG_TYPE_BOOL, 0);
  return s ? config_setting_get_bool(s) : dflt;
}

int pc_config_parse_addr(const char *s, struct sockaddr_storage *out) {
  char host[64];
  const char *colon;
  memset(out, 0, sizeof(*out));
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    if (!close || close[1] != ':' || (size_t)(close - s - 1) >= sizeof(host)) return -1;
    memcpy(host, s + 1, (size_t)(close - s - 1));
    host[close - s - 1] = '\0';
    colon = close + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof(host) || memchr(s, ':', (size_t)(colon - s)))
      return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
  }
  const char *ps = colon + 1;
  if (!*ps || strlen(ps) > 5) return -1;
  long port = 0;
  for (const char *q = ps; *q; q++) {
    if (*q < '0' || *q > '9') return -1;
    port = port * 10 + (*q - '0');
  }
  if (port < 1 || port > 65535) return -1;
  if (s[0] == '[') {
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)out) != 0) return -1;
  } else if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)out) != 0) {
    return -1;
  }
  return 0;
}

int pc_config_cipher_ok(const char *name) {
  for (size_t i = 0; i < PC_ARRAY_SIZE(strong_ciphers); i++)
    if (strcmp(name, strong_ciphers[i]) == 0) return 1;
  return 0;
}

/* Checks a ':'-separated list; each item must satisfy ok(). */
static int check_list(ctx_t *c, const char *list, int line, const char *setting,
                      int (*ok)(const char *), const char *what) {
  if (!*list) return fail(c, line, setting, "must not be empty");
  size_t n = strlen(list);
  if (list[0] == ':' || list[n - 1] == ':' || strstr(list, "::"))
    return fail(c, line, setting, "has an empty entry");
  char *copy = pc_strdup(list), *save = NULL;
  int rc = 0;
  for (char *tok = strtok_r(copy, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
    if (!ok(tok)) {
      rc = fail(c, line, setting, "\"%s\" is not %s", tok, what);
      break;
    }
  }
  free(copy);
  return rc;
}

static int curve_ok(const char *name) {
  for (size_t i = 0; i < PC_ARRAY_SIZE(known_curves); i++)
    if (strcmp(name, known_curves[i]) == 0) return 1;
  return 0;
}

static int readable(const char *file) { return access(file, R_OK) == 0; }

static void parse_identity(ctx_t *c, const config_setting_t *root, pc_config_t *cfg) {
  static const char *const keys[] = {"cert",
                                     "key",
                                     "ca",
                                     "watch",
                                     "poll_interval_ms",
                                     "key_passphrase_file",
                                     "expiry_warning_hours"};
  const config_setting_t *g = member(c, root, "", "identity", CONFIG_TYPE_GROUP, 1);
  if (!g || check_keys(c, g, "identity", keys, PC_ARRAY_SIZE(keys))) return;
  cfg->identity.cert = get_str(c, g, "identity", "cert", 1, NULL, &cfg->identity.line_cert);
  cfg->identity.key = get_str(c, g, "identity", "key", 1, NULL, &cfg->identity.line_key);
  cfg->identity.ca = get_str(c, g, "identity", "ca", 1, NULL, &cfg->identity.line_ca);
  cfg->identity.watch = get_bool(c, g, "identity", "watch", 0);
  cfg->identity.poll_interval_ms =
      (uint64_t)get_int(c, g, "identity", "poll_interval_ms", 60000, 1000, 86400000LL);
  cfg->identity.expiry_warning_hours =
      (uint32_t)get_int(c, g, "identity", "expiry_warning_hours", 168, 1, 8760);
  cfg->identity.key_passphrase_file =
      get_str(c, g, "identity", "key_passphrase_file", 0, NULL, &cfg->identity.line_pass);
  const struct {
    const char *file, *name;
    int line;
  } files[] = {
      {cfg->identity.cert, "identity.cert", cfg->identity.line_cert},
      {cfg->identity.key, "identity.key", cfg->identity.line_key},
      {cfg->identity.ca, "identity.ca", cfg->identity.line_ca},
      {cfg->identity.key_passphrase_file, "identity.key_passphrase_file", cfg->identity.line_pass}};
  for (size_t i = 0; i < PC_ARRAY_SIZE(files) && !c->failed; i++) {
    if (files[i].file && !readable(files[i].file))
      fail(c, files[i].line, files[i].name, "cannot read \"%s\": %s", files[i].file,
           strerror(errno));
  }
}

static void parse_tls(ctx_t *c, const config_setting_t *root, pc_config_t *cfg) {
  static const char *const keys[] = {"min_version", "ciphers", "curves", "verify_depth",
                                     "resumption"};
  const config_setting_t *g = member(c, root, "", "tls", CONFIG_TYPE_GROUP, 0);
  if (g && check_keys(c, g, "tls", keys, PC_ARRAY_SIZE(keys))) return;
  int line;
  char *v = get_str(c, g, "tls", "min_version", 0, "1.2", &line);
  if (v && strcmp(v, "1.2") == 0)
    cfg->tls.min_version = TLS1_2_VERSION;
  else if (v && strcmp(v, "1.3") == 0)
    cfg->tls.min_version = TLS1_3_VERSION;
  else if (v)
    fail(c, line, "tls.min_version", "\"%s\" is not allowed: use \"1.2\" or \"1.3\"", v);
  free(v);
  cfg->tls.ciphers = get_str(c, g, "tls", "ciphers", 0, DEFAULT_CIPHERS, &cfg->tls.line_ciphers);
  cfg->tls.curves = get_str(c, g, "tls", "curves", 0, DEFAULT_CURVES, &cfg->tls.line_curves);
  if (cfg->tls.ciphers)
    check_list(c, cfg->tls.ciphers, cfg->tls.line_ciphers, "tls.ciphers", pc_config_cipher_ok,
               "an ECDHE cipher suite with AES-GCM or ChaCha20-Poly1305");
  if (cfg->tls.curves)
    check_list(c, cfg->tls.curves, cfg->tls.line_curves, "tls.curves", curve_ok,
               "one of X25519, P-256, P-384");
  cfg->tls.verify_depth = (int)get_int(c, g, "tls", "verify_depth", 8, 1, 16);
  cfg->tls.resumption = get_bool(c, g, "tls", "resumption", 1);
}

/* dns = { servers; min_ttl_ms; max_ttl_ms; timeout_ms; } and
 * health = { ejection_base_ms; ejection_max_ms; } (README "Service names"). */
static void parse_dns(ctx_t *c, const config_setting_t *root, pc_config_t *cfg) {
  static const char *const dns_keys[] = {"servers", "min_ttl_ms", "max_ttl_ms", "timeout_ms"};
  static const char *const health_keys[] = {"ejection_base_ms", "ejection_max_ms"};
  const long long day = 86400000LL;
  const config_setting_t *g = member(c, root, "", "dns", CONFIG_TYPE_GROUP, 0);
  if (!(g && check_keys(c, g, "dns", dns_keys, PC_ARRAY_SIZE(dns_keys)))) {
    const config_setting_t *sv = g ? config_setting_get_member(g, "servers") : NULL;
    if (sv) {
      int t = config_setting_type(sv), len = config_setting_length(sv);
      if ((t != CONFIG_TYPE_LIST && t != CONFIG_TYPE_ARRAY) || len == 0) {
        fail(c, line_of(sv), "dns.servers", "expected a non-empty list of \"IP:PORT\" strings");
      } else {
        pc_jbuf_t b = {0};
        for (int i = 0; i < len && !c->failed; i++) {
          const config_setting_t *x = config_setting_get_elem(sv, (unsigned)i);
          const char *str =
              config_setting_type(x) == CONFIG_TYPE_STRING ? config_setting_get_string(x) : NULL;
          struct sockaddr_storage a;
          if (!str || pc_config_parse_addr(str, &a) != 0)
            fail(c, line_of(x), "dns.servers", "entry %d is not an address of the form IP:PORT", i);
          else
            pc_jbuf_printf(&b, "%s%s", i ? "," : "", str);
        }
        if (!c->failed) cfg->dns.servers = pc_strdup(b.data);
        pc_jbuf_free(&b);
      }
    }
    /* A TTL of 0 would have a busy resolver ask again in a loop; an hour
     * caps how long a name can point at a pod that moved. */
    cfg->dns.min_ttl_ms = (uint64_t)get_int(c, g, "dns", "min_ttl_ms", 1000, 100, day);
    cfg->dns.max_ttl_ms = (uint64_t)get_int(c, g, "dns", "max_ttl_ms", 30000, 100, day);
    cfg->dns.timeout_ms = (uint64_t)get_int(c, g, "dns", "timeout_ms", 2000, 10, 600000);
    if (!c->failed && cfg->dns.max_ttl_ms < cfg->dns.min_ttl_ms)
      fail(c, line_of(config_setting_get_member(g, "max_ttl_ms")), "dns.max_ttl_ms",
           "must not be below dns.min_ttl_ms (%llu)", (unsigned long long)cfg->dns.min_ttl_ms);
  }
  g = member(c, root, "", "health", CONFIG_TYPE_GROUP, 0);
  if (!(g && check_keys(c, g, "health", health_keys, PC_ARRAY_SIZE(health_keys)))) {
    cfg->health.ejection_base_ms =
        (uint64_t)get_int(c, g, "health", "ejection_base_ms", 1000, 1, day);
    cfg->health.ejection_max_ms =
        (uint64_t)get_int(c, g, "health", "ejection_max_ms", 30000, 1, day);
    if (!c->failed && cfg->health.ejection_max_ms < cfg->health.ejection_base_ms)
      fail(c, line_of(config_setting_get_member(g, "ejection_max_ms")), "health.ejection_max_ms",
           "must not be below health.ejection_base_ms (%llu)",
           (unsigned long long)cfg->health.ejection_base_ms);
  }
}

static void parse_groups(ctx_t *c, const config_setting_t *root, pc_config_t *cfg) {
  static const char *const admin_keys[] = {"listen", "max_connections", "write_timeout_ms"};
  static const char *const log_keys[] = {"level", "access", "buffer_bytes"};
  static const char *const limit_keys[] = {
      "max_connections",        "handshake_timeout_ms",
      "connect_timeout_ms",     "idle_timeout_ms",
      "drain_timeout_ms",       "revoke_grace_ms",
      "max_pending_handshakes", "handshake_failures_per_source",
      "throttle_window_ms",     "throttle_cooldown_ms",
      "throttle_ipv6_prefix"};
  static const char *const http_keys[] = {
      "max_request_line",    "max_header_bytes", "max_headers",          "request_timeout_ms",
      "response_timeout_ms", "pool_max_idle",    "pool_idle_timeout_ms", "body_timeout_ms"};
  static const char *const http2_keys[] = {"max_concurrent_streams", "stream_window",
                                           "connection_window"};
  int line;
  const config_setting_t *g = member(c, root, "", "admin", CONFIG_TYPE_GROUP, 0);
  if (!(g && check_keys(c, g, "admin", admin_keys, PC_ARRAY_SIZE(admin_keys)))) {
    cfg->admin.listen_str = get_str(c, g, "admin", "listen", 0, "127.0.0.1:15000", &line);
    cfg->admin.line = line;
    if (cfg->admin.listen_str && pc_config_parse_addr(cfg->admin.listen_str, &cfg->admin.listen))
      fail(c, line, "admin.listen", "\"%s\" is not an address of the form IP:PORT",
           cfg->admin.listen_str);
    /* Probes and a scraper need a handful; the cap bounds what a stuck or
     * hostile local client can hold on the main thread. */
    cfg->admin.max_connections = (uint32_t)get_int(c, g, "admin", "max_connections", 64, 1, 10000);
    cfg->admin.write_timeout_ms =
        (uint64_t)get_int(c, g, "admin", "write_timeout_ms", 10000, 1, 86400000LL);
  }
  g = member(c, root, "", "log", CONFIG_TYPE_GROUP, 0);
  cfg->log.level = PC_LOG_INFO;
  if (!(g && check_keys(c, g, "log", log_keys, PC_ARRAY_SIZE(log_keys)))) {
    char *lvl = get_str(c, g, "log", "level", 0, "info", &line);
    if (lvl && pc_log_level_parse(lvl, &cfg->log.level))
      fail(c, line, "log.level", "\"%s\" is not one of debug, info, warn, error", lvl);
    free(lvl);
    cfg->log.access = get_bool(c, g, "log", "access", 1);
    cfg->log.buffer_bytes =
        (size_t)get_int(c, g, "log", "buffer_bytes", 16 << 20, 64 << 10, 1LL << 30);
  }
  g = member(c, root, "", "limits", CONFIG_TYPE_GROUP, 0);
  if (!(g && check_keys(c, g, "limits", limit_keys, PC_ARRAY_SIZE(limit_keys)))) {
    const long long day = 86400000LL;
    cfg->limits.max_connections =
        (uint32_t)get_int(c, g, "limits", "max_connections", 10000, 1, 1000000);
    cfg->limits.handshake_timeout_ms =
        (uint64_t)get_int(c, g, "limits", "handshake_timeout_ms", 10000, 1, day);
    cfg->limits.connect_timeout_ms =
        (uint64_t)get_int(c, g, "limits", "connect_timeout_ms", 5000, 1, day);
    cfg->limits.idle_timeout_ms =
        (uint64_t)get_int(c, g, "limits", "idle_timeout_ms", 300000, 1, day);
    cfg->limits.drain_timeout_ms =
        (uint64_t)get_int(c, g, "limits", "drain_timeout_ms", 20000, 0, day);
    cfg->limits.revoke_grace_ms =
        (uint64_t)get_int(c, g, "limits", "revoke_grace_ms", 10000, 0, day);
    cfg->limits.max_pending_handshakes =
        (uint32_t)get_int(c, g, "limits", "max_pending_handshakes", 1024, 1, 1000000);
    /* A budget above the cap would never be reached: the cap would pause
     * first, which is the starvation the budget exists to prevent. */
    if (cfg->limits.max_pending_handshakes > cfg->limits.max_connections) {
      const config_setting_t *s = g ? config_setting_get_member(g, "max_pending_handshakes") : NULL;
      if (s)
        fail(c, line_of(s), "limits.max_pending_handshakes",
             "must be between 1 and limits.max_connections (%u)", cfg->limits.max_connections);
      else
        cfg->limits.max_pending_handshakes = cfg->limits.max_connections;
    }
    cfg->limits.handshake_failures_per_source =
        (uint32_t)get_int(c, g, "limits", "handshake_failures_per_source", 20, 1, 1000000);
    cfg->limits.throttle_window_ms =
        (uint64_t)get_int(c, g, "limits", "throttle_window_ms", 10000, 1, day);
    cfg->limits.throttle_cooldown_ms =
        (uint64_t)get_int(c, g, "limits", "throttle_cooldown_ms", 30000, 1, day);
    /* Under a /48 one failing caller would throttle a whole site; 128 is one
     * address, for pods that share their node's /64. */
    cfg->limits.throttle_ipv6_prefix =
        (uint32_t)get_int(c, g, "limits", "throttle_ipv6_prefix", 64, 48, 128);
  }
  g = member(c, root, "", "http", CONFIG_TYPE_GROUP, 0);
  if (!(g && check_keys(c, g, "http", http_keys, PC_ARRAY_SIZE(http_keys)))) {
    const long long day = 86400000LL;
    cfg->http.max_request_line =
        (uint32_t)get_int(c, g, "http", "max_request_line", 8192, 64, 1 << 20);
    cfg->http.max_header_bytes =
        (uint32_t)get_int(c, g, "http", "max_header_bytes", 65536, 256, 1 << 24);
    cfg->http.max_headers = (uint32_t)get_int(c, g, "http", "max_headers", 100, 1, 10000);
    cfg->http.request_timeout_ms =
        (uint64_t)get_int(c, g, "http", "request_timeout_ms", 10000, 1, day);
    cfg->http.response_timeout_ms =
        (uint64_t)get_int(c, g, "http", "response_timeout_ms", 30000, 1, day);
    /* A client that stops in the middle of a body holds an upstream
     * connection (and, HTTP/1, the app's request) until it does. */
    cfg->http.body_timeout_ms = (uint64_t)get_int(c, g, "http", "body_timeout_ms", 60000, 1, day);
    /* One HTTP/2 client connection may have 100 requests in flight, each on
     * its own HTTP/1.1 connection to the app: a pool that keeps fewer idle
     * reconnects for most of them (h2load -c16 -m32 through a pair: 15k
     * req/s with 64, 21k with 1024). */
    cfg->http.pool_max_idle = (uint32_t)get_int(c, g, "http", "pool_max_idle", 256, 0, 100000);
    cfg->http.pool_idle_timeout_ms =
        (uint64_t)get_int(c, g, "http", "pool_idle_timeout_ms", 30000, 1, day);
  }
  /* HTTP/2 (README "HTTP/2"): 100 concurrent streams is what HAProxy and
   * Envoy's edge guide use. A stream's window equals the per-direction
   * watermark of an HTTP/1 connection (PC_STREAM_HIGH_WATER), so one stream
   * moves as fast as one HTTP/1 connection; the connection window caps what
   * one client can make the sidecar hold, whatever its stream count. */
  g = member(c, root, "", "http2", CONFIG_TYPE_GROUP, 0);
  if (!(g && check_keys(c, g, "http2", http2_keys, PC_ARRAY_SIZE(http2_keys)))) {
    cfg->http2.max_concurrent_streams =
        (uint32_t)get_int(c, g, "http2", "max_concurrent_streams", 100, 1, 10000);
    cfg->http2.stream_window =
        (uint32_t)get_int(c, g, "http2", "stream_window", 256 * 1024, 65535, (1LL << 31) - 1);
    cfg->http2.connection_window =
        (uint32_t)get_int(c, g, "http2", "connection_window", 1024 * 1024, 65535, (1LL << 31) - 1);
  }
  parse_dns(c, root, cfg);
}

static int method_ok(const char *m) {
  if (!*m) return 0;
  for (; *m; m++)
    if (!((*m >= 'A' && *m <= 'Z') || *m == '-' || *m == '_')) return 0;
  return 1;
}

static int path_ok(const char *p) {
  if (p[0] != '/') return 0;
  for (; *p; p++)
    if (*p <= ' ' || *p == '?' || *p == '#' || *p == 0x7f) return 0;
  return 1;
}

/* An allow entry's `methods` or `paths`: a non-empty list of strings, each
 * passing ok. Returns the strings (NULL when the key is absent). */
static char **parse_strings(ctx_t *c, const config_setting_t *e, const char *epath, const char *key,
                            int (*ok)(const char *), const char *what, int allowed, size_t *n) {
  char sp[340];
  snprintf(sp, sizeof(sp), "%s.%s", epath, key);
  *n = 0;
  const config_setting_t *s = config_setting_get_member(e, key);
  if (!s) return NULL;
  if (!allowed) {
    fail(c, line_of(s), sp, "only an inbound listener with protocol = \"http\" can narrow by %s",
         key);
    return NULL;
  }
  int t = config_setting_type(s), len = config_setting_length(s);
  if ((t != CONFIG_TYPE_LIST && t != CONFIG_TYPE_ARRAY) || len == 0) {
    fail(c, line_of(s), sp, "expected a non-empty list of strings");
    return NULL;
  }
  char **v = pc_calloc((size_t)len, sizeof(char *));
  for (int i = 0; i < len && !c->failed; i++) {
    const config_setting_t *x = config_setting_get_elem(s, (unsigned)i);
    const char *str =
        config_setting_type(x) == CONFIG_TYPE_STRING ? config_setting_get_string(x) : NULL;
    if (!str || !ok(str))
      fail(c, line_of(x), sp, "entry %d is not %s", i, what);
    else
      v[(*n)++] = pc_strdup(str);
  }
  return v;
}

static void free_strings(char **v, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(v[i]);
  free(v);
}

/* allow / expect: a list of { namespace; service_account?; methods?; paths? }
 * groups (methods and paths only on inbound HTTP listeners). */
static pc_policy_t *parse_rules(ctx_t *c, const config_setting_t *lg, const char *lpath,
                                const char *key, int required, int http_rules) {
  static const char *const keys[] = {"namespace", "service_account", "methods", "paths"};
  char path[256], epath[300];
  join(path, sizeof(path), lpath, key);
  const config_setting_t *list = member(c, lg, lpath, key, CONFIG_TYPE_LIST, required);
  pc_policy_t *p = pc_policy_new();
  int n = list ? config_setting_length(list) : 0;
  for (int i = 0; i < n && !c->failed; i++) {
    const config_setting_t *e = config_setting_get_elem(list, (unsigned)i);
    snprintf(epath, sizeof(epath), "%s[%d]", path, i);
    if (config_setting_type(e) != CONFIG_TYPE_GROUP) {
      fail(c, line_of(e), epath, "expected a group { namespace = \"...\"; }");
      break;
    }
    if (check_keys(c, e, epath, keys, PC_ARRAY_SIZE(keys))) break;
    int lns = 0, lsa = 0;
    char *ns = get_str(c, e, epath, "namespace", 1, NULL, &lns);
    char *sa = get_str(c, e, epath, "service_account", 0, NULL, &lsa);
    char sp[320];
    if (ns && !pc_spiffe_valid_segment(ns, strlen(ns))) {
      snprintf(sp, sizeof(sp), "%s.namespace", epath);
      fail(c, lns, sp, "\"%s\" is not a valid SPIFFE path segment", ns);
    } else if (sa && !pc_spiffe_valid_segment(sa, strlen(sa))) {
      snprintf(sp, sizeof(sp), "%s.service_account", epath);
      fail(c, lsa, sp, "\"%s\" is not a valid SPIFFE path segment", sa);
    } else if (ns) {
      pc_policy_add(p, ns, sa);
    }
    size_t nm = 0, np = 0;
    char **methods = parse_strings(c, e, epath, "methods", method_ok,
                                   "an upper-case method name such as \"GET\"", http_rules, &nm);
    char **paths =
        parse_strings(c, e, epath, "paths", path_ok,
                      "a path prefix starting with \"/\" (no spaces, '?' or '#')", http_rules, &np);
    if (!c->failed && (methods || paths))
      pc_policy_narrow(p, (const char *const *)methods, nm, (const char *const *)paths, np);
    free_strings(methods, nm);
    free_strings(paths, np);
    free(ns);
    free(sa);
  }
  return p;
}

/* protocol and upstream_protocol of a listener or route group e. */
static void parse_protocols(ctx_t *c, const config_setting_t *e, const char *path, int in,
                            pc_listener_cfg_t *l) {
  int line;
  char sp[340];
  char *proto = get_str(c, e, path, "protocol", 0, "tcp", &line);
  if (proto && strcmp(proto, "tcp") == 0) {
    l->protocol = PC_PROTO_TCP;
  } else if (proto && strcmp(proto, "http") == 0) {
    l->protocol = PC_PROTO_HTTP;
  } else if (proto) {
    snprintf(sp, sizeof(sp), "%s.protocol", path);
    fail(c, line, sp, "\"%s\" is not one of \"tcp\", \"http\"", proto);
  }
  free(proto);
  /* How requests leave an HTTP listener: to the app (inbound) as HTTP/1.1
   * or prior-knowledge h2c; to the upstream sidecar (outbound) as whatever
   * ALPN settles on, or pinned. */
  const char *pkey = in ? "app_protocol" : "upstream_protocol";
  char *pv = get_str(c, e, path, pkey, 0, in ? "http/1.1" : "auto", &line);
  snprintf(sp, sizeof(sp), "%s.%s", path, pkey);
  if (pv && config_setting_get_member(e, pkey) && l->protocol != PC_PROTO_HTTP) {
    fail(c, line, sp, "applies only to protocol = \"http\"");
  } else if (pv && in) {
    if (strcmp(pv, "http/1.1") == 0)
      l->app_protocol = PC_APP_HTTP1;
    else if (strcmp(pv, "h2c") == 0)
      l->app_protocol = PC_APP_H2C;
    else
      fail(c, line, sp, "\"%s\" is not one of \"http/1.1\", \"h2c\"", pv);
  } else if (pv) {
    if (strcmp(pv, "auto") == 0)
      l->upstream_protocol = PC_UP_AUTO;
    else if (strcmp(pv, "h2") == 0)
      l->upstream_protocol = PC_UP_H2;
    else if (strcmp(pv, "http/1.1") == 0)
      l->upstream_protocol = PC_UP_HTTP1;
    else
      fail(c, line, sp, "\"%s\" is not one of \"auto\", \"h2\", \"http/1.1\"", pv);
  }
  free(pv);
}

/* server_name (required) and expect (at least one) of an outbound listener
 * or route group e. */
static void parse_upstream_identity(ctx_t *c, const config_setting_t *e, const char *path,
                                    pc_listener_cfg_t *l) {
  int line;
  char sp[340];
  l->server_name = get_str(c, e, path, "server_name", 1, NULL, &line);
  if (l->server_name && !*l->server_name) {
    snprintf(sp, sizeof(sp), "%s.server_name", path);
    fail(c, line, sp, "must not be empty");
  }
  l->policy = parse_rules(c, e, path, "expect", 1, 0);
  if (!c->failed && pc_policy_count(l->policy) == 0) {
    snprintf(sp, sizeof(sp), "%s.expect", path);
    fail(c, line_of(config_setting_get_member(e, "expect")), sp,
         "an outbound listener needs at least one expected identity");
  }
}

/* A route's destination: "CIDR:PORT" (a bare address is a /32 or /128),
 * "[v6CIDR]:PORT", or "NAME:PORT"; PORT may be "*" (any) for addresses.
 * Fills r's match fields; names keep family 0. Returns 0, or -1 with why. */
static int parse_destination(const char *s, pc_route_t *r, char *why, size_t whylen) {
  char host[128];
  const char *colon;
  int v6 = s[0] == '[';
  if (v6) {
    const char *close = strchr(s, ']');
    if (!close || close[1] != ':' || (size_t)(close - s - 1) >= sizeof(host)) goto bad;
    memcpy(host, s + 1, (size_t)(close - s - 1));
    host[close - s - 1] = '\0';
    colon = close + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof(host)) goto bad;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
  }
  const char *ps = colon + 1;
  long port = 0;
  if (strcmp(ps, "*") == 0) {
    port = 0;
  } else {
    if (!*ps || strlen(ps) > 5) goto bad;
    for (const char *q = ps; *q; q++) {
      if (*q < '0' || *q > '9') goto bad;
      port = port * 10 + (*q - '0');
    }
    if (port < 1 || port > 65535) goto bad;
  }
  r->port = (uint16_t)port;
  char *slash = strchr(host, '/');
  int maxbits = v6 ? 128 : 32;
  r->bits = maxbits;
  if (slash) {
    *slash = '\0';
    const char *b = slash + 1;
    long bits = 0;
    if (!*b || strlen(b) > 3) goto bad;
    for (const char *q = b; *q; q++) {
      if (*q < '0' || *q > '9') goto bad;
      bits = bits * 10 + (*q - '0');
    }
    if (bits > maxbits) {
      snprintf(why, whylen, "\"%s\": a prefix length of /%ld is more than %d", s, bits, maxbits);
      return -1;
    }
    r->bits = (int)bits;
  }
  if (inet_pton(v6 ? AF_INET6 : AF_INET, host, r->net) == 1) {
    r->family = v6 ? AF_INET6 : AF_INET;
    size_t nbytes = v6 ? 16 : 4;
    for (size_t i = 0; i < nbytes; i++) {
      int keep = r->bits - (int)i * 8;
      uint8_t mask = keep >= 8 ? 0xff : keep <= 0 ? 0 : (uint8_t)(0xff << (8 - keep));
      if (r->net[i] & ~mask) {
        snprintf(why, whylen, "\"%s\": the address has bits set past the /%d prefix", s, r->bits);
        return -1;
      }
    }
    return 0;
  }
  /* Not an address: a NAME:PORT, resolved as an upstream name is. */
  if (v6 || slash) goto bad;
  int digits_only = 1;
  for (const char *q = host; *q; q++)
    if (!((*q >= '0' && *q <= '9') || *q == '.')) digits_only = 0;
  if (digits_only || !*host) goto bad;
  if (port == 0) {
    snprintf(why, whylen, "\"%s\": a name needs a port, not \"*\"", s);
    return -1;
  }
  r->family = 0;
  return 0;
bad:
  snprintf(why, whylen,
           "\"%s\" is not a destination of the form CIDR:PORT (\"10.0.0.0/24:8080\"), "
           "[IPv6CIDR]:PORT, IP:PORT or NAME:PORT (PORT may be \"*\" for addresses)",
           s);
  return -1;
}

/* One entry of an outbound transparent listener's routes, into r->lc (a
 * listener config of its own, named as its listener). */
static void parse_route(ctx_t *c, const config_setting_t *e, const char *path,
                        const pc_listener_cfg_t *l, size_t idx, pc_route_t *r) {
  static const char *const keys[] = {"destination", "protocol", "upstream_protocol",
                                     "server_name", "expect",   "passthrough"};
  pc_listener_cfg_t *rl = &r->lc;
  rl->direction = PC_DIR_OUTBOUND;
  rl->line = line_of(e);
  rl->line_name = l->line_name;
  rl->line_listen = l->line_listen;
  rl->name = pc_strdup(l->name);
  rl->listen_str = pc_strdup(l->listen_str);
  rl->listen = l->listen;
  rl->parent = l;
  rl->route_index = idx;
  if (config_setting_type(e) != CONFIG_TYPE_GROUP) {
    fail(c, rl->line, path,
         "expected a group { destination = \"10.0.0.0/24:8080\"; server_name = \"...\"; "
         "expect = ( ... ); }");
    return;
  }
  if (check_keys(c, e, path, keys, PC_ARRAY_SIZE(keys))) return;
  int line;
  char sp[340], why[300];
  rl->target_str = get_str(c, e, path, "destination", 1, NULL, &line);
  snprintf(sp, sizeof(sp), "%s.destination", path);
  if (rl->target_str && parse_destination(rl->target_str, r, why, sizeof(why)) != 0)
    fail(c, line, sp, "%s", why);
  if (c->failed) return;
  if (r->family) {
    rl->tgt = pc_target_get_pinned(l->name, 0, rl->target_str);
  } else {
    rl->tgt = pc_target_get(l->name, 0, rl->target_str, why, sizeof(why));
    if (!rl->tgt) fail(c, line, sp, "%s", why);
  }
  rl->passthrough = get_bool(c, e, path, "passthrough", 0);
  parse_protocols(c, e, path, 0, rl);
  if (c->failed) return;
  if (rl->passthrough) {
    /* Plain TCP to somewhere outside the mesh: nothing to verify, nothing
     * to parse. */
    static const char *const no[] = {"server_name", "expect", "protocol", "upstream_protocol"};
    for (size_t i = 0; i < PC_ARRAY_SIZE(no); i++) {
      const config_setting_t *x = config_setting_get_member(e, no[i]);
      if (!x) continue;
      snprintf(sp, sizeof(sp), "%s.%s", path, no[i]);
      fail(c, line_of(x), sp, "a passthrough route relays plain TCP: it has no %s", no[i]);
      return;
    }
    rl->policy = pc_policy_new();
    return;
  }
  parse_upstream_identity(c, e, path, rl);
}

static void parse_routes(ctx_t *c, const config_setting_t *e, const char *path,
                         pc_listener_cfg_t *l) {
  char rp[300];
  const config_setting_t *list = member(c, e, path, "routes", CONFIG_TYPE_LIST, 1);
  if (!list) return;
  int n = config_setting_length(list);
  if (n == 0) {
    snprintf(rp, sizeof(rp), "%s.routes", path);
    fail(c, line_of(list), rp,
         "a transparent outbound listener needs at least one route (unrouted destinations "
         "are refused)");
    return;
  }
  l->routes = pc_calloc((size_t)n, sizeof(pc_route_t));
  for (int i = 0; i < n && !c->failed; i++) {
    snprintf(rp, sizeof(rp), "%s.routes[%d]", path, i);
    parse_route(c, config_setting_get_elem(list, (unsigned)i), rp, l, (size_t)i,
                &l->routes[l->nroutes++]);
  }
}

static void parse_listener(ctx_t *c, const config_setting_t *e, const char *path,
                           pc_direction_t dir, pc_listener_cfg_t *l) {
  static const char *const in_keys[] = {"name",         "listen", "forward",    "protocol",
                                        "app_protocol", "allow",  "transparent"};
  static const char *const out_keys[] = {"name",   "listen",   "upstream",          "server_name",
                                         "expect", "protocol", "upstream_protocol", "transparent",
                                         "routes"};
  int in = dir == PC_DIR_INBOUND;
  l->direction = dir;
  l->line = line_of(e);
  if (config_setting_type(e) != CONFIG_TYPE_GROUP) {
    fail(c, l->line, path, "expected a group");
    return;
  }
  if (check_keys(c, e, path, in ? in_keys : out_keys,
                 in ? PC_ARRAY_SIZE(in_keys) : PC_ARRAY_SIZE(out_keys)))
    return;
  int line;
  char sp[300];
  l->name = get_str(c, e, path, "name", 1, NULL, &line);
  l->line_name = line;
  if (l->name && !*l->name) {
    snprintf(sp, sizeof(sp), "%s.name", path);
    fail(c, line, sp, "must not be empty");
  }
  l->listen_str = get_str(c, e, path, "listen", 1, NULL, &line);
  l->line_listen = line;
  if (l->listen_str && pc_config_parse_addr(l->listen_str, &l->listen)) {
    snprintf(sp, sizeof(sp), "%s.listen", path);
    fail(c, line, sp, "\"%s\" is not an address of the form IP:PORT", l->listen_str);
  }
  l->transparent = get_bool(c, e, path, "transparent", 0);
  const char *tkey = in ? "forward" : "upstream";
  if (l->transparent) {
    /* Where a redirected connection goes is where it was headed: the
     * listener names no target; outbound, its routes say the rest. */
    static const char *const out_no[] = {"upstream", "server_name", "expect", "protocol",
                                         "upstream_protocol"};
    static const char *const in_no[] = {"forward"};
    const char *const *no = in ? in_no : out_no;
    size_t nno = in ? PC_ARRAY_SIZE(in_no) : PC_ARRAY_SIZE(out_no);
    for (size_t i = 0; i < nno && !c->failed; i++) {
      const config_setting_t *x = config_setting_get_member(e, no[i]);
      if (!x) continue;
      snprintf(sp, sizeof(sp), "%s.%s", path, no[i]);
      if (in)
        fail(c, line_of(x), sp,
             "a transparent inbound listener sends each connection to 127.0.0.1 on its "
             "original port: it has no forward");
      else
        fail(c, line_of(x), sp,
             "a transparent outbound listener takes %s from its routes, not from the listener",
             no[i]);
    }
    if (c->failed || !l->name) return;
    if (in) {
      l->target_str = pc_strdup("127.0.0.1:*");
      l->tgt = pc_target_get_pinned(l->name, 1, l->target_str);
    } else {
      l->target_str = pc_strdup("(original destination)");
      l->policy = pc_policy_new();
      parse_routes(c, e, path, l);
      return;
    }
  } else {
    if (!in && config_setting_get_member(e, "routes")) {
      snprintf(sp, sizeof(sp), "%s.routes", path);
      fail(c, line_of(config_setting_get_member(e, "routes")), sp,
           "routes apply only to a listener with transparent = true");
      return;
    }
    l->target_str = get_str(c, e, path, tkey, 1, NULL, &line);
    if (l->target_str && l->name) {
      char why[300];
      l->tgt = pc_target_get(l->name, in, l->target_str, why, sizeof(why));
      if (!l->tgt) {
        snprintf(sp, sizeof(sp), "%s.%s", path, tkey);
        fail(c, line, sp, "%s", why);
      }
    }
  }
  parse_protocols(c, e, path, in, l);
  if (in) {
    l->policy = parse_rules(c, e, path, "allow", 0, l->protocol == PC_PROTO_HTTP);
    return;
  }
  parse_upstream_identity(c, e, path, l);
}

static void parse_listeners(ctx_t *c, const config_setting_t *root, pc_config_t *cfg) {
  const char *kinds[2] = {"inbound", "outbound"};
  const config_setting_t *lists[2];
  size_t total = 0;
  for (int k = 0; k < 2; k++) {
    lists[k] = member(c, root, "", kinds[k], CONFIG_TYPE_LIST, 0);
    if (lists[k]) total += (size_t)config_setting_length(lists[k]);
  }
  if (c->failed) return;
  cfg->listeners = pc_calloc(total, sizeof(pc_listener_cfg_t));
  for (int k = 0; k < 2 && !c->failed; k++) {
    int n = lists[k] ? config_setting_length(lists[k]) : 0;
    for (int i = 0; i < n && !c->failed; i++) {
      char path[64];
      snprintf(path, sizeof(path), "%s[%d]", kinds[k], i);
      pc_listener_cfg_t *l = &cfg->listeners[cfg->nlisteners++];
      parse_listener(c, config_setting_get_elem(lists[k], (unsigned)i), path,
                     k == 0 ? PC_DIR_INBOUND : PC_DIR_OUTBOUND, l);
      for (size_t j = 0; j + 1 < cfg->nlisteners && !c->failed; j++) {
        const pc_listener_cfg_t *o = &cfg->listeners[j];
        char sp[80];
        if (l->name && o->name && strcmp(l->name, o->name) == 0) {
          snprintf(sp, sizeof(sp), "%s.name", path);
          fail(c, l->line_name, sp, "listener name \"%s\" is already used on line %d", l->name,
               o->line_name);
        } else if (l->listen_str && o->listen_str &&
                   pc_addr_port(&l->listen) == pc_addr_port(&o->listen)) {
          snprintf(sp, sizeof(sp), "%s.listen", path);
          fail(c, l->line_listen, sp,
               "port of \"%s\" is already used by listener \"%s\" on line %d", l->listen_str,
               o->name ? o->name : "?", o->line_listen);
        }
      }
      if (!c->failed && pc_addr_port(&l->listen) == pc_addr_port(&cfg->admin.listen)) {
        char sp[80];
        snprintf(sp, sizeof(sp), "%s.listen", path);
        fail(c, l->line_listen, sp, "port is already used by admin.listen");
      }
    }
  }
  if (!c->failed && cfg->nlisteners == 0)
    fail(c, 0, "inbound", "no inbound or outbound listener is configured");
}

int pc_config_load(const char *path, pc_config_t **out, char *err, size_t errlen) {
  static const char *const top_keys[] = {"trust_domain", "workers", "identity", "tls",   "admin",
                                         "log",          "limits",  "http",     "http2", "dns",
                                         "health",       "inbound", "outbound"};
  ctx_t c = {.file = path, .err = err, .errlen = errlen};
  config_t lc;
  config_init(&lc);
  pc_config_t *cfg = pc_calloc(1, sizeof(*cfg));
  cfg->refs = 1;
  cfg->file = pc_strdup(path);
  *out = NULL;
  if (!readable(path)) {
    fail(&c, 0, "-c", "cannot read config file: %s", strerror(errno));
    goto fail;
  }
  /* @include paths are relative to the including file, not to our cwd. */
  char *dir = pc_strdup(path), *slash = strrchr(dir, '/');
  if (slash) {
    *slash = '\0';
    config_set_include_dir(&lc, *dir ? dir : "/");
  }
  free(dir);
  if (config_read_file(&lc, path) != CONFIG_TRUE) {
    fail(&c, config_error_line(&lc), "(syntax)", "%s", config_error_text(&lc));
    goto fail;
  }
  const config_setting_t *root = config_root_setting(&lc);
  if (check_keys(&c, root, "", top_keys, PC_ARRAY_SIZE(top_keys))) goto fail;
  int line;
  cfg->trust_domain = get_str(&c, root, "", "trust_domain", 1, NULL, &line);
  if (cfg->trust_domain && !pc_spiffe_valid_td(cfg->trust_domain, strlen(cfg->trust_domain)))
    fail(&c, line, "trust_domain", "\"%s\" is not a valid SPIFFE trust domain", cfg->trust_domain);
  long long w = get_int(&c, root, "", "workers", 0, 0, 256);
  cfg->workers = w ? (int)w : (int)uv_available_parallelism();
  parse_identity(&c, root, cfg);
  parse_tls(&c, root, cfg);
  parse_groups(&c, root, cfg);
  parse_listeners(&c, root, cfg);
  if (c.failed) goto fail;
  config_destroy(&lc);
  *out = cfg;
  return 0;
fail:
  config_destroy(&lc);
  pc_config_free(cfg);
  return -1;
}

void pc_config_ref(pc_config_t *cfg) { __atomic_add_fetch(&cfg->refs, 1, __ATOMIC_RELAXED); }

int pc_config_same_listener(const pc_listener_cfg_t *a, const pc_listener_cfg_t *b) {
  if (strcmp(a->name, b->name) != 0 || a->listen.ss_family != b->listen.ss_family) return 0;
  size_t n =
      a->listen.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  return memcmp(&a->listen, &b->listen, n) == 0;
}

const pc_listener_cfg_t *pc_config_listener(const pc_config_t *cfg, const char *name) {
  for (size_t i = 0; i < cfg->nlisteners; i++)
    if (cfg->listeners[i].name && strcmp(cfg->listeners[i].name, name) == 0)
      return &cfg->listeners[i];
  return NULL;
}

static void free_listener(pc_listener_cfg_t *l) {
  for (size_t i = 0; i < l->nroutes; i++)
    free_listener(&l->routes[i].lc);
  free(l->routes);
  free(l->name);
  free(l->listen_str);
  free(l->target_str);
  pc_target_unref(l->tgt);
  free(l->server_name);
  pc_policy_free(l->policy);
}

const pc_listener_cfg_t *pc_config_counterpart(const pc_config_t *cfg,
                                               const pc_listener_cfg_t *lc) {
  const pc_listener_cfg_t *l = pc_config_listener(cfg, lc->name);
  if (!l || !lc->parent) return l;
  if (!l->transparent || lc->route_index >= l->nroutes) return NULL;
  const pc_listener_cfg_t *r = &l->routes[lc->route_index].lc;
  return strcmp(r->target_str, lc->target_str) == 0 ? r : NULL;
}

int pc_config_pinned(const pc_listener_cfg_t *lc) { return lc->transparent || lc->parent != NULL; }

void pc_config_free(pc_config_t *cfg) {
  if (!cfg || __atomic_sub_fetch(&cfg->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    free_listener(&cfg->listeners[i]);
  free(cfg->listeners);
  free(cfg->file);
  free(cfg->trust_domain);
  free(cfg->identity.cert);
  free(cfg->identity.key);
  free(cfg->identity.ca);
  free(cfg->identity.key_passphrase_file);
  free(cfg->tls.ciphers);
  free(cfg->tls.curves);
  free(cfg->admin.listen_str);
  free(cfg->dns.servers);
  free(cfg);
}

/*
 * test_config.c - pc_config_load on real files: a good config yields the
 * expected snapshot; every invalid one fails with "FILE:LINE: SETTING: ..."
 * naming the line and setting a user has to fix.
 *
 * Each invalid case is the good config with one edit (find -> replace); the
 * expected line is the first line holding the case's marker text (0 for "not
 * on a line").
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include "check.h"
#include "config.h"
#include "endpoint.h"
#include "policy.h"

/* libconfig 1.5 leaks the string token it was holding when a syntax error
 * hits (e.g. a line holding just "oops", or `"" = 1;`): its bison grammar has
 * no %destructor. Those bytes are the library's; every other leak, including
 * a missing config_destroy (config_setting_create), still fails the run. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) {
  return "leak:strbuf_append\nleak:libconfig_yylex\n";
}

static char dir[64];
static char conf_path[128];

static const char base_conf[] =
    "# portcullis test config\n"
    "trust_domain = \"cluster.local\";\n"
    "workers = 2;\n"
    "\n"
    "identity = {\n"
    "  cert = \"@DIR@/tls.crt\";\n"
    "  key = \"@DIR@/tls.key\";\n"
    "  ca = \"@DIR@/ca.crt\";\n"
    "  watch = true;\n"
    "};\n"
    "\n"
    "tls = {\n"
    "  min_version = \"1.2\";\n"
    "  ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";\n"
    "  curves = \"X25519:P-256\";\n"
    "};\n"
    "\n"
    "admin = { listen = \"127.0.0.1:15000\"; };\n"
    "\n"
    "log = { level = \"warn\"; access = false; };\n"
    "\n"
    "limits = {\n"
    "  max_connections = 10000;\n"
    "  handshake_timeout_ms = 10000;\n"
    "  connect_timeout_ms = 5000;\n"
    "  idle_timeout_ms = 300000;\n"
    "  drain_timeout_ms = 20000;\n"
    "};\n"
    "\n"
    "inbound = (\n"
    "  { name = \"api\";\n"
    "    listen = \"0.0.0.0:15443\";\n"
    "    forward = \"127.0.0.1:8080\";\n"
    "    protocol = \"tcp\";\n"
    "    allow = ( { namespace = \"web\"; },\n"
    "              { namespace = \"jobs\"; service_account = \"scheduler\"; } );\n"
    "  }\n"
    ");\n"
    "\n"
    "outbound = (\n"
    "  { name = \"payments\";\n"
    "    listen = \"127.0.0.1:15001\";\n"
    "    upstream = \"10.0.4.7:15443\";\n"
    "    server_name = \"api.payments.svc\";\n"
    "    expect = ( { namespace = \"payments\"; service_account = \"api\"; } );\n"
    "    protocol = \"tcp\";\n"
    "  }\n"
    ");\n";

/* Returns a malloc'd copy of s with every "from" replaced by "to". */
static char *replace_all(const char *s, const char *from, const char *to) {
  size_t fl = strlen(from), tl = strlen(to), n = 0;
  for (const char *p = strstr(s, from); p; p = strstr(p + fl, from))
    n++;
  char *out = malloc(strlen(s) + n * (tl > fl ? tl - fl : 0) + 1), *o = out;
  const char *p = s, *q;
  while ((q = strstr(p, from))) {
    memcpy(o, p, (size_t)(q - p));
    o += q - p;
    memcpy(o, to, tl);
    o += tl;
    p = q + fl;
  }
  strcpy(o, p);
  return out;
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
    perror(path);
    exit(2);
  }
}

/* 1-based line of the first occurrence of marker in text, or 0. A '|' in
 * the marker is not matched: it says which line counts (the one the text
 * after it starts on), so that context before it can pick the occurrence. */
static int line_of_marker(const char *text, const char *marker) {
  char m[256];
  const char *bar = strchr(marker, '|');
  size_t skip = bar ? (size_t)(bar - marker) : 0;
  snprintf(m, sizeof(m), "%.*s%s", (int)skip, marker, bar ? bar + 1 : marker);
  const char *p = strstr(text, m);
  if (!p) return 0;
  int line = 1;
  for (const char *q = text; q < p + skip; q++)
    line += *q == '\n';
  return line;
}

/* The good config with @DIR@ filled in (caller frees). */
static char *good_text(void) { return replace_all(base_conf, "@DIR@", dir); }

/* Writes text to conf_path and loads it. */
static int load_text(const char *text, pc_config_t **cfg, char *err, size_t errlen) {
  write_file(conf_path, text);
  err[0] = '\0';
  return pc_config_load(conf_path, cfg, err, errlen);
}

/* Loads conf_path in a child process that cannot bypass file permissions
 * (as root it switches to nobody first). Returns the load's result and copies
 * its error line into err; -2 if the child could not run. */
static int load_unprivileged(char *err, size_t errlen) {
  int fds[2];
  if (pipe(fds) != 0) return -2;
  pid_t pid = fork();
  if (pid < 0) return -2;
  if (pid == 0) {
    close(fds[0]);
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(3);
    char e[512] = "";
    pc_config_t *c = NULL;
    int r = pc_config_load(conf_path, &c, e, sizeof(e));
    pc_config_free(c);
    if (write(fds[1], e, strlen(e)) < 0) _exit(4);
    _exit(r == 0 ? 0 : 1);
  }
  close(fds[1]);
  size_t n = 0;
  ssize_t k;
  while (n + 1 < errlen && (k = read(fds[0], err + n, errlen - 1 - n)) > 0)
    n += (size_t)k;
  err[n] = '\0';
  close(fds[0]);
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -2;
  int code = WEXITSTATUS(status);
  return code == 0 ? 0 : code == 1 ? -1 : -2;
}

typedef struct {
  const char *find;    /* text in the good config to replace ... */
  const char *replace; /* ... with this */
  const char *setting; /* expected SETTING */
  const char *marker;  /* the error line is the first line with this; NULL: line 0 */
  const char *msg;     /* expected to appear in the message */
} bad_case_t;

static const bad_case_t bad_cases[] = {
    /* Transparent listeners name no target of their own (route.h). */
    {"upstream = \"10.0.4.7:15443\";", "transparent = true;\n    upstream = \"10.0.4.7:15443\";",
     "outbound[0].upstream", "upstream = \"10.0.4.7", "takes upstream from its routes"},
    {"forward = \"127.0.0.1:8080\";", "forward = \"127.0.0.1:8080\"; transparent = true;",
     "inbound[0].forward", "forward = \"127.0.0.1:8080\"", "on its original port"},
    /* Unknown keys, at every level. */
    {"workers = 2;", "workers = 2;\nfoo = 1;", "foo", "foo = 1", "unknown setting"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  foo = 3;", "limits.foo", "foo = 3",
     "unknown setting"},
    {"watch = true;", "watch = true;\n  password = \"x\";", "identity.password", "password",
     "unknown setting"},
    {"curves = \"X25519:P-256\";", "curves = \"X25519:P-256\"; cipher = \"x\";", "tls.cipher",
     "cipher = \"x\"", "unknown setting"},
    {"listen = \"127.0.0.1:15000\";", "listen = \"127.0.0.1:15000\"; port = 1;", "admin.port",
     "port = 1", "unknown setting"},
    {"access = false;", "access = false; format = \"json\";", "log.format",
     "format =", "unknown setting"},
    {"{ namespace = \"web\"; }", "{ namespace = \"web\"; team = \"x\"; }",
     "inbound[0].allow[0].team", "team =", "unknown setting"},
    {"{ namespace = \"jobs\"; service_account = \"scheduler\"; }",
     "{ namespace = \"jobs\"; service_account = \"scheduler\";\n  sa = \"x\"; }",
     "inbound[0].allow[1].sa", "sa = \"x\"", "unknown setting"},
    {"forward = \"127.0.0.1:8080\";",
     "forward = \"127.0.0.1:8080\";\n    upstream = \"1.2.3.4:1\";", "inbound[0].upstream",
     "upstream = \"1.2.3.4:1\"", "unknown setting"},
    {"upstream = \"10.0.4.7:15443\";",
     "upstream = \"10.0.4.7:15443\";\n    forward = \"1.2.3.4:1\";", "outbound[0].forward",
     "forward = \"1.2.3.4:1\"", "unknown setting"},
    {"server_name = \"api.payments.svc\";",
     "server_name = \"api.payments.svc\";\n    allow = ( { namespace = \"x\"; } );",
     "outbound[0].allow", "allow = ( { namespace = \"x\"", "unknown setting"},
    {"expect = ( { namespace = \"payments\"; service_account = \"api\"; } );",
     "expect = ( { namespace = \"payments\"; account = \"api\"; } );",
     "outbound[0].expect[0].account", "account = \"api\"", "unknown setting"},
    {"trust_domain", "trustdomain", "trustdomain", "trustdomain", "unknown setting"},

    /* Wrong types. */
    {"workers = 2;", "workers = \"2\";", "workers", "workers", "expected an integer, got a string"},
    {"workers = 2;", "workers = 2.0;", "workers", "workers", "expected an integer, got a number"},
    {"access = false;", "access = 1;", "log.access", "access = 1",
     "expected a boolean, got an integer"},
    {"watch = true;", "watch = \"yes\";", "identity.watch",
     "watch =", "expected a boolean, got a string"},
    {"trust_domain = \"cluster.local\";", "trust_domain = 5;", "trust_domain", "trust_domain",
     "expected a string, got an integer"},
    {"min_version = \"1.2\";", "min_version = 1.2;", "tls.min_version", "min_version",
     "expected a string, got a number"},
    {"max_connections = 10000;", "max_connections = \"10000\";", "limits.max_connections",
     "max_connections", "expected an integer, got a string"},
    {"admin = { listen = \"127.0.0.1:15000\"; };", "admin = \"127.0.0.1:15000\";", "admin",
     "admin =", "expected a group, got a string"},
    {"identity = {", "identity = (", "(syntax)", "cert =", "syntax error"},
    {"inbound = (\n  {", "inbound = (\n  \"api\", {", "inbound[0]", "\"api\", {",
     "expected a group"},
    {"allow = ( { namespace = \"web\"; },", "allow = ( \"web\",", "inbound[0].allow[0]",
     "allow = ( \"web\"", "expected a group"},
    {"allow = ( { namespace = \"web\"; },\n"
     "              { namespace = \"jobs\"; service_account = \"scheduler\"; } );",
     "allow = \"web\";", "inbound[0].allow", "allow = \"web\"", "expected a list, got a string"},
    {"allow = ( { namespace = \"web\"; },\n"
     "              { namespace = \"jobs\"; service_account = \"scheduler\"; } );",
     "allow = [ \"web\" ];", "inbound[0].allow", "allow = [", "expected a list, got an array"},
    {"{ namespace = \"web\"; }", "{ namespace = 7; }", "inbound[0].allow[0].namespace",
     "namespace = 7", "expected a string, got an integer"},
    {"inbound = (", "inbound = {", "(syntax)", "{ name = \"api\"", "syntax error"},

    /* Ranges. */
    {"workers = 2;", "workers = 1000;", "workers", "workers", "must be between 0 and 256"},
    {"workers = 2;", "workers = -1;", "workers", "workers", "must be between 0 and 256"},
    {"max_connections = 10000;", "max_connections = 0;", "limits.max_connections",
     "max_connections", "must be between"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  max_pending_handshakes = 0;",
     "limits.max_pending_handshakes", "max_pending_handshakes", "must be between"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  max_pending_handshakes = 10001;",
     "limits.max_pending_handshakes", "max_pending_handshakes",
     "must be between 1 and limits.max_connections (10000)"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  handshake_failures_per_source = 0;",
     "limits.handshake_failures_per_source", "handshake_failures_per_source", "must be between"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  throttle_window_ms = 0;",
     "limits.throttle_window_ms", "throttle_window_ms", "must be between"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  throttle_cooldown_ms = 0;",
     "limits.throttle_cooldown_ms", "throttle_cooldown_ms", "must be between"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  throttle_ipv6_prefix = 47;",
     "limits.throttle_ipv6_prefix", "throttle_ipv6_prefix", "must be between 48 and 128"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  throttle_ipv6_prefix = 129;",
     "limits.throttle_ipv6_prefix", "throttle_ipv6_prefix", "must be between 48 and 128"},
    {"idle_timeout_ms = 300000;", "idle_timeout_ms = 0;", "limits.idle_timeout_ms",
     "idle_timeout_ms", "must be between"},
    {"handshake_timeout_ms = 10000;", "handshake_timeout_ms = 100000000000L;",
     "limits.handshake_timeout_ms", "handshake_timeout_ms", "must be between"},
    {"curves = \"X25519:P-256\";", "curves = \"X25519:P-256\";\n  verify_depth = 0;",
     "tls.verify_depth", "verify_depth", "must be between 1 and 16"},
    {"level = \"warn\";", "level = \"verbose\";", "log.level",
     "level =", "\"verbose\" is not one of debug, info, warn, error"},
    {"access = false;", "access = false; buffer_bytes = 1000;", "log.buffer_bytes", "buffer_bytes",
     "must be between 65536 and 1073741824"},

    /* Reload settings (issue 3). */
    {"watch = true;", "watch = true;\n  poll_interval_ms = 10;", "identity.poll_interval_ms",
     "poll_interval_ms", "must be between 1000 and"},
    {"watch = true;", "watch = true;\n  expiry_warning_hours = 0;", "identity.expiry_warning_hours",
     "expiry_warning_hours", "must be between 1 and 8760"},
    {"watch = true;", "watch = true;\n  key_passphrase_file = \"/nonexistent/pass\";",
     "identity.key_passphrase_file", "key_passphrase_file", "cannot read"},
    {"watch = true;", "watch = true;\n  key_passphrase_file = 1;", "identity.key_passphrase_file",
     "key_passphrase_file", "expected a string"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  revoke_grace_ms = \"1s\";",
     "limits.revoke_grace_ms", "revoke_grace_ms", "expected an integer"},
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  revoke_grace_ms = -5;",
     "limits.revoke_grace_ms", "revoke_grace_ms", "must be between 0 and"},
    {"curves = \"X25519:P-256\";", "curves = \"X25519::P-256\";", "tls.curves",
     "curves =", "has an empty entry"},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \":\";", "tls.ciphers", "ciphers =", "has an empty entry"},

    /* Weak TLS. */
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"AES128-SHA\";", "tls.ciphers", "ciphers =", "\"AES128-SHA\" is not an ECDHE"},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"ECDHE-RSA-AES128-SHA\";", "tls.ciphers",
     "ciphers =", "\"ECDHE-RSA-AES128-SHA\" is not an ECDHE"},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:DES-CBC3-SHA\";", "tls.ciphers",
     "ciphers =", "\"DES-CBC3-SHA\" is not"},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"AES128-GCM-SHA256\";", "tls.ciphers", "ciphers =", "\"AES128-GCM-SHA256\""},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"HIGH:!aNULL\";", "tls.ciphers", "ciphers =", "\"HIGH\" is not"},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"ecdhe-ecdsa-aes128-gcm-sha256\";", "tls.ciphers", "ciphers =", "is not"},
    {"ciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305\";",
     "ciphers = \"\";", "tls.ciphers", "ciphers =", "must not be empty"},
    {"min_version = \"1.2\";", "min_version = \"1.1\";", "tls.min_version", "min_version",
     "\"1.1\" is not allowed"},
    {"min_version = \"1.2\";", "min_version = \"1.0\";", "tls.min_version", "min_version",
     "\"1.0\" is not allowed"},
    {"min_version = \"1.2\";", "min_version = \"ssl3\";", "tls.min_version", "min_version",
     "\"ssl3\" is not allowed"},
    {"min_version = \"1.2\";", "min_version = \"TLSv1.2\";", "tls.min_version", "min_version",
     "is not allowed"},
    {"curves = \"X25519:P-256\";", "curves = \"P-521\";", "tls.curves",
     "curves =", "\"P-521\" is not one of X25519, P-256, P-384"},
    {"curves = \"X25519:P-256\";", "curves = \"X25519:X448\";", "tls.curves",
     "curves =", "\"X448\" is not one of"},
    {"curves = \"X25519:P-256\";", "curves = \"\";", "tls.curves", "curves =", "must not be empty"},

    /* Addresses. */
    {"listen = \"0.0.0.0:15443\";", "listen = \"1.2.3.4\";", "inbound[0].listen",
     "listen = \"1.2.3.4\"", "\"1.2.3.4\" is not an address of the form IP:PORT"},
    {"listen = \"0.0.0.0:15443\";", "listen = \"x:80\";", "inbound[0].listen", "listen = \"x:80\"",
     "\"x:80\" is not an address"},
    {"listen = \"0.0.0.0:15443\";", "listen = \"127.0.0.1:0\";", "inbound[0].listen",
     "listen = \"127.0.0.1:0\"", "is not an address"},
    {"listen = \"0.0.0.0:15443\";", "listen = \"127.0.0.1:99999\";", "inbound[0].listen",
     "listen = \"127.0.0.1:99999\"", "is not an address"},
    {"listen = \"0.0.0.0:15443\";", "listen = \"localhost:80\";", "inbound[0].listen",
     "listen = \"localhost:80\"", "\"localhost:80\" is not an address"},
    {"listen = \"0.0.0.0:15443\";", "listen = \"::1:15443\";", "inbound[0].listen",
     "listen = \"::1", "is not an address"},
    {"forward = \"127.0.0.1:8080\";", "forward = \"127.0.0.1:http\";", "inbound[0].forward",
     "forward =", "\"127.0.0.1:http\" is not an address"},
    {"upstream = \"10.0.4.7:15443\";", "upstream = \"10.0.4.7\";", "outbound[0].upstream",
     "upstream =", "is not an address"},
    {"upstream = \"10.0.4.7:15443\";", "upstream = \"api.payments svc:80\";",
     "outbound[0].upstream",
     "upstream =", "is not an address of the form IP:PORT, [IPv6]:PORT or NAME:PORT"},
    {"upstream = \"10.0.4.7:15443\";", "upstream = \"api.payments.svc:0\";", "outbound[0].upstream",
     "upstream =", "is not an address"},
    {"forward = \"127.0.0.1:8080\";", "forward = \"app.local\";", "inbound[0].forward",
     "forward =", "is not an address"},
    {"trust_domain = ", "dns = { servers = [ \"10.0.0.1\" ]; };\ntrust_domain = ", "dns.servers",
     "dns =", "entry 0 is not an address of the form IP:PORT"},
    {"trust_domain = ", "dns = { min_ttl_ms = 5000; max_ttl_ms = 1000; };\ntrust_domain = ",
     "dns.max_ttl_ms", "dns =", "must not be below dns.min_ttl_ms"},
    {"trust_domain = ", "health = { ejection_base_ms = 0; };\ntrust_domain = ",
     "health.ejection_base_ms", "health =", "between"},
    {"listen = \"127.0.0.1:15001\";", "listen = \"127.0.0.1:\";", "outbound[0].listen",
     "listen = \"127.0.0.1:\"", "is not an address"},
    {"admin = { listen = \"127.0.0.1:15000\"; };", "admin = { listen = \"15000\"; };",
     "admin.listen", "admin =", "\"15000\" is not an address"},

    /* Clashes between listeners. */
    {"name = \"payments\";", "name = \"api\";", "outbound[0].name",
     "name = \"api\";\n    listen = \"127", "listener name \"api\" is already used on line 31"},
    {"listen = \"127.0.0.1:15001\";", "listen = \"127.0.0.1:15443\";", "outbound[0].listen",
     "listen = \"127.0.0.1:15443\"",
     "port of \"127.0.0.1:15443\" is already used by listener \"api\" on line 32"},
    {"listen = \"0.0.0.0:15443\";", "listen = \"0.0.0.0:15000\";", "inbound[0].listen",
     "listen = \"0.0.0.0:15000\"", "port is already used by admin.listen"},
    {"admin = { listen = \"127.0.0.1:15000\"; };", "admin = { listen = \"[::1]:15001\"; };",
     "outbound[0].listen", "listen = \"127.0.0.1:15001\"", "port is already used by admin.listen"},

    /* Files. */
    {"@DIR@/tls.key", "@DIR@/missing.key", "identity.key", "key =", "cannot read"},
    {"@DIR@/tls.crt", "@DIR@/nodir/tls.crt", "identity.cert", "cert =", "cannot read"},
    {"@DIR@/ca.crt", "", "identity.ca", "ca =", "cannot read"},

    /* Required settings. */
    {"trust_domain = \"cluster.local\";\n", "", "trust_domain", NULL,
     "required setting is missing"},
    {"  cert = \"@DIR@/tls.crt\";\n", "", "identity.cert", "identity = {",
     "required setting is missing"},
    {"  key = \"@DIR@/tls.key\";\n", "", "identity.key", "identity = {",
     "required setting is missing"},
    {"identity = {", "identity_ = {", "identity_", "identity_", "unknown setting"},
    {"    forward = \"127.0.0.1:8080\";\n", "", "inbound[0].forward", "{ name = \"api\"",
     "required setting is missing"},
    {"  { name = \"api\";\n", "  {\n", "inbound[0].name", "inbound = (\n|  {",
     "required setting is missing"},
    {"    expect = ( { namespace = \"payments\"; service_account = \"api\"; } );\n", "",
     "outbound[0].expect", "{ name = \"payments\"", "required setting is missing"},
    {"    server_name = \"api.payments.svc\";\n", "", "outbound[0].server_name",
     "{ name = \"payments\"", "required setting is missing"},
    {"{ namespace = \"web\"; }", "{ service_account = \"web\"; }", "inbound[0].allow[0].namespace",
     "{ service_account = \"web\"; }", "required setting is missing"},

    /* Identities and names. */
    {"{ namespace = \"web\"; }", "{ namespace = \"a/b\"; }", "inbound[0].allow[0].namespace",
     "\"a/b\"", "\"a/b\" is not a valid SPIFFE path segment"},
    {"{ namespace = \"web\"; }", "{ namespace = \"..\"; }", "inbound[0].allow[0].namespace",
     "\"..\"", "is not a valid SPIFFE path segment"},
    {"{ namespace = \"web\"; }", "{ namespace = \"\"; }", "inbound[0].allow[0].namespace",
     "namespace = \"\"", "is not a valid SPIFFE path segment"},
    {"service_account = \"scheduler\";", "service_account = \"sched uler\";",
     "inbound[0].allow[1].service_account", "sched uler", "is not a valid SPIFFE path segment"},
    {"service_account = \"api\";", "service_account = \"api/../x\";",
     "outbound[0].expect[0].service_account", "api/../x", "is not a valid SPIFFE path segment"},
    {"trust_domain = \"cluster.local\";", "trust_domain = \"Cluster.Local\";", "trust_domain",
     "trust_domain", "\"Cluster.Local\" is not a valid SPIFFE trust domain"},
    {"trust_domain = \"cluster.local\";", "trust_domain = \"spiffe://cluster.local\";",
     "trust_domain", "trust_domain", "is not a valid SPIFFE trust domain"},
    {"trust_domain = \"cluster.local\";", "trust_domain = \"\";", "trust_domain", "trust_domain",
     "is not a valid SPIFFE trust domain"},
    {"name = \"api\";", "name = \"\";", "inbound[0].name", "name = \"\"", "must not be empty"},
    {"server_name = \"api.payments.svc\";", "server_name = \"\";", "outbound[0].server_name",
     "server_name =", "must not be empty"},

    /* Protocols. */
    {"    protocol = \"tcp\";\n    allow", "    protocol = \"udp\";\n    allow",
     "inbound[0].protocol", "\"udp\"", "\"udp\" is not one of \"tcp\", \"http\""},
    {"    protocol = \"tcp\";\n    allow", "    protocol = \"\";\n    allow", "inbound[0].protocol",
     "protocol = \"\"", "\"\" is not one of \"tcp\", \"http\""},
    {"    protocol = \"tcp\";\n  }", "    protocol = \"https\";\n  }", "outbound[0].protocol",
     "\"https\"", "\"https\" is not one of \"tcp\", \"http\""},
    {"    protocol = \"tcp\";\n  }", "    protocol = 1;\n  }", "outbound[0].protocol",
     "protocol = 1", "expected a string, got an integer"},
    {"    protocol = \"tcp\";\n    allow", "    protocol = \"TCP\";\n    allow",
     "inbound[0].protocol", "\"TCP\"", "is not one of"},

/* The http group (HTTP mode limits and timeouts). */
#define HTTP_GROUP(body) "http = { " body " };\nlimits = {"
    {"limits = {", HTTP_GROUP("max_headers = 100; foo = 1;"), "http.foo", "foo = 1",
     "unknown setting"},
    {"limits = {", HTTP_GROUP("max_header_byte = 1000;"), "http.max_header_byte", "max_header_byte",
     "unknown setting"},
    {"limits = {", "http = 5;\nlimits = {", "http", "http = 5", "expected a group, got an integer"},
    {"limits = {", "http = ( );\nlimits = {", "http", "http = ( )", "expected a group, got a list"},
    {"limits = {", HTTP_GROUP("max_headers = \"100\";"), "http.max_headers", "max_headers",
     "expected an integer, got a string"},
    {"limits = {", HTTP_GROUP("request_timeout_ms = 1.5;"), "http.request_timeout_ms",
     "request_timeout_ms", "expected an integer, got a number"},
    {"limits = {", HTTP_GROUP("max_request_line = 63;"), "http.max_request_line",
     "max_request_line", "must be between 64 and 1048576"},
    {"limits = {", HTTP_GROUP("max_request_line = 1048577;"), "http.max_request_line",
     "max_request_line", "must be between 64 and 1048576"},
    {"limits = {", HTTP_GROUP("max_header_bytes = 255;"), "http.max_header_bytes",
     "max_header_bytes", "must be between 256 and 16777216"},
    {"limits = {", HTTP_GROUP("max_header_bytes = 16777217;"), "http.max_header_bytes",
     "max_header_bytes", "must be between 256 and 16777216"},
    {"limits = {", HTTP_GROUP("max_headers = 0;"), "http.max_headers", "max_headers",
     "must be between 1 and 10000"},
    {"limits = {", HTTP_GROUP("max_headers = 10001;"), "http.max_headers", "max_headers",
     "must be between 1 and 10000"},
    {"limits = {", HTTP_GROUP("request_timeout_ms = 0;"), "http.request_timeout_ms",
     "request_timeout_ms", "must be between 1 and 86400000"},
    {"limits = {", HTTP_GROUP("response_timeout_ms = 86400001;"), "http.response_timeout_ms",
     "response_timeout_ms", "must be between 1 and 86400000"},
    {"limits = {", HTTP_GROUP("response_timeout_ms = -1;"), "http.response_timeout_ms",
     "response_timeout_ms", "must be between 1 and 86400000"},
    {"limits = {", HTTP_GROUP("pool_max_idle = -1;"), "http.pool_max_idle", "pool_max_idle",
     "must be between 0 and 100000"},
    {"limits = {", HTTP_GROUP("pool_max_idle = 100001;"), "http.pool_max_idle", "pool_max_idle",
     "must be between 0 and 100000"},
    {"limits = {", HTTP_GROUP("pool_idle_timeout_ms = 0;"), "http.pool_idle_timeout_ms",
     "pool_idle_timeout_ms", "must be between 1 and 86400000"},
    {"limits = {", HTTP_GROUP("pool_idle_timeout_ms = 100000000000L;"), "http.pool_idle_timeout_ms",
     "pool_idle_timeout_ms", "must be between 1 and 86400000"},
    /* The http group is top-level only. */
    {"drain_timeout_ms = 20000;", "drain_timeout_ms = 20000;\n  max_headers = 5;",
     "limits.max_headers", "max_headers = 5", "unknown setting"},
#undef HTTP_GROUP

    /* methods / paths: only in the allow list of an inbound "http" listener. */
    {"{ namespace = \"web\"; }", "{ namespace = \"web\"; methods = [ \"GET\" ]; }",
     "inbound[0].allow[0].methods",
     "methods =", "only an inbound listener with protocol = \"http\" can narrow by methods"},
    {"{ namespace = \"web\"; }", "{ namespace = \"web\";\n      paths = [ \"/api\" ]; }",
     "inbound[0].allow[0].paths",
     "paths =", "only an inbound listener with protocol = \"http\" can narrow by paths"},
    /* No protocol setting means "tcp". */
    {"    protocol = \"tcp\";\n    allow = ( { namespace = \"web\"; },",
     "    allow = ( { namespace = \"web\"; methods = [ \"GET\" ]; },",
     "inbound[0].allow[0].methods",
     "methods =", "only an inbound listener with protocol = \"http\" can narrow by methods"},
    {"service_account = \"scheduler\"; }",
     "service_account = \"scheduler\";\n                methods = [ \"GET\" ]; }",
     "inbound[0].allow[1].methods",
     "methods =", "only an inbound listener with protocol = \"http\" can narrow by methods"},
    {"expect = ( { namespace = \"payments\"; service_account = \"api\"; } );",
     "expect = ( { namespace = \"payments\"; service_account = \"api\";\n"
     "               methods = [ \"GET\" ]; } );",
     "outbound[0].expect[0].methods",
     "methods =", "only an inbound listener with protocol = \"http\" can narrow by methods"},
    {"expect = ( { namespace = \"payments\"; service_account = \"api\"; } );\n"
     "    protocol = \"tcp\";",
     "expect = ( { namespace = \"payments\"; service_account = \"api\";\n"
     "               paths = [ \"/x\" ]; } );\n    protocol = \"http\";",
     "outbound[0].expect[0].paths",
     "paths =", "only an inbound listener with protocol = \"http\" can narrow by paths"},
/* Bad method and path values on an http listener. */
#define HTTP_WEB(entry)                                                                            \
  "    protocol = \"tcp\";\n    allow = ( { namespace = \"web\"; },",                              \
      "    protocol = \"http\";\n    allow = ( { namespace = \"web\"; " entry " },"
#define BAD_METHOD "an upper-case method name such as \"GET\""
#define BAD_PATH "a path prefix starting with \"/\" (no spaces, '?' or '#')"
    {HTTP_WEB("methods = [ \"get\" ];"), "inbound[0].allow[0].methods",
     "methods =", "entry 0 is not " BAD_METHOD},
    {HTTP_WEB("methods = [ \"\" ];"), "inbound[0].allow[0].methods",
     "methods =", "entry 0 is not " BAD_METHOD},
    {HTTP_WEB("methods = [ \"GET\", \"Post\" ];"), "inbound[0].allow[0].methods",
     "methods =", "entry 1 is not " BAD_METHOD},
    {HTTP_WEB("methods = [ \"GET \" ];"), "inbound[0].allow[0].methods",
     "methods =", "entry 0 is not " BAD_METHOD},
    {HTTP_WEB("methods = ( \"GET\", 1 );"), "inbound[0].allow[0].methods",
     "methods =", "entry 1 is not " BAD_METHOD},
    {HTTP_WEB("methods = [ ];"), "inbound[0].allow[0].methods",
     "methods =", "expected a non-empty list of strings"},
    {HTTP_WEB("methods = ( );"), "inbound[0].allow[0].methods",
     "methods =", "expected a non-empty list of strings"},
    {HTTP_WEB("methods = \"GET\";"), "inbound[0].allow[0].methods",
     "methods =", "expected a non-empty list of strings"},
    {HTTP_WEB("paths = [ \"api\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 0 is not " BAD_PATH},
    {HTTP_WEB("paths = [ \"/a b\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 0 is not " BAD_PATH},
    {HTTP_WEB("paths = [ \"/a?b\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 0 is not " BAD_PATH},
    {HTTP_WEB("paths = [ \"/a#b\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 0 is not " BAD_PATH},
    {HTTP_WEB("paths = [ \"\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 0 is not " BAD_PATH},
    {HTTP_WEB("paths = [ \"/ok\", \"/a\\tb\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 1 is not " BAD_PATH},
    {HTTP_WEB("paths = [ ];"), "inbound[0].allow[0].paths",
     "paths =", "expected a non-empty list of strings"},
    {HTTP_WEB("paths = { a = \"/x\"; };"), "inbound[0].allow[0].paths",
     "paths =", "expected a non-empty list of strings"},
    {HTTP_WEB("methods = [ \"GET\" ]; paths = [ \"x\" ];"), "inbound[0].allow[0].paths",
     "paths =", "entry 0 is not " BAD_PATH},
    {HTTP_WEB("method = [ \"GET\" ];"), "inbound[0].allow[0].method",
     "method =", "unknown setting"},
    /* An entry on its own line names that line. */
    {HTTP_WEB("paths = [ \"/ok\",\n        \"bad\" ];"), "inbound[0].allow[0].paths", "\"bad\"",
     "entry 1 is not " BAD_PATH},
#undef HTTP_WEB
#undef BAD_METHOD
#undef BAD_PATH

    /* Outbound needs an expectation. */
    {"expect = ( { namespace = \"payments\"; service_account = \"api\"; } );", "expect = ( );",
     "outbound[0].expect", "expect = ( );", "needs at least one expected identity"},
    {"expect = ( { namespace = \"payments\"; service_account = \"api\"; } );", "expect = [ ];",
     "outbound[0].expect", "expect = [ ];", "needs at least one expected identity"},

    /* Syntax. */
    {"workers = 2;", "workers = = 2;", "(syntax)", "workers", "syntax error"},
    {"workers = 2;", "workers = 2;\nworkers = 3;", "(syntax)", "workers = 3",
     "duplicate setting name"},
    {"  idle_timeout_ms = 300000;\n", "  idle_timeout_ms = 300000;\n  \"oops\"\n", "(syntax)",
     "\"oops\"", "syntax error"},
};

static void check_error(const char *what, const char *err, const char *setting, int line,
                        const char *msg) {
  char prefix[512];
  snprintf(prefix, sizeof(prefix), "%s:%d: %s: ", conf_path, line, setting);
  CHECK_MSG(strncmp(err, prefix, strlen(prefix)) == 0,
            "%s: error \"%s\" does not start with \"%s\"", what, err, prefix);
  CHECK_MSG(strstr(err, msg) != NULL, "%s: error \"%s\" does not contain \"%s\"", what, err, msg);
  CHECK_MSG(strchr(err, '\n') == NULL, "%s: error has a newline: \"%s\"", what, err);
}

static void run_bad_case(size_t i, const bad_case_t *c) {
  char *good = good_text();
  char *find = replace_all(c->find, "@DIR@", dir);
  char *repl = replace_all(c->replace, "@DIR@", dir);
  char what[64];
  snprintf(what, sizeof(what), "bad case %zu (%s)", i, c->setting);
  if (!strstr(good, find)) {
    CHECK_MSG(0, "%s: \"%s\" is not in the good config", what, c->find);
    goto out;
  }
  char *text = replace_all(good, find, repl);
  int line = c->marker ? line_of_marker(text, c->marker) : 0;
  CHECK_MSG(!c->marker || line > 0, "%s: marker \"%s\" not found", what, c->marker);
  pc_config_t *cfg = (pc_config_t *)1;
  char err[1024];
  int rc = load_text(text, &cfg, err, sizeof(err));
  CHECK_MSG(rc == -1, "%s: pc_config_load succeeded on:\n%s", what, text);
  CHECK_MSG(cfg == NULL, "%s: *out must be NULL on failure", what);
  if (rc == 0) pc_config_free(cfg);
  if (rc == -1) check_error(what, err, c->setting, line, c->msg);
  free(text);
out:
  free(find);
  free(repl);
  free(good);
}

static uint16_t port(const struct sockaddr_storage *ss) {
  return ntohs(ss->ss_family == AF_INET6 ? ((const struct sockaddr_in6 *)ss)->sin6_port
                                         : ((const struct sockaddr_in *)ss)->sin_port);
}

static void test_good(void) {
  char *text = good_text();
  pc_config_t *cfg = NULL;
  char err[1024];
  int rc = load_text(text, &cfg, err, sizeof(err));
  CHECK_MSG(rc == 0, "good config failed: %s", err);
  free(text);
  if (rc != 0 || !cfg) return;
  char path[256];
  CHECK_STR_EQ(cfg->file, conf_path);
  CHECK_STR_EQ(cfg->trust_domain, "cluster.local");
  CHECK_INT_EQ(cfg->workers, 2);
  snprintf(path, sizeof(path), "%s/tls.crt", dir);
  CHECK_STR_EQ(cfg->identity.cert, path);
  snprintf(path, sizeof(path), "%s/tls.key", dir);
  CHECK_STR_EQ(cfg->identity.key, path);
  snprintf(path, sizeof(path), "%s/ca.crt", dir);
  CHECK_STR_EQ(cfg->identity.ca, path);
  CHECK_INT_EQ(cfg->identity.watch, 1);
  CHECK_INT_EQ(cfg->identity.line_cert, 6);
  CHECK_INT_EQ(cfg->identity.line_key, 7);
  CHECK_INT_EQ(cfg->identity.line_ca, 8);
  CHECK_INT_EQ(cfg->tls.min_version, TLS1_2_VERSION);
  CHECK_STR_EQ(cfg->tls.ciphers, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305");
  CHECK_STR_EQ(cfg->tls.curves, "X25519:P-256");
  CHECK_INT_EQ(cfg->tls.line_ciphers, 14);
  CHECK_INT_EQ(cfg->tls.line_curves, 15);
  CHECK_INT_EQ(cfg->tls.verify_depth, 8);
  CHECK_STR_EQ(cfg->admin.listen_str, "127.0.0.1:15000");
  CHECK_INT_EQ(cfg->admin.listen.ss_family, AF_INET);
  CHECK_INT_EQ(port(&cfg->admin.listen), 15000);
  CHECK_INT_EQ(cfg->log.level, PC_LOG_WARN);
  CHECK_INT_EQ(cfg->log.access, 0);
  CHECK_INT_EQ(cfg->limits.max_connections, 10000);
  CHECK_INT_EQ(cfg->limits.handshake_timeout_ms, 10000);
  CHECK_INT_EQ(cfg->limits.connect_timeout_ms, 5000);
  CHECK_INT_EQ(cfg->limits.idle_timeout_ms, 300000);
  CHECK_INT_EQ(cfg->limits.drain_timeout_ms, 20000);
  CHECK_INT_EQ(cfg->limits.max_pending_handshakes, 1024);
  CHECK_INT_EQ(cfg->limits.handshake_failures_per_source, 20);
  CHECK_INT_EQ(cfg->limits.throttle_window_ms, 10000);
  CHECK_INT_EQ(cfg->limits.throttle_cooldown_ms, 30000);
  CHECK_INT_EQ(cfg->limits.throttle_ipv6_prefix, 64);
  CHECK_INT_EQ(cfg->nlisteners, 2);
  if (cfg->nlisteners == 2) {
    const pc_listener_cfg_t *in = &cfg->listeners[0], *out = &cfg->listeners[1];
    CHECK_STR_EQ(in->name, "api");
    CHECK_INT_EQ(in->direction, PC_DIR_INBOUND);
    CHECK_INT_EQ(in->protocol, PC_PROTO_TCP);
    CHECK_STR_EQ(in->listen_str, "0.0.0.0:15443");
    CHECK_INT_EQ(port(&in->listen), 15443);
    CHECK_STR_EQ(in->target_str, "127.0.0.1:8080");
    CHECK_INT_EQ(pc_target_port(in->tgt), 8080);
    CHECK(!pc_target_is_name(in->tgt));
    CHECK(in->server_name == NULL);
    CHECK_INT_EQ(in->line, 31);
    CHECK_INT_EQ(pc_policy_count(in->policy), 2);
    const char *ns, *sa;
    pc_policy_rule(in->policy, 0, &ns, &sa);
    CHECK_STR_EQ(ns, "web");
    CHECK(sa == NULL);
    pc_policy_rule(in->policy, 1, &ns, &sa);
    CHECK_STR_EQ(ns, "jobs");
    CHECK_STR_EQ(sa, "scheduler");
    CHECK_INT_EQ(pc_policy_check(in->policy, "spiffe://cluster.local/ns/web/sa/x"), PC_REASON_NONE);
    CHECK_INT_EQ(pc_policy_check(in->policy, "spiffe://cluster.local/ns/jobs/sa/x"),
                 PC_REASON_NOT_ALLOWED);

    CHECK_STR_EQ(out->name, "payments");
    CHECK_INT_EQ(out->direction, PC_DIR_OUTBOUND);
    CHECK_STR_EQ(out->listen_str, "127.0.0.1:15001");
    CHECK_STR_EQ(out->target_str, "10.0.4.7:15443");
    CHECK_INT_EQ(pc_target_port(out->tgt), 15443);
    CHECK_STR_EQ(out->server_name, "api.payments.svc");
    CHECK_INT_EQ(out->line, 41);
    CHECK_INT_EQ(pc_policy_count(out->policy), 1);
    CHECK_INT_EQ(pc_policy_check(out->policy, "spiffe://cluster.local/ns/payments/sa/api"),
                 PC_REASON_NONE);
  }
  pc_config_free(cfg);
}

/* Only the required settings: everything else takes its documented default. */
static void test_minimal(void) {
  char text[1024];
  snprintf(text, sizeof(text),
           "trust_domain = \"example.org\";\n"
           "identity = { cert = \"%s/tls.crt\"; key = \"%s/tls.key\"; ca = \"%s/ca.crt\"; };\n"
           "inbound = ( { name = \"in\"; listen = \"[::]:15443\"; forward = \"[::1]:8080\"; } );\n",
           dir, dir, dir);
  pc_config_t *cfg = NULL;
  char err[1024];
  int rc = load_text(text, &cfg, err, sizeof(err));
  CHECK_MSG(rc == 0, "minimal config failed: %s", err);
  if (rc != 0 || !cfg) return;
  CHECK(cfg->workers >= 1);
  CHECK_INT_EQ(cfg->identity.watch, 0);
  CHECK_INT_EQ(cfg->tls.min_version, TLS1_2_VERSION);
  CHECK(cfg->tls.ciphers && strlen(cfg->tls.ciphers) > 0);
  CHECK(cfg->tls.curves && strlen(cfg->tls.curves) > 0);
  CHECK_STR_EQ(cfg->admin.listen_str, "127.0.0.1:15000");
  CHECK_INT_EQ(cfg->log.level, PC_LOG_INFO);
  CHECK_INT_EQ(cfg->log.access, 1);
  CHECK_INT_EQ(cfg->log.buffer_bytes, 16 << 20);
  CHECK_INT_EQ(cfg->limits.max_connections, 10000);
  CHECK_INT_EQ(cfg->limits.handshake_timeout_ms, 10000);
  CHECK_INT_EQ(cfg->limits.connect_timeout_ms, 5000);
  CHECK_INT_EQ(cfg->limits.idle_timeout_ms, 300000);
  CHECK_INT_EQ(cfg->limits.drain_timeout_ms, 20000);
  CHECK_INT_EQ(cfg->limits.throttle_ipv6_prefix, 64);
  CHECK_INT_EQ(cfg->http.max_request_line, 8192);
  CHECK_INT_EQ(cfg->http.max_header_bytes, 65536);
  CHECK_INT_EQ(cfg->http.max_headers, 100);
  CHECK_INT_EQ(cfg->http.request_timeout_ms, 10000);
  CHECK_INT_EQ(cfg->http.response_timeout_ms, 30000);
  CHECK_INT_EQ(cfg->http.pool_max_idle, 256);
  CHECK_INT_EQ(cfg->http.pool_idle_timeout_ms, 30000);
  CHECK_INT_EQ(cfg->nlisteners, 1);
  if (cfg->nlisteners == 1) {
    CHECK_INT_EQ(cfg->listeners[0].listen.ss_family, AF_INET6);
    CHECK_INT_EQ(port(&cfg->listeners[0].listen), 15443);
    CHECK_INT_EQ(cfg->listeners[0].protocol, PC_PROTO_TCP);
    /* No allow list: deny everyone. */
    CHECK_INT_EQ(pc_policy_count(cfg->listeners[0].policy), 0);
    CHECK_INT_EQ(pc_policy_check(cfg->listeners[0].policy, "spiffe://example.org/ns/a/sa/b"),
                 PC_REASON_NOT_ALLOWED);
  }
  /* Every default cipher and curve passes the config's own checks. */
  char *copy = strdup(cfg->tls.ciphers), *save = NULL;
  for (char *t = strtok_r(copy, ":", &save); t; t = strtok_r(NULL, ":", &save))
    CHECK_MSG(pc_config_cipher_ok(t), "default cipher \"%s\" is refused", t);
  free(copy);
  pc_config_free(cfg);

  /* TLS 1.3 minimum, int64 values, workers = 0 resolved. */
  snprintf(text, sizeof(text),
           "trust_domain = \"example.org\"; workers = 0;\n"
           "identity = { cert = \"%s/tls.crt\"; key = \"%s/tls.key\"; ca = \"%s/ca.crt\"; };\n"
           "tls = { min_version = \"1.3\"; verify_depth = 16; };\n"
           "limits = { idle_timeout_ms = 86400000L; drain_timeout_ms = 0;\n"
           "  throttle_ipv6_prefix = 128; };\n"
           "outbound = ( { name = \"o\"; listen = \"127.0.0.1:1\"; upstream = \"[::1]:2\";\n"
           "  server_name = \"x\"; expect = ( { namespace = \"n\"; } ); } );\n",
           dir, dir, dir);
  rc = load_text(text, &cfg, err, sizeof(err));
  CHECK_MSG(rc == 0, "TLS 1.3 config failed: %s", err);
  if (rc != 0 || !cfg) return;
  CHECK(cfg->workers >= 1);
  CHECK_INT_EQ(cfg->tls.min_version, TLS1_3_VERSION);
  CHECK_INT_EQ(cfg->tls.verify_depth, 16);
  CHECK_INT_EQ(cfg->limits.idle_timeout_ms, 86400000);
  CHECK_INT_EQ(cfg->limits.drain_timeout_ms, 0);
  CHECK_INT_EQ(cfg->limits.throttle_ipv6_prefix, 128);
  CHECK_INT_EQ(cfg->nlisteners, 1);
  if (cfg->nlisteners == 1) CHECK_INT_EQ(cfg->listeners[0].direction, PC_DIR_OUTBOUND);
  pc_config_free(cfg);
}

/* Reads back rule i's narrowing lists as one comma-joined string each. */
static void rule_http_str(const pc_policy_t *p, size_t i, char *methods, char *paths, size_t n) {
  const char *const *ms, *const *ps;
  size_t nm, np;
  pc_policy_rule_http(p, i, &ms, &nm, &ps, &np);
  snprintf(methods, n, "%s", ms ? "" : "(any)");
  snprintf(paths, n, "%s", ps ? "" : "(any)");
  for (size_t j = 0; ms && j < nm; j++)
    snprintf(methods + strlen(methods), n - strlen(methods), "%s%s", j ? "," : "", ms[j]);
  for (size_t j = 0; ps && j < np; j++)
    snprintf(paths + strlen(paths), n - strlen(paths), "%s%s", j ? "," : "", ps[j]);
}

/* HTTP mode: the http group and narrowing allow entries. */
static void test_http(void) {
  char *good = good_text();
  pc_config_t *cfg = NULL;
  char err[1024];

  /* No http group: the defaults; protocol = "http" on both directions. */
  char *t1 = replace_all(good, "    protocol = \"tcp\";\n", "    protocol = \"http\";\n");
  int rc = load_text(t1, &cfg, err, sizeof(err));
  CHECK_MSG(rc == 0, "http listeners failed: %s", err);
  free(t1);
  if (rc == 0 && cfg) {
    CHECK_INT_EQ(cfg->http.max_request_line, 8192);
    CHECK_INT_EQ(cfg->http.max_header_bytes, 65536);
    CHECK_INT_EQ(cfg->http.max_headers, 100);
    CHECK_INT_EQ(cfg->http.request_timeout_ms, 10000);
    CHECK_INT_EQ(cfg->http.response_timeout_ms, 30000);
    CHECK_INT_EQ(cfg->http.pool_max_idle, 256);
    CHECK_INT_EQ(cfg->http.pool_idle_timeout_ms, 30000);
    CHECK_INT_EQ(cfg->nlisteners, 2);
    if (cfg->nlisteners == 2) {
      CHECK_INT_EQ(cfg->listeners[0].protocol, PC_PROTO_HTTP);
      CHECK_INT_EQ(cfg->listeners[1].protocol, PC_PROTO_HTTP);
      CHECK_INT_EQ(cfg->listeners[1].direction, PC_DIR_OUTBOUND);
    }
    pc_config_free(cfg);
  }

  /* Every value set; methods and paths on an inbound http listener. */
  char *t2 = replace_all(good, "limits = {",
                         "http = {\n"
                         "  max_request_line = 4096;\n"
                         "  max_header_bytes = 32768;\n"
                         "  max_headers = 50;\n"
                         "  request_timeout_ms = 5000;\n"
                         "  response_timeout_ms = 60000;\n"
                         "  pool_max_idle = 0;\n"
                         "  pool_idle_timeout_ms = 1234;\n"
                         "};\n"
                         "limits = {");
  char *t3 =
      replace_all(t2,
                  "    protocol = \"tcp\";\n"
                  "    allow = ( { namespace = \"web\"; },\n"
                  "              { namespace = \"jobs\"; service_account = \"scheduler\"; } );",
                  "    protocol = \"http\";\n"
                  "    allow = ( { namespace = \"web\"; methods = [ \"GET\", \"HEAD\" ];\n"
                  "                paths = [ \"/public\", \"/api/\" ]; },\n"
                  "              { namespace = \"jobs\"; service_account = \"scheduler\"; },\n"
                  "              { namespace = \"ops\"; methods = ( \"POST\", \"M-SEARCH\", "
                  "\"X_Y\" ); },\n"
                  "              { namespace = \"cdn\"; paths = [ \"/\", \"/%7Euser/~x\" ]; } );");
  rc = load_text(t3, &cfg, err, sizeof(err));
  CHECK_MSG(rc == 0, "http config failed: %s", err);
  free(t2);
  free(t3);
  if (rc == 0 && cfg) {
    CHECK_INT_EQ(cfg->http.max_request_line, 4096);
    CHECK_INT_EQ(cfg->http.max_header_bytes, 32768);
    CHECK_INT_EQ(cfg->http.max_headers, 50);
    CHECK_INT_EQ(cfg->http.request_timeout_ms, 5000);
    CHECK_INT_EQ(cfg->http.response_timeout_ms, 60000);
    CHECK_INT_EQ(cfg->http.pool_max_idle, 0);
    CHECK_INT_EQ(cfg->http.pool_idle_timeout_ms, 1234);
    const pc_listener_cfg_t *in = pc_config_listener(cfg, "api");
    CHECK(in != NULL);
    if (in) {
      CHECK_INT_EQ(in->protocol, PC_PROTO_HTTP);
      CHECK_INT_EQ(pc_policy_count(in->policy), 4);
      char m[256], ps[256];
      if (pc_policy_count(in->policy) == 4) {
        rule_http_str(in->policy, 0, m, ps, sizeof(m));
        CHECK_STR_EQ(m, "GET,HEAD");
        CHECK_STR_EQ(ps, "/public,/api/");
        rule_http_str(in->policy, 1, m, ps, sizeof(m));
        CHECK_STR_EQ(m, "(any)");
        CHECK_STR_EQ(ps, "(any)");
        rule_http_str(in->policy, 2, m, ps, sizeof(m));
        CHECK_STR_EQ(m, "POST,M-SEARCH,X_Y");
        CHECK_STR_EQ(ps, "(any)");
        rule_http_str(in->policy, 3, m, ps, sizeof(m));
        CHECK_STR_EQ(m, "(any)");
        CHECK_STR_EQ(ps, "/,/%7Euser/~x");
      }
      const pc_policy_t *p = in->policy;
      CHECK_INT_EQ(pc_policy_check_request(p, "spiffe://cluster.local/ns/web/sa/x", "GET", 3,
                                           "/public/a", 9),
                   PC_REASON_NONE);
      CHECK_INT_EQ(pc_policy_check_request(p, "spiffe://cluster.local/ns/web/sa/x", "POST", 4,
                                           "/public/a", 9),
                   PC_REASON_NOT_ALLOWED);
      CHECK_INT_EQ(
          pc_policy_check_request(p, "spiffe://cluster.local/ns/web/sa/x", "GET", 3, "/api", 4),
          PC_REASON_NOT_ALLOWED);
      CHECK_INT_EQ(pc_policy_check_request(p, "spiffe://cluster.local/ns/jobs/sa/scheduler",
                                           "DELETE", 6, "/anything", 9),
                   PC_REASON_NONE);
      CHECK_INT_EQ(
          pc_policy_check_request(p, "spiffe://cluster.local/ns/ops/sa/x", "POST", 4, "/x", 2),
          PC_REASON_NONE);
      CHECK_INT_EQ(
          pc_policy_check_request(p, "spiffe://cluster.local/ns/ops/sa/x", "GET", 3, "/x", 2),
          PC_REASON_NOT_ALLOWED);
      CHECK_INT_EQ(pc_policy_check(p, "spiffe://cluster.local/ns/web/sa/x"), PC_REASON_NONE);
      CHECK_INT_EQ(pc_policy_check(p, "spiffe://cluster.local/ns/ops/sa/x"), PC_REASON_NONE);
    }
    pc_config_free(cfg);
  }

  /* The bounds themselves are accepted; an empty group is all defaults. */
  static const char *const groups[] = {
      "http = { max_request_line = 64; max_header_bytes = 256; max_headers = 1;\n"
      "  request_timeout_ms = 1; response_timeout_ms = 1; pool_max_idle = 0;\n"
      "  pool_idle_timeout_ms = 1; };\nlimits = {",
      "http = { max_request_line = 1048576; max_header_bytes = 16777216; max_headers = 10000;\n"
      "  request_timeout_ms = 86400000; response_timeout_ms = 86400000L;\n"
      "  pool_max_idle = 100000; pool_idle_timeout_ms = 86400000; };\nlimits = {",
      "http = { };\nlimits = {",
  };
  static const uint64_t want[][7] = {
      {64, 256, 1, 1, 1, 0, 1},
      {1048576, 16777216, 10000, 86400000, 86400000, 100000, 86400000},
      {8192, 65536, 100, 10000, 30000, 256, 30000},
  };
  for (size_t i = 0; i < sizeof(groups) / sizeof(groups[0]); i++) {
    char *t = replace_all(good, "limits = {", groups[i]);
    rc = load_text(t, &cfg, err, sizeof(err));
    CHECK_MSG(rc == 0, "http group %zu failed: %s", i, err);
    free(t);
    if (rc != 0 || !cfg) continue;
    CHECK_INT_EQ(cfg->http.max_request_line, want[i][0]);
    CHECK_INT_EQ(cfg->http.max_header_bytes, want[i][1]);
    CHECK_INT_EQ(cfg->http.max_headers, want[i][2]);
    CHECK_INT_EQ(cfg->http.request_timeout_ms, want[i][3]);
    CHECK_INT_EQ(cfg->http.response_timeout_ms, want[i][4]);
    CHECK_INT_EQ(cfg->http.pool_max_idle, want[i][5]);
    CHECK_INT_EQ(cfg->http.pool_idle_timeout_ms, want[i][6]);
    pc_config_free(cfg);
  }

  /* A tcp listener without narrowing keeps open rules. */
  rc = load_text(good, &cfg, err, sizeof(err));
  CHECK_MSG(rc == 0, "good config failed: %s", err);
  if (rc == 0 && cfg) {
    const pc_listener_cfg_t *in = pc_config_listener(cfg, "api");
    if (in && pc_policy_count(in->policy) > 0) {
      char m[64], ps[64];
      rule_http_str(in->policy, 0, m, ps, sizeof(m));
      CHECK_STR_EQ(m, "(any)");
      CHECK_STR_EQ(ps, "(any)");
    }
    pc_config_free(cfg);
  }
  free(good);
}

static void test_other_failures(void) {
  pc_config_t *cfg = (pc_config_t *)1;
  char err[1024], want[512];

  /* The config file itself is unreadable. */
  char missing[256];
  snprintf(missing, sizeof(missing), "%s/nope.conf", dir);
  CHECK_INT_EQ(pc_config_load(missing, &cfg, err, sizeof(err)), -1);
  CHECK(cfg == NULL);
  snprintf(want, sizeof(want), "%s:0: -c: cannot read config file", missing);
  CHECK_STR_CONTAINS(err, want);

  /* No listener at all. */
  char text[512];
  snprintf(text, sizeof(text),
           "trust_domain = \"example.org\";\n"
           "identity = { cert = \"%s/tls.crt\"; key = \"%s/tls.key\"; ca = \"%s/ca.crt\"; };\n",
           dir, dir, dir);
  CHECK_INT_EQ(load_text(text, &cfg, err, sizeof(err)), -1);
  snprintf(want, sizeof(want), "%s:0: inbound: no inbound or outbound listener", conf_path);
  CHECK_STR_CONTAINS(err, want);

  /* An empty file. */
  CHECK_INT_EQ(load_text("", &cfg, err, sizeof(err)), -1);
  snprintf(want, sizeof(want), "%s:0: trust_domain: required setting is missing", conf_path);
  CHECK_STR_CONTAINS(err, want);

  /* A missing identity group. */
  CHECK_INT_EQ(load_text("trust_domain = \"a\";\n", &cfg, err, sizeof(err)), -1);
  snprintf(want, sizeof(want), "%s:0: identity: required setting is missing", conf_path);
  CHECK_STR_CONTAINS(err, want);

  /* A file that exists but cannot be read. Root reads anything (and CI runs
   * as root), so the load runs in a child that first drops to nobody. */
  {
    char locked[256];
    snprintf(locked, sizeof(locked), "%s/tls.crt", dir);
    char *g = good_text();
    write_file(conf_path, g);
    chmod(locked, 0);
    chmod(dir, 0755);
    chmod(conf_path, 0644);
    char child_err[512] = "";
    int rc = load_unprivileged(child_err, sizeof(child_err));
    CHECK_INT_EQ(rc, -1);
    snprintf(want, sizeof(want), "%s:6: identity.cert: cannot read \"%s\": Permission denied",
             conf_path, locked);
    CHECK_STR_CONTAINS(child_err, want);
    chmod(locked, 0644);
    chmod(dir, 0700);
    free(g);
  }

  /* The message is truncated, never overflowed, with a tiny buffer. */
  char tiny[8];
  memset(tiny, 'x', sizeof(tiny));
  CHECK_INT_EQ(load_text("workers = \"x\";\n", &cfg, tiny, sizeof(tiny)), -1);
  CHECK(memchr(tiny, '\0', sizeof(tiny)) != NULL);

  /* A duplicate listener name reported against the name's own line. */
  char *good = good_text();
  char *t2 = replace_all(good, "  { name = \"payments\";\n", "  {\n    name = \"api\";\n");
  CHECK_INT_EQ(load_text(t2, &cfg, err, sizeof(err)), -1);
  snprintf(want, sizeof(want), "%s:%d: outbound[0].name: listener name \"api\" is already used",
           conf_path, line_of_marker(t2, "    name = \"api\""));
  CHECK_STR_CONTAINS(err, want);
  free(t2);
  free(good);
}

/* Transparent listeners: routes become listener configs of their own, with
 * what an original destination must match. */
static void test_transparent(void) {
  char text[4096], err[1024];
  snprintf(text, sizeof(text),
           "trust_domain = \"cluster.local\";\n"
           "identity = { cert = \"%s/tls.crt\"; key = \"%s/tls.key\"; ca = \"%s/ca.crt\"; };\n"
           "inbound = ( { name = \"in\"; listen = \"[::]:15006\"; transparent = true;\n"
           "              allow = ( { namespace = \"web\"; } ); } );\n"
           "outbound = ( { name = \"out\"; listen = \"[::]:15001\"; transparent = true;\n"
           "  routes = ( { destination = \"10.77.0.0/24:8080\"; server_name = \"a\";\n"
           "               expect = ( { namespace = \"payments\"; } ); },\n"
           "             { destination = \"[fd77::/64]:*\"; protocol = \"http\";\n"
           "               upstream_protocol = \"h2\"; server_name = \"b\";\n"
           "               expect = ( { namespace = \"payments\"; } ); },\n"
           "             { destination = \"10.1.2.3:5432\"; passthrough = true; },\n"
           "             { destination = \"db.test:5432\"; server_name = \"c\";\n"
           "               expect = ( { namespace = \"db\"; } ); } ); } );\n",
           dir, dir, dir);
  pc_config_t *cfg = NULL;
  if (load_text(text, &cfg, err, sizeof(err)) != 0) {
    fprintf(stderr, "transparent config refused: %s\n", err);
    CHECK(0);
    return;
  }
  CHECK_INT_EQ((int)cfg->nlisteners, 2);
  const pc_listener_cfg_t *in = &cfg->listeners[0], *out = &cfg->listeners[1];
  CHECK(in->transparent && in->tgt != NULL && in->nroutes == 0);
  CHECK_STR_EQ(in->target_str, "127.0.0.1:*");
  CHECK(pc_config_pinned(in));
  CHECK(out->transparent && out->tgt == NULL && out->server_name == NULL);
  CHECK_INT_EQ((int)out->nroutes, 4);
  const pc_route_t *r = out->routes;
  uint8_t net4[4] = {10, 77, 0, 0};
  CHECK_INT_EQ(r[0].family, AF_INET);
  CHECK_INT_EQ(r[0].bits, 24);
  CHECK_INT_EQ(r[0].port, 8080);
  CHECK(memcmp(r[0].net, net4, 4) == 0);
  CHECK_STR_EQ(r[0].lc.name, "out");
  CHECK_STR_EQ(r[0].lc.server_name, "a");
  CHECK(r[0].lc.parent == out && r[0].lc.route_index == 0 && r[0].lc.protocol == PC_PROTO_TCP);
  CHECK(pc_policy_count(r[0].lc.policy) == 1);
  CHECK(pc_config_pinned(&r[0].lc));
  CHECK_INT_EQ(r[1].family, AF_INET6);
  CHECK_INT_EQ(r[1].bits, 64);
  CHECK_INT_EQ(r[1].port, 0);
  CHECK(r[1].lc.protocol == PC_PROTO_HTTP && r[1].lc.upstream_protocol == PC_UP_H2);
  CHECK_INT_EQ(r[2].bits, 32);
  CHECK(r[2].lc.passthrough && r[2].lc.server_name == NULL);
  CHECK_INT_EQ(r[3].family, 0);
  CHECK(pc_target_is_name(r[3].lc.tgt));
  CHECK_STR_EQ(pc_target_host(r[3].lc.tgt), "db.test");
  /* The same route in another snapshot is found by place and destination. */
  pc_config_t *again = NULL;
  CHECK_INT_EQ(load_text(text, &again, err, sizeof(err)), 0);
  if (again) {
    CHECK(pc_config_counterpart(again, &r[1].lc) == &again->listeners[1].routes[1].lc);
    CHECK(pc_config_counterpart(again, out) == &again->listeners[1]);
    pc_config_free(again);
  }
  /* A pinned target makes one endpoint per destination and finds it again. */
  struct sockaddr_storage d;
  CHECK_INT_EQ(pc_config_parse_addr("10.77.0.9:8080", &d), 0);
  pc_endpoint_t *e1 = pc_target_endpoint_for(r[0].lc.tgt, &d);
  pc_endpoint_t *e2 = pc_target_endpoint_for(r[0].lc.tgt, &d);
  CHECK(e1 != NULL && e1 == e2);
  CHECK_STR_EQ(e1->str, "10.77.0.9:8080");
  CHECK_INT_EQ((int)pc_target_size(r[0].lc.tgt), 1);
  pc_endpoint_done(e1);
  pc_endpoint_done(e2);
  /* The set is bounded: past PC_PINNED_MAX endpoints in use, more are
   * handed out untracked; once they are let go, they are forgotten. */
  pc_endpoint_t **held = calloc(PC_PINNED_MAX + 1, sizeof(*held));
  for (int i = 0; i <= PC_PINNED_MAX; i++) {
    struct sockaddr_storage a;
    char s[32];
    snprintf(s, sizeof(s), "10.77.%d.%d:8080", (i >> 8) & 0xff, i & 0xff);
    /* 10.77.x.y lies outside 10.77.0.0/24 for x > 0: the target does not
     * check (matching is route.c's), it only keeps endpoints. */
    CHECK_INT_EQ(pc_config_parse_addr(s, &a), 0);
    held[i] = pc_target_endpoint_for(r[0].lc.tgt, &a);
  }
  CHECK_INT_EQ((int)pc_target_size(r[0].lc.tgt), PC_PINNED_MAX);
  CHECK(held[PC_PINNED_MAX] != NULL && held[PC_PINNED_MAX] != held[0]);
  for (int i = 0; i <= PC_PINNED_MAX; i++)
    pc_endpoint_done(held[i]);
  free(held);
  CHECK_INT_EQ(pc_config_parse_addr("10.78.0.1:8080", &d), 0);
  e1 = pc_target_endpoint_for(r[0].lc.tgt, &d);
  CHECK_INT_EQ((int)pc_target_size(r[0].lc.tgt), 1);
  pc_endpoint_done(e1);
  /* A name target has only the endpoints of its answer. */
  CHECK(pc_target_endpoint_for(r[3].lc.tgt, &d) == NULL);
  pc_config_free(cfg);
}

static void test_parse_addr(void) {
  static const struct {
    const char *s;
    int ok, family, port;
  } cases[] = {
      {"127.0.0.1:80", 1, AF_INET, 80},
      {"0.0.0.0:15443", 1, AF_INET, 15443},
      {"10.0.4.7:1", 1, AF_INET, 1},
      {"255.255.255.255:65535", 1, AF_INET, 65535},
      {"[::1]:443", 1, AF_INET6, 443},
      {"[::]:15443", 1, AF_INET6, 15443},
      {"[fe80::1]:65535", 1, AF_INET6, 65535},
      {"[2001:db8::42]:8443", 1, AF_INET6, 8443},
      {"[::ffff:10.0.0.1]:80", 1, AF_INET6, 80},
      {"", 0, 0, 0},
      {":", 0, 0, 0},
      {":80", 0, 0, 0},
      {"1.2.3.4", 0, 0, 0},
      {"1.2.3.4:", 0, 0, 0},
      {"x:80", 0, 0, 0},
      {"localhost:80", 0, 0, 0},
      {"example.com:443", 0, 0, 0},
      {"127.0.0.1:0", 0, 0, 0},
      {"127.0.0.1:65536", 0, 0, 0},
      {"127.0.0.1:99999", 0, 0, 0},
      {"127.0.0.1:123456", 0, 0, 0},
      {"127.0.0.1:-1", 0, 0, 0},
      {"127.0.0.1:+80", 0, 0, 0},
      {"127.0.0.1: 80", 0, 0, 0},
      {"127.0.0.1:80 ", 0, 0, 0},
      {" 127.0.0.1:80", 0, 0, 0},
      {"127.0.0.1:8o", 0, 0, 0},
      {"127.0.0.1:0x50", 0, 0, 0},
      {"1.2.3.256:80", 0, 0, 0},
      {"1.2.3:80", 0, 0, 0},
      {"1.2.3.4.5:80", 0, 0, 0},
      {"1.2.3.4:80:80", 0, 0, 0},
      {"::1:443", 0, 0, 0},
      {"::1", 0, 0, 0},
      {"[::1]", 0, 0, 0},
      {"[::1]:", 0, 0, 0},
      {"[::1]443", 0, 0, 0},
      {"[::1]:0", 0, 0, 0},
      {"[::1]:65536", 0, 0, 0},
      {"[::1:443", 0, 0, 0},
      {"::1]:443", 0, 0, 0},
      {"[]:80", 0, 0, 0},
      {"[1.2.3.4]:80", 0, 0, 0},
      {"[localhost]:80", 0, 0, 0},
      {"[::1]]:80", 0, 0, 0},
      {"[[::1]]:80", 0, 0, 0},
      {"[::1]:80x", 0, 0, 0},
      {"[:::::::::::::::::::::::::::::::::::::::::::::::::::::::::::::::::::::::1]:80", 0, 0, 0},
      {"1111111111111111111111111111111111111111111111111111111111111111111111111111:80", 0, 0, 0},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    struct sockaddr_storage ss;
    memset(&ss, 0x5a, sizeof(ss));
    int rc = pc_config_parse_addr(cases[i].s, &ss);
    CHECK_MSG((rc == 0) == cases[i].ok, "pc_config_parse_addr(\"%s\") = %d, expected %s",
              cases[i].s, rc, cases[i].ok ? "0" : "-1");
    if (rc == 0 && cases[i].ok) {
      CHECK_INT_EQ(ss.ss_family, cases[i].family);
      CHECK_INT_EQ(port(&ss), cases[i].port);
    }
  }
  struct sockaddr_storage ss;
  CHECK_INT_EQ(pc_config_parse_addr("10.0.4.7:15443", &ss), 0);
  CHECK_INT_EQ(ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr), 0x0a000407);
  CHECK_INT_EQ(pc_config_parse_addr("[::1]:443", &ss), 0);
  CHECK(memcmp(&((struct sockaddr_in6 *)&ss)->sin6_addr, &in6addr_loopback, 16) == 0);
}

static void test_cipher_ok(void) {
  CHECK(pc_config_cipher_ok("ECDHE-ECDSA-AES128-GCM-SHA256"));
  CHECK(pc_config_cipher_ok("ECDHE-ECDSA-AES256-GCM-SHA384"));
  CHECK(pc_config_cipher_ok("ECDHE-ECDSA-CHACHA20-POLY1305"));
  CHECK(pc_config_cipher_ok("ECDHE-RSA-AES128-GCM-SHA256"));
  CHECK(pc_config_cipher_ok("ECDHE-RSA-AES256-GCM-SHA384"));
  CHECK(pc_config_cipher_ok("ECDHE-RSA-CHACHA20-POLY1305"));
  CHECK(!pc_config_cipher_ok("AES128-SHA"));
  CHECK(!pc_config_cipher_ok("AES128-GCM-SHA256"));
  CHECK(!pc_config_cipher_ok("ECDHE-RSA-AES128-SHA"));
  CHECK(!pc_config_cipher_ok("ECDHE-ECDSA-AES128-SHA256"));
  CHECK(!pc_config_cipher_ok("DES-CBC3-SHA"));
  CHECK(!pc_config_cipher_ok("ECDHE-PSK-CHACHA20-POLY1305"));
  CHECK(!pc_config_cipher_ok("TLS_AES_128_GCM_SHA256"));
  CHECK(!pc_config_cipher_ok("ALL"));
  CHECK(!pc_config_cipher_ok(""));
  CHECK(!pc_config_cipher_ok("ECDHE-ECDSA-AES128-GCM-SHA256 "));
}

static void remove_tree(void) {
  static const char *const names[] = {"tls.crt", "tls.key", "ca.crt", "portcullis.conf"};
  char p[256];
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
    unlink(p);
  }
  rmdir(dir);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  snprintf(dir, sizeof(dir), "/tmp/pc-test-config.XXXXXX");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 2;
  }
  snprintf(conf_path, sizeof(conf_path), "%s/portcullis.conf", dir);
  static const char *const files[] = {"tls.crt", "tls.key", "ca.crt"};
  for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
    char p[256];
    snprintf(p, sizeof(p), "%s/%s", dir, files[i]);
    write_file(p, "dummy\n");
  }

  test_good();
  test_minimal();
  test_http();
  for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++)
    run_bad_case(i, &bad_cases[i]);
  test_other_failures();
  test_transparent();
  test_parse_addr();
  test_cipher_ok();

  remove_tree();
  return CHECK_DONE("test_config");
}

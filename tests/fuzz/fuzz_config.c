/*
 * fuzz_config.c - pc_config_load on arbitrary file contents.
 *
 * Each input is written to one fixed file per process
 * (/tmp/pc-fuzz-config.<pid>.conf, removed at exit) and loaded. On success
 * the snapshot must be internally consistent; on failure the error must be
 * one "FILE:LINE: SETTING: ..." line. Either way everything is freed (ASan's
 * leak checker runs at exit).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "endpoint.h"
#include "identity.h"
#include "policy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

/* libconfig 1.5 leaks the string token it was holding when a syntax error
 * hits (e.g. a line holding just "oops", or `"" = 1;`): its bison grammar has
 * no %destructor. Those bytes are the library's; every other leak, including
 * a missing config_destroy (config_setting_create), still fails the run. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) {
  return "leak:strbuf_append\nleak:libconfig_yylex\n";
}

static char path[64];

static void cleanup(void) {
  if (path[0]) unlink(path);
}

static void check_snapshot(const pc_config_t *cfg) {
  ASSERT(cfg->trust_domain && pc_spiffe_valid_td(cfg->trust_domain, strlen(cfg->trust_domain)));
  ASSERT(cfg->workers >= 1 && cfg->workers <= 256 + 4096);
  ASSERT(cfg->identity.cert && cfg->identity.key && cfg->identity.ca);
  ASSERT(cfg->tls.ciphers && cfg->tls.curves && cfg->admin.listen_str);
  ASSERT(cfg->tls.verify_depth >= 1 && cfg->tls.verify_depth <= 16);
  ASSERT(cfg->limits.max_connections >= 1);
  ASSERT(cfg->nlisteners >= 1);
  ASSERT(cfg->http.max_request_line >= 64 && cfg->http.max_request_line <= 1u << 20);
  ASSERT(cfg->http.max_header_bytes >= 256 && cfg->http.max_header_bytes <= 1u << 24);
  ASSERT(cfg->http.max_headers >= 1 && cfg->http.max_headers <= 10000);
  ASSERT(cfg->http.request_timeout_ms >= 1 && cfg->http.response_timeout_ms >= 1);
  ASSERT(cfg->http.pool_idle_timeout_ms >= 1 && cfg->http.pool_max_idle <= 100000);
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const pc_listener_cfg_t *l = &cfg->listeners[i];
    ASSERT(l->name && *l->name && l->listen_str && l->target_str && l->policy);
    ASSERT(l->protocol == PC_PROTO_TCP || l->protocol == PC_PROTO_HTTP);
    ASSERT(!l->parent && !l->passthrough);
    for (size_t j = 0; j < i; j++)
      ASSERT(strcmp(l->name, cfg->listeners[j].name) != 0);
    struct sockaddr_storage ss;
    ASSERT(pc_config_parse_addr(l->listen_str, &ss) == 0);
    if (l->transparent && l->direction == PC_DIR_OUTBOUND) {
      /* Routes say where and to whom; the listener names no one. */
      ASSERT(!l->tgt && !l->server_name && pc_policy_count(l->policy) == 0 && l->nroutes > 0);
      for (size_t k = 0; k < l->nroutes; k++) {
        const pc_route_t *r = &l->routes[k];
        const pc_listener_cfg_t *rl = &r->lc;
        ASSERT(rl->parent == l && rl->route_index == k && strcmp(rl->name, l->name) == 0);
        ASSERT(rl->tgt && rl->target_str && rl->direction == PC_DIR_OUTBOUND && !rl->transparent);
        ASSERT(r->family == 0 || r->family == AF_INET || r->family == AF_INET6);
        ASSERT(r->bits >= 0 && r->bits <= (r->family == AF_INET6 ? 128 : 32));
        ASSERT(r->family || r->port); /* a name has a port */
        if (rl->passthrough)
          ASSERT(!rl->server_name && pc_policy_count(rl->policy) == 0 &&
                 rl->protocol == PC_PROTO_TCP);
        else
          ASSERT(rl->server_name && *rl->server_name && pc_policy_count(rl->policy) > 0);
      }
      continue;
    }
    ASSERT(l->nroutes == 0 && l->tgt);
    ASSERT(l->direction == PC_DIR_INBOUND || (l->server_name && *l->server_name));
    ASSERT(l->direction == PC_DIR_INBOUND || pc_policy_count(l->policy) > 0);
    /* (a transparent inbound listener's target is "127.0.0.1:*") */
    if (!l->transparent && !pc_target_is_name(l->tgt))
      ASSERT(pc_config_parse_addr(l->target_str, &ss) == 0);
    for (size_t j = 0; j < pc_policy_count(l->policy); j++) {
      const char *ns, *sa;
      pc_policy_rule(l->policy, j, &ns, &sa);
      ASSERT(ns && pc_spiffe_valid_segment(ns, strlen(ns)));
      ASSERT(!sa || pc_spiffe_valid_segment(sa, strlen(sa)));
      /* Narrowing only on inbound HTTP listeners, never by an empty list. */
      const char *const *ms, *const *ps;
      size_t nm, np;
      pc_policy_rule_http(l->policy, j, &ms, &nm, &ps, &np);
      if (ms || ps) ASSERT(l->direction == PC_DIR_INBOUND && l->protocol == PC_PROTO_HTTP);
      ASSERT(!ms || nm > 0);
      ASSERT(!ps || np > 0);
      for (size_t k = 0; ms && k < nm; k++) {
        ASSERT(ms[k][0]);
        for (const char *c = ms[k]; *c; c++)
          ASSERT((*c >= 'A' && *c <= 'Z') || *c == '-' || *c == '_');
      }
      for (size_t k = 0; ps && k < np; k++) {
        ASSERT(ps[k][0] == '/');
        for (const unsigned char *c = (const unsigned char *)ps[k]; *c; c++)
          ASSERT(*c > ' ' && *c != '?' && *c != '#' && *c != 0x7f);
      }
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* @include would read other files (or block on a device): out of scope. */
  if (size >= 8 && memmem(data, size, "@include", 8)) return 0;
  if (!path[0]) {
    snprintf(path, sizeof(path), "/tmp/pc-fuzz-config.%ld.conf", (long)getpid());
    atexit(cleanup);
  }
  FILE *f = fopen(path, "wb");
  ASSERT(f);
  ASSERT(fwrite(data, 1, size, f) == size);
  ASSERT(fclose(f) == 0);

  pc_config_t *cfg = NULL;
  char err[512];
  err[0] = '\0';
  int rc = pc_config_load(path, &cfg, err, sizeof(err));
  if (rc == 0) {
    ASSERT(cfg);
    check_snapshot(cfg);
    pc_config_free(cfg);
  } else {
    ASSERT(rc == -1 && cfg == NULL);
    ASSERT(strncmp(err, path, strlen(path)) == 0 && err[strlen(path)] == ':');
  }
  return 0;
}

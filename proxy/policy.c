#include "policy.h"

#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "identity.h"

typedef struct {
  char *ns, *sa;
  size_t ns_len, sa_len;
  char **methods, **paths; /* NULL: any */
  size_t nmethods, npaths;
} rule_t;

struct pc_policy {
  rule_t *rules;
  size_t n;
};

pc_policy_t *pc_policy_new(void) { return pc_calloc(1, sizeof(pc_policy_t)); }

void pc_policy_add(pc_policy_t *p, const char *ns, const char *sa) {
  p->rules = pc_realloc(p->rules, (p->n + 1) * sizeof(rule_t));
  rule_t *r = &p->rules[p->n++];
  r->ns = pc_strdup(ns);
  r->ns_len = strlen(ns);
  r->sa = sa ? pc_strdup(sa) : NULL;
  r->sa_len = sa ? strlen(sa) : 0;
  r->methods = r->paths = NULL;
  r->nmethods = r->npaths = 0;
}

static char **copy_strings(const char *const *v, size_t n) {
  char **out = pc_calloc(n ? n : 1, sizeof(char *));
  for (size_t i = 0; i < n; i++)
    out[i] = pc_strdup(v[i]);
  return out;
}

void pc_policy_narrow(pc_policy_t *p, const char *const *methods, size_t nmethods,
                      const char *const *paths, size_t npaths) {
  rule_t *r = &p->rules[p->n - 1];
  if (methods) {
    r->methods = copy_strings(methods, nmethods);
    r->nmethods = nmethods;
  }
  if (paths) {
    r->paths = copy_strings(paths, npaths);
    r->npaths = npaths;
  }
}

void pc_policy_rule_http(const pc_policy_t *p, size_t i, const char *const **methods,
                         size_t *nmethods, const char *const **paths, size_t *npaths) {
  const rule_t *r = &p->rules[i];
  *methods = (const char *const *)r->methods;
  *nmethods = r->nmethods;
  *paths = (const char *const *)r->paths;
  *npaths = r->npaths;
}

size_t pc_policy_count(const pc_policy_t *p) { return p->n; }

void pc_policy_rule(const pc_policy_t *p, size_t i, const char **ns, const char **sa) {
  *ns = p->rules[i].ns;
  *sa = p->rules[i].sa;
}

static int identity_matches(const rule_t *r, const pc_spiffe_id_t *id) {
  if (r->ns_len != id->ns_len || memcmp(r->ns, id->ns, id->ns_len) != 0) return 0;
  return !r->sa || (r->sa_len == id->sa_len && memcmp(r->sa, id->sa, id->sa_len) == 0);
}

/* prefix matches path at a segment boundary: "/api" takes "/api" and
 * "/api/x" but not "/apix"; "/api/" takes everything under it. */
static int prefix_matches(const char *prefix, const char *path, size_t plen) {
  size_t n = strlen(prefix);
  if (n > plen || memcmp(prefix, path, n) != 0) return 0;
  return n == plen || prefix[n - 1] == '/' || path[n] == '/';
}

static int request_matches(const rule_t *r, const char *method, size_t mlen, const char *path,
                           size_t plen) {
  int ok = !r->methods;
  for (size_t i = 0; !ok && i < r->nmethods; i++)
    ok = strlen(r->methods[i]) == mlen && memcmp(r->methods[i], method, mlen) == 0;
  if (!ok) return 0;
  ok = !r->paths;
  for (size_t i = 0; !ok && i < r->npaths; i++)
    ok = prefix_matches(r->paths[i], path, plen);
  return ok;
}

pc_reason_t pc_policy_check_request(const pc_policy_t *p, const char *spiffe_id, const char *method,
                                    size_t mlen, const char *path, size_t plen) {
  pc_spiffe_id_t id;
  if (!spiffe_id || pc_spiffe_parse(spiffe_id, strlen(spiffe_id), &id) != 0 || !id.ns)
    return PC_REASON_NOT_ALLOWED;
  for (size_t i = 0; i < p->n; i++) {
    const rule_t *r = &p->rules[i];
    if (!identity_matches(r, &id)) continue;
    if (!method || request_matches(r, method, mlen, path, plen)) return PC_REASON_NONE;
  }
  return PC_REASON_NOT_ALLOWED;
}

pc_reason_t pc_policy_check(const pc_policy_t *p, const char *spiffe_id) {
  return pc_policy_check_request(p, spiffe_id, NULL, 0, NULL, 0);
}

void pc_policy_free(pc_policy_t *p) {
  if (!p) return;
  for (size_t i = 0; i < p->n; i++) {
    free(p->rules[i].ns);
    free(p->rules[i].sa);
    for (size_t j = 0; j < p->rules[i].nmethods; j++)
      free(p->rules[i].methods[j]);
    for (size_t j = 0; j < p->rules[i].npaths; j++)
      free(p->rules[i].paths[j]);
    free(p->rules[i].methods);
    free(p->rules[i].paths);
  }
  free(p->rules);
  free(p);
}

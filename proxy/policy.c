#include "policy.h"

#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "identity.h"

typedef struct {
  char *ns, *sa;
  size_t ns_len, sa_len;
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
}

size_t pc_policy_count(const pc_policy_t *p) { return p->n; }

void pc_policy_rule(const pc_policy_t *p, size_t i, const char **ns, const char **sa) {
  *ns = p->rules[i].ns;
  *sa = p->rules[i].sa;
}

pc_reason_t pc_policy_check(const pc_policy_t *p, const char *spiffe_id) {
  pc_spiffe_id_t id;
  if (!spiffe_id || pc_spiffe_parse(spiffe_id, strlen(spiffe_id), &id) != 0 || !id.ns)
    return PC_REASON_NOT_ALLOWED;
  for (size_t i = 0; i < p->n; i++) {
    const rule_t *r = &p->rules[i];
    if (r->ns_len != id.ns_len || memcmp(r->ns, id.ns, id.ns_len) != 0) continue;
    if (r->sa && (r->sa_len != id.sa_len || memcmp(r->sa, id.sa, id.sa_len) != 0)) continue;
    return PC_REASON_NONE;
  }
  return PC_REASON_NOT_ALLOWED;
}

void pc_policy_free(pc_policy_t *p) {
  if (!p) return;
  for (size_t i = 0; i < p->n; i++) {
    free(p->rules[i].ns);
    free(p->rules[i].sa);
  }
  free(p->rules);
  free(p);
}

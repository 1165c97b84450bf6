/*
 * policy.h - compiled allow lists (inbound) and expect lists (outbound).
 *
 * A policy is a list of rules, each a namespace and optionally a service
 * account. An identity matches a rule when its namespace is equal and the
 * rule has no account or the account is equal. No rule, no entry: deny by
 * default. Policies are immutable once built and may be read from any thread.
 */
#ifndef PC_POLICY_H
#define PC_POLICY_H

#include <stddef.h>

#include "reason.h"

typedef struct pc_policy pc_policy_t;

/* Returns an empty policy (denies everything). Never NULL. */
pc_policy_t *pc_policy_new(void);

/* Adds a rule; sa may be NULL for "any account in ns". Copies the strings.
 * Only while building, before the policy is shared. */
void pc_policy_add(pc_policy_t *p, const char *ns, const char *sa);

/* Narrows the rule added last to requests whose method is one of methods
 * (exact, case-sensitive) and whose path matches one of paths as a prefix at
 * a segment boundary ("/api" matches "/api", "/api/x" and "/api?q" but not
 * "/apix"; a prefix ending in "/" matches everything under it). NULL leaves
 * that dimension open. Copies the strings. HTTP listeners only; while
 * building. */
void pc_policy_narrow(pc_policy_t *p, const char *const *methods, size_t nmethods,
                      const char *const *paths, size_t npaths);

/* Number of rules. */
size_t pc_policy_count(const pc_policy_t *p);

/* Rule i's namespace and account (account NULL when the rule has none). */
void pc_policy_rule(const pc_policy_t *p, size_t i, const char **ns, const char **sa);

/* Rule i's method and path lists (NULL when the rule does not narrow). */
void pc_policy_rule_http(const pc_policy_t *p, size_t i, const char *const **methods,
                         size_t *nmethods, const char *const **paths, size_t *npaths);

/* Decides for a SPIFFE ID already validated by pc_identity_from_cert:
 * PC_REASON_NONE when a rule matches, PC_REASON_NOT_ALLOWED otherwise
 * (including an ID that is not of the /ns/<ns>/sa/<sa> form). */
pc_reason_t pc_policy_check(const pc_policy_t *p, const char *spiffe_id);

/* Decides one HTTP request: some rule must match the identity and, where it
 * narrows, the method and the path (the request-target before '?').
 * PC_REASON_NONE or PC_REASON_NOT_ALLOWED. A rule that narrows does not admit
 * other requests, but the handshake (pc_policy_check) lets its peer in. */
pc_reason_t pc_policy_check_request(const pc_policy_t *p, const char *spiffe_id, const char *method,
                                    size_t mlen, const char *path, size_t plen);

void pc_policy_free(pc_policy_t *p);

#endif

/*
 * test_policy.c - allow / expect lists: deny by default, exact namespace and
 * account matches, no prefix or injection tricks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "policy.h"
#include "reason.h"

static void expect(const pc_policy_t *p, const char *id, pc_reason_t want) {
  pc_reason_t r = pc_policy_check(p, id);
  CHECK_MSG(r == want, "pc_policy_check(\"%s\") = \"%s\", expected \"%s\"", id ? id : "(null)",
            pc_reason_word(r), pc_reason_word(want));
}

#define ALLOW(p, id) expect(p, id, PC_REASON_NONE)
#define DENY(p, id) expect(p, id, PC_REASON_NOT_ALLOWED)

static void test_empty(void) {
  pc_policy_t *p = pc_policy_new();
  CHECK(p != NULL);
  CHECK_INT_EQ(pc_policy_count(p), 0);
  DENY(p, "spiffe://cluster.local/ns/web/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/default/sa/default");
  DENY(p, "");
  DENY(p, NULL);
  pc_policy_free(p);
  pc_policy_free(NULL);
}

static void test_namespace_only(void) {
  pc_policy_t *p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  CHECK_INT_EQ(pc_policy_count(p), 1);
  const char *ns = NULL, *sa = "x";
  pc_policy_rule(p, 0, &ns, &sa);
  CHECK_STR_EQ(ns, "web");
  CHECK(sa == NULL);

  ALLOW(p, "spiffe://cluster.local/ns/web/sa/frontend");
  ALLOW(p, "spiffe://cluster.local/ns/web/sa/anything");
  ALLOW(p, "spiffe://cluster.local/ns/web/sa/web");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/frontend");
  /* Prefixes and case. */
  DENY(p, "spiffe://cluster.local/ns/webx/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/we/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/Web/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/xweb/sa/frontend");
  /* The namespace must be in the ns position, not anywhere in the path. */
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/web");
  DENY(p, "spiffe://cluster.local/sa/x/ns/web");
  DENY(p, "spiffe://web/ns/jobs/sa/x");
  /* Not of the /ns/X/sa/Y form. */
  DENY(p, "spiffe://cluster.local/ns/web");
  DENY(p, "spiffe://cluster.local/ns/web/sa");
  DENY(p, "spiffe://cluster.local/ns/web/sa/frontend/extra");
  DENY(p, "spiffe://cluster.local/x/ns/web/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/web/sa/frontend/");
  DENY(p, "spiffe://cluster.local/ns/web/sa//");
  DENY(p, "spiffe://cluster.local/ns/web/");
  DENY(p, "spiffe://cluster.local");
  DENY(p, "spiffe://cluster.local/");
  /* Malformed IDs that carry /ns/web/. */
  DENY(p, "spiffe://Cluster.local/ns/web/sa/frontend");
  DENY(p, "https://cluster.local/ns/web/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/web/sa/fr%6fntend");
  DENY(p, "spiffe://cluster.local/ns/web/sa/frontend?ns=web");
  DENY(p, "spiffe://cluster.local/ns/web/sa/frontend#x");
  DENY(p, "spiffe://cluster.local/ns/./web/sa/frontend");
  DENY(p, "ns/web/sa/frontend");
  DENY(p, "/ns/web/sa/frontend");
  DENY(p, "web");
  pc_policy_free(p);
}

static void test_ns_and_sa(void) {
  pc_policy_t *p = pc_policy_new();
  pc_policy_add(p, "jobs", "scheduler");
  pc_policy_add(p, "web", NULL);
  CHECK_INT_EQ(pc_policy_count(p), 2);
  const char *ns = NULL, *sa = NULL;
  pc_policy_rule(p, 0, &ns, &sa);
  CHECK_STR_EQ(ns, "jobs");
  CHECK_STR_EQ(sa, "scheduler");
  pc_policy_rule(p, 1, &ns, &sa);
  CHECK_STR_EQ(ns, "web");
  CHECK(sa == NULL);

  ALLOW(p, "spiffe://cluster.local/ns/jobs/sa/scheduler");
  ALLOW(p, "spiffe://cluster.local/ns/web/sa/scheduler");
  ALLOW(p, "spiffe://cluster.local/ns/web/sa/other");
  /* Account mismatch. */
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/worker");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/schedulerx");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/schedule");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/Scheduler");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/scheduler/x");
  /* Swapped, shifted or injected components. */
  DENY(p, "spiffe://cluster.local/ns/scheduler/sa/jobs");
  DENY(p, "spiffe://cluster.local/ns/jobsx/sa/scheduler");
  DENY(p, "spiffe://cluster.local/ns/job/sa/scheduler");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/scheduler/ns/jobs/sa/scheduler");
  DENY(p, "spiffe://cluster.local/ns/other/sa/x/ns/jobs/sa/scheduler");
  DENY(p, "spiffe://cluster.local/ns/jobs%2fsa%2fscheduler/sa/x");
  pc_policy_free(p);
}

/* Rules are copied: the caller's strings may change afterwards. A rule value
 * that itself contains '/' can never match a well-formed ID. */
static void test_copies_and_injection(void) {
  char ns[8], sa[16];
  strcpy(ns, "web");
  strcpy(sa, "frontend");
  pc_policy_t *p = pc_policy_new();
  pc_policy_add(p, ns, sa);
  strcpy(ns, "jobs");
  strcpy(sa, "scheduler");
  ALLOW(p, "spiffe://cluster.local/ns/web/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/scheduler");
  pc_policy_free(p);

  p = pc_policy_new();
  pc_policy_add(p, "ns/web", NULL);
  pc_policy_add(p, "web/sa/frontend", NULL);
  pc_policy_add(p, "a", "b/ns/c");
  pc_policy_add(p, "", NULL);
  DENY(p, "spiffe://cluster.local/ns/web/sa/frontend");
  DENY(p, "spiffe://cluster.local/ns/ns/web/sa/x");
  DENY(p, "spiffe://cluster.local/ns/a/sa/b");
  DENY(p, "spiffe://cluster.local/ns/a/sa/b/ns/c");
  DENY(p, "spiffe://cluster.local/ns//sa/x");
  pc_policy_free(p);

  /* Namespace and account with the same name as the path keywords. */
  p = pc_policy_new();
  pc_policy_add(p, "sa", "ns");
  ALLOW(p, "spiffe://cluster.local/ns/sa/sa/ns");
  DENY(p, "spiffe://cluster.local/ns/ns/sa/sa");
  pc_policy_free(p);
}

/* Many rules: the last one still matches; order does not matter. */
static void test_many_rules(void) {
  pc_policy_t *p = pc_policy_new();
  char ns[32];
  for (int i = 0; i < 200; i++) {
    snprintf(ns, sizeof(ns), "ns%d", i);
    pc_policy_add(p, ns, i % 2 ? "sa" : NULL);
  }
  CHECK_INT_EQ(pc_policy_count(p), 200);
  ALLOW(p, "spiffe://cluster.local/ns/ns0/sa/any");
  ALLOW(p, "spiffe://cluster.local/ns/ns199/sa/sa");
  DENY(p, "spiffe://cluster.local/ns/ns199/sa/other");
  ALLOW(p, "spiffe://cluster.local/ns/ns198/sa/other");
  DENY(p, "spiffe://cluster.local/ns/ns200/sa/sa");
  DENY(p, "spiffe://cluster.local/ns/ns1/sa/sax");
  pc_policy_free(p);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  test_empty();
  test_namespace_only();
  test_ns_and_sa();
  test_copies_and_injection();
  test_many_rules();
  return CHECK_DONE("test_policy");
}

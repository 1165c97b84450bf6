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

/* ---- HTTP requests (pc_policy_narrow / pc_policy_check_request) ---------- */

static void expect_req(const pc_policy_t *p, const char *id, const char *method, const char *path,
                       pc_reason_t want) {
  pc_reason_t r = pc_policy_check_request(p, id, method, strlen(method), path, strlen(path));
  CHECK_MSG(r == want, "pc_policy_check_request(\"%s\", %s %s) = \"%s\", expected \"%s\"", id,
            method, path, pc_reason_word(r), pc_reason_word(want));
}

#define ALLOW_REQ(p, id, m, path) expect_req(p, id, m, path, PC_REASON_NONE)
#define DENY_REQ(p, id, m, path) expect_req(p, id, m, path, PC_REASON_NOT_ALLOWED)

#define WEB "spiffe://cluster.local/ns/web/sa/frontend"
#define JOBS "spiffe://cluster.local/ns/jobs/sa/scheduler"
#define OTHER "spiffe://cluster.local/ns/other/sa/x"

static void test_methods(void) {
  static const char *const methods[] = {"GET", "HEAD"};
  pc_policy_t *p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  pc_policy_narrow(p, methods, 2, NULL, 0);
  ALLOW_REQ(p, WEB, "GET", "/");
  ALLOW_REQ(p, WEB, "HEAD", "/anything/at/all");
  DENY_REQ(p, WEB, "POST", "/");
  DENY_REQ(p, WEB, "DELETE", "/");
  /* Exact and case-sensitive. */
  DENY_REQ(p, WEB, "get", "/");
  DENY_REQ(p, WEB, "Get", "/");
  DENY_REQ(p, WEB, "GE", "/");
  DENY_REQ(p, WEB, "GETX", "/");
  DENY_REQ(p, WEB, "HEA", "/");
  DENY_REQ(p, WEB, "", "/");
  /* The rule is still for web only. */
  DENY_REQ(p, JOBS, "GET", "/");
  DENY_REQ(p, OTHER, "GET", "/");
  /* The method is compared by length, not up to a NUL. */
  CHECK_INT_EQ(pc_policy_check_request(p, WEB, "GETS", 3, "/", 1), PC_REASON_NONE);
  CHECK_INT_EQ(pc_policy_check_request(p, WEB, "GET", 2, "/", 1), PC_REASON_NOT_ALLOWED);
  /* The handshake lets web in: its requests are then judged one by one. */
  ALLOW(p, WEB);
  DENY(p, JOBS);
  pc_policy_free(p);
}

static void test_paths(void) {
  static const char *const api[] = {"/api"};
  pc_policy_t *p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  pc_policy_narrow(p, NULL, 0, api, 1);
  ALLOW_REQ(p, WEB, "GET", "/api");
  ALLOW_REQ(p, WEB, "POST", "/api/x");
  ALLOW_REQ(p, WEB, "DELETE", "/api/x/y/z");
  ALLOW_REQ(p, WEB, "GET", "/api/");
  DENY_REQ(p, WEB, "GET", "/apix");
  DENY_REQ(p, WEB, "GET", "/api.json");
  DENY_REQ(p, WEB, "GET", "/ap");
  DENY_REQ(p, WEB, "GET", "/");
  DENY_REQ(p, WEB, "GET", "");
  DENY_REQ(p, WEB, "GET", "/API");
  DENY_REQ(p, WEB, "GET", "/Api/x");
  DENY_REQ(p, WEB, "GET", "//api");
  DENY_REQ(p, WEB, "GET", "/v1/api");
  DENY_REQ(p, WEB, "GET", "/%61pi");
  DENY_REQ(p, WEB, "GET", "api");
  /* The path is the request-target before '?': the caller passes path_len. */
  CHECK_INT_EQ(pc_policy_check_request(p, WEB, "GET", 3, "/api?q=1", 4), PC_REASON_NONE);
  CHECK_INT_EQ(pc_policy_check_request(p, WEB, "GET", 3, "/apix?q=1", 5), PC_REASON_NOT_ALLOWED);
  CHECK_INT_EQ(pc_policy_check_request(p, WEB, "GET", 3, "/api/x", 3), PC_REASON_NOT_ALLOWED);
  DENY_REQ(p, OTHER, "GET", "/api");
  pc_policy_free(p);

  /* A prefix ending in "/" matches what is under it, not the directory itself. */
  static const char *const api_dir[] = {"/api/"};
  p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  pc_policy_narrow(p, NULL, 0, api_dir, 1);
  ALLOW_REQ(p, WEB, "GET", "/api/x");
  ALLOW_REQ(p, WEB, "GET", "/api/");
  ALLOW_REQ(p, WEB, "GET", "/api/x/y");
  DENY_REQ(p, WEB, "GET", "/api");
  DENY_REQ(p, WEB, "GET", "/apix");
  DENY_REQ(p, WEB, "GET", "/apix/y");
  pc_policy_free(p);

  /* "/" matches every origin-form path. */
  static const char *const root[] = {"/"};
  p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  pc_policy_narrow(p, NULL, 0, root, 1);
  ALLOW_REQ(p, WEB, "GET", "/");
  ALLOW_REQ(p, WEB, "GET", "/x/y");
  DENY_REQ(p, WEB, "GET", "*");
  DENY_REQ(p, WEB, "CONNECT", "db:5432");
  pc_policy_free(p);

  /* Several prefixes: any one of them. */
  static const char *const several[] = {"/a", "/b/c", "/d/"};
  p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  pc_policy_narrow(p, NULL, 0, several, 3);
  ALLOW_REQ(p, WEB, "GET", "/a");
  ALLOW_REQ(p, WEB, "GET", "/a/1");
  ALLOW_REQ(p, WEB, "GET", "/b/c");
  ALLOW_REQ(p, WEB, "GET", "/b/c/d");
  ALLOW_REQ(p, WEB, "GET", "/d/e");
  DENY_REQ(p, WEB, "GET", "/b");
  DENY_REQ(p, WEB, "GET", "/b/cd");
  DENY_REQ(p, WEB, "GET", "/d");
  DENY_REQ(p, WEB, "GET", "/ab");
  DENY_REQ(p, WEB, "GET", "/c");
  pc_policy_free(p);
}

static void test_methods_and_paths(void) {
  static const char *const get[] = {"GET"};
  static const char *const post[] = {"POST", "PUT"};
  static const char *const pub[] = {"/public"};
  static const char *const api[] = {"/api/v1", "/api/v2/"};
  pc_policy_t *p = pc_policy_new();
  /* Rule 0: web may GET /public. */
  pc_policy_add(p, "web", NULL);
  pc_policy_narrow(p, get, 1, pub, 1);
  /* Rule 1: web/frontend may POST or PUT under the API. */
  pc_policy_add(p, "web", "frontend");
  pc_policy_narrow(p, post, 2, api, 2);
  /* Rule 2: jobs/scheduler may do anything. */
  pc_policy_add(p, "jobs", "scheduler");
  /* Rule 3: other may only GET, anywhere. */
  pc_policy_add(p, "other", NULL);
  pc_policy_narrow(p, get, 1, NULL, 0);
  CHECK_INT_EQ(pc_policy_count(p), 4);

  ALLOW_REQ(p, WEB, "GET", "/public");
  ALLOW_REQ(p, WEB, "GET", "/public/index.html");
  DENY_REQ(p, WEB, "POST", "/public");
  ALLOW_REQ(p, WEB, "POST", "/api/v1");
  ALLOW_REQ(p, WEB, "PUT", "/api/v1/items");
  ALLOW_REQ(p, WEB, "POST", "/api/v2/items");
  DENY_REQ(p, WEB, "POST", "/api/v2");
  DENY_REQ(p, WEB, "POST", "/api/v10");
  DENY_REQ(p, WEB, "GET", "/api/v1"); /* neither rule has both */
  DENY_REQ(p, WEB, "DELETE", "/api/v1");
  DENY_REQ(p, WEB, "GET", "/private");
  /* Rule 1 is for the frontend account only. */
  DENY_REQ(p, "spiffe://cluster.local/ns/web/sa/backend", "POST", "/api/v1");
  ALLOW_REQ(p, "spiffe://cluster.local/ns/web/sa/backend", "GET", "/public");
  /* A rule without methods or paths admits every request of its identity. */
  ALLOW_REQ(p, JOBS, "GET", "/");
  ALLOW_REQ(p, JOBS, "DELETE", "/api/v1/everything");
  ALLOW_REQ(p, JOBS, "PATCH", "/x");
  ALLOW_REQ(p, JOBS, "CONNECT", "db:5432");
  ALLOW_REQ(p, JOBS, "OPTIONS", "*");
  DENY_REQ(p, "spiffe://cluster.local/ns/jobs/sa/worker", "GET", "/");
  /* Methods only: every path. */
  ALLOW_REQ(p, OTHER, "GET", "/");
  ALLOW_REQ(p, OTHER, "GET", "/api/v1");
  DENY_REQ(p, OTHER, "POST", "/api/v1");
  /* Unknown identities and malformed IDs. */
  DENY_REQ(p, "spiffe://cluster.local/ns/nobody/sa/x", "GET", "/public");
  DENY_REQ(p, "spiffe://cluster.local/ns/web", "GET", "/public");
  DENY_REQ(p, "", "GET", "/public");
  CHECK_INT_EQ(pc_policy_check_request(p, NULL, "GET", 3, "/public", 7), PC_REASON_NOT_ALLOWED);
  /* The handshake admits every identity that some rule names, narrowing or not. */
  ALLOW(p, WEB);
  ALLOW(p, "spiffe://cluster.local/ns/web/sa/backend");
  ALLOW(p, JOBS);
  ALLOW(p, OTHER);
  DENY(p, "spiffe://cluster.local/ns/jobs/sa/worker");
  DENY(p, "spiffe://cluster.local/ns/nobody/sa/x");

  /* A narrowing rule for another identity does not apply to this one; an
   * open rule for this one does. */
  pc_policy_t *q = pc_policy_new();
  pc_policy_add(q, "jobs", NULL);
  pc_policy_narrow(q, get, 1, pub, 1);
  pc_policy_add(q, "web", NULL);
  ALLOW_REQ(q, WEB, "DELETE", "/private");
  DENY_REQ(q, JOBS, "DELETE", "/private");
  ALLOW_REQ(q, JOBS, "GET", "/public/x");
  pc_policy_free(q);

  /* Order does not matter: an open rule after a narrowing one for the same identity. */
  q = pc_policy_new();
  pc_policy_add(q, "web", NULL);
  pc_policy_narrow(q, get, 1, pub, 1);
  pc_policy_add(q, "web", "frontend");
  ALLOW_REQ(q, WEB, "DELETE", "/private");
  DENY_REQ(q, "spiffe://cluster.local/ns/web/sa/other", "DELETE", "/private");
  ALLOW_REQ(q, "spiffe://cluster.local/ns/web/sa/other", "GET", "/public");
  pc_policy_free(q);

  /* An empty (non-NULL) list admits nothing in that dimension. */
  q = pc_policy_new();
  pc_policy_add(q, "web", NULL);
  pc_policy_narrow(q, get, 0, NULL, 0);
  DENY_REQ(q, WEB, "GET", "/");
  ALLOW(q, WEB);
  pc_policy_free(q);
  pc_policy_free(p);
}

static void test_rule_http(void) {
  char m0[8], p0[16];
  strcpy(m0, "GET");
  strcpy(p0, "/api");
  const char *methods[] = {m0, "POST"};
  const char *paths[] = {p0};
  pc_policy_t *p = pc_policy_new();
  pc_policy_add(p, "web", NULL);
  pc_policy_add(p, "jobs", "scheduler");
  pc_policy_narrow(p, methods, 2, paths, 1);
  pc_policy_add(p, "other", NULL);
  pc_policy_narrow(p, NULL, 0, paths, 1);
  /* The strings were copied. */
  strcpy(m0, "PUT");
  strcpy(p0, "/xyz");

  const char *const *ms = (const char *const *)1, *const *ps = (const char *const *)1;
  size_t nm = 99, np = 99;
  pc_policy_rule_http(p, 0, &ms, &nm, &ps, &np);
  CHECK(ms == NULL);
  CHECK(ps == NULL);
  CHECK_INT_EQ(nm, 0);
  CHECK_INT_EQ(np, 0);

  pc_policy_rule_http(p, 1, &ms, &nm, &ps, &np);
  CHECK_INT_EQ(nm, 2);
  CHECK_INT_EQ(np, 1);
  if (ms && nm == 2) {
    CHECK_STR_EQ(ms[0], "GET");
    CHECK_STR_EQ(ms[1], "POST");
  }
  if (ps && np == 1) CHECK_STR_EQ(ps[0], "/api");
  const char *ns, *sa;
  pc_policy_rule(p, 1, &ns, &sa);
  CHECK_STR_EQ(ns, "jobs");
  CHECK_STR_EQ(sa, "scheduler");

  pc_policy_rule_http(p, 2, &ms, &nm, &ps, &np);
  CHECK(ms == NULL);
  CHECK_INT_EQ(nm, 0);
  CHECK_INT_EQ(np, 1);
  if (ps && np == 1) CHECK_STR_EQ(ps[0], "/api");

  ALLOW_REQ(p, JOBS, "GET", "/api/x");
  DENY_REQ(p, JOBS, "PUT", "/api/x");
  DENY_REQ(p, JOBS, "GET", "/xyz");
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
  test_methods();
  test_paths();
  test_methods_and_paths();
  test_rule_http();
  return CHECK_DONE("test_policy");
}

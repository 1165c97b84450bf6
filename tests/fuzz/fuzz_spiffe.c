/*
 * fuzz_spiffe.c - pc_spiffe_parse on arbitrary bytes.
 *
 * Besides not crashing: every view lies inside the input; the trust domain,
 * path and segments satisfy the validators; the result agrees with an
 * independent reading of the X509-SVID rules; and the policy check agrees
 * with the parse.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "identity.h"
#include "policy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

static int inside(const char *base, size_t size, const char *p, size_t n) {
  return p >= base && p <= base + size && n <= (size_t)(base + size - p);
}

/* The rules, read again without sharing code with identity.c. */
static int reference_ok(const char *s, size_t n) {
  if (n > 2048 || n < 10 || strncmp(s, "spiffe://", 9) != 0) return 0;
  size_t i = 9, td = 0;
  for (; i < n && s[i] != '/'; i++, td++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_'))
      return 0;
  }
  if (td == 0 || td > 255) return 0;
  while (i < n) { /* s[i] == '/' */
    size_t start = ++i;
    for (; i < n && s[i] != '/'; i++) {
      char c = s[i];
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '.' || c == '-' || c == '_'))
        return 0;
    }
    size_t len = i - start;
    if (len == 0) return 0;
    if (len == 1 && s[start] == '.') return 0;
    if (len == 2 && s[start] == '.' && s[start + 1] == '.') return 0;
  }
  return 1;
}

static pc_policy_t *policy;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *s = (const char *)data;
  pc_spiffe_id_t id;
  int rc = pc_spiffe_parse(s, size, &id);
  ASSERT(rc == 0 || rc == -1);
  ASSERT((rc == 0) == reference_ok(s, size));

  if (rc == 0) {
    ASSERT(size <= PC_SPIFFE_MAX_ID);
    ASSERT(id.td == s + 9);
    ASSERT(inside(s, size, id.td, id.td_len));
    ASSERT(pc_spiffe_valid_td(id.td, id.td_len));
    ASSERT(id.td_len <= PC_SPIFFE_MAX_TD);
    if (id.path_len) {
      ASSERT(id.path == id.td + id.td_len);
      ASSERT(inside(s, size, id.path, id.path_len));
      ASSERT(id.path + id.path_len == s + size);
      ASSERT(id.path[0] == '/' && id.path[id.path_len - 1] != '/');
    } else {
      ASSERT(id.td + id.td_len == s + size);
    }
    ASSERT((id.ns == NULL) == (id.sa == NULL));
    if (id.ns) {
      ASSERT(inside(s, size, id.ns, id.ns_len) && inside(s, size, id.sa, id.sa_len));
      ASSERT(pc_spiffe_valid_segment(id.ns, id.ns_len));
      ASSERT(pc_spiffe_valid_segment(id.sa, id.sa_len));
      ASSERT(id.path_len == 4 + id.ns_len + 4 + id.sa_len);
      ASSERT(memcmp(id.path, "/ns/", 4) == 0 && id.ns == id.path + 4);
      ASSERT(memcmp(id.ns + id.ns_len, "/sa/", 4) == 0 && id.sa == id.ns + id.ns_len + 4);
    }
  } else {
    /* Failure leaves no dangling views. */
    ASSERT(id.td == NULL || inside(s, size, id.td, id.td_len));
  }

  /* The policy decision follows the parse: only /ns/web/... of a valid ID
   * passes a namespace-only rule for "web". */
  if (!memchr(s, '\0', size)) {
    if (!policy) {
      policy = pc_policy_new();
      pc_policy_add(policy, "web", NULL);
      pc_policy_add(policy, "jobs", "scheduler");
    }
    char *z = malloc(size + 1);
    ASSERT(z);
    memcpy(z, s, size);
    z[size] = '\0';
    int want = rc == 0 && id.ns &&
               ((id.ns_len == 3 && memcmp(id.ns, "web", 3) == 0) ||
                (id.ns_len == 4 && memcmp(id.ns, "jobs", 4) == 0 && id.sa_len == 9 &&
                 memcmp(id.sa, "scheduler", 9) == 0));
    pc_reason_t r = pc_policy_check(policy, z);
    ASSERT(r == (want ? PC_REASON_NONE : PC_REASON_NOT_ALLOWED));
    free(z);
  }
  return 0;
}

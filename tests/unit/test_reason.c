/*
 * test_reason.c - the fixed refusal words of DESIGN.md, in order, unique,
 * with their TLS alerts.
 */
#include <string.h>

#include "check.h"
#include "reason.h"

/* DESIGN.md "Decisions and what a refused peer sees", in its order. */
static const char *const design_words[] = {
    "no_cert",     "bad_chain", "expired", "no_spiffe_id", "wrong_trust_domain",
    "not_allowed", "protocol",  "cipher",  "timeout",      "limit",
};

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  const size_t nwords = sizeof(design_words) / sizeof(design_words[0]);

  CHECK_INT_EQ(PC_REASON_NONE, 0);
  CHECK_STR_EQ(pc_reason_word(PC_REASON_NONE), "");
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_NONE), 0);
  CHECK_INT_EQ(PC_REASON_COUNT, nwords + 1);

  for (size_t i = 0; i < nwords && i + 1 < PC_REASON_COUNT; i++)
    CHECK_STR_EQ(pc_reason_word((pc_reason_t)(i + 1)), design_words[i]);

  for (int r = 1; r < PC_REASON_COUNT; r++) {
    const char *w = pc_reason_word((pc_reason_t)r);
    CHECK_MSG(w && *w, "reason %d has an empty word", r);
    /* Metric-label safe: lowercase letters and '_' only. */
    for (const char *p = w; p && *p; p++)
      CHECK_MSG((*p >= 'a' && *p <= 'z') || *p == '_', "reason \"%s\": bad character '%c'", w, *p);
    for (int o = 1; o < r; o++)
      CHECK_MSG(strcmp(w, pc_reason_word((pc_reason_t)o)) != 0, "reasons %d and %d share \"%s\"", o,
                r, w);
  }

  /* The enum names line up with the words. */
  CHECK_STR_EQ(pc_reason_word(PC_REASON_NO_CERT), "no_cert");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_BAD_CHAIN), "bad_chain");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_EXPIRED), "expired");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_NO_SPIFFE_ID), "no_spiffe_id");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_WRONG_TRUST_DOMAIN), "wrong_trust_domain");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_NOT_ALLOWED), "not_allowed");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_PROTOCOL), "protocol");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_CIPHER), "cipher");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_TIMEOUT), "timeout");
  CHECK_STR_EQ(pc_reason_word(PC_REASON_LIMIT), "limit");

  /* Handshake refusals send the alerts DESIGN.md names (RFC 8446 codes). */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_NOT_ALLOWED), 49);        /* access_denied */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_NO_SPIFFE_ID), 46);       /* certificate_unknown */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_WRONG_TRUST_DOMAIN), 46); /* certificate_unknown */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_EXPIRED), 45);            /* certificate_expired */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_NO_CERT), 116);           /* certificate_required */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_BAD_CHAIN), 42);          /* bad_certificate */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_PROTOCOL), 70);           /* protocol_version */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_CIPHER), 40);             /* handshake_failure */
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_TIMEOUT), 0);
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_LIMIT), 0);

  /* Out-of-range values are harmless. */
  CHECK_STR_EQ(pc_reason_word(PC_REASON_COUNT), "");
  CHECK_STR_EQ(pc_reason_word((pc_reason_t)-1), "");
  CHECK_INT_EQ(pc_reason_alert(PC_REASON_COUNT), 0);
  CHECK_INT_EQ(pc_reason_alert((pc_reason_t)1000), 0);

  return CHECK_DONE("test_reason");
}

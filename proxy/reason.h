/*
 * reason.h - the fixed set of refusal reasons (DESIGN.md "Decisions").
 *
 * One X-macro table gives each reason its enum value, the word used in logs and
 * metric labels, and the TLS alert sent when the refusal happens during a
 * handshake. Adding a reason means adding one line here and documenting it in
 * the README; the word is part of the public contract.
 */
#ifndef PC_REASON_H
#define PC_REASON_H

#include <stdint.h>

/*   name                word                  TLS alert (RFC 8446 codes) */
#define PC_REASON_TABLE(X)                                                                         \
  X(NONE, "", 0)                                                                                   \
  X(NO_CERT, "no_cert", 116 /* certificate_required */)                                            \
  X(BAD_CHAIN, "bad_chain", 42 /* bad_certificate */)                                              \
  X(EXPIRED, "expired", 45 /* certificate_expired */)                                              \
  X(NO_SPIFFE_ID, "no_spiffe_id", 46 /* certificate_unknown */)                                    \
  X(WRONG_TRUST_DOMAIN, "wrong_trust_domain", 46)                                                  \
  X(NOT_ALLOWED, "not_allowed", 49 /* access_denied */)                                            \
  X(PROTOCOL, "protocol", 70 /* protocol_version */)                                               \
  X(CIPHER, "cipher", 40 /* handshake_failure */)                                                  \
  X(TIMEOUT, "timeout", 0)                                                                         \
  X(LIMIT, "limit", 0)

typedef enum {
#define PC_REASON_ENUM(name, word, alert) PC_REASON_##name,
  PC_REASON_TABLE(PC_REASON_ENUM)
#undef PC_REASON_ENUM
      PC_REASON_COUNT
} pc_reason_t;

/* The reason's word ("" for PC_REASON_NONE). Static storage; any thread. */
const char *pc_reason_word(pc_reason_t r);

/* The TLS alert to send for a refusal decided during the handshake (0: none). */
uint8_t pc_reason_alert(pc_reason_t r);

/* Non-zero if r refuses a peer's identity (its certificate or the policy):
 * a decision "deny" rather than an "error" of the path to it. */
int pc_reason_is_identity(pc_reason_t r);

#endif

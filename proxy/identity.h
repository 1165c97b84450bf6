/*
 * identity.h - SPIFFE IDs: parsing (pure, fuzzable) and extraction from an
 * X.509 leaf following the X509-SVID rules.
 *
 * A workload identity is spiffe://<trust-domain>/ns/<namespace>/sa/<account>.
 * Namespace and service account come from that ID only, never from CN, SNI or
 * anything the peer says outside its certificate.
 */
#ifndef PC_IDENTITY_H
#define PC_IDENTITY_H

#include <stddef.h>

#include <openssl/x509.h>

#include "reason.h"

#define PC_SPIFFE_MAX_ID 2048
#define PC_SPIFFE_MAX_TD 255

/* Views into the string that was parsed; nothing is owned. */
typedef struct {
  const char *td;
  size_t td_len;
  const char *path; /* starts with '/', or empty */
  size_t path_len;
  const char *ns; /* NULL unless the path is exactly /ns/<ns>/sa/<sa> */
  size_t ns_len;
  const char *sa;
  size_t sa_len;
} pc_spiffe_id_t;

/* Parses s[0..len) as a SPIFFE ID: scheme "spiffe", lowercase trust domain of
 * [a-z0-9.-_] (no port, no userinfo, at most 255 bytes), path segments of
 * [a-zA-Z0-9.-_] with no empty, "." or ".." segment and no trailing '/', no
 * query, fragment or percent-encoding, at most 2048 bytes in all. Fills *out
 * with views into s. Returns 0, or -1 if s is not a well-formed SPIFFE ID. */
int pc_spiffe_parse(const char *s, size_t len, pc_spiffe_id_t *out);

/* Non-zero if s[0..len) is a valid trust domain name. */
int pc_spiffe_valid_td(const char *s, size_t len);

/* Non-zero if s[0..len) is a valid single path segment (namespace or account). */
int pc_spiffe_valid_segment(const char *s, size_t len);

/* Checks the X509-SVID leaf rules that chain verification does not: not a CA,
 * no keyCertSign or cRLSign, keyUsage present with digitalSignature, and an
 * extendedKeyUsage, if present, holding both serverAuth and clientAuth. Returns
 * PC_REASON_NONE or PC_REASON_BAD_CHAIN. Pure; any thread. */
pc_reason_t pc_identity_check_leaf(X509 *leaf);

/* Extracts the workload identity of leaf: it must carry exactly one URI SAN,
 * a well-formed SPIFFE ID of the /ns/<ns>/sa/<sa> form (else
 * PC_REASON_NO_SPIFFE_ID) in trust_domain (else PC_REASON_WRONG_TRUST_DOMAIN).
 * On PC_REASON_NONE, and on PC_REASON_WRONG_TRUST_DOMAIN (so that the log can
 * say who was refused), *out_id is a NUL-terminated copy of the ID the caller
 * frees with free(); otherwise *out_id is NULL. */
pc_reason_t pc_identity_from_cert(X509 *leaf, const char *trust_domain, char **out_id);

#endif

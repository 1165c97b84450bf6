#include "identity.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/x509v3.h>

#include "compat.h"

static int td_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

static int seg_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '-' || c == '_';
}

int pc_spiffe_valid_td(const char *s, size_t len) {
  if (len == 0 || len > PC_SPIFFE_MAX_TD) return 0;
  for (size_t i = 0; i < len; i++)
    if (!td_char((unsigned char)s[i])) return 0;
  return 1;
}

int pc_spiffe_valid_segment(const char *s, size_t len) {
  if (len == 0) return 0;
  if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.')) return 0;
  for (size_t i = 0; i < len; i++)
    if (!seg_char((unsigned char)s[i])) return 0;
  return 1;
}

int pc_spiffe_parse(const char *s, size_t len, pc_spiffe_id_t *out) {
  static const char scheme[] = "spiffe://";
  const size_t slen = sizeof(scheme) - 1;
  memset(out, 0, sizeof(*out));
  if (len > PC_SPIFFE_MAX_ID || len <= slen || memcmp(s, scheme, slen) != 0) return -1;
  const char *td = s + slen, *end = s + len;
  const char *slash = memchr(td, '/', (size_t)(end - td));
  size_t td_len = slash ? (size_t)(slash - td) : (size_t)(end - td);
  if (!pc_spiffe_valid_td(td, td_len)) return -1;
  out->td = td;
  out->td_len = td_len;
  if (!slash) return 0;
  /* Walk the path segment by segment; a '/' at the end is an empty segment. */
  const char *p = slash;
  out->path = p;
  out->path_len = (size_t)(end - p);
  const char *seg[5];
  size_t seg_len[5], nseg = 0;
  while (p < end) {
    const char *q = p + 1, *next = memchr(q, '/', (size_t)(end - q));
    size_t n = next ? (size_t)(next - q) : (size_t)(end - q);
    if (!pc_spiffe_valid_segment(q, n)) return -1;
    if (nseg < PC_ARRAY_SIZE(seg)) {
      seg[nseg] = q;
      seg_len[nseg] = n;
    }
    nseg++;
    p = q + n;
  }
  if (nseg == 4 && seg_len[0] == 2 && memcmp(seg[0], "ns", 2) == 0 && seg_len[2] == 2 &&
      memcmp(seg[2], "sa", 2) == 0) {
    out->ns = seg[1];
    out->ns_len = seg_len[1];
    out->sa = seg[3];
    out->sa_len = seg_len[3];
  }
  return 0;
}

pc_reason_t pc_identity_check_leaf(X509 *leaf) {
  uint32_t flags = X509_get_extension_flags(leaf);
  if (flags & EXFLAG_INVALID) return PC_REASON_BAD_CHAIN;
  if (flags & EXFLAG_CA) return PC_REASON_BAD_CHAIN;
  if (!(flags & EXFLAG_KUSAGE)) return PC_REASON_BAD_CHAIN;
  uint32_t ku = X509_get_key_usage(leaf);
  if (!(ku & KU_DIGITAL_SIGNATURE)) return PC_REASON_BAD_CHAIN;
  if (ku & (KU_KEY_CERT_SIGN | KU_CRL_SIGN)) return PC_REASON_BAD_CHAIN;
  /* A workload acts as both TLS client and server: an EKU that allows only
   * one of them marks a certificate that was not issued as an SVID. */
  const uint32_t both = XKU_SSL_SERVER | XKU_SSL_CLIENT;
  if ((flags & EXFLAG_XKUSAGE) && (X509_get_extended_key_usage(leaf) & both) != both)
    return PC_REASON_BAD_CHAIN;
  return PC_REASON_NONE;
}

pc_reason_t pc_identity_from_cert(X509 *leaf, const char *trust_domain, char **out_id) {
  *out_id = NULL;
  GENERAL_NAMES *names = X509_get_ext_d2i(leaf, NID_subject_alt_name, NULL, NULL);
  if (!names) return PC_REASON_NO_SPIFFE_ID;
  const ASN1_IA5STRING *uri = NULL;
  int nuri = 0;
  for (size_t i = 0; i < sk_GENERAL_NAME_num(names); i++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
    if (gn->type == GEN_URI) {
      uri = gn->d.uniformResourceIdentifier;
      nuri++;
    }
  }
  pc_reason_t r = PC_REASON_NONE;
  pc_spiffe_id_t id;
  const char *s = uri ? (const char *)ASN1_STRING_get0_data(uri) : NULL;
  size_t len = uri ? (size_t)ASN1_STRING_length(uri) : 0;
  if (nuri != 1 || memchr(s, '\0', len) || pc_spiffe_parse(s, len, &id) != 0 || !id.ns) {
    r = PC_REASON_NO_SPIFFE_ID;
  } else {
    if (id.td_len != strlen(trust_domain) || memcmp(id.td, trust_domain, id.td_len) != 0)
      r = PC_REASON_WRONG_TRUST_DOMAIN;
    char *copy = pc_malloc(len + 1);
    memcpy(copy, s, len);
    copy[len] = '\0';
    *out_id = copy;
  }
  GENERAL_NAMES_free(names);
  return r;
}

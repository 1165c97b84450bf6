/*
 * fuzz_cert.c - the X509-SVID rules and the SPIFFE ID read from a peer's
 * leaf certificate (identity.h pc_identity_check_leaf and
 * pc_identity_from_cert), on arbitrary DER.
 *
 * Input: one certificate, DER, as a peer's handshake delivers it; it goes
 * through X509_parse_from_buffer as tls.c does, and inputs BoringSSL does not
 * parse end there. Trust domain: cluster.local.
 *
 * The check is against a second reading of the extension values the rules
 * depend on, strictly as DER with CBS, sharing nothing with BoringSSL's
 * X509v3 decoding or identity.c. Whatever the code under test accepts must
 * hold on that reading:
 * - a leaf that passes pc_identity_check_leaf has exactly one keyUsage
 *   extension, a valid BIT STRING with digitalSignature and without
 *   keyCertSign and cRLSign; at most one basicConstraints, without cA TRUE;
 *   at most one extendedKeyUsage, and then one listing serverAuth and
 *   clientAuth;
 * - an ID from pc_identity_from_cert (accepted, or refused for its trust
 *   domain) comes from the only subjectAltName extension, whose GeneralNames
 *   parse whole and hold exactly one uniformResourceIdentifier, byte for
 *   byte the ID; the ID parses as a SPIFFE ID with a namespace and service
 *   account, and its trust domain is ours exactly when the verdict is
 *   PC_REASON_NONE.
 * Verdicts stay in their sets, an ID is returned exactly when one is
 * promised, and everything is freed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bytestring.h>
#include <openssl/nid.h>
#include <openssl/obj.h>
#include <openssl/pool.h>
#include <openssl/x509.h>

#include "identity.h"
#include "reason.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

#define TD "cluster.local"

static const uint8_t oid_server_auth[] = {0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01};
static const uint8_t oid_client_auth[] = {0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02};

/* The extensions of interest: how often each occurs, and its extnValue. */
typedef struct {
  int n_san, n_ku, n_bc, n_eku;
  CBS san, ku, bc, eku;
} exts_t;

#define IS_OID(cbs, oid) CBS_mem_equal(cbs, oid, sizeof(oid))

static void seen(int *count, CBS *keep, const CBS *value) {
  (*count)++;
  *keep = *value;
}

/* The extension list as BoringSSL's certificate parser delimits it. That
 * parser takes some BER in the certificate's outer structure (a primitive
 * tag on the extensions SEQUENCE, a critical BOOLEAN other than 00/FF), so a
 * DER walk of the whole certificate would disagree on inputs no rule here
 * is about; the values the rules read are read again strictly below. */
static void collect(X509 *leaf, exts_t *x) {
  memset(x, 0, sizeof(*x));
  for (int i = 0; i < X509_get_ext_count(leaf); i++) {
    X509_EXTENSION *ext = X509_get_ext(leaf, i);
    const ASN1_OCTET_STRING *v = X509_EXTENSION_get_data(ext);
    CBS value;
    CBS_init(&value, ASN1_STRING_get0_data(v), (size_t)ASN1_STRING_length(v));
    switch (OBJ_obj2nid(X509_EXTENSION_get_object(ext))) {
    case NID_subject_alt_name: seen(&x->n_san, &x->san, &value); break;
    case NID_key_usage: seen(&x->n_ku, &x->ku, &value); break;
    case NID_basic_constraints: seen(&x->n_bc, &x->bc, &value); break;
    case NID_ext_key_usage: seen(&x->n_eku, &x->eku, &value); break;
    default: break;
    }
  }
}

/* Reads a SEQUENCE (OF). BoringSSL's template decoder does not check the
 * constructed bit there (it takes tag 0x10 as well as 0x30); which of the
 * two the bytes say is not what any rule is about. */
static int get_sequence(CBS *in, CBS *out) {
  unsigned tag;
  return CBS_get_any_asn1(in, out, &tag) && (tag == CBS_ASN1_SEQUENCE || tag == 0x10);
}

/* What pc_identity_check_leaf accepting implies. */
static void check_leaf_rules(const exts_t *x) {
  CBS ku = x->ku, bits;
  ASSERT(x->n_ku == 1);
  ASSERT(CBS_get_asn1(&ku, &bits, CBS_ASN1_BITSTRING) && CBS_len(&ku) == 0);
  ASSERT(CBS_is_valid_asn1_bitstring(&bits));
  ASSERT(CBS_asn1_bitstring_has_bit(&bits, 0));  /* digitalSignature */
  ASSERT(!CBS_asn1_bitstring_has_bit(&bits, 5)); /* keyCertSign */
  ASSERT(!CBS_asn1_bitstring_has_bit(&bits, 6)); /* cRLSign */

  ASSERT(x->n_bc <= 1);
  if (x->n_bc) {
    CBS bc = x->bc, seq;
    int ca = 0;
    ASSERT(get_sequence(&bc, &seq) && CBS_len(&bc) == 0);
    if (CBS_peek_asn1_tag(&seq, CBS_ASN1_BOOLEAN)) {
      /* Read as BER: any non-zero byte is TRUE. */
      CBS b;
      ASSERT(CBS_get_asn1(&seq, &b, CBS_ASN1_BOOLEAN));
      for (size_t i = 0; i < CBS_len(&b); i++)
        ca |= CBS_data(&b)[i] != 0;
    }
    ASSERT(!ca);
  }

  ASSERT(x->n_eku <= 1);
  if (x->n_eku) {
    CBS eku = x->eku, seq, oid;
    int server = 0, client = 0;
    ASSERT(get_sequence(&eku, &seq) && CBS_len(&eku) == 0);
    while (CBS_len(&seq)) {
      ASSERT(CBS_get_asn1(&seq, &oid, CBS_ASN1_OBJECT));
      server |= IS_OID(&oid, oid_server_auth);
      client |= IS_OID(&oid, oid_client_auth);
    }
    ASSERT(server && client);
  }
}

/* What an ID from pc_identity_from_cert implies. */
static void check_id(const exts_t *x, const char *id, pc_reason_t r) {
  ASSERT(x->n_san == 1);
  CBS san = x->san, names, name, uri;
  unsigned tag;
  int nuri = 0;
  ASSERT(get_sequence(&san, &names) && CBS_len(&san) == 0);
  while (CBS_len(&names)) {
    ASSERT(CBS_get_any_asn1(&names, &name, &tag));
    if (tag == (CBS_ASN1_CONTEXT_SPECIFIC | 6)) {
      nuri++;
      uri = name;
    }
  }
  ASSERT(nuri == 1);
  size_t n = strlen(id);
  ASSERT(CBS_len(&uri) == n && memcmp(CBS_data(&uri), id, n) == 0);
  pc_spiffe_id_t sid;
  ASSERT(pc_spiffe_parse(id, n, &sid) == 0 && sid.ns && sid.sa);
  int ours = sid.td_len == strlen(TD) && memcmp(sid.td, TD, sid.td_len) == 0;
  ASSERT(ours == (r == PC_REASON_NONE));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  CRYPTO_BUFFER *buf = CRYPTO_BUFFER_new(data, size, NULL);
  ASSERT(buf);
  X509 *leaf = X509_parse_from_buffer(buf);
  CRYPTO_BUFFER_free(buf);
  if (!leaf) return 0;

  exts_t x;
  collect(leaf, &x);

  pc_reason_t lr = pc_identity_check_leaf(leaf);
  ASSERT(lr == PC_REASON_NONE || lr == PC_REASON_BAD_CHAIN);
  if (lr == PC_REASON_NONE) check_leaf_rules(&x);

  char *id = (char *)1; /* must be overwritten either way */
  pc_reason_t r = pc_identity_from_cert(leaf, TD, &id);
  ASSERT(r == PC_REASON_NONE || r == PC_REASON_NO_SPIFFE_ID || r == PC_REASON_WRONG_TRUST_DOMAIN);
  ASSERT((id != NULL) == (r != PC_REASON_NO_SPIFFE_ID));
  if (id) check_id(&x, id, r);
  free(id);
  X509_free(leaf);
  return 0;
}

/*
 * test_identity.c - SPIFFE ID parsing and the X509-SVID leaf rules.
 *
 * Certificates are built in memory with BoringSSL's X509 API, signed, and
 * round-tripped through DER so that the code under test sees what a peer's
 * handshake would hand it. No files.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/mem.h>
#include <openssl/ec_key.h>
#include <openssl/evp.h>
#include <openssl/nid.h>
#include <openssl/obj.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "check.h"
#include "identity.h"
#include "reason.h"

#define TD "cluster.local"

/* Sentinel length: use strlen(s). */
#define Z ((size_t)-1)

typedef struct {
  const char *s;
  size_t len;
  int ok;
  const char *td;   /* expected trust domain when ok */
  const char *path; /* expected path when ok */
  const char *ns;   /* expected namespace when ok, NULL for "not /ns/X/sa/Y" */
  const char *sa;
} parse_case_t;

#define BADN(s, n)                                                                                 \
  { s, n, 0, NULL, NULL, NULL, NULL }
#define BAD(s) BADN(s, Z)

static const parse_case_t parse_cases[] = {
    /* well-formed, /ns/X/sa/Y */
    {"spiffe://cluster.local/ns/web/sa/frontend", Z, 1, TD, "/ns/web/sa/frontend", "web",
     "frontend"},
    {"spiffe://a/ns/b/sa/c", Z, 1, "a", "/ns/b/sa/c", "b", "c"},
    {"spiffe://my-td_1.example.org/ns/A-b_c.d/sa/X.Y-z_0", Z, 1, "my-td_1.example.org",
     "/ns/A-b_c.d/sa/X.Y-z_0", "A-b_c.d", "X.Y-z_0"},
    {"spiffe://cluster.local/ns/...x/sa/..y", Z, 1, TD, "/ns/...x/sa/..y", "...x", "..y"},
    {"spiffe://cluster.local/ns/ns/sa/sa", Z, 1, TD, "/ns/ns/sa/sa", "ns", "sa"},
    /* len shorter than the string: only s[0..len) counts */
    {"spiffe://cluster.local/ns/web/sa/frontendXYZ", 41, 1, TD, "/ns/web/sa/frontend", "web",
     "frontend"},
    {"spiffe://cluster.local/ns/web/sa/front/../x", 38, 1, TD, "/ns/web/sa/front", "web", "front"},
    /* well-formed, other paths: parse succeeds, no ns/sa */
    {"spiffe://cluster.local", Z, 1, TD, "", NULL, NULL},
    {"spiffe://cluster.local/foo", Z, 1, TD, "/foo", NULL, NULL},
    {"spiffe://cluster.local/ns/web", Z, 1, TD, "/ns/web", NULL, NULL},
    {"spiffe://cluster.local/ns/web/sa", Z, 1, TD, "/ns/web/sa", NULL, NULL},
    {"spiffe://cluster.local/ns/web/sa/frontend/extra", Z, 1, TD, "/ns/web/sa/frontend/extra", NULL,
     NULL},
    {"spiffe://cluster.local/ns/web/sa/frontend/a/b/c/d", Z, 1, TD, "/ns/web/sa/frontend/a/b/c/d",
     NULL, NULL},
    {"spiffe://cluster.local/NS/web/SA/frontend", Z, 1, TD, "/NS/web/SA/frontend", NULL, NULL},
    {"spiffe://cluster.local/sa/web/ns/frontend", Z, 1, TD, "/sa/web/ns/frontend", NULL, NULL},
    {"spiffe://cluster.local/x/ns/web/sa/frontend", Z, 1, TD, "/x/ns/web/sa/frontend", NULL, NULL},
    {"spiffe://cluster.local/nsx/web/sa/frontend", Z, 1, TD, "/nsx/web/sa/frontend", NULL, NULL},
    {"spiffe://cluster.local/ns/web/sax/frontend", Z, 1, TD, "/ns/web/sax/frontend", NULL, NULL},

    /* scheme */
    BAD(""),
    BAD("spiffe"),
    BAD("spiffe:"),
    BAD("spiffe:/"),
    BAD("spiffe://"),
    BAD("spiffe:cluster.local/ns/web/sa/x"),
    BAD("spiffe:/cluster.local/ns/web/sa/x"),
    BAD("SPIFFE://cluster.local/ns/web/sa/x"),
    BAD("Spiffe://cluster.local/ns/web/sa/x"),
    BAD("https://cluster.local/ns/web/sa/x"),
    BAD("spiffes://cluster.local/ns/web/sa/x"),
    BAD(" spiffe://cluster.local/ns/web/sa/x"),
    BAD("cluster.local/ns/web/sa/x"),
    /* trust domain */
    BAD("spiffe:///ns/web/sa/x"),
    BAD("spiffe://Cluster.local/ns/web/sa/x"),
    BAD("spiffe://CLUSTER.LOCAL/ns/web/sa/x"),
    BAD("spiffe://cluster.local:8443/ns/web/sa/x"),
    BAD("spiffe://cluster.local:/ns/web/sa/x"),
    BAD("spiffe://user@cluster.local/ns/web/sa/x"),
    BAD("spiffe://user:pw@cluster.local/ns/web/sa/x"),
    BAD("spiffe://@cluster.local/ns/web/sa/x"),
    BAD("spiffe://clu%73ter.local/ns/web/sa/x"),
    BAD("spiffe://[::1]/ns/web/sa/x"),
    BAD("spiffe://cluster local/ns/web/sa/x"),
    BAD("spiffe://cluster.local\\ns\\web"),
    BAD("spiffe://clüster.local/ns/web/sa/x"),
    BAD("spiffe://cluster.local?x=1"),
    BAD("spiffe://cluster.local#x"),
    /* path segments */
    BAD("spiffe://cluster.local/"),
    BAD("spiffe://cluster.local//"),
    BAD("spiffe://cluster.local/ns/web/sa/frontend/"),
    BAD("spiffe://cluster.local//ns/web/sa/frontend"),
    BAD("spiffe://cluster.local/ns//sa/frontend"),
    BAD("spiffe://cluster.local/ns/web/sa//frontend"),
    BAD("spiffe://cluster.local/./ns/web/sa/x"),
    BAD("spiffe://cluster.local/ns/./sa/x"),
    BAD("spiffe://cluster.local/ns/../sa/x"),
    BAD("spiffe://cluster.local/ns/web/sa/.."),
    BAD("spiffe://cluster.local/ns/web/sa/."),
    BAD("spiffe://cluster.local/ns/web/../web/sa/x"),
    BAD("spiffe://cluster.local/ns/w%65b/sa/x"),
    BAD("spiffe://cluster.local/ns/web%2fsa/x"),
    BAD("spiffe://cluster.local/ns/web/sa/x%00"),
    BAD("spiffe://cluster.local/ns/web/sa/x?y=1"),
    BAD("spiffe://cluster.local/ns/web/sa/x?"),
    BAD("spiffe://cluster.local/ns/web/sa/x#frag"),
    BAD("spiffe://cluster.local/ns/web/sa/x#"),
    BAD("spiffe://cluster.local/ns/we b/sa/x"),
    BAD("spiffe://cluster.local/ns/web/sa/x "),
    BAD("spiffe://cluster.local/ns/wéb/sa/x"),
    BAD("spiffe://cluster.local/ns/web;x/sa/y"),
    BAD("spiffe://cluster.local/ns/web/sa/x\n"),
    BAD("spiffe://cluster.local/ns/web:80/sa/x"),
    BAD("spiffe://cluster.local/ns/web@x/sa/y"),
    BAD("spiffe://cluster.local/ns/~web/sa/x"),
    /* NUL bytes (explicit lengths) */
    BADN("spiffe://cluster.local/ns/web/sa/x\0", 35),
    BADN("spiffe://cluster.local/ns/w\0b/sa/x", 34),
    BADN("spiffe://clu\0ter.local/ns/web/sa/x", 34),
    BADN("spiffe://\0", 10),
    BADN("\0spiffe://cluster.local/ns/web/sa/x", 35),
    BADN("spiffe:/\0/cluster.local", 24),
};

static void check_parse_case(size_t idx, const parse_case_t *c) {
  size_t len = c->len == Z ? strlen(c->s) : c->len;
  pc_spiffe_id_t id;
  memset(&id, 0xa5, sizeof(id)); /* parse must overwrite every field */
  int rc = pc_spiffe_parse(c->s, len, &id);
  CHECK_MSG((rc == 0) == c->ok, "case %zu: pc_spiffe_parse(\"%.*s\") = %d, expected %s", idx,
            (int)len, c->s, rc, c->ok ? "0" : "-1");
  if (rc != 0 || !c->ok) return;
  CHECK_MEM_EQ(id.td, id.td_len, c->td);
  CHECK(id.td == c->s + 9);
  if (*c->path)
    CHECK_MEM_EQ(id.path, id.path_len, c->path);
  else
    CHECK_INT_EQ(id.path_len, 0);
  if (c->ns) {
    CHECK_MEM_EQ(id.ns, id.ns_len, c->ns);
    CHECK_MEM_EQ(id.sa, id.sa_len, c->sa);
  } else {
    CHECK_MSG(id.ns == NULL, "case %zu: \"%.*s\" must have no ns", idx, (int)len, c->s);
    CHECK_MSG(id.sa == NULL, "case %zu: \"%.*s\" must have no sa", idx, (int)len, c->s);
  }
}

/* Builds "spiffe://" + td of td_len bytes + path padded with segments so that
 * the whole ID is exactly total bytes (when total is large enough). */
static char *long_id(size_t td_len, size_t total) {
  char *s = malloc(9 + td_len + 12 + total + 1);
  size_t n = 0;
  memcpy(s, "spiffe://", 9);
  n = 9;
  memset(s + n, 'a', td_len);
  n += td_len;
  static const char tail[] = "/ns/web/sa/x";
  memcpy(s + n, tail, sizeof(tail) - 1);
  n += sizeof(tail) - 1;
  /* Extend the last segment: still one valid segment. */
  if (n < total) {
    memset(s + n, 'y', total - n);
    n = total;
  }
  s[n] = '\0';
  return s;
}

static void test_lengths(void) {
  pc_spiffe_id_t id;
  char *s = long_id(PC_SPIFFE_MAX_TD, 300);
  CHECK_INT_EQ(pc_spiffe_parse(s, strlen(s), &id), 0);
  CHECK_INT_EQ(id.td_len, PC_SPIFFE_MAX_TD);
  CHECK(id.ns && id.ns_len == 3);
  free(s);

  s = long_id(PC_SPIFFE_MAX_TD + 1, 300);
  CHECK_INT_EQ(pc_spiffe_parse(s, strlen(s), &id), -1);
  free(s);

  s = long_id(20, PC_SPIFFE_MAX_ID);
  CHECK_INT_EQ(strlen(s), PC_SPIFFE_MAX_ID);
  CHECK_INT_EQ(pc_spiffe_parse(s, strlen(s), &id), 0);
  CHECK(id.sa && id.sa_len == PC_SPIFFE_MAX_ID - (9 + 20 + 11));
  free(s);

  s = long_id(20, PC_SPIFFE_MAX_ID + 1);
  CHECK_INT_EQ(pc_spiffe_parse(s, strlen(s), &id), -1);
  free(s);

  s = long_id(20, 100000);
  CHECK_INT_EQ(pc_spiffe_parse(s, strlen(s), &id), -1);
  free(s);

  /* A trust domain alone, just under and over the ID limit. */
  s = long_id(PC_SPIFFE_MAX_TD, 0);
  s[9 + PC_SPIFFE_MAX_TD] = '\0';
  CHECK_INT_EQ(pc_spiffe_parse(s, strlen(s), &id), 0);
  CHECK_INT_EQ(id.path_len, 0);
  free(s);
}

static void test_valid_td_segment(void) {
  static const struct {
    const char *s;
    int td, seg;
  } cases[] = {
      {"cluster.local", 1, 1},
      {"a", 1, 1},
      {"0-9_a.z", 1, 1},
      {"", 0, 0},
      {".", 1, 0},
      {"..", 1, 0},
      {"...", 1, 1},
      {".hidden", 1, 1},
      {"Cluster", 0, 1},
      {"ABC", 0, 1},
      {"a:1", 0, 0},
      {"a/b", 0, 0},
      {"a%2fb", 0, 0},
      {"a@b", 0, 0},
      {"a b", 0, 0},
      {"a?b", 0, 0},
      {"a#b", 0, 0},
      {"a+b", 0, 0},
      {"a~b", 0, 0},
      {"\xc3\xa9", 0, 0},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    size_t n = strlen(cases[i].s);
    CHECK_MSG(!!pc_spiffe_valid_td(cases[i].s, n) == cases[i].td, "valid_td(\"%s\") != %d",
              cases[i].s, cases[i].td);
    CHECK_MSG(!!pc_spiffe_valid_segment(cases[i].s, n) == cases[i].seg,
              "valid_segment(\"%s\") != %d", cases[i].s, cases[i].seg);
  }
  /* Embedded NUL, explicit length. */
  CHECK(!pc_spiffe_valid_td("a\0b", 3));
  CHECK(!pc_spiffe_valid_segment("a\0b", 3));
  /* Length limits: the trust domain has one, a segment alone does not. */
  char buf[PC_SPIFFE_MAX_TD + 2];
  memset(buf, 'a', sizeof(buf));
  CHECK(pc_spiffe_valid_td(buf, PC_SPIFFE_MAX_TD));
  CHECK(!pc_spiffe_valid_td(buf, PC_SPIFFE_MAX_TD + 1));
  CHECK(pc_spiffe_valid_segment(buf, PC_SPIFFE_MAX_TD + 1));
  /* Only the first len bytes are looked at. */
  CHECK(pc_spiffe_valid_td("ab:", 2));
  CHECK(pc_spiffe_valid_segment("ab/", 2));
}

/* --- certificates ------------------------------------------------------ */

static EVP_PKEY *test_key;

static EVP_PKEY *make_key(void) {
  EC_KEY *ec = EC_KEY_new_by_curve_name(NID_X9_62_prime256v1);
  if (!ec || !EC_KEY_generate_key(ec)) abort();
  EVP_PKEY *k = EVP_PKEY_new();
  if (!k || !EVP_PKEY_assign_EC_KEY(k, ec)) abort();
  return k;
}

/* A v3 certificate with subject/issuer CN=test and a one-day validity; no
 * extensions yet. */
static X509 *cert_new(void) {
  X509 *x = X509_new();
  if (!x || !X509_set_version(x, X509_VERSION_3)) abort();
  ASN1_INTEGER_set(X509_get_serialNumber(x), 42);
  X509_NAME *name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const uint8_t *)"test", -1, -1, 0);
  X509_set_issuer_name(x, name);
  X509_gmtime_adj(X509_getm_notBefore(x), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x), 86400);
  X509_set_pubkey(x, test_key);
  return x;
}

static void add_name(GENERAL_NAMES *names, int type, const char *s, size_t len) {
  GENERAL_NAME *gn = GENERAL_NAME_new();
  ASN1_IA5STRING *str = ASN1_IA5STRING_new();
  if (!gn || !str || !ASN1_STRING_set(str, s, (int)len)) abort();
  GENERAL_NAME_set0_value(gn, type, str);
  sk_GENERAL_NAME_push(names, gn);
}

/* Adds a subjectAltName with the given URIs (NULL-terminated list) and,
 * optionally, one DNS name. */
static void add_san(X509 *x, const char *const *uris, const char *dns) {
  GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();
  if (dns) add_name(names, GEN_DNS, dns, strlen(dns));
  for (; uris && *uris; uris++)
    add_name(names, GEN_URI, *uris, strlen(*uris));
  if (!X509_add1_ext_i2d(x, NID_subject_alt_name, names, 0, X509V3_ADD_APPEND)) abort();
  GENERAL_NAMES_free(names);
}

static void add_san_bytes(X509 *x, const char *uri, size_t len) {
  GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();
  add_name(names, GEN_URI, uri, len);
  if (!X509_add1_ext_i2d(x, NID_subject_alt_name, names, 0, X509V3_ADD_APPEND)) abort();
  GENERAL_NAMES_free(names);
}

static void add_bc(X509 *x, int ca) {
  BASIC_CONSTRAINTS *bc = BASIC_CONSTRAINTS_new();
  bc->ca = ca ? 0xff : 0;
  if (!X509_add1_ext_i2d(x, NID_basic_constraints, bc, 1, X509V3_ADD_APPEND)) abort();
  BASIC_CONSTRAINTS_free(bc);
}

enum {
  KU_BIT_DIGITAL_SIGNATURE = 0,
  KU_BIT_KEY_ENCIPHERMENT = 2,
  KU_BIT_KEY_AGREEMENT = 4,
  KU_BIT_KEY_CERT_SIGN = 5,
  KU_BIT_CRL_SIGN = 6,
};
#define KU(bit) (1u << (bit))

static void add_ku(X509 *x, unsigned bits) {
  ASN1_BIT_STRING *bs = ASN1_BIT_STRING_new();
  for (int i = 0; i < 9; i++)
    if (bits & (1u << i)) ASN1_BIT_STRING_set_bit(bs, i, 1);
  if (!X509_add1_ext_i2d(x, NID_key_usage, bs, 1, X509V3_ADD_APPEND)) abort();
  ASN1_BIT_STRING_free(bs);
}

static void add_eku(X509 *x, int server, int client) {
  EXTENDED_KEY_USAGE *eku = sk_ASN1_OBJECT_new_null();
  if (server) sk_ASN1_OBJECT_push(eku, OBJ_nid2obj(NID_server_auth));
  if (client) sk_ASN1_OBJECT_push(eku, OBJ_nid2obj(NID_client_auth));
  if (!X509_add1_ext_i2d(x, NID_ext_key_usage, eku, 0, X509V3_ADD_APPEND)) abort();
  sk_ASN1_OBJECT_free(eku);
}

/* An extension whose value is not valid DER for its type. */
static void add_raw_ext(X509 *x, int nid, const uint8_t *der, size_t len) {
  ASN1_OCTET_STRING *os = ASN1_OCTET_STRING_new();
  if (!os || !ASN1_OCTET_STRING_set(os, der, (int)len)) abort();
  X509_EXTENSION *ext = X509_EXTENSION_create_by_NID(NULL, nid, 0, os);
  if (!ext || !X509_add_ext(x, ext, -1)) abort();
  X509_EXTENSION_free(ext);
  ASN1_OCTET_STRING_free(os);
}

/* Signs x, frees it, and returns the certificate parsed back from DER. */
static X509 *cert_finish(X509 *x) {
  if (!X509_sign(x, test_key, EVP_sha256())) abort();
  uint8_t *der = NULL;
  int len = i2d_X509(x, &der);
  X509_free(x);
  if (len <= 0) abort();
  const uint8_t *p = der;
  X509 *y = d2i_X509(NULL, &p, len);
  OPENSSL_free(der);
  if (!y) abort();
  return y;
}

/* A good SVID leaf with the given URI SANs. */
static X509 *svid(const char *const *uris) {
  X509 *x = cert_new();
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  if (uris) add_san(x, uris, NULL);
  return cert_finish(x);
}

#define URIS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* Runs pc_identity_from_cert and checks the reason and the ID handed back:
 * the ID when allowed or in the wrong trust domain (for the log), else NULL. */
static void expect_id(const char *what, X509 *x, const char *td, pc_reason_t want,
                      const char *want_id) {
  static char sentinel[] = "sentinel";
  char *id = sentinel;
  pc_reason_t r = pc_identity_from_cert(x, td, &id);
  CHECK_MSG(r == want, "%s: pc_identity_from_cert = %s (%d), expected %s (%d)", what,
            pc_reason_word(r), (int)r, pc_reason_word(want), (int)want);
  if (want == PC_REASON_NONE || want == PC_REASON_WRONG_TRUST_DOMAIN)
    CHECK_STR_EQ(id, want_id);
  else
    CHECK_MSG(id == NULL, "%s: out_id must be NULL on a refusal", what);
  if (id != sentinel) free(id);
  X509_free(x);
}

static void test_from_cert(void) {
  const char *good = "spiffe://cluster.local/ns/web/sa/frontend";

  expect_id("one URI SAN", svid(URIS(good)), TD, PC_REASON_NONE, good);
  expect_id("two URI SANs", svid(URIS(good, good)), TD, PC_REASON_NO_SPIFFE_ID, NULL);
  expect_id("two URI SANs, other first", svid(URIS("spiffe://cluster.local/ns/evil/sa/x", good)),
            TD, PC_REASON_NO_SPIFFE_ID, NULL);
  expect_id("URI SAN plus https URI", svid(URIS(good, "https://example.com/")), TD,
            PC_REASON_NO_SPIFFE_ID, NULL);
  expect_id("no SAN", svid(NULL), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  X509 *x = cert_new();
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  add_san(x, NULL, "web.cluster.local");
  expect_id("DNS-only SAN", cert_finish(x), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  x = cert_new();
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  add_san(x, URIS(good), "web.cluster.local");
  expect_id("DNS + one URI SAN", cert_finish(x), TD, PC_REASON_NONE, good);

  /* The identity comes from the SAN only, never from the subject CN. */
  x = cert_new();
  X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC, (const uint8_t *)good,
                             -1, -1, 0);
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  expect_id("ID in CN only", cert_finish(x), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  /* Trust domain. */
  expect_id("other trust domain", svid(URIS("spiffe://other.local/ns/web/sa/frontend")), TD,
            PC_REASON_WRONG_TRUST_DOMAIN, "spiffe://other.local/ns/web/sa/frontend");
  expect_id("trust domain with suffix", svid(URIS("spiffe://cluster.local.evil/ns/web/sa/x")), TD,
            PC_REASON_WRONG_TRUST_DOMAIN, "spiffe://cluster.local.evil/ns/web/sa/x");
  expect_id("trust domain prefix only", svid(URIS("spiffe://cluster.loca/ns/web/sa/x")), TD,
            PC_REASON_WRONG_TRUST_DOMAIN, "spiffe://cluster.loca/ns/web/sa/x");
  expect_id("trust domain sub-domain", svid(URIS("spiffe://a.cluster.local/ns/web/sa/x")), TD,
            PC_REASON_WRONG_TRUST_DOMAIN, "spiffe://a.cluster.local/ns/web/sa/x");
  expect_id("configured trust domain longer", svid(URIS(good)), "cluster.local2",
            PC_REASON_WRONG_TRUST_DOMAIN, good);

  /* Malformed or not of the /ns/X/sa/Y form. */
  static const char *const malformed[] = {
      "spiffe://Cluster.local/ns/web/sa/frontend",
      "spiffe://cluster.local:443/ns/web/sa/frontend",
      "spiffe://u@cluster.local/ns/web/sa/frontend",
      "spiffe://cluster.local/ns/web/sa/frontend/",
      "spiffe://cluster.local/ns/../sa/frontend",
      "spiffe://cluster.local/ns/w%65b/sa/frontend",
      "spiffe://cluster.local/ns/web/sa/frontend?x",
      "spiffe://cluster.local/ns/web/sa/frontend#x",
      "SPIFFE://cluster.local/ns/web/sa/frontend",
      "https://cluster.local/ns/web/sa/frontend",
      "spiffe://cluster.local",
      "spiffe://cluster.local/web",
      "spiffe://cluster.local/ns/web",
      "spiffe://cluster.local/ns/web/sa/frontend/x",
      "",
  };
  for (size_t i = 0; i < sizeof(malformed) / sizeof(malformed[0]); i++)
    expect_id(malformed[i], svid(URIS(malformed[i])), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  /* Embedded NUL: the C string would read as the good ID. */
  static const char nul_id[] = "spiffe://cluster.local/ns/web/sa/frontend\0.evil";
  x = cert_new();
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  add_san_bytes(x, nul_id, sizeof(nul_id) - 1);
  expect_id("NUL inside URI SAN", cert_finish(x), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  /* Two subjectAltName extensions, one URI each: still two URIs. */
  x = cert_new();
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  add_san(x, URIS(good), NULL);
  add_san(x, URIS("spiffe://cluster.local/ns/evil/sa/x"), NULL);
  expect_id("two SAN extensions", cert_finish(x), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  /* A subjectAltName that is not valid DER. */
  static const uint8_t bad_der[] = {0x30, 0x10, 0x86, 0x05, 's', 'p'};
  x = cert_new();
  add_bc(x, 0);
  add_ku(x, KU(KU_BIT_DIGITAL_SIGNATURE));
  add_raw_ext(x, NID_subject_alt_name, bad_der, sizeof(bad_der));
  expect_id("SAN not DER", cert_finish(x), TD, PC_REASON_NO_SPIFFE_ID, NULL);

  /* The largest ID allowed. */
  char longest[PC_SPIFFE_MAX_ID + 1];
  memset(longest, 'y', sizeof(longest));
  memcpy(longest, "spiffe://cluster.local/ns/web/sa/", 33);
  longest[PC_SPIFFE_MAX_ID] = '\0';
  expect_id("2048-byte ID", svid(URIS(longest)), TD, PC_REASON_NONE, longest);
  longest[PC_SPIFFE_MAX_ID] = 'y';
  char over[PC_SPIFFE_MAX_ID + 2];
  memcpy(over, longest, PC_SPIFFE_MAX_ID + 1);
  over[PC_SPIFFE_MAX_ID + 1] = '\0';
  expect_id("2049-byte ID", svid(URIS(over)), TD, PC_REASON_NO_SPIFFE_ID, NULL);
}

/* Builds a leaf with a SPIFFE ID and the given constraints. ca: -1 no
 * basicConstraints, 0 CA:FALSE, 1 CA:TRUE. ku: -1 no keyUsage, else bits. */
static X509 *leaf(int ca, long ku) {
  X509 *x = cert_new();
  if (ca >= 0) add_bc(x, ca);
  if (ku >= 0) add_ku(x, (unsigned)ku);
  add_san(x, URIS("spiffe://cluster.local/ns/web/sa/frontend"), NULL);
  return cert_finish(x);
}

static void expect_leaf(const char *what, X509 *x, pc_reason_t want) {
  pc_reason_t r = pc_identity_check_leaf(x);
  CHECK_MSG(r == want, "%s: pc_identity_check_leaf = %s (%d), expected %s (%d)", what,
            pc_reason_word(r), (int)r, pc_reason_word(want), (int)want);
  X509_free(x);
}

static void test_check_leaf(void) {
  const long ds = KU(KU_BIT_DIGITAL_SIGNATURE);
  expect_leaf("digitalSignature, CA:FALSE", leaf(0, ds), PC_REASON_NONE);
  expect_leaf("digitalSignature, no basicConstraints", leaf(-1, ds), PC_REASON_NONE);
  expect_leaf("digitalSignature + keyEncipherment", leaf(0, ds | KU(KU_BIT_KEY_ENCIPHERMENT)),
              PC_REASON_NONE);
  expect_leaf("digitalSignature + keyAgreement", leaf(0, ds | KU(KU_BIT_KEY_AGREEMENT)),
              PC_REASON_NONE);
  expect_leaf("CA:TRUE leaf", leaf(1, ds), PC_REASON_BAD_CHAIN);
  expect_leaf("CA:TRUE + keyCertSign", leaf(1, ds | KU(KU_BIT_KEY_CERT_SIGN)), PC_REASON_BAD_CHAIN);
  expect_leaf("keyCertSign", leaf(0, ds | KU(KU_BIT_KEY_CERT_SIGN)), PC_REASON_BAD_CHAIN);
  expect_leaf("keyCertSign, no basicConstraints", leaf(-1, ds | KU(KU_BIT_KEY_CERT_SIGN)),
              PC_REASON_BAD_CHAIN);
  expect_leaf("cRLSign", leaf(0, ds | KU(KU_BIT_CRL_SIGN)), PC_REASON_BAD_CHAIN);
  expect_leaf("missing keyUsage", leaf(0, -1), PC_REASON_BAD_CHAIN);
  expect_leaf("keyUsage without digitalSignature", leaf(0, KU(KU_BIT_KEY_ENCIPHERMENT)),
              PC_REASON_BAD_CHAIN);
  expect_leaf("empty keyUsage", leaf(0, 0), PC_REASON_BAD_CHAIN);

  /* EKU with both purposes is fine. */
  X509 *x = cert_new();
  add_bc(x, 0);
  add_ku(x, (unsigned)ds);
  add_eku(x, 1, 1);
  expect_leaf("EKU serverAuth + clientAuth", cert_finish(x), PC_REASON_NONE);

  /* Two keyUsage extensions: ambiguous, so invalid. */
  x = cert_new();
  add_bc(x, 0);
  add_ku(x, (unsigned)ds);
  add_ku(x, (unsigned)ds);
  expect_leaf("two keyUsage extensions", cert_finish(x), PC_REASON_BAD_CHAIN);

  /* keyUsage / basicConstraints that do not parse. */
  static const uint8_t junk[] = {0x04, 0x7f, 0x00};
  x = cert_new();
  add_bc(x, 0);
  add_raw_ext(x, NID_key_usage, junk, sizeof(junk));
  expect_leaf("keyUsage not DER", cert_finish(x), PC_REASON_BAD_CHAIN);
  x = cert_new();
  add_raw_ext(x, NID_basic_constraints, junk, sizeof(junk));
  add_ku(x, (unsigned)ds);
  expect_leaf("basicConstraints not DER", cert_finish(x), PC_REASON_BAD_CHAIN);
}

int main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  for (size_t i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++)
    check_parse_case(i, &parse_cases[i]);
  test_lengths();
  test_valid_td_segment();

  test_key = make_key();
  test_from_cert();
  test_check_leaf();
  EVP_PKEY_free(test_key);
  return CHECK_DONE("test_identity");
}

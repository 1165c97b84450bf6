#include "certstore.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/mem.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509v3.h>

#include "compat.h"
#include "identity.h"

/* Identity files are small; anything bigger is not a certificate set. */
#define MAX_FILE (1 << 20)

typedef struct {
  char *data;
  size_t len;
} blob_t;

static void blob_free(blob_t *b) {
  if (b->data) OPENSSL_cleanse(b->data, b->len);
  free(b->data);
  b->data = NULL;
  b->len = 0;
}

/* Reads a whole file (through symlinks). Returns 0, or -1 with errno set. */
static int read_file(const char *path, blob_t *out) {
  FILE *f = fopen(path, "rb");
  out->data = NULL;
  out->len = 0;
  if (!f) return -1;
  size_t cap = 0;
  for (;;) {
    if (out->len == cap) {
      if (cap >= MAX_FILE) {
        fclose(f);
        blob_free(out);
        errno = EFBIG;
        return -1;
      }
      cap = cap ? cap * 2 : 8192;
      out->data = pc_realloc(out->data, cap);
    }
    size_t n = fread(out->data + out->len, 1, cap - out->len, f);
    out->len += n;
    if (n == 0) break;
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    blob_free(out);
    errno = EIO;
    return -1;
  }
  return 0;
}

/* Every certificate in a PEM blob; NULL if it holds none. */
static STACK_OF(X509) * parse_certs(const blob_t *b) {
  BIO *bio = BIO_new_mem_buf(b->data, (int)b->len);
  if (!bio) pc_fatal("out of memory");
  STACK_OF(X509) *sk = sk_X509_new_null();
  X509 *x;
  while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
    if (!sk_X509_push(sk, x)) pc_fatal("out of memory");
  }
  BIO_free(bio);
  ERR_clear_error(); /* the loop ends on an expected "no start line" */
  if (sk_X509_num(sk) == 0) {
    sk_X509_free(sk);
    return NULL;
  }
  return sk;
}

static int pass_cb(char *buf, int size, int rwflag, void *u) {
  const blob_t *pass = u;
  if (!pass || !pass->data || (int)pass->len >= size) return 0;
  memcpy(buf, pass->data, pass->len);
  return (int)pass->len;
}

static const char *ssl_err(void) {
  static _Thread_local char buf[256];
  unsigned long e = ERR_get_error();
  if (!e) return "unknown error";
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

static void hash_blobs(const blob_t *b, size_t n, uint8_t out[32]) {
  SHA256_CTX h;
  SHA256_Init(&h);
  for (size_t i = 0; i < n; i++) {
    uint64_t len = b[i].len; /* length-prefixed: moving bytes between files changes the hash */
    SHA256_Update(&h, &len, sizeof(len));
    if (b[i].len) SHA256_Update(&h, b[i].data, b[i].len);
  }
  SHA256_Final(out, &h);
}

enum { F_CERT, F_KEY, F_CA, F_PASS, F_COUNT };

static int read_all(const pc_config_t *cfg, blob_t b[F_COUNT], char *err, size_t errlen) {
  const struct {
    const char *path, *name;
    int line;
  } files[F_COUNT] = {
      {cfg->identity.cert, "identity.cert", cfg->identity.line_cert},
      {cfg->identity.key, "identity.key", cfg->identity.line_key},
      {cfg->identity.ca, "identity.ca", cfg->identity.line_ca},
      {cfg->identity.key_passphrase_file, "identity.key_passphrase_file", cfg->identity.line_pass},
  };
  memset(b, 0, sizeof(blob_t) * F_COUNT);
  for (int i = 0; i < F_COUNT; i++) {
    if (!files[i].path) continue;
    if (read_file(files[i].path, &b[i]) != 0) {
      if (err)
        snprintf(err, errlen, "%s:%d: %s: cannot read \"%s\": %s", cfg->file, files[i].line,
                 files[i].name, files[i].path, strerror(errno));
      for (int j = 0; j < i; j++)
        blob_free(&b[j]);
      return -1;
    }
  }
  return 0;
}

int pc_certs_digest(const pc_config_t *cfg, uint8_t out[32]) {
  blob_t b[F_COUNT];
  if (read_all(cfg, b, NULL, 0) != 0) return -1;
  hash_blobs(b, F_COUNT, out);
  for (int i = 0; i < F_COUNT; i++)
    blob_free(&b[i]);
  return 0;
}

void pc_certs_serial(X509 *x, char *out, size_t n) {
  BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(x), NULL);
  char *hex = bn ? BN_bn2hex(bn) : NULL;
  snprintf(out, n, "%s", hex ? hex : "?");
  for (char *p = out; *p; p++)
    if (*p >= 'a' && *p <= 'f') *p = (char)(*p - 'a' + 'A');
  OPENSSL_free(hex);
  BN_free(bn);
}

int pc_certs_verify_chain(X509_STORE *store, X509 *leaf, STACK_OF(X509) * chain, int as_server,
                          int depth, time_t *from, time_t *until) {
  X509_STORE_CTX *xc = X509_STORE_CTX_new();
  if (!xc || !X509_STORE_CTX_init(xc, store, leaf, chain)) pc_fatal("out of memory");
  X509_STORE_CTX_set_default(xc, as_server ? "ssl_server" : "ssl_client");
  X509_VERIFY_PARAM_set_depth(X509_STORE_CTX_get0_param(xc), depth);
  int verr = X509_verify_cert(xc) == 1 ? X509_V_OK : X509_STORE_CTX_get_error(xc);
  if (verr == X509_V_OK && (from || until)) {
    time_t nb = 0, na = 0;
    STACK_OF(X509) *path = X509_STORE_CTX_get0_chain(xc);
    for (size_t i = 0; path && i < sk_X509_num(path); i++) {
      time_t b = pc_certs_time(X509_get0_notBefore(sk_X509_value(path, i)));
      time_t a = pc_certs_time(X509_get0_notAfter(sk_X509_value(path, i)));
      if (b > nb) nb = b;
      if (a && (!na || a < na)) na = a;
    }
    if (from) *from = nb;
    if (until) *until = na;
  }
  X509_STORE_CTX_free(xc);
  ERR_clear_error();
  return verr;
}

time_t pc_certs_time(const ASN1_TIME *t) {
  int days = 0, secs = 0;
  return ASN1_TIME_diff(&days, &secs, NULL, t) ? time(NULL) + days * 86400L + secs : 0;
}

int pc_certs_load(const pc_config_t *cfg, pc_certs_t **out, char *err, size_t errlen) {
  const char *file = cfg->file;
  blob_t b[F_COUNT];
  int rc = -1;
  *out = NULL;
  if (read_all(cfg, b, err, errlen) != 0) return -1;
  pc_certs_t *c = pc_calloc(1, sizeof(*c));
  hash_blobs(b, F_COUNT, c->digest);
  if (b[F_PASS].data) {
    /* A trailing newline is an artefact of how the file was written. */
    while (b[F_PASS].len &&
           (b[F_PASS].data[b[F_PASS].len - 1] == '\n' || b[F_PASS].data[b[F_PASS].len - 1] == '\r'))
      b[F_PASS].len--;
  }

  STACK_OF(X509) *certs = parse_certs(&b[F_CERT]);
  if (!certs) {
    snprintf(err, errlen, "%s:%d: identity.cert: no PEM certificate in \"%s\"", file,
             cfg->identity.line_cert, cfg->identity.cert);
    goto fail;
  }
  c->leaf = sk_X509_shift(certs);
  c->chain = certs;
  pc_certs_serial(c->leaf, c->serial, sizeof(c->serial));

  BIO *kb = BIO_new_mem_buf(b[F_KEY].data, (int)b[F_KEY].len);
  if (!kb) pc_fatal("out of memory");
  c->key = PEM_read_bio_PrivateKey(kb, NULL, pass_cb, b[F_PASS].data ? &b[F_PASS] : NULL);
  BIO_free(kb);
  if (!c->key) {
    snprintf(err, errlen, "%s:%d: identity.key: no usable private key in \"%s\" (%s%s)", file,
             cfg->identity.line_key, cfg->identity.key,
             b[F_PASS].data ? "wrong passphrase or " : "", ssl_err());
    goto fail;
  }
  if (!X509_check_private_key(c->leaf, c->key)) {
    ERR_clear_error();
    snprintf(err, errlen, "%s:%d: identity.key: key in \"%s\" does not match certificate \"%s\"",
             file, cfg->identity.line_key, cfg->identity.key, cfg->identity.cert);
    rc = PC_CERTS_MISMATCH;
    goto fail;
  }

  c->bundle = parse_certs(&b[F_CA]);
  if (!c->bundle) {
    snprintf(err, errlen, "%s:%d: identity.ca: no PEM certificate in \"%s\"", file,
             cfg->identity.line_ca, cfg->identity.ca);
    goto fail;
  }
  c->store = X509_STORE_new();
  if (!c->store) pc_fatal("out of memory");
  for (size_t i = 0; i < sk_X509_num(c->bundle); i++) {
    X509 *ca = sk_X509_value(c->bundle, i);
    if (!(X509_get_extension_flags(ca) & EXFLAG_CA)) {
      snprintf(err, errlen, "%s:%d: identity.ca: certificate %zu in \"%s\" is not a CA", file,
               cfg->identity.line_ca, i + 1, cfg->identity.ca);
      goto fail;
    }
    X509_STORE_add_cert(c->store, ca);
  }
  ERR_clear_error();

  pc_reason_t r = pc_identity_from_cert(c->leaf, cfg->trust_domain, &c->spiffe_id);
  if (r != PC_REASON_NONE) {
    free(c->spiffe_id);
    c->spiffe_id = NULL;
  }
  if (r == PC_REASON_NONE) r = pc_identity_check_leaf(c->leaf);
  if (r != PC_REASON_NONE) {
    snprintf(err, errlen,
             "%s:%d: identity.cert: \"%s\" is not a usable workload certificate for trust "
             "domain \"%s\" (%s)",
             file, cfg->identity.line_cert, cfg->identity.cert, cfg->trust_domain,
             pc_reason_word(r));
    goto fail;
  }

  /* Our own chain must verify for both roles we play: server for inbound,
   * client for outbound; peers would refuse it otherwise. */
  for (int as_server = 1; as_server >= 0; as_server--) {
    int verr = pc_certs_verify_chain(c->store, c->leaf, c->chain, as_server, cfg->tls.verify_depth,
                                     NULL, NULL);
    if (verr != X509_V_OK) {
      snprintf(err, errlen, "%s:%d: identity.cert: \"%s\" does not verify against \"%s\" as %s: %s",
               file, cfg->identity.line_cert, cfg->identity.cert, cfg->identity.ca,
               as_server ? "server" : "client", X509_verify_cert_error_string(verr));
      goto fail;
    }
  }
  c->not_after = pc_certs_time(X509_get0_notAfter(c->leaf));
  for (int i = 0; i < F_COUNT; i++)
    blob_free(&b[i]);
  *out = c;
  return 0;
fail:
  for (int i = 0; i < F_COUNT; i++)
    blob_free(&b[i]);
  pc_certs_free(c);
  return rc;
}

void pc_certs_free(pc_certs_t *c) {
  if (!c) return;
  X509_free(c->leaf);
  sk_X509_pop_free(c->chain, X509_free);
  EVP_PKEY_free(c->key);
  sk_X509_pop_free(c->bundle, X509_free);
  X509_STORE_free(c->store);
  free(c->spiffe_id);
  free(c);
}

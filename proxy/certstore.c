#include "certstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "compat.h"
#include "identity.h"

/* Reads every certificate in a PEM file; NULL if the file holds none. */
static STACK_OF(X509) * read_certs(const char *file) {
  FILE *f = fopen(file, "r");
  if (!f) return NULL;
  STACK_OF(X509) *sk = sk_X509_new_null();
  X509 *x;
  while ((x = PEM_read_X509(f, NULL, NULL, NULL)) != NULL) {
    if (!sk_X509_push(sk, x)) pc_fatal("out of memory");
  }
  fclose(f);
  ERR_clear_error(); /* the loop ends on an expected "no start line" */
  if (sk_X509_num(sk) == 0) {
    sk_X509_free(sk);
    return NULL;
  }
  return sk;
}

static const char *ssl_err(void) {
  static _Thread_local char buf[256];
  unsigned long e = ERR_get_error();
  if (!e) return "unknown error";
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

int pc_certs_load(const pc_config_t *cfg, pc_certs_t **out, char *err, size_t errlen) {
  const char *file = cfg->file;
  pc_certs_t *c = pc_calloc(1, sizeof(*c));
  *out = NULL;
  STACK_OF(X509) *certs = read_certs(cfg->identity.cert);
  if (!certs) {
    snprintf(err, errlen, "%s:%d: identity.cert: no PEM certificate in \"%s\"", file,
             cfg->identity.line_cert, cfg->identity.cert);
    goto fail;
  }
  c->leaf = sk_X509_shift(certs);
  c->chain = certs;

  FILE *f = fopen(cfg->identity.key, "r");
  c->key = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
  if (f) fclose(f);
  if (!c->key) {
    snprintf(err, errlen, "%s:%d: identity.key: no usable private key in \"%s\" (%s)", file,
             cfg->identity.line_key, cfg->identity.key, ssl_err());
    goto fail;
  }
  if (!X509_check_private_key(c->leaf, c->key)) {
    ERR_clear_error();
    snprintf(err, errlen, "%s:%d: identity.key: key in \"%s\" does not match certificate \"%s\"",
             file, cfg->identity.line_key, cfg->identity.key, cfg->identity.cert);
    goto fail;
  }

  c->bundle = read_certs(cfg->identity.ca);
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
  static const char *const roles[] = {"ssl_server", "ssl_client"};
  for (size_t i = 0; i < PC_ARRAY_SIZE(roles); i++) {
    X509_STORE_CTX *xc = X509_STORE_CTX_new();
    if (!xc || !X509_STORE_CTX_init(xc, c->store, c->leaf, c->chain)) pc_fatal("out of memory");
    X509_STORE_CTX_set_default(xc, roles[i]);
    X509_VERIFY_PARAM_set_depth(X509_STORE_CTX_get0_param(xc), cfg->tls.verify_depth);
    int ok = X509_verify_cert(xc);
    int verr = X509_STORE_CTX_get_error(xc);
    X509_STORE_CTX_free(xc);
    ERR_clear_error();
    if (ok != 1) {
      snprintf(err, errlen, "%s:%d: identity.cert: \"%s\" does not verify against \"%s\" as %s: %s",
               file, cfg->identity.line_cert, cfg->identity.cert, cfg->identity.ca,
               i == 0 ? "server" : "client", X509_verify_cert_error_string(verr));
      goto fail;
    }
  }
  const ASN1_TIME *na = X509_get0_notAfter(c->leaf);
  int days = 0, secs = 0;
  c->not_after = ASN1_TIME_diff(&days, &secs, NULL, na) ? time(NULL) + days * 86400L + secs : 0;
  *out = c;
  return 0;
fail:
  pc_certs_free(c);
  return -1;
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

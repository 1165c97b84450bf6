/*
 * certstore.h - this workload's identity material: certificate chain, private
 * key and trust bundle, loaded from the files named in the config and
 * validated before anything uses them.
 *
 * A pc_certs_t is immutable once loaded and is owned by one generation
 * (gen.h). Loading validates: the key matches the leaf, the leaf is valid now,
 * carries exactly one SPIFFE ID in the trust domain and follows the SVID leaf
 * rules, and the chain verifies against the bundle. Any thread.
 */
#ifndef PC_CERTSTORE_H
#define PC_CERTSTORE_H

#include <stddef.h>
#include <time.h>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "config.h"

typedef struct {
  X509 *leaf;
  STACK_OF(X509) * chain; /* intermediates sent after the leaf; may be empty */
  EVP_PKEY *key;
  STACK_OF(X509) * bundle; /* trust anchors */
  X509_STORE *store;       /* built from bundle; shared read-only by workers */
  char *spiffe_id;
  time_t not_after;
} pc_certs_t;

/* Loads and validates cfg->identity. Returns 0 and *out, or -1 with one line
 * "FILE:LINE: identity.X: what is wrong" in err. */
int pc_certs_load(const pc_config_t *cfg, pc_certs_t **out, char *err, size_t errlen);

void pc_certs_free(pc_certs_t *c);

#endif

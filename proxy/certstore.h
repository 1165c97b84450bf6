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
#include <stdint.h>
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
  char serial[80];    /* leaf serial, uppercase hex without colons */
  uint8_t digest[32]; /* SHA-256 over the files' bytes: "did anything change?" */
} pc_certs_t;

/* pc_certs_load's result when the key does not match the certificate: during
 * an in-place rotation this is a half-written set, worth retrying shortly. */
#define PC_CERTS_MISMATCH (-2)

/* Loads and validates cfg->identity (following symlinks; the files are read
 * once into memory, so a rotation in progress is seen as one snapshot per
 * file). Returns 0 and *out, or -1 / PC_CERTS_MISMATCH with one line
 * "FILE:LINE: identity.X: what is wrong" in err. The passphrase, if any, is
 * wiped from memory after use and never written to err. */
int pc_certs_load(const pc_config_t *cfg, pc_certs_t **out, char *err, size_t errlen);

/* Verifies leaf (with the untrusted chain) against store for a TLS role:
 * as_server requires a certificate usable by a TLS server, otherwise by a
 * client; at most depth intermediates. Returns X509_V_OK or the
 * X509_V_ERR_* code. On success, *from and *until (either may be NULL) get
 * the window in which every certificate of the verified path is valid: the
 * latest notBefore and the earliest notAfter, trust-bundle certificates the
 * peer did not send included. Any thread (the store is shared read-only). */
int pc_certs_verify_chain(X509_STORE *store, X509 *leaf, STACK_OF(X509) * chain, int as_server,
                          int depth, time_t *from, time_t *until);

/* The Unix time an ASN1_TIME denotes, or 0 if it cannot be read. */
time_t pc_certs_time(const ASN1_TIME *t);

/* x's serial number as uppercase hex without colons (as `openssl x509
 * -serial` prints it) into out. */
void pc_certs_serial(X509 *x, char *out, size_t n);

/* SHA-256 over the bytes of the identity files as they are now, without
 * parsing them. Returns 0, or -1 if a file cannot be read. */
int pc_certs_digest(const pc_config_t *cfg, uint8_t out[32]);

void pc_certs_free(pc_certs_t *c);

#endif

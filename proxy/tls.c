#include "tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/sha.h>
#include <openssl/x509v3.h>

#include "compat.h"
#include "identity.h"

static int peer_idx = -1;

/* X.509 failures that mean "not valid at this time" get their own reason so
 * that an operator can tell rotation trouble from an attack. */
static pc_reason_t chain_reason(int verr) {
  switch (verr) {
  case X509_V_ERR_CERT_HAS_EXPIRED:
  case X509_V_ERR_CERT_NOT_YET_VALID: return PC_REASON_EXPIRED;
  default: return PC_REASON_BAD_CHAIN;
  }
}

/* Chain, SVID leaf rules and identity: everything but the policy. On
 * success *from..*until is when the whole verified path is valid. */
static pc_reason_t check_identity(pc_tls_peer_t *pv, STACK_OF(X509) * chain, time_t *from,
                                  time_t *until) {
  if (!chain || sk_X509_num(chain) == 0) return PC_REASON_NO_CERT;
  X509 *leaf = sk_X509_value(chain, 0);
  /* Inbound peers are TLS clients and must carry clientAuth; upstreams are
   * servers and must carry serverAuth. */
  int verr = pc_certs_verify_chain(pv->store, leaf, chain, !pv->is_server, pv->depth, from, until);
  if (verr != X509_V_OK) return chain_reason(verr);
  pc_reason_t r = pc_identity_check_leaf(leaf);
  if (r != PC_REASON_NONE) return r;
  free(pv->peer_id);
  pv->peer_id = NULL;
  return pc_identity_from_cert(leaf, pv->trust_domain, &pv->peer_id);
}

/* The peer's chain as parsed certificates, built from the DER BoringSSL kept
 * (TLS_with_buffers_method parses nothing itself). NULL if there is none;
 * *malformed is set if a certificate does not parse. The caller frees it
 * with sk_X509_pop_free(chain, X509_free). */
static STACK_OF(X509) * peer_chain(const SSL *ssl, int *malformed) {
  *malformed = 0;
  const STACK_OF(CRYPTO_BUFFER) *certs = SSL_get0_peer_certificates(ssl);
  if (!certs || sk_CRYPTO_BUFFER_num(certs) == 0) return NULL;
  STACK_OF(X509) *chain = sk_X509_new_null();
  if (!chain) pc_fatal("out of memory");
  for (size_t i = 0; i < sk_CRYPTO_BUFFER_num(certs); i++) {
    X509 *x = X509_parse_from_buffer(sk_CRYPTO_BUFFER_value(certs, i));
    if (!x) {
      *malformed = 1;
      break;
    }
    if (!sk_X509_push(chain, x)) pc_fatal("out of memory");
  }
  return chain;
}

/* check_identity on the peer's chain as BoringSSL holds it. */
static pc_reason_t check_peer(pc_tls_peer_t *pv, const SSL *ssl, time_t *from, time_t *until) {
  int malformed;
  STACK_OF(X509) *chain = peer_chain(ssl, &malformed);
  *from = *until = 0;
  pc_reason_t r = malformed ? PC_REASON_BAD_CHAIN : check_identity(pv, chain, from, until);
  sk_X509_pop_free(chain, X509_free);
  return r;
}

int pc_tls_peer_expired(const pc_tls_peer_t *pv, uint64_t grace_ms) {
  if (!pv->not_after) return 0;
  return (int64_t)time(NULL) * 1000 >= (int64_t)pv->not_after * 1000 + (int64_t)grace_ms;
}

int pc_tls_peer_leaf_sha256(const SSL *ssl, uint8_t out[SHA256_DIGEST_LENGTH]) {
  const STACK_OF(CRYPTO_BUFFER) *certs = SSL_get0_peer_certificates(ssl);
  if (!certs || sk_CRYPTO_BUFFER_num(certs) == 0) return -1;
  const CRYPTO_BUFFER *leaf = sk_CRYPTO_BUFFER_value(certs, 0);
  SHA256(CRYPTO_BUFFER_data(leaf), CRYPTO_BUFFER_len(leaf), out);
  return 0;
}

/* ---- verified-chain cache ------------------------------------------------
 * Chain verification costs a signature check per link; a peer that comes
 * back (a client opening connection after connection) presents the same
 * bytes. Each worker thread remembers chains that passed everything but the
 * policy, keyed by SHA-256 over the chain's DER and the inputs of the check
 * (generation, role, depth), and reuses the result while every certificate of
 * the verified path (the trust bundle's too, which the peer did not send) is
 * within its validity period. The policy is always checked
 * afresh; failures are never cached. A new generation (bundle, trust domain,
 * depth) misses by construction. */

#define CACHE_SLOTS 1024

typedef struct {
  uint8_t key[SHA256_DIGEST_LENGTH];
  time_t not_before, not_after; /* when the whole verified path is valid */
  char *peer_id;                /* NULL: empty slot */
} cache_ent_t;

static _Thread_local cache_ent_t *cache;

static int cache_key(const SSL *ssl, const pc_tls_peer_t *pv, uint8_t key[SHA256_DIGEST_LENGTH]) {
  const STACK_OF(CRYPTO_BUFFER) *certs = SSL_get0_peer_certificates(ssl);
  if (!certs || sk_CRYPTO_BUFFER_num(certs) == 0 || pv->cache_tag == 0) return 0;
  SHA256_CTX h;
  SHA256_Init(&h);
  uint64_t params[3] = {pv->cache_tag, (uint64_t)pv->is_server, (uint64_t)pv->depth};
  SHA256_Update(&h, params, sizeof(params));
  for (size_t i = 0; i < sk_CRYPTO_BUFFER_num(certs); i++) {
    const CRYPTO_BUFFER *b = sk_CRYPTO_BUFFER_value(certs, i);
    uint64_t n = CRYPTO_BUFFER_len(b);
    SHA256_Update(&h, &n, sizeof(n));
    SHA256_Update(&h, CRYPTO_BUFFER_data(b), CRYPTO_BUFFER_len(b));
  }
  SHA256_Final(key, &h);
  return 1;
}

static cache_ent_t *cache_slot(const uint8_t *key) {
  if (!cache) cache = pc_calloc(CACHE_SLOTS, sizeof(*cache));
  uint32_t i;
  memcpy(&i, key, sizeof(i));
  return &cache[i % CACHE_SLOTS];
}

static void cache_put(const uint8_t *key, const pc_tls_peer_t *pv, time_t nb, time_t na) {
  if (!nb || !na) return;
  cache_ent_t *e = cache_slot(key);
  free(e->peer_id);
  memcpy(e->key, key, SHA256_DIGEST_LENGTH);
  e->not_before = nb;
  e->not_after = na;
  e->peer_id = pc_strdup(pv->peer_id);
}

static const cache_ent_t *cache_get(const uint8_t *key) {
  cache_ent_t *e = cache_slot(key);
  if (!e->peer_id || memcmp(e->key, key, SHA256_DIGEST_LENGTH) != 0) return NULL;
  time_t now = time(NULL);
  return now >= e->not_before && now < e->not_after ? e : NULL;
}

void pc_tls_thread_done(void) {
  if (!cache) return;
  for (size_t i = 0; i < CACHE_SLOTS; i++)
    free(cache[i].peer_id);
  free(cache);
  cache = NULL;
}

/* The whole peer decision, through the verified-chain cache when
 * pv->cache_tag is set: the chain (once per distinct chain and generation),
 * then the policy (always). */
static pc_reason_t decide(pc_tls_peer_t *pv, const SSL *ssl) {
  uint8_t key[SHA256_DIGEST_LENGTH];
  int keyed = cache_key(ssl, pv, key);
  const cache_ent_t *known = keyed ? cache_get(key) : NULL;
  pc_reason_t r;
  if (known) {
    free(pv->peer_id);
    pv->peer_id = pc_strdup(known->peer_id);
    pv->not_after = known->not_after;
    r = PC_REASON_NONE;
  } else {
    time_t nb;
    r = check_peer(pv, ssl, &nb, &pv->not_after);
    if (r == PC_REASON_NONE && keyed) cache_put(key, pv, nb, pv->not_after);
  }
  if (r == PC_REASON_NONE) r = pc_policy_check(pv->policy, pv->peer_id);
  return r;
}

pc_reason_t pc_tls_recheck(pc_tls_peer_t *pv, const SSL *ssl) { return decide(pv, ssl); }

static enum ssl_verify_result_t verify_peer(SSL *ssl, uint8_t *out_alert) {
  pc_tls_peer_t *pv = SSL_get_ex_data(ssl, peer_idx);
  if (!pv) {
    *out_alert = SSL_AD_INTERNAL_ERROR;
    return ssl_verify_invalid;
  }
  pc_reason_t r = decide(pv, ssl);
  if (r == PC_REASON_NONE) return ssl_verify_ok;
  pv->reason = r;
  *out_alert = pc_reason_alert(r) ? pc_reason_alert(r) : SSL_AD_CERTIFICATE_UNKNOWN;
  return ssl_verify_invalid;
}

static CRYPTO_BUFFER *der_buffer(X509 *x, CRYPTO_BUFFER_POOL *pool) {
  uint8_t *der = NULL;
  int n = i2d_X509(x, &der);
  if (n <= 0) pc_fatal("out of memory");
  CRYPTO_BUFFER *b = CRYPTO_BUFFER_new(der, (size_t)n, pool);
  OPENSSL_free(der);
  if (!b) pc_fatal("out of memory");
  return b;
}

/* Our leaf and intermediates, as DER, with the key. */
static int use_chain_and_key(SSL_CTX *ctx, const pc_certs_t *certs, CRYPTO_BUFFER_POOL *pool) {
  size_t n = 1 + sk_X509_num(certs->chain);
  CRYPTO_BUFFER **bufs = pc_calloc(n, sizeof(*bufs));
  bufs[0] = der_buffer(certs->leaf, pool);
  for (size_t i = 1; i < n; i++)
    bufs[i] = der_buffer(sk_X509_value(certs->chain, i - 1), pool);
  int ok = SSL_CTX_set_chain_and_key(ctx, bufs, n, certs->key, NULL);
  for (size_t i = 0; i < n; i++)
    CRYPTO_BUFFER_free(bufs[i]);
  free(bufs);
  return ok;
}

static int select_alpn(SSL *ssl, const uint8_t **out, uint8_t *outlen, const uint8_t *in,
                       unsigned inlen, void *arg);

SSL_CTX *pc_tls_ctx_new(const pc_config_t *cfg, const pc_certs_t *certs, int is_server, char *err,
                        size_t errlen) {
  if (peer_idx < 0) {
    /* Called first from the main thread before any worker exists. */
    peer_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
  }
  /* Buffers only: BoringSSL keeps the peer's certificates as DER, shared
   * through one pool by every connection that sees the same certificate,
   * instead of a parsed X509 copy per connection (about 4 KiB each). The
   * verify callback parses them only when the chain is not in the cache. */
  static CRYPTO_BUFFER_POOL *pool;
  if (!pool) pool = CRYPTO_BUFFER_POOL_new(); /* for the life of the process */
  SSL_CTX *ctx = SSL_CTX_new(TLS_with_buffers_method());
  if (!ctx || !pool) pc_fatal("out of memory");
  SSL_CTX_set0_buffer_pool(ctx, pool);
  SSL_CTX_set_min_proto_version(ctx, (uint16_t)cfg->tls.min_version);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  if (!SSL_CTX_set_strict_cipher_list(ctx, cfg->tls.ciphers)) {
    snprintf(err, errlen, "%s:%d: tls.ciphers: BoringSSL refused \"%s\"", cfg->file,
             cfg->tls.line_ciphers, cfg->tls.ciphers);
    goto fail;
  }
  if (!SSL_CTX_set1_curves_list(ctx, cfg->tls.curves)) {
    snprintf(err, errlen, "%s:%d: tls.curves: BoringSSL refused \"%s\"", cfg->file,
             cfg->tls.line_curves, cfg->tls.curves);
    goto fail;
  }
  SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
  /* Resumption would skip the verify callback: a peer removed from the allow
   * list, or a CA removed from the bundle, would still get in. Off both ways. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (!use_chain_and_key(ctx, certs, pool)) {
    snprintf(err, errlen, "%s:%d: identity.cert: cannot use certificate/key: %s", cfg->file,
             cfg->identity.line_cert, pc_tls_error_string());
    goto fail;
  }
  if (is_server) SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);
  SSL_CTX_set_custom_verify(
      ctx, is_server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_PEER,
      verify_peer);
  ERR_clear_error();
  return ctx;
fail:
  ERR_clear_error();
  SSL_CTX_free(ctx);
  return NULL;
}

/* Server side of ALPN: an HTTP listener prefers h2, then http/1.1; a TCP
 * listener selects nothing (the bytes are not ours to interpret). A client
 * that offers neither gets no ALPN and is served as HTTP/1.1. */
static int select_alpn(SSL *ssl, const uint8_t **out, uint8_t *outlen, const uint8_t *in,
                       unsigned inlen, void *arg) {
  (void)arg;
  const pc_tls_peer_t *pv = SSL_get_ex_data(ssl, peer_idx);
  if (!pv || !pv->alpn_http) return SSL_TLSEXT_ERR_NOACK;
  return pc_tls_alpn_choose(in, inlen, out, outlen) ? SSL_TLSEXT_ERR_OK : SSL_TLSEXT_ERR_NOACK;
}

int pc_tls_alpn_choose(const uint8_t *in, size_t inlen, const uint8_t **out, uint8_t *outlen) {
  static const char *const ours[] = {"h2", "http/1.1"};
  for (size_t k = 0; k < PC_ARRAY_SIZE(ours); k++) {
    size_t n = strlen(ours[k]);
    for (size_t i = 0; i < inlen;) {
      size_t len = in[i];
      if (len + 1 > inlen - i) return 0;
      if (len == n && memcmp(in + i + 1, ours[k], n) == 0) {
        *out = in + i + 1;
        *outlen = (uint8_t)len;
        return 1;
      }
      i += 1 + len;
    }
  }
  return 0;
}

int pc_tls_alpn_is_h2(const SSL *ssl) {
  const uint8_t *p;
  unsigned n;
  SSL_get0_alpn_selected(ssl, &p, &n);
  return n == 2 && memcmp(p, "h2", 2) == 0;
}

SSL *pc_tls_new(SSL_CTX *ctx, pc_tls_peer_t *peer) {
  SSL *ssl = SSL_new(ctx);
  if (!ssl) pc_fatal("out of memory");
  SSL_set_ex_data(ssl, peer_idx, peer);
  /* Nothing reads the handshake configuration (our chain, the cipher and
   * group lists, verify settings) once the handshake is done; BoringSSL
   * frees its copy then instead of keeping it for the connection's life. */
  SSL_set_shed_handshake_config(ssl, 1);
  return ssl;
}

pc_reason_t pc_tls_failure_reason(SSL *ssl) {
  pc_tls_peer_t *pv = SSL_get_ex_data(ssl, peer_idx);
  uint32_t e = ERR_peek_error();
  int lib = ERR_GET_LIB(e), reason = ERR_GET_REASON(e);
  ERR_clear_error();
  if (pv && pv->reason != PC_REASON_NONE) return pv->reason;
  if (lib != ERR_LIB_SSL) return PC_REASON_PROTOCOL;
  switch (reason) {
  case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE: return PC_REASON_NO_CERT;
  case SSL_R_NO_SHARED_CIPHER:
  case SSL_R_NO_SHARED_GROUP:
  case SSL_R_NO_CIPHER_MATCH: return PC_REASON_CIPHER;
  default: return PC_REASON_PROTOCOL;
  }
}

const char *pc_tls_error_string(void) {
  static _Thread_local char buf[256];
  uint32_t e = ERR_peek_error();
  if (!e) return "no TLS error";
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

#include "tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/aead.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <openssl/x509v3.h>

#include "compat.h"
#include "identity.h"
#include "log.h"
#include "ticketkeys.h"

static int peer_idx = -1;
static int tkeys_idx = -1; /* SSL_CTX ex_data: a server context's ticket keys */

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

/* A chain of DER certificates (leaf first) as parsed certificates
 * (TLS_with_buffers_method parses nothing itself). NULL if there is none;
 * *malformed is set if a certificate does not parse. The caller frees it
 * with sk_X509_pop_free(chain, X509_free). */
static STACK_OF(X509) * parse_chain(const STACK_OF(CRYPTO_BUFFER) * certs, int *malformed) {
  *malformed = 0;
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

/* check_identity on a peer chain as BoringSSL holds it (a handshake's or a
 * stored session's). */
static pc_reason_t check_peer(pc_tls_peer_t *pv, const STACK_OF(CRYPTO_BUFFER) * certs,
                              time_t *from, time_t *until) {
  int malformed;
  STACK_OF(X509) *chain = parse_chain(certs, &malformed);
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

static int cache_key(const STACK_OF(CRYPTO_BUFFER) * certs, const pc_tls_peer_t *pv,
                     uint8_t key[SHA256_DIGEST_LENGTH]) {
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

static void sessions_free(void);

void pc_tls_thread_done(void) {
  sessions_free();
  if (!cache) return;
  for (size_t i = 0; i < CACHE_SLOTS; i++)
    free(cache[i].peer_id);
  free(cache);
  cache = NULL;
}

/* The whole peer decision on a chain (a handshake's, or one a session
 * stored), through the verified-chain cache when pv->cache_tag is set: the
 * chain (once per distinct chain and generation), then the policy (always).
 * Every decision about a peer, full handshake or resumption, is this one. */
static pc_reason_t decide_chain(pc_tls_peer_t *pv, const STACK_OF(CRYPTO_BUFFER) * certs) {
  uint8_t key[SHA256_DIGEST_LENGTH];
  int keyed = cache_key(certs, pv, key);
  const cache_ent_t *known = keyed ? cache_get(key) : NULL;
  pc_reason_t r;
  if (known) {
    free(pv->peer_id);
    pv->peer_id = pc_strdup(known->peer_id);
    pv->not_after = known->not_after;
    r = PC_REASON_NONE;
  } else {
    time_t nb;
    r = check_peer(pv, certs, &nb, &pv->not_after);
    if (r == PC_REASON_NONE && keyed) cache_put(key, pv, nb, pv->not_after);
  }
  if (r == PC_REASON_NONE) r = pc_policy_check(pv->policy, pv->peer_id);
  return r;
}

static pc_reason_t decide(pc_tls_peer_t *pv, const SSL *ssl) {
  return decide_chain(pv, SSL_get0_peer_certificates(ssl));
}

pc_reason_t pc_tls_recheck(pc_tls_peer_t *pv, const SSL *ssl) { return decide(pv, ssl); }

/* The session being made (its tickets, once issued) lives no longer than
 * the peer's verified path: a resumption past it is refused anyway (it is
 * re-judged), but need not be attempted. */
static void cap_session(SSL *ssl, time_t not_after) {
  SSL_SESSION *sess = SSL_get_session(ssl);
  if (!sess || !not_after) return;
  int64_t left = (int64_t)not_after - (int64_t)SSL_SESSION_get_time(sess);
  if (left < 1) left = 1;
  if ((uint64_t)left < SSL_SESSION_get_timeout(sess)) SSL_SESSION_set_timeout(sess, (uint32_t)left);
}

static enum ssl_verify_result_t verify_peer(SSL *ssl, uint8_t *out_alert) {
  pc_tls_peer_t *pv = SSL_get_ex_data(ssl, peer_idx);
  if (!pv) {
    *out_alert = SSL_AD_INTERNAL_ERROR;
    return ssl_verify_invalid;
  }
  pc_reason_t r = decide(pv, ssl);
  if (r == PC_REASON_NONE) {
    cap_session(ssl, pv->not_after);
    return ssl_verify_ok;
  }
  pv->reason = r;
  *out_alert = pc_reason_alert(r) ? pc_reason_alert(r) : SSL_AD_CERTIFICATE_UNKNOWN;
  return ssl_verify_invalid;
}

static void forget_session(const pc_tls_peer_t *pv);

pc_reason_t pc_tls_handshake_done(pc_tls_peer_t *pv, const SSL *ssl, uint8_t *alert) {
  if (!SSL_session_reused(ssl)) return PC_REASON_NONE;
  /* No verify callback ran: the session's stored chain is judged now, by
   * the connection's generation and the clock, as a full handshake would
   * have been. */
  pv->resumed = 1;
  pc_reason_t r = decide(pv, ssl);
  if (r == PC_REASON_NONE) return r;
  pv->reason = r;
  *alert = pc_reason_alert(r) ? pc_reason_alert(r) : SSL_AD_CERTIFICATE_UNKNOWN;
  if (!pv->is_server && pv->name) forget_session(pv);
  return r;
}

/* ---- server: session tickets ---------------------------------------------
 * Tickets are sealed with AES-256-GCM under a random key of the context (so
 * of one generation: a reload's new context opens none of the old tickets).
 * A key seals for PC_TLS_TICKET_KEY_S seconds and then only opens, for as
 * long again, which covers the lifetime of every ticket it sealed. Opening
 * a ticket judges the session's stored peer chain first: a peer that would
 * be refused now is ignored as if its ticket were garbage, and the full
 * handshake that follows refuses it in the handshake, with its alert. */

#define TK_NONCE 12
#define TK_OVERHEAD (PC_TKEY_NAME + TK_NONCE + EVP_AEAD_MAX_OVERHEAD)

static void tkeys_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int index, long argl,
                       void *argp) {
  (void)parent, (void)ad, (void)index, (void)argl, (void)argp;
  pc_tkeys_free(ptr);
}

static size_t ticket_overhead(SSL *ssl) {
  (void)ssl;
  return TK_OVERHEAD;
}

static int ticket_seal(SSL *ssl, uint8_t *out, size_t *out_len, size_t max_out, const uint8_t *in,
                       size_t in_len) {
  pc_tkeys_t *tk = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), tkeys_idx);
  if (!tk || max_out < PC_TKEY_NAME + TK_NONCE) return 0;
  pc_tkey_t k;
  pc_tkeys_sealing(tk, time(NULL), &k);
  uint8_t *copy = NULL; /* in may be out: the header would overwrite it */
  if (in == out) in = copy = memcpy(pc_malloc(in_len), in, in_len);
  memcpy(out, k.name, PC_TKEY_NAME);
  RAND_bytes(out + PC_TKEY_NAME, TK_NONCE);
  EVP_AEAD_CTX actx;
  size_t n = 0;
  int ok =
      EVP_AEAD_CTX_init(&actx, EVP_aead_aes_256_gcm(), k.key, sizeof(k.key),
                        EVP_AEAD_DEFAULT_TAG_LENGTH, NULL) &&
      EVP_AEAD_CTX_seal(&actx, out + PC_TKEY_NAME + TK_NONCE, &n, max_out - PC_TKEY_NAME - TK_NONCE,
                        out + PC_TKEY_NAME, TK_NONCE, in, in_len, out, PC_TKEY_NAME);
  EVP_AEAD_CTX_cleanup(&actx);
  OPENSSL_cleanse(&k, sizeof(k));
  free(copy);
  *out_len = PC_TKEY_NAME + TK_NONCE + n;
  return ok;
}

static enum ssl_ticket_aead_result_t ticket_open(SSL *ssl, uint8_t *out, size_t *out_len,
                                                 size_t max_out, const uint8_t *in, size_t in_len) {
  SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
  pc_tkeys_t *tk = SSL_CTX_get_ex_data(ctx, tkeys_idx);
  pc_tls_peer_t *pv = SSL_get_ex_data(ssl, peer_idx);
  pc_tkey_t k;
  if (!tk || !pv || SSL_version(ssl) < TLS1_3_VERSION || in_len < TK_OVERHEAD ||
      !pc_tkeys_opening(tk, in, time(NULL), &k))
    return ssl_ticket_aead_ignore_ticket;
  uint8_t *copy = NULL;
  if (in == out) in = copy = memcpy(pc_malloc(in_len), in, in_len);
  EVP_AEAD_CTX actx;
  size_t n = 0;
  int ok = EVP_AEAD_CTX_init(&actx, EVP_aead_aes_256_gcm(), k.key, sizeof(k.key),
                             EVP_AEAD_DEFAULT_TAG_LENGTH, NULL) &&
           EVP_AEAD_CTX_open(&actx, out, &n, max_out, in + PC_TKEY_NAME, TK_NONCE,
                             in + PC_TKEY_NAME + TK_NONCE, in_len - PC_TKEY_NAME - TK_NONCE, in,
                             PC_TKEY_NAME);
  EVP_AEAD_CTX_cleanup(&actx);
  OPENSSL_cleanse(&k, sizeof(k));
  free(copy);
  ERR_clear_error();
  if (!ok) return ssl_ticket_aead_ignore_ticket;
  SSL_SESSION *sess = SSL_SESSION_from_bytes(out, n, ctx);
  pc_reason_t r =
      sess ? decide_chain(pv, SSL_SESSION_get0_peer_certificates(sess)) : PC_REASON_BAD_CHAIN;
  SSL_SESSION_free(sess);
  ERR_clear_error();
  if (r != PC_REASON_NONE) {
    pc_log(PC_LOG_DEBUG, "TLS ticket of %s not accepted (%s): full handshake",
           pv->peer_id ? pv->peer_id : "?", pc_reason_word(r));
    return ssl_ticket_aead_ignore_ticket;
  }
  *out_len = n;
  return ssl_ticket_aead_success;
}

static const SSL_TICKET_AEAD_METHOD ticket_method = {ticket_overhead, ticket_seal, ticket_open};

/* TLS 1.2 sessions stay off (no ticket, no session ID): a TLS 1.2
 * resumption has no fresh key exchange. The version is known here. */
static int no_tls12_tickets(SSL *ssl, void *arg) {
  (void)arg;
  if (SSL_version(ssl) < TLS1_3_VERSION) SSL_set_options(ssl, SSL_OP_NO_TICKET);
  return 1;
}

/* ---- client: one session per outbound listener, endpoint and thread ------
 * The latest TLS 1.3 session an upstream gave (each resumed connection
 * brings a fresh one), under the listener's name, the endpoint's address
 * (the pods behind a name, or a transparent route's destinations, each
 * issue their own tickets) and the generation. A
 * session of another generation (client certificate, bundle or expect list
 * may differ), past its lifetime or the expiry of the server's verified
 * path, or whose stored chain no longer passes, is dropped, never offered. */

typedef struct {
  char *name; /* listener name, '\0', endpoint ("" if none) */
  size_t name_len;
  uint64_t tag; /* generation id */
  time_t until;
  SSL_SESSION *sess;
} sess_ent_t;

static _Thread_local sess_ent_t *sessions;
static _Thread_local size_t nsessions;

static void sess_drop(size_t i) {
  free(sessions[i].name);
  SSL_SESSION_free(sessions[i].sess);
  sessions[i] = sessions[--nsessions];
}

static void sessions_free(void) {
  while (nsessions)
    sess_drop(0);
  free(sessions);
  sessions = NULL;
}

/* The cache key of pv: its listener name and endpoint, '\0' between. */
static size_t sess_key(const pc_tls_peer_t *pv, char *key, size_t n) {
  int k = snprintf(key, n, "%s%c%s", pv->name, 0, pv->endpoint ? pv->endpoint : "");
  return k < 0 || (size_t)k >= n ? 0 : (size_t)k;
}

static sess_ent_t *sess_find(const pc_tls_peer_t *pv) {
  char key[512];
  size_t n = sess_key(pv, key, sizeof(key));
  for (size_t i = 0; n && i < nsessions; i++)
    if (sessions[i].name_len == n && memcmp(sessions[i].name, key, n) == 0) return &sessions[i];
  return NULL;
}

/* Makes room for one more session: the one that would end first goes. */
static void sess_evict(void) {
  size_t worst = 0;
  for (size_t i = 1; i < nsessions; i++)
    if (sessions[i].until < sessions[worst].until) worst = i;
  sess_drop(worst);
}

static int on_new_session(SSL *ssl, SSL_SESSION *sess) {
  const pc_tls_peer_t *pv = SSL_get_ex_data(ssl, peer_idx);
  /* Only from a connection whose upstream passed the decision. */
  if (!pv || pv->is_server || !pv->name || !pv->peer_id || pv->reason != PC_REASON_NONE ||
      SSL_SESSION_get_protocol_version(sess) < TLS1_3_VERSION)
    return 0;
  for (size_t i = 0; i < nsessions;) { /* older generations' sessions are of no use */
    if (sessions[i].tag < pv->cache_tag)
      sess_drop(i);
    else
      i++;
  }
  sess_ent_t *e = sess_find(pv);
  if (e && e->tag > pv->cache_tag) return 0; /* a late ticket of an older generation */
  if (!e) {
    char key[512];
    size_t n = sess_key(pv, key, sizeof(key));
    if (!n) return 0;
    if (nsessions == PC_TLS_CLIENT_SESSIONS) sess_evict();
    sessions = pc_realloc(sessions, (nsessions + 1) * sizeof(*sessions));
    e = &sessions[nsessions++];
    e->name = pc_malloc(n);
    memcpy(e->name, key, n);
    e->name_len = n;
    e->sess = NULL;
  }
  SSL_SESSION_free(e->sess);
  e->sess = sess;
  e->tag = pv->cache_tag;
  e->until = (time_t)(SSL_SESSION_get_time(sess) + SSL_SESSION_get_timeout(sess));
  if (pv->not_after && pv->not_after < e->until) e->until = pv->not_after;
  return 1;
}

static void forget_session(const pc_tls_peer_t *pv) {
  sess_ent_t *e = sess_find(pv);
  if (e) sess_drop((size_t)(e - sessions));
}

static void offer_session(SSL *ssl, pc_tls_peer_t *pv) {
  sess_ent_t *e = sess_find(pv);
  if (!e) return;
  if (e->tag != pv->cache_tag || time(NULL) >= e->until ||
      decide_chain(pv, SSL_SESSION_get0_peer_certificates(e->sess)) != PC_REASON_NONE) {
    sess_drop((size_t)(e - sessions));
    return;
  }
  SSL_set_session(ssl, e->sess);
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
    tkeys_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, tkeys_free);
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
  SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
  /* BoringSSL resumes without the verify callback: resumption is on only
   * with the re-judgement around it (tls.h); the server keeps no session
   * cache either way, tickets only. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (!cfg->tls.resumption) {
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 0);
  } else if (is_server) {
    /* Each connection binds its sessions to its listener (pc_tls_new). */
    static const uint8_t sid_ctx[] = "portcullis";
    SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
    SSL_CTX_set_ex_data(ctx, tkeys_idx, pc_tkeys_new());
    SSL_CTX_set_ticket_aead_method(ctx, &ticket_method);
    SSL_CTX_set_num_tickets(ctx, 1);
    SSL_CTX_set_session_psk_dhe_timeout(ctx, PC_TLS_TICKET_KEY_S);
    SSL_CTX_set_cert_cb(ctx, no_tls12_tickets, NULL);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  }
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
  if (peer->is_server && peer->name) {
    /* A session resumes only on the listener that made it: listeners have
     * different allow lists. */
    uint8_t sid_ctx[SHA256_DIGEST_LENGTH];
    SHA256((const uint8_t *)peer->name, strlen(peer->name), sid_ctx);
    SSL_set_session_id_context(ssl, sid_ctx, sizeof(sid_ctx));
  } else if (peer->name && (SSL_CTX_get_session_cache_mode(ctx) & SSL_SESS_CACHE_CLIENT)) {
    offer_session(ssl, peer);
  }
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

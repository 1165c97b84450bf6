/*
 * tls.h - BoringSSL contexts with portcullis's pinned posture, and the peer
 * authorisation that runs inside BoringSSL's custom verify callback.
 *
 * Posture: TLS 1.2 minimum (1.3 on), TLS 1.2 suites from the config (already
 * limited to ECDHE + AEAD by config.c and re-checked by
 * SSL_CTX_set_strict_cipher_list), server preference, curves from the config,
 * no renegotiation.
 *
 * Resumption (tls.resumption, default on) is TLS 1.3 only, both ways, and
 * never skips the decision: BoringSSL does not run the verify callback for a
 * resumed handshake, so the peer chain the session stored is judged like a
 * fresh one (current bundle, validity now, SPIFFE ID, allow/expect list)
 * before the session is accepted (server: when its ticket is opened) or
 * offered (client), and again once the handshake completes
 * (pc_tls_handshake_done), before the app sees a byte. Server ticket keys
 * belong to one context, that is to one generation (a reload makes every
 * earlier ticket undecryptable), and rotate every PC_TLS_TICKET_KEY_S
 * seconds with the previous key still accepted for decryption; a session
 * lives no longer than the peer's verified path (cap_session). A client
 * keeps the latest session of each outbound listener and upstream endpoint
 * per worker thread (at most PC_TLS_CLIENT_SESSIONS, the soonest to end
 * evicted first) and drops it when the generation changes or its lifetime
 * (capped by the peer's certificate) ends.
 */
#ifndef PC_TLS_H
#define PC_TLS_H

#include <time.h>

#include <openssl/ssl.h>

#include "certstore.h"
#include "config.h"
#include "policy.h"
#include "reason.h"
#include "ticketkeys.h"

/* Client sessions kept per worker thread (one per listener and endpoint). */
#define PC_TLS_CLIENT_SESSIONS 512

/* What the verify callback needs and what it decides, one per connection.
 * The inputs are borrowed from the connection's generation and listener and
 * must outlive the SSL. */
typedef struct {
  const pc_policy_t *policy; /* allow list (server) or expect list (client) */
  const char *trust_domain;
  X509_STORE *store;
  int depth;
  int is_server;
  int alpn_http;        /* server: offer h2 and http/1.1 by ALPN (protocol = "http") */
  uint64_t cache_tag;   /* the generation's id: keys the verified-chain cache (0: no cache) and
                           the client session cache */
  const char *name;     /* listener name: server session ID context, client session cache key
                           (NULL: no resumption for this connection) */
  const char *endpoint; /* client: the upstream's "IP:PORT"; with name, keys the session
                           cache (a ticket is only offered to the server that issued it) */
  int resumed;          /* out: set by pc_tls_handshake_done for a resumed handshake */
  pc_reason_t reason;   /* out: why the peer was refused, PC_REASON_NONE if not */
  char *peer_id;        /* out: the peer's SPIFFE ID (malloc'd) once parsed; the
                           connection frees it */
  time_t not_after;     /* out: once the peer passed, the earliest notAfter of its verified
                           path (its own certificates and the trust bundle's; 0: unknown) */
} pc_tls_peer_t;

/* Builds the server (inbound) or client (outbound) context for cfg and certs.
 * Contexts keep certificates as DER only (TLS_with_buffers_method): X509-based
 * SSL functions (SSL_get_peer_certificate and the like) return nothing on
 * their connections; use the functions here.
 * Returns the context (caller owns one reference) or NULL with one line in
 * err naming the setting. */
SSL_CTX *pc_tls_ctx_new(const pc_config_t *cfg, const pc_certs_t *certs, int is_server, char *err,
                        size_t errlen);

/* The whole peer decision for the chain ssl's peer presented (leaf first):
 * the chain against pv->store within pv->depth for the peer's role, SVID leaf
 * rules, identity, then pv->policy. Sets pv->peer_id when an ID could be read
 * (see identity.h) and pv->not_after when the chain passed. The verify
 * callback makes the same decision; this is for established connections
 * after a reload. Both go through the calling thread's verified-chain cache
 * when pv->cache_tag is set (the new generation's id): re-judging thousands
 * of connections that present a few distinct chains costs a few chain
 * verifications, not thousands, so a reload does not stall the loop. */
pc_reason_t pc_tls_recheck(pc_tls_peer_t *pv, const SSL *ssl);

/* Non-zero once pv's verified path expired more than grace_ms ago (wall
 * clock): a connection to that peer may carry no new request. */
int pc_tls_peer_expired(const pc_tls_peer_t *pv, uint64_t grace_ms);

/* SHA-256 over the DER of the peer's leaf certificate into out. Returns 0, or
 * -1 if the peer sent none. */
int pc_tls_peer_leaf_sha256(const SSL *ssl, uint8_t out[32]);

/* Frees this thread's verified-chain cache and client session cache (see
 * tls.c). Worker threads call it before they exit. */
void pc_tls_thread_done(void);

/* The server's ALPN choice from a client's protocol list in wire format
 * (each name preceded by its one-byte length): "h2" if listed, else
 * "http/1.1" if listed. Returns 1 with *out pointing at the chosen name inside
 * in and *outlen its length, or 0 (select nothing) when neither is listed.
 * BoringSSL hands the callback only well-formed lists; on a malformed one this
 * may return 0 even if a name of ours is listed, and never reads outside in.
 * Pure; any thread. */
int pc_tls_alpn_choose(const uint8_t *in, size_t inlen, const uint8_t **out, uint8_t *outlen);

/* Non-zero if ALPN settled on "h2" for ssl (after the handshake). */
int pc_tls_alpn_is_h2(const SSL *ssl);

/* Creates an SSL from ctx bound to peer for the verify callback. On a server
 * context, sessions are bound to peer->name (the listener: another
 * listener's ticket never resumes here). On a client context with
 * resumption on, the session cached for peer->name and peer->cache_tag is
 * offered if its stored server chain still passes the decision (else it is
 * dropped and a full handshake follows). Never NULL. Loop thread of the
 * connection (the client session cache is per thread). */
SSL *pc_tls_new(SSL_CTX *ctx, pc_tls_peer_t *peer);

/* Call once the handshake succeeded, before any application byte is passed
 * on. For a full handshake the verify callback has decided: returns
 * PC_REASON_NONE. For a resumed one it sets pv->resumed and runs the whole
 * decision on the chain the session stored, against pv's inputs (the
 * connection's generation) and the clock now, filling pv->peer_id and
 * pv->not_after. On a refusal it sets pv->reason and *alert (the alert a
 * full handshake would have sent) and returns the reason: the caller sends
 * the alert (pc_stream_alert; the handshake is over, so the peer reads it as
 * its first record) and refuses the connection as for a failed handshake. */
pc_reason_t pc_tls_handshake_done(pc_tls_peer_t *pv, const SSL *ssl, uint8_t *alert);

/* Decides the refusal reason for a failed handshake: the verify callback's
 * decision if it made one, else the BoringSSL error on this thread's queue
 * mapped to no_cert / protocol / cipher. Clears the error queue. */
pc_reason_t pc_tls_failure_reason(SSL *ssl);

/* A short description of the BoringSSL error for server logs; clears nothing.
 * Returns a pointer to thread-local storage. */
const char *pc_tls_error_string(void);

#endif

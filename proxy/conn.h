/*
 * conn.h - one proxied connection: accept, TLS handshake with authorisation,
 * connect, splice, teardown.
 *
 * Inbound: peer --mTLS--> [down] portcullis [up] --plain--> local app.
 *   The app is contacted only after the handshake succeeded, which includes
 *   the allow-list decision taken in the verify callback (tls.h).
 * Outbound: local app --plain--> [down] portcullis [up] --mTLS--> upstream.
 *   The app's bytes are read only after the upstream's identity was checked
 *   against `expect`.
 *
 * Each phase runs under a timer (handshake, connect, idle). Every ending goes
 * through one teardown path that writes the access-log line, counts, closes
 * every handle, and frees the connection in the last close callback.
 * Loop thread only.
 */
#ifndef PC_CONN_H
#define PC_CONN_H

#include "listener.h"
#include "worker.h"

/* Accepts one pending connection of l (libuv already holds it) and starts it.
 * Returns 0, or a libuv error if it could not be accepted. */
int pc_conn_accept(pc_listener_t *l);

/* Drain began: HTTP/2 connections of w send GOAWAY and close once their
 * streams are done (HTTP/1 ones close after their next answer). */
void pc_conn_drain_all(pc_worker_t *w);

/* Closes every connection of w (worker stop): close reason "shutdown". */
void pc_conn_close_all(pc_worker_t *w);

/* After w adopted a new generation: re-checks every verified peer of w
 * against it (chain against the new bundle, identity, the same-named
 * listener's new allow/expect list). A refused peer's connection is closed
 * after limits.revoke_grace_ms (access log: decision deny, close "revoked");
 * one that passes again before then is kept. */
void pc_conn_recheck_all(pc_worker_t *w);

/* Live connections in the process (all workers). */
int pc_conn_active(void);

/* Of those, inbound connections whose TLS handshake is still in progress. */
int pc_conn_pending(void);

#endif

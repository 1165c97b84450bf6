/*
 * pool.h - per-worker pools of keep-alive connections for HTTP mode: to the
 * local app (inbound listeners, plaintext) or to the upstream sidecar
 * (outbound listeners, mTLS with the upstream checked against `expect`).
 *
 * A pool belongs to one worker, one listener and one generation: requests
 * decided under a generation only reuse connections made under it, so a
 * reload never lets a request ride a connection whose peer was verified
 * against an older bundle or expect list. After a worker adopts a new
 * generation, pc_pool_sweep closes the older pools' idle connections; busy
 * ones are closed when they come back.
 *
 * A borrowed connection's stream reports to the borrower's callbacks (its
 * owner pointer is the borrower's); an idle one is watched by the pool, and
 * any byte, EOF or error from it closes it (an app must not answer what was
 * not asked). Loop thread of the owning worker only.
 */
#ifndef PC_POOL_H
#define PC_POOL_H

#include <stdint.h>

#include "config.h"
#include "gen.h"
#include "metrics.h"
#include "stream.h"
#include "tls.h"

struct pc_worker;
typedef struct pc_pool pc_pool_t;
typedef struct pc_upconn pc_upconn_t;

/* How a connection attempt failed (pc_upconn_ready_cb). */
typedef enum {
  PC_UPCONN_OK = 0,
  PC_UPCONN_CONNECT,    /* no TCP connection: refused, unreachable, or timed out */
  PC_UPCONN_TLS,        /* the TLS handshake failed, timed out, or refused the upstream */
  PC_UPCONN_UNRESOLVED, /* the target is a name that has no address yet (endpoint.h) */
} pc_upconn_fail_t;

/* A connection attempt ended. fail PC_UPCONN_OK: up is ready and lent to the
 * borrower. Otherwise up is closing (readable during the callback only) and
 * reason says why (PC_REASON_TIMEOUT for a deadline; an identity reason when
 * our verify callback refused the upstream; PC_REASON_NONE when the upstream
 * could not be reached); detail is static text. What to answer is the
 * borrower's business (h1up.h). */
typedef void (*pc_upconn_ready_cb)(void *user, pc_upconn_t *up, pc_upconn_fail_t fail,
                                   pc_reason_t reason, const char *detail);

struct pc_upconn {
  pc_stream_t s;          /* lent: s.cbs and s.owner are the borrower's */
  pc_tls_peer_t peer;     /* outbound: peer.peer_id is the upstream's SPIFFE ID */
  uint64_t served;        /* requests completed over it before this one */
  struct pc_endpoint *ep; /* where it goes (NULL: unresolved); counted in flight while lent */
  /* private */
  uv_timer_t timer;
  uv_connect_t req;
  pc_pool_t *pool;
  pc_metrics_t *stats;
  pc_upconn_ready_cb on_ready;
  void *user;
  const pc_stream_cbs_t *user_cbs;
  void *user_owner;
  int state, handles;
  pc_upconn_fail_t fail_kind;
  pc_reason_t fail_reason;
  const char *fail_detail;
  uint64_t hs_start;
  uint64_t idle_since; /* loop time (ms) it last went idle */
  int idle_timer;      /* the timer, if active, is the (lazy) idle timer */
  uint8_t rechecked;   /* the connect/handshake deadline expired once (deadline.h) */
  uint8_t counted;     /* lent: counted in ep's in_flight */
  pc_upconn_t *prev, *next;
};

/* The pool of worker w for listener lc of generation g (created on first
 * use; it holds a reference on g). Never NULL. */
pc_pool_t *pc_pool_for(struct pc_worker *w, pc_gen_t *g, const pc_listener_cfg_t *lc);

/* Lends a connection to a borrower whose stream callbacks are cbs with owner.
 * The endpoint is pin if set (borrowed: a transparent connection's original
 * destination), else picked first (endpoint.h: power of two choices over the
 * listener's set); an idle connection to it is reused if there is one.
 * If an idle one is available it is returned with *ready = 1 and nothing else
 * fires. Otherwise a new one is started, *ready = 0, and on_ready(user, ...)
 * fires exactly once later (never from inside this call) unless the borrower
 * releases it first. stats counts connects, reuses, failures and a TLS
 * truncation (the lent stream's PC_STREAM_ETRUNC, counted and logged at
 * release); it must stay valid until the connection was released. */
pc_upconn_t *pc_pool_acquire(pc_pool_t *p, struct pc_endpoint *pin, pc_metrics_t *stats,
                             const pc_stream_cbs_t *cbs, void *owner, pc_upconn_ready_cb on_ready,
                             void *user, int *ready);

/* pc_pool_release modes. */
#define PC_POOL_KEEP 1   /* the exchange ended cleanly, both sides keep-alive */
#define PC_POOL_CLOSE 0  /* close with FIN */
#define PC_POOL_ABORT -1 /* close with RST: the app must not take a cut-off request as whole */

/* Gives up back. PC_POOL_KEEP keeps it idle if its generation is still
 * current and the pool has room; otherwise, and with the other modes, it is
 * closed. A connection still being made is abandoned (its on_ready never
 * fires). The borrower must not touch up afterwards. */
void pc_pool_release(pc_upconn_t *up, int how);

/* After w adopted a new generation, or an endpoint set changed: closes
 * idle connections of pools made under older generations or to endpoints
 * no longer in their set, and frees pools with nothing left. */
void pc_pool_sweep(struct pc_worker *w);

/* SIGTERM drain: closes every idle connection of w's pools (gently); from
 * now on a connection given back closes instead of waiting idle. */
void pc_pool_drain(struct pc_worker *w);

/* Closes every idle connection and frees every empty pool of w (worker stop;
 * lent connections are closed by their borrowers' teardown). */
void pc_pool_close_all(struct pc_worker *w);

#endif

/*
 * endpoint.h - where a listener sends its connections and requests: the
 * listener's target (its `upstream` or `forward`), the set of addresses it
 * stands for, and how work is spread over them.
 *
 * A target is an IP literal (one endpoint, for ever) or NAME:PORT, whose
 * addresses dns.h keeps current. Each address is an endpoint, shared by
 * every worker: power of two choices picks, among the healthy endpoints,
 * the less loaded of two drawn at random (load: open connections for TCP
 * listeners, requests in flight for HTTP ones). Passive health: a failed
 * connect, a refused handshake or a reset before any response ejects an
 * endpoint for a backoff that doubles with every consecutive failure (with
 * jitter, capped: health.ejection_base_ms, ejection_max_ms); ejected
 * endpoints are skipped while a healthy one exists.
 *
 * A new answer replaces the set at once: endpoints that stay keep their
 * health and load; endpoints that left are marked removed, and connections
 * to them finish what they carry, then close (pc_endpoint_removed).
 *
 * Targets are registered by config load (one per listener, keyed by
 * listener name, direction and target text, so a reload that keeps the
 * listener keeps its answers and health) and live as long as a config holds
 * them. Every function here may be called from any thread unless said.
 */
#ifndef PC_ENDPOINT_H
#define PC_ENDPOINT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <uv.h>

/* dns_resolutions_total results, and the state of a target's answer. */
typedef enum {
  PC_DNS_OK,
  PC_DNS_NXDOMAIN, /* the name does not exist, or has no address */
  PC_DNS_SERVFAIL,
  PC_DNS_TIMEOUT, /* no answer: the servers did not answer or could not be reached */
  PC_DNS_RESULTS,
  PC_DNS_PENDING = PC_DNS_RESULTS, /* not answered yet */
  PC_DNS_STATIC,                   /* an IP literal */
} pc_dns_result_t;

const char *pc_dns_result_word(pc_dns_result_t r);

typedef struct pc_target pc_target_t;

typedef struct pc_endpoint {
  struct sockaddr_storage addr;
  char str[56];     /* "IP:PORT", "[v6]:PORT" */
  pc_target_t *tgt; /* not owned: a target outlives its endpoints' users */
  /* private: atomics */
  int refs;
  uint32_t in_flight;
  uint32_t failures;      /* consecutive */
  uint64_t ejected_until; /* pc_endpoint_now_ms; 0: healthy */
  int removed;
} pc_endpoint_t;

/* Registers (or finds) the target of listener name: spec is the listener's
 * `upstream` / `forward`. Returns a new reference, or NULL (with a message
 * in err) if spec is neither IP:PORT, [v6]:PORT nor NAME:PORT. */
pc_target_t *pc_target_get(const char *listener, int inbound, const char *spec, char *err,
                           size_t errlen);
/* Registers (or finds) a pinned target of listener name: one whose
 * endpoints are made on demand, one per original destination of
 * transparent connections (pc_target_endpoint_for); spec is only its text
 * ("10.77.0.0/24:8080", "127.0.0.1:*"). Returns a new reference. */
pc_target_t *pc_target_get_pinned(const char *listener, int inbound, const char *spec);
void pc_target_ref(pc_target_t *t);
void pc_target_unref(pc_target_t *t);
/* References held now (dns.h lets go of a target only it still holds). */
int pc_target_refs(const pc_target_t *t);

/* Non-zero if t is a name (dns.h resolves it). */
int pc_target_is_name(const pc_target_t *t);
const char *pc_target_host(const pc_target_t *t);
uint16_t pc_target_port(const pc_target_t *t);
const char *pc_target_listener(const pc_target_t *t);
const char *pc_target_spec(const pc_target_t *t);

/* "the upstream name NAME:PORT has not resolved" (what a 503 says); lives
 * as long as t. */
const char *pc_target_unresolved_text(const pc_target_t *t);

/* Endpoints in the current set. */
size_t pc_target_size(pc_target_t *t);

/* Picks an endpoint for one connection or request and counts it in
 * flight: a new reference the caller gives back with pc_endpoint_done.
 * avoid (may be NULL) is not picked while another endpoint exists (a
 * retry). NULL: the target has no address (a name never resolved). */
pc_endpoint_t *pc_target_pick(pc_target_t *t, const pc_endpoint_t *avoid);

/* The endpoint of t at exactly dst (address and port), counted in flight
 * and referenced as pc_target_pick's. A pinned target finds or makes it:
 * endpoints live in its set while something uses them (pools included) or
 * they are ejected, and at PC_PINNED_MAX endpoints the unused ones are let
 * go (past that, an untracked endpoint is returned: it works, but its
 * health is its own). A name or IP target returns its endpoint at dst if
 * its current set has one, else NULL. */
#define PC_PINNED_MAX 1024
pc_endpoint_t *pc_target_endpoint_for(pc_target_t *t, const struct sockaddr_storage *dst);

/* A pinned connection or request uses ep again: counted in flight, with a
 * new reference (give back with pc_endpoint_done). */
void pc_endpoint_use(pc_endpoint_t *ep);

/* The connection or request that pc_target_pick counted ended: the count
 * and the reference go (pc_endpoint_done), or only the count
 * (pc_endpoint_settle: a pooled connection keeps its endpoint). NULL is
 * ignored. */
void pc_endpoint_done(pc_endpoint_t *ep);
void pc_endpoint_settle(pc_endpoint_t *ep);

/* A new reference on ep, not counted in flight (pool bookkeeping) / its
 * release. */
void pc_endpoint_ref(pc_endpoint_t *ep);
void pc_endpoint_unref(pc_endpoint_t *ep);

/* Passive health: ep failed (why: a few words for the log) / served. */
void pc_endpoint_failed(pc_endpoint_t *ep, uint64_t base_ms, uint64_t max_ms, const char *why);
void pc_endpoint_ok(pc_endpoint_t *ep);

/* Non-zero once a newer answer left ep out: no new work goes to it. */
int pc_endpoint_removed(const pc_endpoint_t *ep);

/* Non-zero if a and b are the same IPv4 or IPv6 address and port. */
int pc_endpoint_same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b);

/* The port of an IPv4 or IPv6 address, in host order. */
uint16_t pc_addr_port(const struct sockaddr_storage *a);

/* Writes "IP:PORT" or "[IPv6]:PORT" (as access logs and /endpoints show it). */
void pc_addr_str(const struct sockaddr_storage *a, char *out, size_t n);

/* Monotonic milliseconds (ejection clocks). */
uint64_t pc_endpoint_now_ms(void);

/* Bumped whenever some target's set changed: workers compare it with what
 * they saw to close idle connections to removed endpoints. */
uint64_t pc_endpoint_epoch(void);

/* ---- for dns.h (main thread) ------------------------------------------- */

/* Calls fn for every live name target, with the registry locked (fn may
 * not call pc_target_get/ref/unref/refs). */
void pc_targets_each_name(void (*fn)(pc_target_t *t, void *arg), void *arg);

/* Private slot for dns.h's per-target state (main thread only); dns.h
 * holds a reference on every target it keeps state for. */
void *pc_target_dns_state(const pc_target_t *t);
void pc_target_set_dns_state(pc_target_t *t, void *state);

/* An answer: addrs (n may be 0 only with a failure) replaces the set when
 * r is PC_DNS_OK; a failure keeps the last good set (marked stale). ttl_ms:
 * the clamped TTL that schedules the next query. Returns 1 if the set's
 * members changed (pc_endpoint_epoch moved), else 0. */
int pc_target_answer(pc_target_t *t, pc_dns_result_t r, const struct sockaddr_storage *addrs,
                     size_t n, uint64_t ttl_ms);

/* ---- reports (admin) ---------------------------------------------------- */

typedef struct {
  char address[56];
  int ejected;
  uint64_t ejected_until_ms; /* wall clock, ms since the epoch; 0 when healthy */
  uint32_t in_flight;
} pc_endpoint_view_t;

typedef struct {
  int is_name;
  pc_dns_result_t last_result;
  int stale;               /* a failure after a good answer: the last good set is kept */
  uint64_t resolved_at_ms; /* wall clock of the last good answer, 0 if none */
  uint64_t ttl_ms;         /* of the last good answer */
  uint64_t resolutions[PC_DNS_RESULTS];
  uint64_t ejections;
  pc_endpoint_view_t *eps; /* malloc'd; free with pc_target_view_free */
  size_t neps;
} pc_target_view_t;

/* t may be NULL (an outbound transparent listener has no target of its
 * own): an empty view. */
void pc_target_view(pc_target_t *t, pc_target_view_t *out);
void pc_target_view_free(pc_target_view_t *v);

/* 1 while some name target has had no answer yet (or failure); then why is
 * set to static text. */
int pc_targets_pending(const char **why);

#endif

#include "endpoint.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "compat.h"
#include "config.h"
#include "log.h"

struct pc_target {
  char *listener, *spec, *host;
  uint16_t port;
  int inbound, is_name, pinned;
  char *unresolved;
  /* Guards eps/neps and the answer's state; endpoints' own fields are
   * atomics, touched by every worker without it. */
  uv_mutex_t lock;
  pc_endpoint_t **eps;
  size_t neps;
  pc_dns_result_t result;
  int stale;
  uint64_t resolved_at_ms, ttl_ms;
  uint64_t resolutions[PC_DNS_RESULTS];
  uint64_t ejections; /* atomic */
  void *dns;          /* dns.c's, main thread */
  int refs;           /* under reg_lock */
  pc_target_t *next;
};

/* The registry: every target some config holds. */
static uv_mutex_t reg_lock;
static uv_once_t reg_once = UV_ONCE_INIT;
static pc_target_t *targets;
static uint64_t epoch; /* atomic */

static void reg_init(void) {
  if (uv_mutex_init(&reg_lock) != 0) pc_fatal("cannot create a mutex");
}

static const char *const result_words[] = {"ok",      "nxdomain", "servfail",
                                           "timeout", "pending",  "static"};

const char *pc_dns_result_word(pc_dns_result_t r) { return result_words[r]; }

uint64_t pc_endpoint_now_ms(void) { return uv_hrtime() / 1000000u; }

uint64_t pc_endpoint_epoch(void) { return __atomic_load_n(&epoch, __ATOMIC_ACQUIRE); }

static uint64_t wall_ms(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u;
}

/* Per-thread xorshift: picks need no shared state and no lock. */
static uint32_t rnd(void) {
  static __thread uint64_t s;
  if (!s) s = uv_hrtime() ^ ((uint64_t)(uintptr_t)&s << 17) ^ 0x9e3779b97f4a7c15ull;
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return (uint32_t)(s >> 16);
}

uint16_t pc_addr_port(const struct sockaddr_storage *a) {
  return ntohs(a->ss_family == AF_INET6 ? ((const struct sockaddr_in6 *)a)->sin6_port
                                        : ((const struct sockaddr_in *)a)->sin_port);
}

void pc_addr_str(const struct sockaddr_storage *a, char *out, size_t n) {
  char ip[INET6_ADDRSTRLEN] = "?";
  if (a->ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)a)->sin6_addr, ip, sizeof(ip));
    snprintf(out, n, "[%s]:%u", ip, pc_addr_port(a));
  } else {
    inet_ntop(AF_INET, &((const struct sockaddr_in *)a)->sin_addr, ip, sizeof(ip));
    snprintf(out, n, "%s:%u", ip, pc_addr_port(a));
  }
}

static pc_endpoint_t *endpoint_new(pc_target_t *t, const struct sockaddr_storage *a) {
  pc_endpoint_t *ep = pc_calloc(1, sizeof(*ep));
  ep->addr = *a;
  ep->tgt = t;
  ep->refs = 1;
  pc_addr_str(a, ep->str, sizeof(ep->str));
  return ep;
}

void pc_endpoint_ref(pc_endpoint_t *ep) { __atomic_add_fetch(&ep->refs, 1, __ATOMIC_RELAXED); }

void pc_endpoint_unref(pc_endpoint_t *ep) {
  if (ep && __atomic_sub_fetch(&ep->refs, 1, __ATOMIC_ACQ_REL) == 0) free(ep);
}

void pc_endpoint_settle(pc_endpoint_t *ep) {
  if (ep) __atomic_sub_fetch(&ep->in_flight, 1, __ATOMIC_RELAXED);
}

void pc_endpoint_done(pc_endpoint_t *ep) {
  if (!ep) return;
  pc_endpoint_settle(ep);
  pc_endpoint_unref(ep);
}

int pc_endpoint_removed(const pc_endpoint_t *ep) {
  return __atomic_load_n(&ep->removed, __ATOMIC_ACQUIRE);
}

void pc_endpoint_failed(pc_endpoint_t *ep, uint64_t base_ms, uint64_t max_ms, const char *why) {
  uint32_t f = __atomic_add_fetch(&ep->failures, 1, __ATOMIC_RELAXED);
  uint64_t backoff = base_ms;
  for (uint32_t i = 1; i < f && backoff < max_ms; i++)
    backoff *= 2;
  if (backoff > max_ms) backoff = max_ms;
  /* Jitter keeps every worker's and every sidecar's retries of one dead pod
   * from arriving together: anywhere in the upper half of the backoff. */
  uint64_t wait = backoff / 2 + (backoff / 2 ? rnd() % (backoff / 2 + 1) : 0);
  uint64_t now = pc_endpoint_now_ms();
  uint64_t prev = __atomic_exchange_n(&ep->ejected_until, now + wait, __ATOMIC_RELAXED);
  if (prev > now) return; /* already ejected: extended, counted once */
  __atomic_add_fetch(&ep->tgt->ejections, 1, __ATOMIC_RELAXED);
  pc_log(PC_LOG_WARN, "listener %s: endpoint %s of %s ejected for %llu ms (%s; %u in a row)",
         ep->tgt->listener, ep->str, ep->tgt->spec, (unsigned long long)wait, why, f);
}

void pc_endpoint_ok(pc_endpoint_t *ep) {
  if (!__atomic_load_n(&ep->failures, __ATOMIC_RELAXED)) return;
  __atomic_store_n(&ep->failures, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&ep->ejected_until, 0, __ATOMIC_RELAXED);
}

static int ejected(const pc_endpoint_t *ep, uint64_t now) {
  return __atomic_load_n(&ep->ejected_until, __ATOMIC_RELAXED) > now;
}

static uint32_t load(const pc_endpoint_t *ep) {
  return __atomic_load_n(&ep->in_flight, __ATOMIC_RELAXED);
}

/* ---- targets ------------------------------------------------------------ */

static char *dupn(const char *s, size_t n) {
  char *d = pc_malloc(n + 1);
  memcpy(d, s, n);
  d[n] = '\0';
  return d;
}

/* Splits "NAME:PORT" (a DNS name: letters, digits, '-', '.', '_'). */
static int parse_name(const char *spec, char **host, uint16_t *port) {
  const char *colon = strrchr(spec, ':');
  if (!colon || colon == spec || colon - spec > 253) return -1;
  char *end;
  unsigned long p = strtoul(colon + 1, &end, 10);
  if (!colon[1] || *end || p == 0 || p > 65535) return -1;
  for (const char *c = spec; c < colon; c++)
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
          *c == '-' || *c == '.' || *c == '_'))
      return -1;
  if (spec[0] == '.' || spec[0] == '-') return -1;
  *host = dupn(spec, (size_t)(colon - spec));
  *port = (uint16_t)p;
  return 0;
}

pc_target_t *pc_target_get(const char *listener, int inbound, const char *spec, char *err,
                           size_t errlen) {
  struct sockaddr_storage a;
  char *host = NULL;
  uint16_t port = 0;
  int is_name = 0;
  if (pc_config_parse_addr(spec, &a) != 0) {
    /* Something that looks like an address but does not parse is a typo,
     * not a name. */
    int digits_only = 1;
    for (const char *c = spec; *c && *c != ':'; c++)
      if (!((*c >= '0' && *c <= '9') || *c == '.')) digits_only = 0;
    if (spec[0] == '[' || digits_only || parse_name(spec, &host, &port) != 0) {
      snprintf(err, errlen,
               "\"%s\" is not an address of the form IP:PORT, [IPv6]:PORT or NAME:PORT", spec);
      return NULL;
    }
    is_name = 1;
  }
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_lock);
  for (pc_target_t *t = targets; t; t = t->next) {
    if (!t->pinned && t->inbound == inbound && strcmp(t->listener, listener) == 0 &&
        strcmp(t->spec, spec) == 0) {
      t->refs++;
      uv_mutex_unlock(&reg_lock);
      free(host);
      return t;
    }
  }
  pc_target_t *t = pc_calloc(1, sizeof(*t));
  t->listener = pc_strdup(listener);
  t->spec = pc_strdup(spec);
  t->inbound = inbound;
  t->is_name = is_name;
  t->refs = 1;
  if (uv_mutex_init(&t->lock) != 0) pc_fatal("cannot create a mutex");
  if (is_name) {
    t->host = host;
    t->port = port;
    t->result = PC_DNS_PENDING;
    size_t n = strlen(spec) + 64;
    t->unresolved = pc_malloc(n);
    snprintf(t->unresolved, n, "the upstream name %s has not resolved", spec);
  } else {
    t->host = dupn(spec, (size_t)(strrchr(spec, ':') - spec));
    t->port = pc_addr_port(&a);
    t->result = PC_DNS_STATIC;
    t->eps = pc_calloc(1, sizeof(*t->eps));
    t->eps[0] = endpoint_new(t, &a);
    t->neps = 1;
    t->unresolved = pc_strdup("the upstream has no address");
  }
  t->next = targets;
  targets = t;
  uv_mutex_unlock(&reg_lock);
  return t;
}

pc_target_t *pc_target_get_pinned(const char *listener, int inbound, const char *spec) {
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_lock);
  for (pc_target_t *t = targets; t; t = t->next) {
    if (t->pinned && t->inbound == inbound && strcmp(t->listener, listener) == 0 &&
        strcmp(t->spec, spec) == 0) {
      t->refs++;
      uv_mutex_unlock(&reg_lock);
      return t;
    }
  }
  pc_target_t *t = pc_calloc(1, sizeof(*t));
  t->listener = pc_strdup(listener);
  t->spec = pc_strdup(spec);
  t->host = pc_strdup(spec);
  t->inbound = inbound;
  t->pinned = 1;
  t->refs = 1;
  t->result = PC_DNS_STATIC;
  t->unresolved = pc_strdup("the original destination has no address");
  if (uv_mutex_init(&t->lock) != 0) pc_fatal("cannot create a mutex");
  t->next = targets;
  targets = t;
  uv_mutex_unlock(&reg_lock);
  return t;
}

void pc_target_unref(pc_target_t *t) {
  if (!t) return;
  uv_mutex_lock(&reg_lock);
  if (--t->refs > 0) {
    uv_mutex_unlock(&reg_lock);
    return;
  }
  pc_target_t **pp = &targets;
  while (*pp != t)
    pp = &(*pp)->next;
  *pp = t->next;
  uv_mutex_unlock(&reg_lock);
  for (size_t i = 0; i < t->neps; i++) {
    __atomic_store_n(&t->eps[i]->removed, 1, __ATOMIC_RELEASE);
    pc_endpoint_unref(t->eps[i]);
  }
  free(t->eps);
  uv_mutex_destroy(&t->lock);
  free(t->listener);
  free(t->spec);
  free(t->host);
  free(t->unresolved);
  free(t);
}

void pc_target_ref(pc_target_t *t) {
  uv_mutex_lock(&reg_lock);
  t->refs++;
  uv_mutex_unlock(&reg_lock);
}

int pc_target_refs(const pc_target_t *t) {
  uv_mutex_lock(&reg_lock);
  int n = t->refs;
  uv_mutex_unlock(&reg_lock);
  return n;
}

int pc_target_is_name(const pc_target_t *t) { return t->is_name; }
const char *pc_target_host(const pc_target_t *t) { return t->host; }
uint16_t pc_target_port(const pc_target_t *t) { return t->port; }
const char *pc_target_listener(const pc_target_t *t) { return t->listener; }
const char *pc_target_spec(const pc_target_t *t) { return t->spec; }
const char *pc_target_unresolved_text(const pc_target_t *t) { return t->unresolved; }
void *pc_target_dns_state(const pc_target_t *t) { return t->dns; }
void pc_target_set_dns_state(pc_target_t *t, void *state) { t->dns = state; }

size_t pc_target_size(pc_target_t *t) {
  uv_mutex_lock(&t->lock);
  size_t n = t->neps;
  uv_mutex_unlock(&t->lock);
  return n;
}

int pc_endpoint_same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port &&
           memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
  }
  const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
  return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
}

void pc_endpoint_use(pc_endpoint_t *ep) {
  pc_endpoint_ref(ep);
  __atomic_add_fetch(&ep->in_flight, 1, __ATOMIC_RELAXED);
}

/* Pinned sets grow with the destinations seen; an endpoint only the set
 * holds (no connection, no pooled one) and in good health can go. */
static void forget_unused(pc_target_t *t, uint64_t now) {
  size_t m = 0;
  for (size_t i = 0; i < t->neps; i++) {
    pc_endpoint_t *e = t->eps[i];
    if (__atomic_load_n(&e->refs, __ATOMIC_ACQUIRE) == 1 && !ejected(e, now)) {
      __atomic_store_n(&e->removed, 1, __ATOMIC_RELEASE);
      pc_endpoint_unref(e);
    } else {
      t->eps[m++] = e;
    }
  }
  t->neps = m;
}

pc_endpoint_t *pc_target_endpoint_for(pc_target_t *t, const struct sockaddr_storage *dst) {
  pc_endpoint_t *found = NULL;
  uv_mutex_lock(&t->lock);
  for (size_t i = 0; i < t->neps && !found; i++)
    if (pc_endpoint_same_addr(&t->eps[i]->addr, dst)) found = t->eps[i];
  if (!found && t->pinned) {
    /* A fresh copy of the address: only family, address and port count. */
    struct sockaddr_storage a;
    memset(&a, 0, sizeof(a));
    if (dst->ss_family == AF_INET6) {
      struct sockaddr_in6 *d = (struct sockaddr_in6 *)&a;
      const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)dst;
      d->sin6_family = AF_INET6;
      d->sin6_addr = s->sin6_addr;
      d->sin6_port = s->sin6_port;
    } else {
      struct sockaddr_in *d = (struct sockaddr_in *)&a;
      const struct sockaddr_in *s = (const struct sockaddr_in *)dst;
      d->sin_family = AF_INET;
      d->sin_addr = s->sin_addr;
      d->sin_port = s->sin_port;
    }
    if (t->neps >= PC_PINNED_MAX) forget_unused(t, pc_endpoint_now_ms());
    found = endpoint_new(t, &a);
    if (t->neps < PC_PINNED_MAX) {
      if ((t->neps & (t->neps - 1)) == 0) /* 0, 1, 2, 4, ...: grow by doubling */
        t->eps = pc_realloc(t->eps, (t->neps ? 2 * t->neps : 1) * sizeof(*t->eps));
      t->eps[t->neps++] = found;
      pc_endpoint_ref(found); /* the set's, and the caller's below */
    }
    /* else untracked: the caller's reference is endpoint_new's */
    __atomic_add_fetch(&found->in_flight, 1, __ATOMIC_RELAXED);
    uv_mutex_unlock(&t->lock);
    return found;
  }
  if (found) pc_endpoint_use(found);
  uv_mutex_unlock(&t->lock);
  return found;
}

pc_endpoint_t *pc_target_pick(pc_target_t *t, const pc_endpoint_t *avoid) {
  if (!t->is_name && !t->pinned) {
    /* An IP literal's one endpoint never changes: no lock on the path
     * every connection and request of such a listener takes. */
    pc_endpoint_t *ep = t->eps[0];
    pc_endpoint_ref(ep);
    __atomic_add_fetch(&ep->in_flight, 1, __ATOMIC_RELAXED);
    return ep;
  }
  uint64_t now = pc_endpoint_now_ms();
  uv_mutex_lock(&t->lock);
  size_t n = t->neps;
  pc_endpoint_t *best = NULL;
  if (n == 1) {
    best = t->eps[0];
  } else if (n > 1) {
    /* Two distinct draws among the healthy ones (avoid excluded); a few
     * tries find them in all but tiny healthy fractions, then a scan. */
    pc_endpoint_t *cand[2] = {NULL, NULL};
    int got = 0;
    for (int tries = 0; tries < 8 && got < 2; tries++) {
      pc_endpoint_t *e = t->eps[rnd() % n];
      if (e == avoid || ejected(e, now) || (got && e == cand[0])) continue;
      cand[got++] = e;
    }
    for (size_t i = 0, start = rnd() % n; i < n && got < 2; i++) {
      pc_endpoint_t *e = t->eps[(start + i) % n];
      if (e == avoid || ejected(e, now) || (got && e == cand[0])) continue;
      cand[got++] = e;
    }
    if (got == 0) {
      /* None healthy: retried anyway, the least ejected first is not worth
       * the bookkeeping; two draws by load, avoid only if nothing else. */
      cand[0] = t->eps[rnd() % n];
      cand[1] = t->eps[rnd() % n];
      if (cand[0] == avoid) cand[0] = cand[1];
      if (cand[1] == avoid) cand[1] = cand[0];
      got = 2;
    }
    best = cand[0];
    if (got == 2 && load(cand[1]) < load(cand[0])) best = cand[1];
  }
  if (best) {
    pc_endpoint_ref(best);
    __atomic_add_fetch(&best->in_flight, 1, __ATOMIC_RELAXED);
  }
  uv_mutex_unlock(&t->lock);
  return best;
}

int pc_target_answer(pc_target_t *t, pc_dns_result_t r, const struct sockaddr_storage *addrs,
                     size_t n, uint64_t ttl_ms) {
  uv_mutex_lock(&t->lock);
  t->resolutions[r]++;
  if (r != PC_DNS_OK || n == 0) {
    t->stale = t->neps > 0;
    t->result = r;
    uv_mutex_unlock(&t->lock);
    return 0;
  }
  pc_endpoint_t **eps = pc_calloc(n, sizeof(*eps));
  size_t m = 0;
  int changed = 0;
  for (size_t i = 0; i < n; i++) {
    int dup = 0;
    for (size_t j = 0; j < m && !dup; j++)
      dup = pc_endpoint_same_addr(&eps[j]->addr, &addrs[i]);
    if (dup) continue;
    pc_endpoint_t *e = NULL;
    for (size_t j = 0; j < t->neps && !e; j++)
      if (pc_endpoint_same_addr(&t->eps[j]->addr, &addrs[i])) e = t->eps[j];
    if (e) {
      pc_endpoint_ref(e);
    } else {
      e = endpoint_new(t, &addrs[i]);
      changed = 1;
    }
    eps[m++] = e;
  }
  for (size_t j = 0; j < t->neps; j++) {
    int kept = 0;
    for (size_t i = 0; i < m && !kept; i++)
      kept = eps[i] == t->eps[j];
    if (!kept) {
      __atomic_store_n(&t->eps[j]->removed, 1, __ATOMIC_RELEASE);
      changed = 1;
    }
    pc_endpoint_unref(t->eps[j]);
  }
  free(t->eps);
  t->eps = eps;
  t->neps = m;
  t->result = PC_DNS_OK;
  t->stale = 0;
  t->resolved_at_ms = wall_ms();
  t->ttl_ms = ttl_ms;
  uv_mutex_unlock(&t->lock);
  if (changed) __atomic_add_fetch(&epoch, 1, __ATOMIC_RELEASE);
  return changed;
}

void pc_targets_each_name(void (*fn)(pc_target_t *t, void *arg), void *arg) {
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_lock);
  for (pc_target_t *t = targets; t; t = t->next)
    if (t->is_name) fn(t, arg);
  uv_mutex_unlock(&reg_lock);
}

int pc_targets_pending(const char **why) {
  int pending = 0;
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_lock);
  for (pc_target_t *t = targets; t && !pending; t = t->next) {
    uv_mutex_lock(&t->lock);
    pending = t->result == PC_DNS_PENDING;
    uv_mutex_unlock(&t->lock);
  }
  uv_mutex_unlock(&reg_lock);
  if (pending) *why = "resolving upstream names";
  return pending;
}

void pc_target_view(pc_target_t *t, pc_target_view_t *out) {
  if (!t) {
    *out = (pc_target_view_t){.last_result = PC_DNS_STATIC, .eps = pc_calloc(1, sizeof(*out->eps))};
    return;
  }
  uint64_t now = pc_endpoint_now_ms(), wall = wall_ms();
  uv_mutex_lock(&t->lock);
  *out = (pc_target_view_t){.is_name = t->is_name,
                            .last_result = t->result,
                            .stale = t->stale,
                            .resolved_at_ms = t->resolved_at_ms,
                            .ttl_ms = t->ttl_ms,
                            .ejections = __atomic_load_n(&t->ejections, __ATOMIC_RELAXED),
                            .neps = t->neps};
  memcpy(out->resolutions, t->resolutions, sizeof(out->resolutions));
  out->eps = pc_calloc(t->neps + 1, sizeof(*out->eps));
  for (size_t i = 0; i < t->neps; i++) {
    const pc_endpoint_t *e = t->eps[i];
    pc_endpoint_view_t *v = &out->eps[i];
    memcpy(v->address, e->str, sizeof(v->address));
    uint64_t until = __atomic_load_n(&e->ejected_until, __ATOMIC_RELAXED);
    v->ejected = until > now;
    v->ejected_until_ms = v->ejected ? wall + (until - now) : 0;
    v->in_flight = load(e);
  }
  uv_mutex_unlock(&t->lock);
}

void pc_target_view_free(pc_target_view_t *v) {
  free(v->eps);
  v->eps = NULL;
}

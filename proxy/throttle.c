#include "throttle.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"

/* Probe run: a source lives in one of this many slots after its hash. */
#define PROBE 8

#define KEY_LEN PC_THROTTLE_KEY_LEN

typedef struct {
  uint64_t window_end; /* failures counted until then */
  uint64_t until;      /* throttled until then; 0 = not throttled */
  uint32_t fails;
  uint8_t key[KEY_LEN]; /* as pc_throttle_key_t; key[0] = 0: free */
} slot_t;
_Static_assert(sizeof(slot_t) == 40, "README gives the table's size");

struct pc_throttle {
  uint64_t seed;
  slot_t slots[PC_THROTTLE_SLOTS];
};

pc_throttle_t *pc_throttle_new(uint64_t seed) {
  pc_throttle_t *t = pc_calloc(1, sizeof(*t));
  t->seed = seed;
  return t;
}

void pc_throttle_free(pc_throttle_t *t) { free(t); }

int pc_throttle_key(const struct sockaddr *sa, unsigned ipv6_prefix, pc_throttle_key_t *key) {
  uint8_t *k = key->b;
  memset(k, 0, sizeof(key->b));
  if (sa->sa_family == AF_INET) {
    k[0] = 4;
    k[1] = 32;
    memcpy(k + 2, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    return 0;
  }
  if (sa->sa_family != AF_INET6) return -1;
  const uint8_t *a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
  static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (memcmp(a, mapped, 12) == 0) { /* a dual-stack listener's IPv4 peer */
    k[0] = 4;
    k[1] = 32;
    memcpy(k + 2, a + 12, 4);
    return 0;
  }
  unsigned bits = ipv6_prefix > 128 ? 128 : ipv6_prefix;
  k[0] = 6;
  k[1] = (uint8_t)bits;
  memcpy(k + 2, a, bits / 8);
  if (bits % 8) k[2 + bits / 8] = (uint8_t)(a[bits / 8] & (0xff00u >> (bits % 8)));
  return 0;
}

static size_t hash(const pc_throttle_t *t, const uint8_t key[KEY_LEN]) {
  uint64_t h = t->seed;
  for (int i = 0; i < KEY_LEN; i++) {
    h ^= key[i];
    h *= 0x100000001b3ULL;
  }
  /* splitmix64 finaliser: every key bit reaches the slot index */
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return (size_t)(h % PC_THROTTLE_SLOTS);
}

static int expired(const slot_t *s, uint64_t now) {
  return s->key[0] == 0 || (now >= s->window_end && (s->until == 0 || now >= s->until));
}

static const slot_t *find(const pc_throttle_t *t, const uint8_t key[KEY_LEN], uint64_t now) {
  size_t h = hash(t, key);
  for (int i = 0; i < PROBE; i++) {
    const slot_t *s = &t->slots[(h + (size_t)i) % PC_THROTTLE_SLOTS];
    if (s->key[0] && memcmp(s->key, key, KEY_LEN) == 0) return expired(s, now) ? NULL : s;
  }
  return NULL;
}

int pc_throttle_blocked(const pc_throttle_t *t, const pc_throttle_key_t *key, uint64_t now) {
  if (!key->b[0]) return 0;
  const slot_t *s = find(t, key->b, now);
  return s && s->until > now;
}

/* What evicting s costs: nothing if it is expired, then its failures if it
 * is not throttled, and most for a throttled one (the one whose cool-down
 * ends first is cheapest among those). */
static uint64_t cost(const slot_t *s, uint64_t now) {
  if (expired(s, now)) return 0;
  if (s->until == 0) return 1 + (uint64_t)s->fails;
  return (1ULL << 33) + (s->until - now);
}

/* The slot for key: its own, else the run's cheapest victim, emptied. */
static slot_t *claim(pc_throttle_t *t, const uint8_t key[KEY_LEN], uint64_t now) {
  size_t h = hash(t, key);
  slot_t *victim = NULL;
  uint64_t best = UINT64_MAX;
  for (int i = 0; i < PROBE; i++) {
    slot_t *s = &t->slots[(h + (size_t)i) % PC_THROTTLE_SLOTS];
    if (s->key[0] && memcmp(s->key, key, KEY_LEN) == 0) {
      if (!expired(s, now)) return s;
      victim = s; /* the same source, starting afresh */
      break;
    }
    uint64_t c = cost(s, now);
    if (c < best) {
      best = c;
      victim = s;
    }
  }
  memset(victim, 0, sizeof(*victim));
  memcpy(victim->key, key, KEY_LEN);
  return victim;
}

int pc_throttle_fail(pc_throttle_t *t, const pc_throttle_key_t *key, uint64_t now,
                     uint32_t threshold, uint64_t window_ms, uint64_t cooldown_ms) {
  if (!key->b[0]) return 0;
  slot_t *s = claim(t, key->b, now);
  if (s->until > now) return 0; /* already throttled: nothing new to say */
  if (s->until || now >= s->window_end) {
    s->until = 0;
    s->fails = 0;
    s->window_end = now + window_ms;
  }
  if (++s->fails < threshold) return 0;
  s->until = now + cooldown_ms;
  return 1;
}

size_t pc_throttle_count(const pc_throttle_t *t, uint64_t now) {
  size_t n = 0;
  for (size_t i = 0; i < PC_THROTTLE_SLOTS; i++)
    n += !expired(&t->slots[i], now);
  return n;
}

void pc_throttle_source_str(const pc_throttle_key_t *key, char *out, size_t len) {
  char a[INET6_ADDRSTRLEN];
  if (key->b[0] == 4) {
    inet_ntop(AF_INET, key->b + 2, a, sizeof(a));
    snprintf(out, len, "%s", a);
  } else if (key->b[0] == 6) {
    inet_ntop(AF_INET6, key->b + 2, a, sizeof(a));
    snprintf(out, len, "%s/%u", a, (unsigned)key->b[1]);
  } else {
    snprintf(out, len, "?");
  }
}

/*
 * throttle.h - per-source handshake-failure throttling for one inbound
 * listener on one worker.
 *
 * A source is an IPv4 address (an IPv4-mapped IPv6 address counts as its
 * IPv4 address) or the leading `ipv6_prefix` bits of an IPv6 address
 * (limits.throttle_ipv6_prefix: 64 by default, 128 = per address; pods
 * that share a node's /64 want 128). Each source has a fixed window that starts
 * at its first failure: once `threshold` handshakes from it failed, were
 * refused or timed out within `window_ms`, it is throttled for `cooldown_ms`
 * (connections closed at accept), after which it starts afresh. Successful
 * handshakes do not reset the count: an attacker holding one valid
 * certificate could otherwise interleave it to keep failing forever.
 *
 * The table has PC_THROTTLE_SLOTS entries and never grows: a new source
 * takes a free slot, or an expired one (window over and not throttled), or
 * else evicts, within its probe run, the entry with the fewest failures
 * that is not throttled (a throttled entry is evicted only when the whole
 * run is throttled: the oldest cool-down goes). The hash is seeded per table
 * so that which addresses collide cannot be chosen from outside.
 *
 * Pure: time is passed in (ms, any monotonic clock). One thread.
 */
#ifndef PC_THROTTLE_H
#define PC_THROTTLE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define PC_THROTTLE_SLOTS 4096

typedef struct pc_throttle pc_throttle_t;

/* A source, as the table keys it: [0] is 4 or 6 (0 = none), [1] the prefix
 * length in bits (32 for IPv4), then 16 address bytes, those past the
 * prefix zero (IPv4: 4 bytes, then zeros). The prefix is part of the key, so
 * after a reload changes it the old entries never match and age out. Small
 * enough to keep in every connection. */
#define PC_THROTTLE_KEY_LEN 18
typedef struct {
  uint8_t b[PC_THROTTLE_KEY_LEN];
} pc_throttle_key_t;

/* Fills key with sa's source: an IPv6 address (not IPv4-mapped) keeps its
 * leading ipv6_prefix bits (above 128 counts as 128). Returns 0, or -1 (key
 * b[0] = 0) for a family other than IPv4 and IPv6. */
int pc_throttle_key(const struct sockaddr *sa, unsigned ipv6_prefix, pc_throttle_key_t *key);

/* A new, empty table (owned by the caller; pc_throttle_free). Never NULL. */
pc_throttle_t *pc_throttle_new(uint64_t seed);
void pc_throttle_free(pc_throttle_t *t);

/* 1 if key's source is throttled at now, else 0. A key with b[0] = 0 is
 * never throttled. */
int pc_throttle_blocked(const pc_throttle_t *t, const pc_throttle_key_t *key, uint64_t now);

/* Counts one failed handshake from key's source. Returns 1 if this failure
 * started a cool-down (the caller logs it, once), else 0. */
int pc_throttle_fail(pc_throttle_t *t, const pc_throttle_key_t *key, uint64_t now,
                     uint32_t threshold, uint64_t window_ms, uint64_t cooldown_ms);

/* Sources the table holds at now (expired entries not counted). */
size_t pc_throttle_count(const pc_throttle_t *t, uint64_t now);

/* Writes key's source as text ("192.0.2.1", "2001:db8:1:2::/64" or, with
 * prefix 128, "2001:db8:1:2::7/128"). */
void pc_throttle_source_str(const pc_throttle_key_t *key, char *out, size_t len);

#endif

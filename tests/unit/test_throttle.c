/*
 * test_throttle.c - throttle.h: what a source is, the window, the cool-down,
 * and that the table keeps its size (and its throttled sources) when more
 * sources fail than it has slots.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "check.h"
#include "throttle.h"

static pc_throttle_key_t v4(const char *ip) {
  struct sockaddr_in sa = {.sin_family = AF_INET};
  inet_pton(AF_INET, ip, &sa.sin_addr);
  pc_throttle_key_t k;
  pc_throttle_key((const struct sockaddr *)&sa, 64, &k);
  return k;
}

static pc_throttle_key_t v6p(const char *ip, unsigned prefix) {
  struct sockaddr_in6 sa = {.sin6_family = AF_INET6};
  CHECK_INT_EQ(inet_pton(AF_INET6, ip, &sa.sin6_addr), 1);
  pc_throttle_key_t k;
  pc_throttle_key((const struct sockaddr *)&sa, prefix, &k);
  return k;
}

static pc_throttle_key_t v6(const char *ip) { return v6p(ip, 64); }

static int same(const char *a, const char *b, unsigned prefix) {
  pc_throttle_key_t ka = v6p(a, prefix), kb = v6p(b, prefix);
  return memcmp(&ka, &kb, sizeof(ka)) == 0;
}

static void check_str(const char *ip, unsigned prefix, const char *want) {
  pc_throttle_key_t k = v6p(ip, prefix);
  char s[64];
  pc_throttle_source_str(&k, s, sizeof(s));
  CHECK_STR_EQ(s, want);
}

static void test_sources(void) {
  pc_throttle_key_t a = v6("2001:db8:1:2::1"), b = v6("2001:db8:1:2:ffff::9");
  pc_throttle_key_t c = v6("2001:db8:1:3::1");
  CHECK(memcmp(&a, &b, sizeof(a)) == 0); /* one /64 */
  CHECK(memcmp(&a, &c, sizeof(a)) != 0);
  pc_throttle_key_t m = v6("::ffff:192.0.2.7"), p = v4("192.0.2.7");
  CHECK(memcmp(&m, &p, sizeof(m)) == 0); /* IPv4-mapped is the IPv4 address */
  char s[64];
  pc_throttle_source_str(&a, s, sizeof(s));
  CHECK_STR_EQ(s, "2001:db8:1:2::/64");
  pc_throttle_source_str(&p, s, sizeof(s));
  CHECK_STR_EQ(s, "192.0.2.7");
  struct sockaddr un = {.sa_family = AF_UNIX};
  pc_throttle_key_t u;
  CHECK_INT_EQ(pc_throttle_key(&un, 64, &u), -1);
  pc_throttle_t *t = pc_throttle_new(1);
  CHECK_INT_EQ(pc_throttle_fail(t, &u, 0, 1, 10, 10), 0);
  CHECK_INT_EQ(pc_throttle_blocked(t, &u, 0), 0);
  pc_throttle_free(t);
}

/* limits.throttle_ipv6_prefix: addresses that differ only past the prefix
 * are one source, addresses that differ inside it are not. */
static void test_ipv6_prefix(void) {
  /* 64: the interface ID is the host's own choice */
  CHECK(same("fd00:99::2", "fd00:99::3", 64));
  CHECK(same("fd00:99::2", "fd00:99::ffff:ffff:ffff:3", 64));
  CHECK(!same("fd00:99::2", "fd00:99:0:1::2", 64));
  check_str("fd00:99::ffff:2", 64, "fd00:99::/64");
  /* 128: one address each, so pods sharing a node's /64 are apart */
  CHECK(!same("fd00:99::2", "fd00:99::3", 128));
  CHECK(!same("fd00:99::2", "fd00:99::1:0:0:2", 128));
  CHECK(same("fd00:99::2", "fd00:99::2", 128));
  check_str("fd00:99::ffff:2", 128, "fd00:99::ffff:2/128");
  /* 80: bits 64-79 count, 80-127 do not */
  CHECK(same("fd00:99::2", "fd00:99::ffff:ffff:3", 80));
  CHECK(!same("fd00:99::2", "fd00:99:0:0:1::2", 80));
  check_str("fd00:99::1:ffff:ffff:2", 80, "fd00:99:0:0:1::/80");
  /* 52: not on a byte boundary, the masked nibble included */
  CHECK(same("2001:db8:1:2000::1", "2001:db8:1:2fff::1", 52));
  CHECK(!same("2001:db8:1:2000::1", "2001:db8:1:1000::1", 52));
  check_str("2001:db8:1:2fff::1", 52, "2001:db8:1:2000::/52");
  /* Keys made under different prefixes never match: a reload's new
   * setting starts afresh instead of hitting an old entry by chance. */
  pc_throttle_key_t k64 = v6p("fd00:99::", 64), k128 = v6p("fd00:99::", 128);
  CHECK(memcmp(&k64, &k128, sizeof(k64)) != 0);
  /* An IPv4-mapped peer stays one IPv4 address whatever the prefix. */
  pc_throttle_key_t m = v6p("::ffff:192.0.2.7", 128), n = v6p("::ffff:192.0.2.8", 48);
  pc_throttle_key_t p = v4("192.0.2.7"), q = v4("192.0.2.8");
  CHECK(memcmp(&m, &p, sizeof(m)) == 0);
  CHECK(memcmp(&n, &q, sizeof(n)) == 0);
  CHECK(memcmp(&m, &n, sizeof(m)) != 0);

  /* Through the table: a source throttled at 64 throttles its /64
   * neighbour; at 128 the neighbour is not. */
  pc_throttle_t *t = pc_throttle_new(3);
  pc_throttle_key_t a64 = v6p("fd00:99::2", 64), b64 = v6p("fd00:99::3", 64);
  pc_throttle_key_t a128 = v6p("fd00:99::2", 128), b128 = v6p("fd00:99::3", 128);
  CHECK_INT_EQ(pc_throttle_fail(t, &a64, 0, 2, 1000, 1000), 0);
  CHECK_INT_EQ(pc_throttle_fail(t, &a64, 1, 2, 1000, 1000), 1);
  CHECK_INT_EQ(pc_throttle_blocked(t, &b64, 2), 1);
  CHECK_INT_EQ(pc_throttle_fail(t, &a128, 0, 2, 1000, 1000), 0);
  CHECK_INT_EQ(pc_throttle_fail(t, &a128, 1, 2, 1000, 1000), 1);
  CHECK_INT_EQ(pc_throttle_blocked(t, &a128, 2), 1);
  CHECK_INT_EQ(pc_throttle_blocked(t, &b128, 2), 0);
  pc_throttle_free(t);
}

static void test_window_and_cooldown(void) {
  pc_throttle_t *t = pc_throttle_new(42);
  pc_throttle_key_t a = v4("10.0.0.1"), b = v4("10.0.0.2");
  /* threshold 3 in 100 ms, cool-down 1000 ms */
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 0, 3, 100, 1000), 0);
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 50, 3, 100, 1000), 0);
  /* the window ended: counting starts again */
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 100, 3, 100, 1000), 0);
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 110, 3, 100, 1000), 0);
  CHECK_INT_EQ(pc_throttle_blocked(t, &a, 120), 0);
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 120, 3, 100, 1000), 1); /* said once */
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 130, 3, 100, 1000), 0);
  CHECK_INT_EQ(pc_throttle_blocked(t, &a, 130), 1);
  CHECK_INT_EQ(pc_throttle_blocked(t, &b, 130), 0);
  CHECK_INT_EQ(pc_throttle_blocked(t, &a, 1119), 1);
  CHECK_INT_EQ(pc_throttle_blocked(t, &a, 1120), 0);
  CHECK_INT_EQ((int)pc_throttle_count(t, 1119), 1);
  CHECK_INT_EQ((int)pc_throttle_count(t, 1120), 0);
  /* afresh after the cool-down */
  CHECK_INT_EQ(pc_throttle_fail(t, &a, 1200, 3, 100, 1000), 0);
  CHECK_INT_EQ(pc_throttle_blocked(t, &a, 1200), 0);
  pc_throttle_free(t);
}

static void test_bounded(void) {
  pc_throttle_t *t = pc_throttle_new(7);
  pc_throttle_key_t bad = v4("198.51.100.1");
  CHECK_INT_EQ(pc_throttle_fail(t, &bad, 0, 1, 1000000, 1000000), 1);
  /* Three times as many sources as slots, each failing once. */
  for (unsigned i = 0; i < 3 * PC_THROTTLE_SLOTS; i++) {
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(0x0a000000u + i);
    pc_throttle_key_t k;
    pc_throttle_key((const struct sockaddr *)&sa, 64, &k);
    pc_throttle_fail(t, &k, 1, 5, 1000000, 1000000);
  }
  size_t n = pc_throttle_count(t, 2);
  CHECK(n <= PC_THROTTLE_SLOTS);
  CHECK(n > PC_THROTTLE_SLOTS * 9 / 10);
  /* A throttled source is evicted last: it is still throttled. */
  CHECK_INT_EQ(pc_throttle_blocked(t, &bad, 2), 1);
  pc_throttle_free(t);
}

int main(void) {
  test_sources();
  test_ipv6_prefix();
  test_window_and_cooldown();
  test_bounded();
  return CHECK_DONE("throttle");
}

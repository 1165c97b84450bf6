/*
 * test_ticketkeys.c - ticketkeys.h: a key seals for PC_TLS_TICKET_KEY_S,
 * then only opens until twice that after its birth; the next seal makes a
 * fresh, different key; a name never issued opens nothing.
 */
#include <string.h>

#include "check.h"
#include "ticketkeys.h"

#define H PC_TLS_TICKET_KEY_S

static int opens(pc_tkeys_t *tk, const pc_tkey_t *k, time_t now) {
  pc_tkey_t got;
  memset(&got, 0, sizeof(got));
  if (!pc_tkeys_opening(tk, k->name, now, &got)) return 0;
  return memcmp(got.key, k->key, sizeof(got.key)) == 0 && got.born == k->born;
}

static int same_key(const pc_tkey_t *a, const pc_tkey_t *b) {
  return memcmp(a->name, b->name, PC_TKEY_NAME) == 0 && memcmp(a->key, b->key, 32) == 0;
}

static void test_schedule(void) {
  const time_t t0 = 1800000000;
  pc_tkeys_t *tk = pc_tkeys_new();
  pc_tkey_t a, b, c, k;
  /* No key opens anything before the first seal. */
  memset(&a, 0, sizeof(a));
  CHECK_INT_EQ(opens(tk, &a, t0), 0);

  pc_tkeys_sealing(tk, t0, &a);
  CHECK_INT_EQ((long long)a.born, (long long)t0);
  CHECK_INT_EQ(opens(tk, &a, t0), 1);
  /* The same key seals for the whole period. */
  pc_tkeys_sealing(tk, t0 + H - 1, &k);
  CHECK(same_key(&k, &a));

  /* Then a fresh one seals; the old one still opens. */
  pc_tkeys_sealing(tk, t0 + H, &b);
  CHECK(!same_key(&b, &a));
  CHECK(memcmp(b.name, a.name, PC_TKEY_NAME) != 0);
  CHECK_INT_EQ((long long)b.born, (long long)(t0 + H));
  CHECK_INT_EQ(opens(tk, &b, t0 + H), 1);
  CHECK_INT_EQ(opens(tk, &a, t0 + H), 1);
  CHECK_INT_EQ(opens(tk, &a, t0 + 2 * H - 1), 1);
  /* Twice the period after its birth, a key opens nothing. */
  CHECK_INT_EQ(opens(tk, &a, t0 + 2 * H), 0);
  CHECK_INT_EQ(opens(tk, &b, t0 + 2 * H), 1);

  /* The next rotation drops the oldest key even within its opening time. */
  pc_tkeys_sealing(tk, t0 + 2 * H, &c);
  CHECK(!same_key(&c, &b) && !same_key(&c, &a));
  CHECK_INT_EQ(opens(tk, &c, t0 + 2 * H), 1);
  CHECK_INT_EQ(opens(tk, &b, t0 + 2 * H), 1);
  CHECK_INT_EQ(opens(tk, &a, t0 + H), 0);

  /* A name never issued opens nothing. */
  pc_tkey_t forged = c;
  forged.name[0] ^= 1;
  CHECK_INT_EQ(opens(tk, &forged, t0 + 2 * H), 0);
  pc_tkeys_free(tk);
  pc_tkeys_free(NULL);
}

static void test_contexts_differ(void) {
  /* Two contexts (two generations) never share a key. */
  pc_tkeys_t *x = pc_tkeys_new(), *y = pc_tkeys_new();
  pc_tkey_t kx, ky;
  pc_tkeys_sealing(x, 1000, &kx);
  pc_tkeys_sealing(y, 1000, &ky);
  CHECK(!same_key(&kx, &ky));
  CHECK_INT_EQ(opens(y, &kx, 1000), 0);
  pc_tkeys_free(x);
  pc_tkeys_free(y);
}

int main(void) {
  test_schedule();
  test_contexts_differ();
  return CHECK_DONE("ticketkeys");
}

#include "ticketkeys.h"

#include <stdlib.h>
#include <string.h>

#include <pthread.h>

#include <openssl/mem.h>
#include <openssl/rand.h>

#include "compat.h"

struct pc_tkeys {
  pthread_mutex_t lock;
  pc_tkey_t cur, prev;
};

pc_tkeys_t *pc_tkeys_new(void) {
  pc_tkeys_t *tk = pc_calloc(1, sizeof(*tk));
  pthread_mutex_init(&tk->lock, NULL);
  return tk;
}

void pc_tkeys_free(pc_tkeys_t *tk) {
  if (!tk) return;
  pthread_mutex_destroy(&tk->lock);
  OPENSSL_cleanse(tk, sizeof(*tk));
  free(tk);
}

void pc_tkeys_sealing(pc_tkeys_t *tk, time_t now, pc_tkey_t *out) {
  pthread_mutex_lock(&tk->lock);
  if (!tk->cur.born || now - tk->cur.born >= PC_TLS_TICKET_KEY_S) {
    tk->prev = tk->cur;
    RAND_bytes(tk->cur.name, sizeof(tk->cur.name));
    RAND_bytes(tk->cur.key, sizeof(tk->cur.key));
    tk->cur.born = now;
  }
  *out = tk->cur;
  pthread_mutex_unlock(&tk->lock);
}

int pc_tkeys_opening(pc_tkeys_t *tk, const uint8_t *name, time_t now, pc_tkey_t *out) {
  int found = 0;
  pthread_mutex_lock(&tk->lock);
  const pc_tkey_t *ks[] = {&tk->cur, &tk->prev};
  for (size_t i = 0; i < PC_ARRAY_SIZE(ks) && !found; i++) {
    if (ks[i]->born && now - ks[i]->born < 2 * PC_TLS_TICKET_KEY_S &&
        memcmp(ks[i]->name, name, PC_TKEY_NAME) == 0) {
      *out = *ks[i];
      found = 1;
    }
  }
  pthread_mutex_unlock(&tk->lock);
  return found;
}

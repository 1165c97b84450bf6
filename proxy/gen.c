#include "gen.h"

#include <pthread.h>
#include <stdlib.h>

#include "compat.h"
#include "tls.h"

static pthread_mutex_t current_lock = PTHREAD_MUTEX_INITIALIZER;
static pc_gen_t *current;
static uint64_t next_id = 1; /* main thread only (pc_gen_number) */

static void gen_free(pc_gen_t *g) {
  SSL_CTX_free(g->server_ctx);
  SSL_CTX_free(g->client_ctx);
  pc_certs_free(g->certs);
  pc_config_free(g->cfg);
  free(g);
}

/* Loads certificates for g->cfg and builds both contexts. */
static int finish(pc_gen_t *g, pc_gen_t **out, char *err, size_t errlen) {
  int rc = pc_certs_load(g->cfg, &g->certs, err, errlen);
  if (rc) goto fail;
  rc = -1;
  g->server_ctx = pc_tls_ctx_new(g->cfg, g->certs, 1, err, errlen);
  if (!g->server_ctx) goto fail;
  g->client_ctx = pc_tls_ctx_new(g->cfg, g->certs, 0, err, errlen);
  if (!g->client_ctx) goto fail;
  *out = g;
  return 0;
fail:
  gen_free(g);
  return rc;
}

int pc_gen_build(const char *path, pc_gen_t **out, char *err, size_t errlen) {
  pc_gen_t *g = pc_calloc(1, sizeof(*g));
  g->refs = 1;
  *out = NULL;
  if (pc_config_load(path, &g->cfg, err, errlen)) {
    gen_free(g);
    return -1;
  }
  return finish(g, out, err, errlen);
}

int pc_gen_rebuild_certs(const pc_gen_t *cur, pc_gen_t **out, char *err, size_t errlen) {
  pc_gen_t *g = pc_calloc(1, sizeof(*g));
  g->refs = 1;
  *out = NULL;
  g->cfg = cur->cfg;
  pc_config_ref(g->cfg);
  return finish(g, out, err, errlen);
}

/* The number is written once, by the main thread, before g is handed to a
 * worker (under the worker's lock, which orders it before the worker's reads)
 * or published here: numbering at publish alone raced with workers that had
 * already adopted g and read its id (a reload hands g over, then publishes). */
void pc_gen_number(pc_gen_t *g) {
  if (!g->id) g->id = next_id++;
}

void pc_gen_publish(pc_gen_t *g) {
  if (g) pc_gen_number(g);
  pthread_mutex_lock(&current_lock);
  pc_gen_t *old = current;
  current = g;
  pthread_mutex_unlock(&current_lock);
  if (old) pc_gen_unref(old);
}

pc_gen_t *pc_gen_current(void) {
  pthread_mutex_lock(&current_lock);
  pc_gen_t *g = current;
  if (g) __atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
  pthread_mutex_unlock(&current_lock);
  return g;
}

void pc_gen_ref(pc_gen_t *g) { __atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED); }

void pc_gen_unref(pc_gen_t *g) {
  if (g && __atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) == 0) gen_free(g);
}

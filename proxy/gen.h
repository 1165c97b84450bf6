/*
 * gen.h - immutable, refcounted generations of config + certificates + TLS
 * contexts.
 *
 * Everything a new connection needs to decide and handshake lives in one
 * generation. A connection takes a reference when it is accepted and drops it
 * when it is freed, so a future publish (hot reload) never changes anything
 * under a connection in flight. Building is parse -> validate -> load certs ->
 * build contexts; --check runs exactly that and publishes nothing.
 */
#ifndef PC_GEN_H
#define PC_GEN_H

#include <stdint.h>

#include <openssl/ssl.h>

#include "certstore.h"
#include "config.h"

typedef struct pc_gen {
  uint64_t id; /* 1 for the first generation, +1 per publish; 0 until numbered */
  pc_config_t *cfg;
  pc_certs_t *certs;
  SSL_CTX *server_ctx; /* inbound listeners */
  SSL_CTX *client_ctx; /* outbound listeners */
  int refs;            /* only touched through pc_gen_ref / pc_gen_unref */
} pc_gen_t;

/* Builds a generation from the config file at path. Returns 0 and *out (one
 * reference, owned by the caller), or -1 (PC_CERTS_MISMATCH when only the
 * key/certificate pair disagreed) with one error line in err. */
int pc_gen_build(const char *path, pc_gen_t **out, char *err, size_t errlen);

/* Builds a generation that shares cur's config and re-reads the identity
 * files (a certificate rotation). Same returns as pc_gen_build. */
int pc_gen_rebuild_certs(const pc_gen_t *cur, pc_gen_t **out, char *err, size_t errlen);

/* Gives g the next generation number unless it has one. Main thread, once
 * nothing can stop g being published and before any other thread sees g:
 * workers read g->id without a lock (pc_workers_publish numbers g just before
 * it hands g over). */
void pc_gen_number(pc_gen_t *g);

/* Makes g the current generation (numbering it first if it has no number);
 * takes over the caller's reference. NULL drops the current one (process
 * exit). Main thread. */
void pc_gen_publish(pc_gen_t *g);

/* Returns the current generation with a new reference, or NULL before the
 * first publish. Any thread. */
pc_gen_t *pc_gen_current(void);

void pc_gen_ref(pc_gen_t *g);
/* Drops a reference; the last one frees the generation. Any thread. */
void pc_gen_unref(pc_gen_t *g);

#endif

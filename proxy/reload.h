/*
 * reload.h - following certificate rotations and SIGHUP without a restart.
 *
 * Runs on the main thread's loop. With identity.watch, the directories of the
 * identity files are watched (so a Kubernetes `..data` symlink swap, a rename
 * over a file and an in-place rewrite are all seen); events are debounced, the
 * files are re-read through their symlinks and compared by content, and only
 * a changed set is validated and published. A periodic re-check
 * (identity.poll_interval_ms) catches whatever the events missed. A set whose
 * key does not match its certificate is retried for a moment (a rotation
 * half-way through), then counted as failed. Whatever fails, the last good
 * generation keeps serving and an error says why.
 *
 * SIGHUP rebuilds everything from the config file (policy, TLS settings,
 * limits, listeners) and the certificates, and publishes only if all of it is
 * valid and every added listener could bind.
 */
#ifndef PC_RELOAD_H
#define PC_RELOAD_H

#include <stdint.h>

#include <uv.h>

typedef enum { PC_RELOAD_CERTS, PC_RELOAD_CONFIG, PC_RELOAD_KINDS } pc_reload_kind_t;

typedef struct {
  uint64_t ok[PC_RELOAD_KINDS], failed[PC_RELOAD_KINDS];
  int last_failed; /* the most recent attempt failed */
} pc_reload_stats_t;

/* Starts watching/polling for the current generation; path is the config
 * file SIGHUP re-reads. Call after the first publish. Main thread. */
void pc_reload_start(uv_loop_t *loop, const char *path);

/* Rebuilds config and certificates (SIGHUP). Main thread. */
void pc_reload_config(void);

/* Closes the watch and timer handles. Main thread. */
void pc_reload_stop(void);

/* A copy of the counters. Any thread (values may be a moment old). */
void pc_reload_stats(pc_reload_stats_t *out);

/* "certs" / "config". */
const char *pc_reload_kind_word(pc_reload_kind_t k);

#endif

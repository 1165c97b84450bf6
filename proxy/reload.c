#include "reload.h"

#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "certstore.h"
#include "compat.h"
#include "dns.h"
#include "gen.h"
#include "log.h"
#include "worker.h"

#define DEBOUNCE_MS 100
#define MISMATCH_RETRY_MS 200
#define MISMATCH_WINDOW_MS 2000
#define MAX_WATCHES 4

static uv_loop_t *loop;
static char *config_path;
static int nwatches; /* entries of watches[] in use (declared with watch_t below) */
static uv_timer_t check_timer, poll_timer;
static uint64_t mismatch_since; /* loop time of the first mismatch in a row; 0 = none */
static uint8_t failed_digest[32];
static int have_failed_digest;
static pc_reload_stats_t stats;

const char *pc_reload_kind_word(pc_reload_kind_t k) {
  return k == PC_RELOAD_CONFIG ? "config" : "certs";
}

void pc_reload_stats(pc_reload_stats_t *out) {
  for (int k = 0; k < PC_RELOAD_KINDS; k++) {
    out->ok[k] = __atomic_load_n(&stats.ok[k], __ATOMIC_RELAXED);
    out->failed[k] = __atomic_load_n(&stats.failed[k], __ATOMIC_RELAXED);
  }
  out->last_failed = __atomic_load_n(&stats.last_failed, __ATOMIC_RELAXED);
}

static void count(pc_reload_kind_t k, int ok) {
  __atomic_add_fetch(ok ? &stats.ok[k] : &stats.failed[k], 1, __ATOMIC_RELAXED);
  __atomic_store_n(&stats.last_failed, !ok, __ATOMIC_RELAXED);
}

/* Warns when our own certificate is close to expiry, louder when the last
 * reload failed (the rotation that should replace it is not getting through). */
static void check_expiry(const pc_gen_t *g) {
  time_t now = time(NULL);
  int64_t left = (int64_t)g->certs->not_after - (int64_t)now;
  if (left > (int64_t)g->cfg->identity.expiry_warning_hours * 3600) return;
  char when[32];
  pc_log_utc(g->certs->not_after, when, sizeof(when));
  pc_log(PC_LOG_WARN, "certificate expires soon: %s serial=%s not_after=%s (in %lld hours)%s",
         g->certs->spiffe_id, g->certs->serial, when, (long long)(left / 3600),
         stats.last_failed ? "; the last reload failed, so nothing is replacing it yet" : "");
}

static void log_ok(pc_reload_kind_t k, const pc_gen_t *g) {
  char when[32];
  pc_log_utc(g->certs->not_after, when, sizeof(when));
  pc_log(PC_LOG_INFO, "reload ok: kind=%s generation=%llu serial=%s not_after=%s",
         pc_reload_kind_word(k), (unsigned long long)g->id, g->certs->serial, when);
}

static void log_failed(pc_reload_kind_t k, const char *why) {
  pc_gen_t *cur = pc_gen_current();
  pc_log(PC_LOG_ERROR, "reload failed: kind=%s: %s; keeping generation %llu",
         pc_reload_kind_word(k), why, (unsigned long long)(cur ? cur->id : 0));
  if (cur) {
    check_expiry(cur);
    pc_gen_unref(cur);
  }
}

static void schedule_check(uint64_t ms);

/* Re-reads the identity files; publishes a new generation if they changed and
 * are valid. */
static void check_certs(int from_poll) {
  pc_gen_t *cur = pc_gen_current(), *g = NULL;
  uint8_t d[32];
  char err[1024];
  if (!cur) return;
  int readable = pc_certs_digest(cur->cfg, d) == 0;
  if (readable && memcmp(d, cur->certs->digest, sizeof(d)) == 0) {
    mismatch_since = 0;
    goto out; /* unchanged (or changed back) */
  }
  /* File events skip content that already failed (one report per bad set);
   * the poll retries it, since time alone can make a set valid (a
   * certificate whose notBefore was a little in the future). */
  if (!from_poll && readable && have_failed_digest && memcmp(d, failed_digest, sizeof(d)) == 0)
    goto out;
  int rc = pc_gen_rebuild_certs(cur, &g, err, sizeof(err));
  if (rc == PC_CERTS_MISMATCH) {
    uint64_t now = uv_now(loop);
    if (!mismatch_since) mismatch_since = now;
    if (now - mismatch_since < MISMATCH_WINDOW_MS) {
      pc_log(PC_LOG_WARN, "reload retry: kind=certs: %s", err);
      schedule_check(MISMATCH_RETRY_MS);
      goto out;
    }
  }
  mismatch_since = 0;
  if (rc != 0) {
    count(PC_RELOAD_CERTS, 0);
    if (readable) {
      memcpy(failed_digest, d, sizeof(d));
      have_failed_digest = 1;
    }
    log_failed(PC_RELOAD_CERTS, err);
    goto out;
  }
  have_failed_digest = 0;
  /* Same config, so no listener changes: handing over cannot fail. */
  if (pc_workers_publish(g, err, sizeof(err)) != 0) {
    count(PC_RELOAD_CERTS, 0);
    log_failed(PC_RELOAD_CERTS, err);
    pc_gen_unref(g);
    goto out;
  }
  pc_gen_ref(g);
  pc_gen_publish(g);
  count(PC_RELOAD_CERTS, 1);
  log_ok(PC_RELOAD_CERTS, g);
  check_expiry(g);
  pc_gen_unref(g);
out:
  pc_gen_unref(cur);
}

static void on_check_timer(uv_timer_t *t) { check_certs(0); }

static void schedule_check(uint64_t ms) { uv_timer_start(&check_timer, on_check_timer, ms, 0); }

static void on_fs_event(uv_fs_event_t *h, const char *name, int events, int status) {
  if (status < 0) {
    pc_log(PC_LOG_WARN, "watching a certificate directory: %s (the periodic re-check still runs)",
           uv_strerror(status));
    return;
  }
  schedule_check(DEBOUNCE_MS); /* restarts: a burst of events makes one check */
}

static void on_poll_timer(uv_timer_t *t) {
  check_certs(1);
  pc_gen_t *cur = pc_gen_current();
  if (cur) {
    check_expiry(cur);
    pc_gen_unref(cur);
  }
}

typedef struct {
  uv_fs_event_t h;
  char *dir;
} watch_t;

static watch_t *watches[MAX_WATCHES];

static void on_watch_closed(uv_handle_t *h) {
  watch_t *w = pc_container_of((uv_fs_event_t *)h, watch_t, h);
  free(w->dir);
  free(w);
}

static void unwatch(void) {
  for (int i = 0; i < nwatches; i++)
    uv_close((uv_handle_t *)&watches[i]->h, on_watch_closed);
  nwatches = 0;
}

static void watch_dir_of(const char *path) {
  char *copy = pc_strdup(path);
  char *dir = pc_strdup(dirname(copy));
  free(copy);
  for (int i = 0; i < nwatches; i++) {
    if (strcmp(watches[i]->dir, dir) == 0) {
      free(dir);
      return;
    }
  }
  if (nwatches == MAX_WATCHES) { /* cert, key, ca, passphrase: never more */
    free(dir);
    return;
  }
  watch_t *w = pc_calloc(1, sizeof(*w));
  w->dir = dir;
  uv_fs_event_init(loop, &w->h);
  int rc = uv_fs_event_start(&w->h, on_fs_event, dir, 0);
  if (rc) {
    pc_log(PC_LOG_WARN, "cannot watch %s: %s (the periodic re-check still runs)", dir,
           uv_strerror(rc));
    uv_close((uv_handle_t *)&w->h, on_watch_closed);
    return;
  }
  watches[nwatches++] = w;
}

/* Applies the identity watch and poll settings of g (after unwatch()). */
static void apply_watch(const pc_gen_t *g) {
  if (g->cfg->identity.watch) {
    watch_dir_of(g->cfg->identity.cert);
    watch_dir_of(g->cfg->identity.key);
    watch_dir_of(g->cfg->identity.ca);
    if (g->cfg->identity.key_passphrase_file) watch_dir_of(g->cfg->identity.key_passphrase_file);
  }
  uint64_t every = g->cfg->identity.poll_interval_ms;
  uv_timer_start(&poll_timer, on_poll_timer, every, every);
}

void pc_reload_start(uv_loop_t *l, const char *path) {
  loop = l;
  config_path = pc_strdup(path);
  uv_timer_init(loop, &check_timer);
  uv_timer_init(loop, &poll_timer);
  pc_gen_t *cur = pc_gen_current();
  apply_watch(cur);
  check_expiry(cur);
  pc_gen_unref(cur);
}

void pc_reload_config(void) {
  pc_gen_t *g = NULL, *cur = pc_gen_current();
  char err[1024];
  int rc = pc_gen_build(config_path, &g, err, sizeof(err));
  if (rc == 0 && g->cfg->workers != cur->cfg->workers) {
    pc_log(PC_LOG_WARN, "reload: workers = %d needs a restart; keeping %d worker threads",
           g->cfg->workers, cur->cfg->workers);
  }
  if (rc == 0 && strcmp(g->cfg->admin.listen_str, cur->cfg->admin.listen_str) != 0)
    pc_log(PC_LOG_WARN,
           "reload: admin.listen = \"%s\" needs a restart; the admin server stays on %s",
           g->cfg->admin.listen_str, cur->cfg->admin.listen_str);
  if (rc == 0 && pc_workers_publish(g, err, sizeof(err)) != 0) rc = -1;
  if (rc != 0) {
    count(PC_RELOAD_CONFIG, 0);
    log_failed(PC_RELOAD_CONFIG, err);
    if (g) pc_gen_unref(g);
    pc_gen_unref(cur);
    return;
  }
  pc_gen_ref(g);
  pc_gen_publish(g);
  pc_dns_sync(g->cfg);
  pc_log_init(g->cfg->log.level, g->cfg->log.access);
  pc_log_set_buffer(g->cfg->log.buffer_bytes);
  count(PC_RELOAD_CONFIG, 1);
  have_failed_digest = 0;
  mismatch_since = 0;
  log_ok(PC_RELOAD_CONFIG, g);
  unwatch();
  apply_watch(g);
  check_expiry(g);
  pc_gen_unref(g);
  pc_gen_unref(cur);
}

void pc_reload_stop(void) {
  unwatch();
  uv_close((uv_handle_t *)&check_timer, NULL);
  uv_close((uv_handle_t *)&poll_timer, NULL);
  free(config_path);
  config_path = NULL;
}

/*
 * main.c - command line, process setup, signals.
 *
 * portcullis [-c FILE] | --check -c FILE | --version
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <openssl/ssl.h>
#include <uv.h>

#include "compat.h"
#include "conn.h"
#include "dns.h"
#include "gen.h"
#include "log.h"
#include "admin.h"
#include "reload.h"
#include "stream.h"
#include "worker.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: portcullis [-c FILE]          run (default config: %s)\n"
          "       portcullis --check -c FILE    validate the config and load every cert/key\n"
          "       portcullis --version\n",
          PC_DEFAULT_CONFIG);
}

static void print_version(void) {
  printf("portcullis %s (BoringSSL %s, libuv %s)\n", PC_VERSION, OPENSSL_VERSION_TEXT,
         uv_version_string());
}

/* Ask for as many descriptors as the hard limit allows; what they can hold
 * is budgeted by every publish (worker.h pc_workers_publish). */
static void raise_descriptor_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

static const char *config_path;
static uv_timer_t drain_deadline, drain_poll;
static int draining;

static void on_drain_poll(uv_timer_t *t) {
  if (pc_conn_active() > 0) return;
  pc_log(PC_LOG_INFO, "drained: no connection left");
  uv_stop(t->loop);
}

static void on_drain_deadline(uv_timer_t *t) {
  pc_log(PC_LOG_INFO, "drain deadline reached: closing %d connections", pc_conn_active());
  uv_stop(t->loop);
}

/* SIGTERM: readiness goes false at once, listeners stop accepting, open
 * connections get limits.drain_timeout_ms. A second SIGTERM or SIGINT: now. */
static void start_drain(uv_loop_t *loop) {
  pc_gen_t *g = pc_gen_current();
  uint64_t ms = g->cfg->limits.drain_timeout_ms;
  pc_gen_unref(g);
  draining = 1;
  pc_admin_set_draining();
  pc_workers_drain();
  pc_log(PC_LOG_INFO, "draining: listeners closed, %d open connections get up to %llu ms",
         pc_conn_active(), (unsigned long long)ms);
  uv_timer_start(&drain_deadline, on_drain_deadline, ms, 0);
  uv_timer_start(&drain_poll, on_drain_poll, 0, 50);
}

static void on_signal(uv_signal_t *h, int signum) {
  if (signum == SIGHUP) {
    pc_log(PC_LOG_INFO, "SIGHUP: reloading %s and the certificates", config_path);
    pc_reload_config();
    return;
  }
  if (signum == SIGTERM && !draining) {
    start_drain(h->loop);
    return;
  }
  pc_log(PC_LOG_INFO, "%s: exiting now", signum == SIGTERM ? "second SIGTERM" : "SIGINT");
  uv_stop(h->loop);
}

int main(int argc, char **argv) {
  static const struct option opts[] = {{"check", no_argument, NULL, 'k'},
                                       {"version", no_argument, NULL, 'V'},
                                       {"config", required_argument, NULL, 'c'},
                                       {"help", no_argument, NULL, 'h'},
                                       {NULL, 0, NULL, 0}};
  const char *path = PC_DEFAULT_CONFIG;
  int check = 0, c;
  while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
    switch (c) {
    case 'c': path = optarg; break;
    case 'k': check = 1; break;
    case 'V': print_version(); return 0;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 1;
    }
  }
  if (optind != argc) {
    usage(stderr);
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  pc_stream_global_init();

  char err[1024];
  pc_gen_t *gen;
  if (pc_gen_build(path, &gen, err, sizeof(err)) != 0) {
    fprintf(stderr, "portcullis: %s\n", err);
    return 1;
  }
  if (check) {
    /* A name that does not resolve now may well resolve once its Service
     * exists: worth a warning, not a failed check. */
    pc_dns_check(gen->cfg);
    printf("portcullis: %s: OK (identity %s, %zu listeners)\n", path, gen->certs->spiffe_id,
           gen->cfg->nlisteners);
    pc_gen_unref(gen);
    return 0;
  }
  pc_log_init(gen->cfg->log.level, gen->cfg->log.access);
  pc_log_set_buffer(gen->cfg->log.buffer_bytes);
  pc_log_start_writer();
  raise_descriptor_limit();
  pc_gen_publish(gen); /* the current generation keeps the build's reference */

  if (pc_workers_create(gen, err, sizeof(err)) != 0) {
    fprintf(stderr, "portcullis: %s\n", err);
    return 1;
  }
  uv_loop_t *loop = uv_default_loop();
  uv_signal_t sigs[3];
  const int signums[3] = {SIGTERM, SIGINT, SIGHUP};
  for (int i = 0; i < 3; i++) {
    uv_signal_init(loop, &sigs[i]);
    uv_signal_start(&sigs[i], on_signal, signums[i]);
  }
  if (pc_admin_start(loop, gen->cfg, err, sizeof(err)) != 0) {
    fprintf(stderr, "portcullis: %s\n", err);
    return 1;
  }
  pc_dns_start(loop, gen->cfg);
  uv_timer_init(loop, &drain_deadline);
  uv_timer_init(loop, &drain_poll);
  if (pc_workers_start() != 0) pc_fatal("cannot start worker threads");
  config_path = path;
  pc_reload_start(loop, path);
  /* "ready" means what /ready says: every worker has adopted its listeners.
   * The sockets already queue connections, so this wait loses nothing. */
  const char *why = NULL;
  for (int i = 0; i < 10000 && !pc_workers_ready(&why); i++)
    uv_sleep(1);
  if (!pc_workers_ready(&why))
    pc_log(PC_LOG_ERROR, "not ready after 10 s: %s", why);
  else
    pc_log(PC_LOG_INFO, "ready");
  pc_log(PC_LOG_INFO, "identity %s, %d workers, %zu listeners", gen->certs->spiffe_id,
         gen->cfg->workers, gen->cfg->nlisteners);
  uv_run(loop, UV_RUN_DEFAULT);

  pc_reload_stop();
  pc_dns_stop();
  pc_admin_stop();
  uv_close((uv_handle_t *)&drain_deadline, NULL);
  uv_close((uv_handle_t *)&drain_poll, NULL);
  pc_workers_stop();
  for (int i = 0; i < 3; i++)
    uv_close((uv_handle_t *)&sigs[i], NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  pc_gen_publish(NULL);
  pc_log(PC_LOG_INFO, "stopped");
  pc_log_stop_writer();
  return 0;
}

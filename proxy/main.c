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
#include "gen.h"
#include "log.h"
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

/* Each connection needs two descriptors. Ask for as many as the hard limit
 * allows, and if that is still short of max_connections, cap live
 * connections so that accepting pauses before accept(2) or socket(2) fail
 * with EMFILE (which would drop peers without a trace). */
static void fit_descriptors(const pc_config_t *cfg) {
  struct rlimit rl;
  uint32_t max_conns = cfg->limits.max_connections;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  /* stdio, logs, signal pipes, and per worker: epoll, async, libuv's reserve
   * descriptor and one socket per listener. */
  rlim_t reserve = 32 + (rlim_t)cfg->workers * (cfg->nlisteners + 8);
  rlim_t need = (rlim_t)max_conns * 2 + reserve;
  if (rl.rlim_cur >= need) return;
  uint32_t cap = rl.rlim_cur > reserve + 2 ? (uint32_t)((rl.rlim_cur - reserve) / 2) : 1;
  pc_workers_set_fd_cap(cap);
  pc_log(PC_LOG_WARN,
         "descriptor limit %llu cannot hold limits.max_connections=%u (needs %llu); at most %u "
         "connections will be served at once and accepting pauses beyond that",
         (unsigned long long)rl.rlim_cur, max_conns, (unsigned long long)need, cap);
}

static const char *config_path;

static void on_signal(uv_signal_t *h, int signum) {
  if (signum == SIGHUP) {
    pc_log(PC_LOG_INFO, "SIGHUP: reloading %s and the certificates", config_path);
    pc_reload_config();
    return;
  }
  pc_log(PC_LOG_INFO, "%s: shutting down", signum == SIGTERM ? "SIGTERM" : "SIGINT");
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
    printf("portcullis: %s: OK (identity %s, %zu listeners)\n", path, gen->certs->spiffe_id,
           gen->cfg->nlisteners);
    pc_gen_unref(gen);
    return 0;
  }
  pc_log_init(gen->cfg->log.level, gen->cfg->log.access);
  fit_descriptors(gen->cfg);
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
  if (pc_workers_start() != 0) pc_fatal("cannot start worker threads");
  config_path = path;
  pc_reload_start(loop, path);
  pc_log(PC_LOG_INFO, "ready");
  pc_log(PC_LOG_INFO, "identity %s, %d workers, %zu listeners", gen->certs->spiffe_id,
         gen->cfg->workers, gen->cfg->nlisteners);
  uv_run(loop, UV_RUN_DEFAULT);

  pc_reload_stop();
  pc_workers_stop();
  for (int i = 0; i < 3; i++)
    uv_close((uv_handle_t *)&sigs[i], NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  pc_gen_publish(NULL);
  pc_log(PC_LOG_INFO, "stopped");
  return 0;
}

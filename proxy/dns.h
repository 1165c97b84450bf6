/*
 * dns.h - keeps every name target (endpoint.h) resolved, with c-ares on the
 * main thread's loop, so that no worker ever waits for DNS.
 *
 * Each name is looked up for A and AAAA the way a pod's resolver would
 * (/etc/resolv.conf: servers, search list, ndots; dns.servers replaces the
 * servers). A good answer replaces the name's endpoint set and is asked
 * again when its TTL, clamped into [dns.min_ttl_ms, dns.max_ttl_ms], runs
 * out; a failure (timeout, SERVFAIL, NXDOMAIN or no address) keeps the last
 * good set and is retried after dns.min_ttl_ms. Workers read the sets
 * through pc_target_pick and never block on a query.
 */
#ifndef PC_DNS_H
#define PC_DNS_H

#include <uv.h>

#include "config.h"

/* Starts resolving on loop with cfg's dns settings. Main thread. */
void pc_dns_start(uv_loop_t *loop, const pc_config_t *cfg);

/* After a config was loaded (a reload): takes up cfg's dns settings, starts
 * resolving names it adds and forgets names no config holds any more.
 * Main thread, after pc_dns_start. */
void pc_dns_sync(const pc_config_t *cfg);

/* Cancels every query and closes the handles (the loop must run once more
 * to finish closing them). Main thread. */
void pc_dns_stop(void);

/* --check: resolves every name of cfg once, on a private loop, and writes
 * one warning line to stderr for each that does not resolve. Returns how
 * many did not. */
int pc_dns_check(const pc_config_t *cfg);

#endif

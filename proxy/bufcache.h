/*
 * bufcache.h - a per-thread cache of released request buffers.
 *
 * HTTP mode gives back a keep-alive connection's request buffers (heads,
 * field tables, output queues) between requests, so that thousands of idle
 * connections hold none. Getting them back from malloc for every request (a
 * fresh block each, then reallocs as it grew) cost about 3% of HTTP
 * requests/s, so released buffers go onto this thread's stack instead, and
 * the next request on any connection of the same worker takes them from it.
 *
 * Every cached buffer is exactly PC_BUFCACHE_SIZE bytes; a buffer that grew
 * past that, and any beyond PC_BUFCACHE_MAX per thread, is freed. The cache
 * therefore holds at most PC_BUFCACHE_MAX * PC_BUFCACHE_SIZE bytes per thread,
 * whatever the number of connections. Each thread uses only its own stack;
 * a thread that put buffers calls pc_bufcache_drain before it exits.
 */
#ifndef PC_BUFCACHE_H
#define PC_BUFCACHE_H

#include <stddef.h>

#define PC_BUFCACHE_SIZE 2048
#define PC_BUFCACHE_MAX 256

/* Returns a buffer of at least min bytes and stores its size in *cap: a
 * cached PC_BUFCACHE_SIZE one when min fits, else a new allocation of
 * max(min, PC_BUFCACHE_SIZE). Never NULL (allocation failure aborts). */
void *pc_bufcache_get(size_t min, size_t *cap);

/* Gives back a buffer of size cap (as returned by pc_bufcache_get, or grown
 * since): cached if cap is PC_BUFCACHE_SIZE and the stack has room, else
 * freed. p may be NULL. */
void pc_bufcache_put(void *p, size_t cap);

/* Frees this thread's cached buffers. */
void pc_bufcache_drain(void);

/* Number of buffers cached by this thread (for tests). */
size_t pc_bufcache_cached(void);

#endif

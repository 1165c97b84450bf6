/* bufcache.c - see bufcache.h. */
#include "bufcache.h"

#include <stdlib.h>

#include "compat.h"

static _Thread_local void *stack[PC_BUFCACHE_MAX];
static _Thread_local size_t depth;

void *pc_bufcache_get(size_t min, size_t *cap) {
  if (min <= PC_BUFCACHE_SIZE) {
    *cap = PC_BUFCACHE_SIZE;
    return depth ? stack[--depth] : pc_malloc(PC_BUFCACHE_SIZE);
  }
  *cap = min;
  return pc_malloc(min);
}

void pc_bufcache_put(void *p, size_t cap) {
  if (!p) return;
  if (cap == PC_BUFCACHE_SIZE && depth < PC_BUFCACHE_MAX)
    stack[depth++] = p;
  else
    free(p);
}

void pc_bufcache_drain(void) {
  while (depth)
    free(stack[--depth]);
}

size_t pc_bufcache_cached(void) { return depth; }

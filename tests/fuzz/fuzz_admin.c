/*
 * fuzz_admin.c - the admin endpoint's request reader (adminreq.h) on
 * arbitrary bytes from a connection.
 *
 * Input: byte 0 chooses how the stream is split (0: one piece; n: pieces of
 * 1..n bytes); the rest is what the connection sends. Pieces are fed until
 * the reader decides or the input runs out.
 *
 * Besides not crashing: the status is one of 0, 200, 400, 414, 431 and never
 * changes once decided, and a decided reader reads nothing more; 431 only
 * after more than PC_ADMINREQ_MAX_HEAD bytes, 414 only after at least
 * PC_ADMINREQ_MAX_URL; a request read whole has a method llhttp knows, named
 * in the bytes fed, and a NUL-terminated path shorter than
 * PC_ADMINREQ_MAX_URL, without '?', CR, LF or space, that occurs in the
 * bytes fed (the target arrives in pieces: they must be put back together
 * in order). And up to PC_ADMINREQ_MAX_HEAD bytes, where the limit cannot
 * intervene, the split changes nothing: one piece gives the same status,
 * method and path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "adminreq.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

static uint32_t rng;

static size_t next_piece(uint8_t split, size_t left) {
  if (split == 0) return left;
  rng = rng * 1103515245u + 12345u;
  size_t k = 1 + (rng >> 16) % split;
  return k < left ? k : left;
}

/* Feeds in[0..n) split as chosen; returns the status, *fed the bytes given. */
static int run(pc_adminreq_t *r, const char *in, size_t n, uint8_t split, size_t *fed) {
  pc_adminreq_init(r);
  rng = split * 2654435761u + (uint32_t)n;
  size_t pos = 0;
  int st = 0;
  while (pos < n && st == 0) {
    size_t k = next_piece(split, n - pos);
    st = pc_adminreq_feed(r, in + pos, k);
    pos += k;
    ASSERT(r->bytes == pos);
  }
  *fed = pos;
  return st;
}

static void check_decided(pc_adminreq_t *r, int st, const char *in, size_t fed) {
  ASSERT(st == 0 || st == 200 || st == 400 || st == 414 || st == 431);
  if (st == 431) ASSERT(fed > PC_ADMINREQ_MAX_HEAD);
  if (st == 414) ASSERT(fed >= PC_ADMINREQ_MAX_URL);
  if (st == 200) {
    /* llhttp_method_name aborts on a number it does not know. */
    const char *m = llhttp_method_name((llhttp_method_t)pc_adminreq_method(r));
    ASSERT(m && *m && memmem(in, fed, m, strlen(m)) != NULL);
    const char *path = pc_adminreq_path(r);
    ASSERT(path >= r->url && path < r->url + sizeof(r->url));
    const char *nul = memchr(path, '\0', (size_t)(r->url + sizeof(r->url) - path));
    ASSERT(nul);
    size_t plen = (size_t)(nul - path);
    ASSERT(plen > 0 && plen < PC_ADMINREQ_MAX_URL);
    for (size_t i = 0; i < plen; i++)
      ASSERT(path[i] != '?' && path[i] != '\r' && path[i] != '\n' && path[i] != ' ');
    ASSERT(memmem(in, fed, path, plen) != NULL);
  }
  if (st != 0) {
    size_t before = r->bytes;
    ASSERT(pc_adminreq_feed(r, in, fed) == st);
    ASSERT(r->bytes == before);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  const uint8_t split = data[0];
  const char *in = (const char *)data + 1;
  const size_t n = size - 1;

  pc_adminreq_t *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));
  ASSERT(a && b);
  size_t fed_a, fed_b;
  int st_a = run(a, in, n, split, &fed_a);
  check_decided(a, st_a, in, fed_a);
  if (n <= PC_ADMINREQ_MAX_HEAD) {
    int st_b = run(b, in, n, 0, &fed_b);
    check_decided(b, st_b, in, fed_b);
    ASSERT(st_a == st_b);
    if (st_a == 200) {
      ASSERT(pc_adminreq_method(a) == pc_adminreq_method(b));
      ASSERT(strcmp(pc_adminreq_path(a), pc_adminreq_path(b)) == 0);
    }
  }
  free(a);
  free(b);
  return 0;
}

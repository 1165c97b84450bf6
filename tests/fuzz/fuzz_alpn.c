/*
 * fuzz_alpn.c - the server's ALPN choice (tls.h pc_tls_alpn_choose) on
 * arbitrary protocol lists.
 *
 * Input: the list exactly as a ClientHello's ALPN extension carries it
 * (each name preceded by its one-byte length).
 *
 * Besides not reading outside the list: on a well-formed list (BoringSSL's
 * rule: at least one name, no empty name, the lengths cover the list
 * exactly) the choice is exactly the first "h2", else the first
 * "http/1.1", else nothing. On any list, a choice is "h2" or "http/1.1"
 * byte for byte, points at a name the lengths lead to from the start (never
 * into the middle of another name), and is "http/1.1" only when no "h2"
 * comes before the list stops making sense.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tls.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                                                                                  \
  do {                                                                                             \
    if (!(c)) abort();                                                                             \
  } while (0)

static int is(const uint8_t *name, size_t len, const char *want) {
  return len == strlen(want) && memcmp(name, want, len) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Walk the names the lengths lead to, until one would run past the end. */
  const uint8_t *first_h2 = NULL, *first_h11 = NULL;
  int well_formed = size > 0;
  size_t i = 0;
  while (i < size) {
    size_t len = data[i];
    if (len == 0) well_formed = 0;
    if (len > size - i - 1) {
      well_formed = 0;
      break;
    }
    const uint8_t *name = data + i + 1;
    if (!first_h2 && is(name, len, "h2")) first_h2 = name;
    if (!first_h11 && is(name, len, "http/1.1")) first_h11 = name;
    i += 1 + len;
  }

  const uint8_t *out = NULL;
  uint8_t outlen = 0;
  int chosen = pc_tls_alpn_choose(data, size, &out, &outlen);
  ASSERT(chosen == 0 || chosen == 1);
  if (well_formed) {
    const uint8_t *want = first_h2 ? first_h2 : first_h11;
    ASSERT(chosen == (want != NULL));
    if (chosen) ASSERT(out == want && outlen == (first_h2 ? 2 : 8));
  }
  if (chosen) {
    ASSERT(out > data && out <= data + size && outlen <= (size_t)(data + size - out));
    ASSERT(is(out, outlen, "h2") || is(out, outlen, "http/1.1"));
    ASSERT(out == first_h2 || out == first_h11);
    if (outlen == 8) ASSERT(first_h2 == NULL);
  }
  return 0;
}

/*
 * check.h - the assertion helper every unit test includes (header only).
 *
 * A failed CHECK prints "FILE:LINE: check failed: ..." with the values
 * involved and the test goes on; CHECK_DONE() prints
 * "NAME: P passed, F failed" and evaluates to the exit status (non-zero if
 * anything failed, or if nothing was checked at all). One test per
 * executable, single-threaded: the counters are plain statics.
 */
#ifndef PC_CHECK_H
#define PC_CHECK_H

#include <stdio.h>
#include <string.h>

static unsigned check_passed, check_failed;

static inline int check_report(int ok) {
  if (ok)
    check_passed++;
  else
    check_failed++;
  return ok;
}

/* Prints n bytes of s with C escapes so binary and control bytes stay visible. */
static inline void check_print_bytes(const char *s, size_t n) {
  if (!s) {
    fputs("(null)", stderr);
    return;
  }
  fputc('"', stderr);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\')
      fprintf(stderr, "\\%c", c);
    else if (c < 0x20 || c >= 0x7f)
      fprintf(stderr, "\\x%02x", c);
    else
      fputc(c, stderr);
  }
  fputc('"', stderr);
}

#define CHECK_MSG(cond, ...)                                                                       \
  do {                                                                                             \
    if (!check_report(!!(cond))) {                                                                 \
      fprintf(stderr, "%s:%d: check failed: ", __FILE__, __LINE__);                                \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

#define CHECK(cond) CHECK_MSG(cond, "%s", #cond)

#define CHECK_INT_EQ(actual, expected)                                                             \
  do {                                                                                             \
    long long check_a_ = (long long)(actual), check_e_ = (long long)(expected);                    \
    CHECK_MSG(check_a_ == check_e_, "%s == %s: got %lld, expected %lld", #actual, #expected,       \
              check_a_, check_e_);                                                                 \
  } while (0)

#define CHECK_STR_EQ(actual, expected)                                                             \
  do {                                                                                             \
    const char *check_a_ = (actual), *check_e_ = (expected);                                       \
    int check_ok_ = check_a_ && check_e_ ? strcmp(check_a_, check_e_) == 0 : check_a_ == check_e_; \
    if (!check_report(check_ok_)) {                                                                \
      fprintf(stderr, "%s:%d: check failed: %s == %s: got ", __FILE__, __LINE__, #actual,          \
              #expected);                                                                          \
      check_print_bytes(check_a_, check_a_ ? strlen(check_a_) : 0);                                \
      fputs(", expected ", stderr);                                                                \
      check_print_bytes(check_e_, check_e_ ? strlen(check_e_) : 0);                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

/* actual[0..actual_len) must equal the NUL-terminated expected, byte for byte. */
#define CHECK_MEM_EQ(actual, actual_len, expected)                                                 \
  do {                                                                                             \
    const char *check_a_ = (actual), *check_e_ = (expected);                                       \
    size_t check_n_ = (actual_len);                                                                \
    int check_ok_ =                                                                                \
        check_a_ && check_n_ == strlen(check_e_) && memcmp(check_a_, check_e_, check_n_) == 0;     \
    if (!check_report(check_ok_)) {                                                                \
      fprintf(stderr, "%s:%d: check failed: %s == %s: got ", __FILE__, __LINE__, #actual,          \
              #expected);                                                                          \
      check_print_bytes(check_a_, check_n_);                                                       \
      fputs(", expected ", stderr);                                                                \
      check_print_bytes(check_e_, strlen(check_e_));                                               \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

/* haystack must contain needle. */
#define CHECK_STR_CONTAINS(haystack, needle)                                                       \
  do {                                                                                             \
    const char *check_h_ = (haystack), *check_n_ = (needle);                                       \
    CHECK_MSG(check_h_ &&strstr(check_h_, check_n_), "%s contains \"%s\": got \"%s\"", #haystack,  \
              check_n_, check_h_ ? check_h_ : "(null)");                                           \
  } while (0)

/* Ends main: prints the summary and yields the exit status. */
#define CHECK_DONE(name)                                                                           \
  (printf("%s: %u passed, %u failed\n", (name), check_passed, check_failed),                       \
   (check_failed || !check_passed) ? 1 : 0)

#endif

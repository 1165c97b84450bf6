/*
 * replay_main.c - runs a libFuzzer target over a seed corpus without
 * libFuzzer, so every seed is exercised under the sanitizers in CI.
 *
 * usage: fuzz_X DIR|FILE...   (each regular file in each DIR, sorted by name)
 * Exits 0 after running at least one input, 1 when an argument cannot be
 * read or no input was found. A crash or sanitizer report ends the process.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return -1;
  }
  size_t cap = 4096, len = 0;
  uint8_t *buf = malloc(cap);
  size_t n;
  while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
    len += n;
    if (len == cap) buf = realloc(buf, cap *= 2);
  }
  int bad = !buf || ferror(f);
  fclose(f);
  if (bad) {
    fprintf(stderr, "%s: read error\n", path);
    free(buf);
    return -1;
  }
  /* An exact-size copy, so that ASan sees a read one past the input. */
  uint8_t *exact = malloc(len ? len : 1);
  if (!exact) abort();
  memcpy(exact, buf, len);
  free(buf);
  LLVMFuzzerTestOneInput(exact, len);
  free(exact);
  return 0;
}

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Runs every regular file of dir; returns the count or -1. */
static long run_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) {
    perror(dir);
    return -1;
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 64;
      names = realloc(names, cap * sizeof(*names));
      if (!names) abort();
    }
    names[n] = strdup(e->d_name);
    if (!names[n]) abort();
    n++;
  }
  closedir(d);
  if (n) qsort(names, n, sizeof(*names), cmp_names);
  long count = 0;
  for (size_t i = 0; i < n; i++) {
    size_t plen = strlen(dir) + strlen(names[i]) + 2;
    char *path = malloc(plen);
    if (!path) abort();
    snprintf(path, plen, "%s/%s", dir, names[i]);
    struct stat st;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
      if (run_file(path) != 0) count = -1;
      if (count >= 0) count++;
    }
    free(path);
    free(names[i]);
  }
  free(names);
  return count;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s DIR|FILE...\n", argv[0]);
    return 1;
  }
  long total = 0;
  int failed = 0;
  for (int i = 1; i < argc; i++) {
    struct stat st;
    if (stat(argv[i], &st) != 0) {
      perror(argv[i]);
      failed = 1;
    } else if (S_ISDIR(st.st_mode)) {
      long n = run_dir(argv[i]);
      if (n < 0)
        failed = 1;
      else
        total += n;
    } else if (run_file(argv[i]) == 0) {
      total++;
    } else {
      failed = 1;
    }
  }
  printf("%s: ran %ld inputs\n", argv[0], total);
  if (total == 0) fprintf(stderr, "%s: no inputs found\n", argv[0]);
  return failed || total == 0 ? 1 : 0;
}

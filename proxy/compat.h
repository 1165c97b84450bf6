/*
 * compat.h - the one place where platform and library-version differences live.
 *
 * portcullis builds against Debian 12's libuv 1.44, BoringSSL (android build),
 * llhttp 8.1 and nghttp2 1.52. Anything that papers over a missing API of those
 * versions belongs here, not in the modules.
 */
#ifndef PC_COMPAT_H
#define PC_COMPAT_H

#include <stddef.h>
#include <stdint.h>

#ifndef PC_VERSION
#define PC_VERSION "0.0.0"
#endif

/* Recover the enclosing struct from a pointer to one of its members. */
#define pc_container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

#define PC_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Aborts the process with a message; used for out-of-memory, which portcullis
 * does not try to survive (a half-built connection is worse than a restart). */
_Noreturn void pc_fatal(const char *what);

/* malloc/calloc/realloc/strdup that abort on failure. Never return NULL. */
void *pc_malloc(size_t n);
void *pc_calloc(size_t n, size_t size);
void *pc_realloc(void *p, size_t n);
char *pc_strdup(const char *s);

/* libuv 1.44 has no UV_TCP_REUSEPORT: listener.c sets SO_REUSEPORT on a socket
 * it creates itself and hands the descriptor to uv_tcp_open(). */

#endif

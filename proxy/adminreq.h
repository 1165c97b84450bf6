/*
 * adminreq.h - reads the one request an admin connection carries (admin.h):
 * llhttp with every lenient flag off, bounded in head size and target
 * length. No I/O and no state outside the reader, so that it can be fuzzed.
 * One reader per connection; any thread.
 */
#ifndef PC_ADMINREQ_H
#define PC_ADMINREQ_H

#include <stddef.h>

#include <llhttp.h>

/* Bytes a connection may send before its request head is complete. */
#define PC_ADMINREQ_MAX_HEAD 8192
/* Room for the request-target, its terminating NUL included. */
#define PC_ADMINREQ_MAX_URL 1024

typedef struct {
  llhttp_t parser;
  llhttp_settings_t settings;
  char url[PC_ADMINREQ_MAX_URL];
  size_t url_len; /* request-target bytes kept (all of them unless too long) */
  size_t bytes;   /* bytes fed so far */
  int url_too_long, headers_done, complete;
  int status; /* see pc_adminreq_feed */
  int method; /* llhttp_method_t, once status is 200 */
} pc_adminreq_t;

/* Prepares r for a new connection. r must not move afterwards (llhttp keeps
 * a pointer to r's settings). Nothing to free. */
void pc_adminreq_init(pc_adminreq_t *r);

/* Feeds the next len bytes the connection sent. Returns r->status:
 *   0    more bytes are needed;
 *   200  a whole request was read (method and path below); bytes after it
 *        are ignored;
 *   400  malformed;
 *   414  the request-target is PC_ADMINREQ_MAX_URL bytes or longer;
 *   431  more than PC_ADMINREQ_MAX_HEAD bytes arrived before the head ended.
 * Once it is not 0, later calls return the same status and read nothing. */
int pc_adminreq_feed(pc_adminreq_t *r, const char *buf, size_t len);

/* The method of a request read whole (status 200), as llhttp numbers it. */
int pc_adminreq_method(const pc_adminreq_t *r);

/* The path of a request read whole (status 200): its request-target up to
 * the first '?', NUL-terminated. Points into r. */
const char *pc_adminreq_path(const pc_adminreq_t *r);

#endif

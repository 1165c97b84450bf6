/*
 * splice.h - the L4 pump between two established streams.
 *
 * Bytes read from one side are written to the other. When the receiving
 * side's queue passes PC_STREAM_HIGH_WATER the sending side stops reading,
 * and resumes when the queue drains (stream.h). An EOF on one side becomes a
 * shutdown of the other (TLS close_notify, then FIN) while the other direction
 * keeps flowing; a read or write error resets both, unless both peers had
 * already finished sending (then nothing is lost and it ends cleanly). The
 * splice is done when both directions have ended, or at the first error.
 *
 * The owner embeds a pc_splice_t, routes the stream callbacks of its two
 * streams to the pc_splice_on_* functions once both are established, and
 * hears back through on_done exactly once. Loop thread only.
 */
#ifndef PC_SPLICE_H
#define PC_SPLICE_H

#include <stdint.h>

#include "stream.h"

typedef struct pc_splice pc_splice_t;

struct pc_splice {
  pc_stream_t *side[2];
  uint64_t bytes[2]; /* bytes[i]: read from side[i] and written to the other */
  unsigned eof[2], shut[2], paused[2], done;
  /* Fires once: reset is 0 when both directions ended cleanly, else 1 with a
   * negative libuv code (or PC_STREAM_ETLS) in err. */
  void (*on_done)(pc_splice_t *sp, int reset, int err);
};

/* Starts reading both sides. Any data BoringSSL already holds is delivered
 * before this returns. */
void pc_splice_start(pc_splice_t *sp, pc_stream_t *a, pc_stream_t *b,
                     void (*on_done)(pc_splice_t *, int, int));

void pc_splice_on_data(pc_splice_t *sp, pc_stream_t *from, const char *buf, size_t len);
void pc_splice_on_eof(pc_splice_t *sp, pc_stream_t *from);
void pc_splice_on_drain(pc_splice_t *sp, pc_stream_t *s);
void pc_splice_on_shutdown(pc_splice_t *sp, pc_stream_t *s, int status);
void pc_splice_on_error(pc_splice_t *sp, pc_stream_t *s, int err);

#endif

#include "splice.h"

static int index_of(const pc_splice_t *sp, const pc_stream_t *s) { return s == sp->side[1]; }

static void finish(pc_splice_t *sp, int reset, int err) {
  if (sp->done) return;
  sp->done = 1;
  sp->on_done(sp, reset, err);
}

static void check_done(pc_splice_t *sp) {
  if (sp->eof[0] && sp->eof[1] && sp->shut[0] && sp->shut[1]) finish(sp, 0, 0);
}

void pc_splice_start(pc_splice_t *sp, pc_stream_t *a, pc_stream_t *b,
                     void (*on_done)(pc_splice_t *, int, int)) {
  sp->side[0] = a;
  sp->side[1] = b;
  sp->on_done = on_done;
  pc_stream_read_start(b);
  if (!sp->done) pc_stream_read_start(a);
}

void pc_splice_on_data(pc_splice_t *sp, pc_stream_t *from, const char *buf, size_t len) {
  int i = index_of(sp, from);
  pc_stream_t *to = sp->side[!i];
  sp->bytes[i] += len;
  int rc = pc_stream_write(to, buf, len);
  if (rc < 0) {
    finish(sp, 1, rc);
    return;
  }
  if (pc_stream_queued(to) > PC_STREAM_HIGH_WATER && !sp->paused[i]) {
    sp->paused[i] = 1;
    pc_stream_read_stop(from);
  }
}

void pc_splice_on_drain(pc_splice_t *sp, pc_stream_t *s) {
  int i = !index_of(sp, s); /* the side that feeds s */
  if (sp->paused[i] && !sp->done) {
    sp->paused[i] = 0;
    pc_stream_read_start(sp->side[i]);
  }
}

void pc_splice_on_eof(pc_splice_t *sp, pc_stream_t *from) {
  int i = index_of(sp, from);
  sp->eof[i] = 1;
  pc_stream_shutdown(sp->side[!i], 0);
  check_done(sp);
}

/* Both peers already finished sending: a failure now (typically our FIN or
 * close_notify meeting a socket the peer fully closed) loses nothing. */
static int both_ended(const pc_splice_t *sp) { return sp->eof[0] && sp->eof[1]; }

void pc_splice_on_shutdown(pc_splice_t *sp, pc_stream_t *s, int status) {
  if (status < 0) {
    finish(sp, !both_ended(sp), status);
    return;
  }
  sp->shut[index_of(sp, s)] = 1;
  check_done(sp);
}

void pc_splice_on_error(pc_splice_t *sp, pc_stream_t *s, int err) {
  finish(sp, !both_ended(sp), err);
}

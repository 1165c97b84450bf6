#include "h2io.h"

/* Output gathered before it is handed to the stream. */
#define OUT_CHUNK (64 * 1024)

static int hand_over(pc_stream_t *s, pc_jbuf_t *out, unsigned *blocked) {
  if (!out->len) return PC_H2IO_OK;
  size_t n = out->len;
  out->len = 0;
  if (pc_stream_write(s, out->data, n) != 0) return PC_H2IO_WRITE;
  if (pc_stream_queued(s) > PC_STREAM_HIGH_WATER) *blocked = 1;
  return PC_H2IO_OK;
}

int pc_h2io_send(nghttp2_session *ss, pc_stream_t *s, pc_jbuf_t *out, unsigned *blocked, int *err) {
  while (!*blocked) {
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(ss, &data);
    if (n < 0) {
      *err = (int)n;
      out->len = 0;
      return PC_H2IO_SESSION;
    }
    if (n == 0) break;
    pc_jbuf_raw(out, (const char *)data, (size_t)n);
    if (out->len >= OUT_CHUNK && hand_over(s, out, blocked) != PC_H2IO_OK) return PC_H2IO_WRITE;
  }
  return hand_over(s, out, blocked);
}

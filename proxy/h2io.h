/*
 * h2io.h - moving an nghttp2 session's frames onto a stream (both sides of
 * the sidecar's HTTP/2: h2.c serves clients, h2up.c talks to upstreams).
 *
 * Frames are gathered into one buffer and handed to the stream 64 KiB at a
 * time (one write, one TLS record run), and sending stops while more than
 * PC_STREAM_HIGH_WATER waits unsent: a peer that does not read holds a
 * bounded amount of framed output, and nghttp2 keeps the rest unframed
 * (DATA stays in its owner's buffers, under flow control). Loop thread only.
 */
#ifndef PC_H2IO_H
#define PC_H2IO_H

#include <nghttp2/nghttp2.h>

#include "log.h"
#include "stream.h"

/* pc_h2io_send results. */
enum {
  PC_H2IO_OK = 0,       /* sent all nghttp2 had, or stopped at the watermark (*blocked) */
  PC_H2IO_SESSION = -1, /* nghttp2 failed (fatal to the session): see *err */
  PC_H2IO_WRITE = -2,   /* the stream refused the bytes (the peer went away) */
};

/* Sends while !*blocked; sets *blocked once the stream's queue passes the
 * high watermark (clear it on the stream's on_drain, then call again). out
 * is scratch kept by the caller. *err gets nghttp2's code on
 * PC_H2IO_SESSION. May run the session's send callbacks. */
int pc_h2io_send(nghttp2_session *ss, pc_stream_t *s, pc_jbuf_t *out, unsigned *blocked, int *err);

#endif

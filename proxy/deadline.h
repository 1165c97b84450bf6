/*
 * deadline.h - deadlines judged after the loop has read what already arrived.
 *
 * In one libuv loop iteration, due timers run before I/O is polled. A worker
 * that got no CPU for longer than a deadline (a loaded host, a stopped or
 * swapped-out process) wakes up to find the deadline passed while the bytes
 * that met it wait unread in its socket: a complete request head would be
 * answered with 408, a ClientHello closed as a handshake timeout, a finished
 * connect reported as timed out.
 *
 * So a deadline that waits for the peer acts only at its second expiry: the
 * first one restarts the timer for PC_DEADLINE_RECHECK_MS and returns, the
 * poll that follows hands over whatever is ready, and the deadline's owner
 * disarms it if that was what it waited for. (A 0 ms restart would not do:
 * libuv runs a timer that is due again inside the same timer phase, before
 * any I/O.) The cost is one extra wake-up of 1 ms per deadline that fires.
 */
#ifndef PC_DEADLINE_H
#define PC_DEADLINE_H

#include <stdint.h>
#include <uv.h>

#define PC_DEADLINE_RECHECK_MS 1

/* Call first in the timer callback of such a deadline. *rechecked must be
 * cleared whenever the deadline is (re)armed. Returns 1 at the first expiry
 * (timer t restarted with cb; the caller returns at once) and 0 at the second
 * (the deadline has passed: act on it). */
static inline int pc_deadline_recheck(uv_timer_t *t, uv_timer_cb cb, uint8_t *rechecked) {
  if (*rechecked) return 0;
  *rechecked = 1;
  uv_timer_start(t, cb, PC_DEADLINE_RECHECK_MS, 0);
  return 1;
}

#endif

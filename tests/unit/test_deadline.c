/*
 * test_deadline.c - deadline.h on a real libuv loop: a deadline whose awaited
 * bytes arrived while the loop was busy past it must see those bytes first.
 *
 * Each case: a socketpair whose one end the loop polls, a deadline timer,
 * and another connection's I/O callback that keeps the loop busy beyond the
 * deadline and meanwhile writes to the other end (the peer's bytes arrive in
 * time; the loop is too busy to read them). The next loop iteration sees the
 * deadline overdue before it polls. Then the loop runs to completion.
 */
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "check.h"
#include "deadline.h"

typedef struct {
  uv_poll_t poll, busy;
  uv_timer_t deadline;
  int fds[2], other[2];
  int use_recheck, send, got, acted;
  uint8_t rechecked;
} scene_t;

static void on_readable(uv_poll_t *p, int status, int events) {
  scene_t *s = p->data;
  (void)events;
  char buf[16];
  if (status == 0 && read(s->fds[0], buf, sizeof(buf)) > 0) s->got = 1;
  uv_timer_stop(&s->deadline); /* what was awaited came: disarm */
  uv_poll_stop(p);
}

static void on_deadline(uv_timer_t *t) {
  scene_t *s = t->data;
  if (s->use_recheck && pc_deadline_recheck(t, on_deadline, &s->rechecked)) return;
  s->acted = 1;
  uv_poll_stop(&s->poll);
}

static void on_busy(uv_poll_t *p, int status, int events) {
  scene_t *s = p->data;
  (void)status;
  (void)events;
  uv_poll_stop(p);
  /* Armed from the loop time of this iteration, so the sleep below makes it
   * overdue at the next one, however the host schedules this process. */
  uv_timer_start(&s->deadline, on_deadline, 20, 0);
  if (s->send) CHECK(write(s->fds[1], "head", 4) == 4);
  usleep(80 * 1000); /* the loop is busy well past the 20 ms deadline */
}

static void run(scene_t *s, int use_recheck, int send) {
  memset(s, 0, sizeof(*s));
  s->use_recheck = use_recheck;
  s->send = send;
  uv_loop_t loop;
  CHECK_INT_EQ(uv_loop_init(&loop), 0);
  CHECK_INT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, s->fds), 0);
  CHECK_INT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, s->other), 0);
  CHECK(write(s->other[1], "x", 1) == 1); /* the busy connection has work at once */
  uv_poll_init(&loop, &s->poll, s->fds[0]);
  uv_poll_init(&loop, &s->busy, s->other[0]);
  uv_timer_init(&loop, &s->deadline);
  s->poll.data = s->deadline.data = s->busy.data = s;
  uv_poll_start(&s->busy, UV_READABLE, on_busy);
  uv_poll_start(&s->poll, UV_READABLE, on_readable);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&s->poll, NULL);
  uv_close((uv_handle_t *)&s->deadline, NULL);
  uv_close((uv_handle_t *)&s->busy, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT_EQ(uv_loop_close(&loop), 0);
  for (int i = 0; i < 2; i++) {
    close(s->fds[i]);
    close(s->other[i]);
  }
}

int main(void) {
  scene_t s;

  /* The hazard is real: without the recheck, libuv runs the overdue timer
   * before it polls, and the deadline acts although the bytes are there. */
  run(&s, 0, 1);
  CHECK_MSG(s.acted && !s.got, "plain deadline: acted=%d got=%d, expected acted=1 got=0", s.acted,
            s.got);

  /* With the recheck, the bytes that arrived in time win. */
  run(&s, 1, 1);
  CHECK_MSG(s.got && !s.acted, "rechecked deadline: acted=%d got=%d, expected acted=0 got=1",
            s.acted, s.got);

  /* Nothing arrives: the rechecked deadline still acts (at its second expiry). */
  run(&s, 1, 0);
  CHECK_MSG(s.acted && !s.got, "rechecked deadline, silent peer: acted=%d got=%d", s.acted, s.got);
  CHECK_INT_EQ(s.rechecked, 1);

  return CHECK_DONE("deadline");
}

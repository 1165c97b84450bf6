"""Issue 14, item 6: shutdown under load.

  1. SIGTERM (drain) then SIGTERM (now) while accepting is paused at max_connections and
     clients keep connecting: the process exits 0 with no sanitizer report, over several
     sidecar lifetimes. Each connection that ends while a worker is paused wakes every
     worker; a worker that has already closed its wake handle (and whose loop the main
     thread then closes) must not be woken any more.

Every loop is bounded in count and time; ports come from h.free_port().
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import harness as h

SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer",
                   "runtime error:", "ThreadSanitizer")


def _sanitizer_lines(sc: h.Sidecar) -> list[str]:
    with sc._cv:
        return [ln for ln in sc.stderr_lines if any(m in ln for m in SANITIZER_MARKS)]


class Churn:
    """Threads that open and close plain TCP connections to port, each at most `count`
    times and for at most `seconds`: at the cap they wait in the backlog, after the drain
    they are refused. Errors are expected and ignored; only the bound matters."""

    def __init__(self, port: int, threads: int = 4, count: int = 400, seconds: float = 20.0):
        self.port, self.count, self.seconds = port, count, seconds
        self.stop = threading.Event()
        self.attempts = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + h.T(self.seconds)
        for _ in range(self.count):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                s = socket.create_connection((h.HOST, self.port), timeout=0.2)
                s.sendall(b"\x16\x03\x01\x00\x05hello")  # not a ClientHello: a quick refusal
                s.close()
            except OSError:
                time.sleep(0.005)
            with self._lock:
                self.attempts += 1

    def start(self) -> "Churn":
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(h.T(10))


def _one_lifetime(env, pki, i: int, *, second_sigterm: bool) -> None:
    cap = 2
    app = env.app("echo")
    port = h.free_port()
    drain = 60000 if second_sigterm else 300
    cfg = h.base_config(pki, "payments-api", workers=2,
                        limits={"max_connections": cap, "drain_timeout_ms": drain},
                        inbound=[h.inbound_listener("api", port, app.addr,
                                                    [{"namespace": "web"}])])
    sc = env.sidecar(cfg, name=f"shutdown{i}")
    # Connections that never start their handshake hold the cap (handshake deadline 60 s).
    held = [socket.create_connection((h.HOST, port), timeout=h.T(5)) for _ in range(cap)]
    churn = Churn(port).start()
    try:
        assert sc.wait_for_event("accepting paused", h.WAIT_S) is not None, \
            "accepting never paused at max_connections"
        # more attempts queue up behind the pause, then the drain begins
        h.wait_until(lambda: churn.attempts >= 20, h.T(5))
        ev = sc.event_count()
        sc.signal(signal.SIGTERM)
        if second_sigterm:
            assert sc.wait_for_event("draining", h.PROMPT_S, ev) is not None
            sc.signal(signal.SIGTERM)
        rc = sc.wait_exit(h.WAIT_S)
        assert rc is not None, "the sidecar did not exit after SIGTERM"
        assert rc == 0, f"exit code {rc}; stderr tail:\n" + "\n".join(sc.stderr_lines[-30:])
        bad = _sanitizer_lines(sc)
        assert not bad, "sanitizer report:\n" + "\n".join(bad[:20])
        assert sc.wait_for_event("stopped", 1, ev) is not None
    finally:
        churn.join()
        for s in held:
            s.close()


def test_sigterm_twice_while_paused_exits_0(env, pki):
    for i in range(5):
        _one_lifetime(env, pki, i, second_sigterm=True)


def test_drain_deadline_while_paused_exits_0(env, pki):
    for i in range(5):
        _one_lifetime(env, pki, i, second_sigterm=False)

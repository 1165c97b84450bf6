"""Admission before authentication (issue 14, item 1): a per-listener budget of handshakes
in progress (limits.max_pending_handshakes), so silent connects to an inbound port pause
that listener alone and never the app's outbound calls; and per-source throttling of
sources whose handshakes keep failing (limits.handshake_failures_per_source,
throttle_window_ms, throttle_cooldown_ms), with a table of bounded size; and what one IPv6
source is (limits.throttle_ipv6_prefix), in a network namespace of the test's own."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest

import harness as h
import httpkit as hk

CONNS = "portcullis_connections_total"

# In the throttle test's network namespace (v6_netns): the sidecar listens on [::] and is
# reached at NS_DST from the other addresses, which lie in one /64 (fd00:99::/64) but for
# the last, in the next /64.
NS_DST = "fd00:99::1"
NS_ADDRS = ("fd00:99::1", "fd00:99::2", "fd00:99::3", "fd00:99::ff:3", "fd00:99::1:0:0:2",
            "fd00:99:0:1::2")


def _connect_from(port: int, source: str, timeout: float = h.WAIT_S) -> socket.socket:
    """A plain TCP connection to 127.0.0.1:port whose source address is `source` (any
    127.0.0.0/8 address works on Linux loopback); from an IPv6 source, to NS_DST:port."""
    dst = NS_DST if ":" in source else h.HOST
    return socket.create_connection((dst, port), timeout=h.T(timeout),
                                    source_address=(source, 0))


def _tls_from(port: int, ctx: ssl.SSLContext, source: str,
              timeout: float = h.WAIT_S) -> ssl.SSLSocket:
    return h.tls_connect(port, ctx, raw=_connect_from(port, source, timeout))


def _echo(s: socket.socket, data: bytes) -> None:
    s.sendall(data)
    assert h.recv_exact(s, len(data), timeout=h.PROMPT_S) == data


def test_silent_flood_pauses_only_its_listener(env):
    """More silent TCP connects to an inbound port than max_connections: the inbound
    listener stops at its handshake budget, the app's outbound calls keep being served
    while every silent one still holds its handshake, and an allowed peer gets in once
    the silent ones time out."""
    app = env.app("echo")
    upstream = env.upstream("payments-api", mode="echo")
    in_port, out_port = h.free_port(), h.free_port()
    budget, cap, silent_n = 8, 12, 16
    hs_ms = int(h.T(3000))
    cfg = h.base_config(env.pki, "payments-api", workers=2, limits={
        "max_connections": cap, "max_pending_handshakes": budget,
        "handshake_timeout_ms": hs_ms, "handshake_failures_per_source": 1000000},
        inbound=[h.inbound_listener("api", in_port, app.addr, [{"namespace": "web"}])],
        outbound=[h.outbound_listener("calls", out_port, upstream.addr,
                                      [{"namespace": "payments", "service_account": "api"}])])
    sc = env.sidecar(cfg, name="flood")
    silent = []
    try:
        for _ in range(silent_n):
            silent.append(socket.create_connection((h.HOST, in_port), timeout=h.T(h.WAIT_S)))
        # The inbound listener paused at its budget (counted across both workers; a race
        # between them may take it one past), and no more handshakes are in progress.
        m = hk.wait_metric(sc, "portcullis_accept_paused_total", lambda v: v >= 1,
                           listener="api")
        assert sc.wait_for_event("max_pending_handshakes reached"), sc.all_output()[-2000:]
        pending = m.get("portcullis_pending_handshakes", listener="api")
        assert budget <= pending <= budget + 1, m.lines("portcullis_pending_handshakes")
        assert m.get("portcullis_active_connections", listener="api") <= budget + 1
        # The app's own calls go out meanwhile, several times over.
        for i in range(3):
            with socket.create_connection((h.HOST, out_port), timeout=h.T(h.PROMPT_S)) as s:
                _echo(s, b"call %d\n" % i)
        m = hk.scrape(sc)
        # Served while the silent ones still held their handshakes: none had timed out.
        assert m.get(CONNS, listener="api", reason="timeout") == 0, \
            "outbound was served only after inbound handshakes timed out:\n" + m.lines(CONNS)
        assert m.get("portcullis_accept_paused_total", listener="calls") == 0, m.lines(
            "portcullis_accept_paused_total")
        # An allowed peer, queued behind the silent ones, is served once they time out.
        s = h.tls_connect(in_port, h.client_context(env.pki, "web-frontend"),
                          timeout=h.PROMPT_S + 4 * hs_ms / 1000)
        with s:
            _echo(s, b"peer\n")
        m = hk.scrape(sc)
        assert m.get(CONNS, listener="api", decision="deny", reason="timeout") >= 1, \
            m.lines(CONNS)
        assert m.get("portcullis_pending_handshakes", listener="api") <= budget + 1
    finally:
        for s in silent:
            s.close()
    sc.assert_alive()


def _fail_handshake(port: int, ctx: ssl.SSLContext, source: str) -> None:
    """One handshake without a client certificate from `source`: refused by the sidecar
    (TLS 1.3 shows the alert at the first read)."""
    try:
        s = _tls_from(port, ctx, source)
    except (ssl.SSLError, OSError):
        return
    with s:
        try:
            s.sendall(b"x")
            s.recv(16)
        except (ssl.SSLError, OSError):
            pass


def _ends_unanswered(port: int, source: str, send: bytes = b"") -> bool:
    """Connect from source and send `send`: True if the sidecar ends the connection without
    a byte back (a reset counts), False if it keeps it open."""
    try:
        s = _connect_from(port, source)
    except ConnectionResetError:
        return True
    with s:
        s.settimeout(h.T(h.PROMPT_S))
        try:
            if send:
                s.sendall(send)
            return s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, TimeoutError):
            return False


def _closed_at_accept(port: int, source: str) -> bool:
    """Connect from source and send nothing: True if the sidecar ends the connection
    without a byte (no ServerHello; it cannot have started TLS: we never said hello)."""
    return _ends_unanswered(port, source)


def _hello_unanswered(port: int, ctx: ssl.SSLContext, source: str) -> bool:
    """Send a real ClientHello from source: True if the sidecar ends the connection
    without answering it (no ServerHello, not even an alert)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="api.payments.svc")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]   # a TLS handshake record
    return _ends_unanswered(port, source, hello)


def test_failing_source_is_throttled_then_served_again(env):
    app = env.app("echo")
    port = h.free_port()
    n = 3
    cooldown_ms = int(h.T(4000))
    # One worker: the threshold applies per worker (README), so the count here is exact.
    cfg = h.base_config(env.pki, "payments-api", workers=1, limits={
        "handshake_failures_per_source": n, "throttle_window_ms": h.GENEROUS_MS,
        "throttle_cooldown_ms": cooldown_ms},
        inbound=[h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    sc = env.sidecar(cfg, name="throttle")
    good = h.client_context(env.pki, "web-frontend")
    nocert = h.client_context(env.pki, None)
    for _ in range(n):
        _fail_handshake(port, nocert, "127.0.0.1")
    ev = sc.wait_for_event("throttled")
    assert ev and "127.0.0.1" in ev["msg"], sc.all_output()[-2000:]
    m = hk.wait_metric(sc, CONNS, lambda v: v >= n, listener="api", reason="no_cert")
    assert m.get(CONNS, listener="api", reason="limit") == 0
    seen = time.monotonic()
    # Closed at accept, before any TLS, and counted as deny/limit.
    assert _closed_at_accept(port, "127.0.0.1")
    assert _closed_at_accept(port, "127.0.0.1")
    # Even with a valid certificate, its ClientHello gets no answer (while another
    # source's is answered: the check can tell them apart).
    assert _hello_unanswered(port, good, "127.0.0.1"), "a throttled source got a ServerHello"
    assert not _hello_unanswered(port, good, "127.0.0.3")
    # Another source is served meanwhile, and 127.0.0.1 is still throttled after it.
    with _tls_from(port, good, "127.0.0.2") as s:
        _echo(s, b"other source\n")
    assert _closed_at_accept(port, "127.0.0.1")
    # Of all these, only 127.0.0.2's connection reached the app.
    assert app.count() == 1, f"the app saw {app.count()} connections, expected 1"
    hk.wait_metric(sc, CONNS, lambda v: v == 4, listener="api", decision="deny", reason="limit")
    # Waiting out the cool-down is the test condition.
    time.sleep(max(0.0, cooldown_ms / 1000 - (time.monotonic() - seen)) + 0.2)
    with _tls_from(port, good, "127.0.0.1") as s:
        _echo(s, b"served again\n")
    assert app.count() == 2, f"the app saw {app.count()} connections, expected 2"
    m = hk.scrape(sc)
    assert m.get(CONNS, listener="api", decision="deny", reason="limit") == 4, m.lines(CONNS)
    # One server event for the source and cool-down, and no access-log line per throttled
    # connection.
    assert len(sc.events_matching("throttled")) == 1, sc.events_matching("throttled")
    assert not [e for e in sc.access_log() if e.get("reason") == "limit"], sc.access_log()
    sc.assert_alive()


def test_throttle_table_stays_bounded(env):
    """More distinct failing sources than the table holds (4096 per listener and worker):
    the table's size gauge stops at its bound."""
    app = env.app("echo")
    port = h.free_port()
    cfg = h.base_config(env.pki, "payments-api", workers=1, limits={
        "handshake_failures_per_source": 2, "throttle_window_ms": h.GENEROUS_MS,
        "throttle_cooldown_ms": h.GENEROUS_MS},
        inbound=[h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    cfg["log"]["access"] = False   # 5,000 refusals: keep the run's output small
    sc = env.sidecar(cfg, name="table")
    total, batch, done = 5000, 500, 0
    sources = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(total)]
    while done < total:
        # Connect and leave at once: the handshake fails (the peer went away) and the
        # source is recorded. In batches, so the listen backlog never overflows.
        for src in sources[done:done + batch]:
            _connect_from(port, src).close()
        done += batch
        hk.wait_metric(sc, CONNS, lambda v, d=done: v >= d, timeout=h.PROMPT_S, listener="api")
    m = hk.scrape(sc)
    n = m.get("portcullis_throttle_sources", listener="api")
    assert 3000 < n <= 4096, m.lines("portcullis_throttle_sources")
    # Each source failed once, under the threshold: nobody is throttled.
    assert m.get(CONNS, listener="api", reason="limit") == 0, m.lines(CONNS)
    # A source failing twice after all of that is still tracked and throttled.
    for _ in range(2):
        _connect_from(port, "127.2.0.1").close()
    assert sc.wait_for_event("source 127.2.0.1 throttled"), sc.all_output()[-2000:]
    assert _closed_at_accept(port, "127.2.0.1")
    sc.assert_alive()


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True, capture_output=True,
                   timeout=30)


@pytest.fixture
def v6_netns():
    """A network namespace of this test's own, its loopback up with 127.0.0.1 and NS_ADDRS:
    the test's thread enters it, so the sidecar it starts, its app (and that app's threads)
    and every socket it opens live there, and leaves it afterwards (request it before env,
    so env's teardown runs inside). Needs root (CAP_SYS_ADMIN) and iproute2."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for a network namespace")
    ns = f"pc-throttle6-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"ip netns add: {r.stderr.strip()}")
    home = ns_fd = -1
    try:
        _ip(ns, "link", "set", "lo", "up")
        for a in NS_ADDRS:   # nodad: usable at once, no duplicate detection to wait for
            _ip(ns, "-6", "addr", "add", f"{a}/64", "dev", "lo", "nodad")
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        ns_fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        _setns(ns_fd)
        try:
            yield ns
        finally:
            _setns(home)
    finally:
        for fd in (home, ns_fd):
            if fd >= 0:
                os.close(fd)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.parametrize("prefix, shown, throttled, served", [
    # the default: fd00:99::2's whole /64 goes, the next /64 is served
    (None, "fd00:99::/64", ["fd00:99::3", "fd00:99::1:0:0:2"], ["fd00:99:0:1::2"]),
    # per address: its /64 neighbours (pods on one node) are served
    (128, "fd00:99::2/128", [], ["fd00:99::3", "fd00:99::1:0:0:2", "fd00:99:0:1::2"]),
    # in between: bits 64-79 tell sources apart, later ones do not
    (80, "fd00:99::/80", ["fd00:99::ff:3"], ["fd00:99::1:0:0:2", "fd00:99:0:1::2"]),
])
def test_ipv6_source_is_its_prefix(v6_netns, env, prefix, shown, throttled, served):
    """Real connections from several IPv6 addresses: fd00:99::2 fails its handshakes until
    throttled; the server event names it with the configured prefix, addresses inside that
    prefix are closed at accept, addresses outside it are served end to end. On the same
    dual-stack listener an IPv4 peer (an IPv4-mapped address to the sidecar) is one IPv4
    source, whatever the prefix: its neighbour 127.0.0.6 is served."""
    app = env.app("echo")
    port = h.free_port()
    n = 3
    limits = {"handshake_failures_per_source": n, "throttle_window_ms": h.GENEROUS_MS,
              "throttle_cooldown_ms": h.GENEROUS_MS}
    if prefix is not None:
        limits["throttle_ipv6_prefix"] = prefix
    listener = h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])
    listener["listen"] = f"[::]:{port}"   # dual stack: IPv6 and IPv4-mapped peers
    # One worker: the threshold applies per worker (README), so the count here is exact.
    cfg = h.base_config(env.pki, "payments-api", workers=1, limits=limits, inbound=[listener])
    sc = env.sidecar(cfg, name=f"prefix{prefix}")
    assert sc.admin_get("/config").json()["limits"]["throttle_ipv6_prefix"] == (prefix or 64)
    good = h.client_context(env.pki, "web-frontend")
    nocert = h.client_context(env.pki, None)
    for _ in range(n):
        _fail_handshake(port, nocert, "fd00:99::2")
    ev = sc.wait_for_event("throttled")
    assert ev and f"source {shown} throttled" in ev["msg"], sc.all_output()[-2000:]
    assert _closed_at_accept(port, "fd00:99::2")
    for a in throttled:
        assert _closed_at_accept(port, a), f"{a} is inside {shown} but was not throttled"
        assert _hello_unanswered(port, good, a), f"{a} is inside {shown} but got a ServerHello"
    for a in served:
        with _tls_from(port, good, a) as s:
            _echo(s, f"from {a}\n".encode())
    assert app.count() == len(served), f"the app saw {app.count()} connections"
    m = hk.wait_metric(sc, CONNS, lambda v: v == 1 + 2 * len(throttled), listener="api",
                       decision="deny", reason="limit")
    assert m.get("portcullis_throttle_sources", listener="api") == 1, m.lines(
        "portcullis_throttle_sources")

    # An IPv4 peer on the same listener: one address, never an IPv6 prefix (::ffff:0:0/96
    # would hold every IPv4 peer in one source).
    for _ in range(n):
        _fail_handshake(port, nocert, "127.0.0.5")
    assert sc.wait_for_event("source 127.0.0.5 throttled"), sc.all_output()[-2000:]
    assert _closed_at_accept(port, "127.0.0.5")
    with _tls_from(port, good, "127.0.0.6") as s:
        _echo(s, b"from 127.0.0.6\n")
    assert app.count() == len(served) + 1, f"the app saw {app.count()} connections"
    assert len(sc.events_matching("throttled")) == 2, sc.events_matching("throttled")
    sc.assert_alive()

"""L4 proxying behaviour: half-close, resets, concurrency, backpressure, timeouts,
connect failures and the connection limit."""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import ssl
import struct
import threading
import time
from types import SimpleNamespace

import pytest

import harness as h

MiB = 1 << 20


def _ctx(pki, stem="web-frontend", **kw):
    return h.client_context(pki, stem, **kw)


def _tls(port, pki, **kw):
    return h.tls_connect(port, _ctx(pki), **kw)


def _expect_closed(s, timeout=5.0):
    """Read until the peer ends the connection; returns (outcome, bytes, elapsed)."""
    t0 = time.monotonic()
    s.settimeout(h.T(timeout))
    buf = b""
    try:
        while len(buf) < 1 << 20:
            b = s.recv(65536)
            if not b:
                return "eof", buf, time.monotonic() - t0
            buf += b
        return "data", buf, time.monotonic() - t0
    except (socket.timeout, TimeoutError):
        return "timeout", buf, time.monotonic() - t0
    except ssl.SSLError as e:   # e.g. unexpected EOF / alert: still "closed"
        return "ssl:" + str(e), buf, time.monotonic() - t0
    except (ConnectionResetError, BrokenPipeError):
        return "reset", buf, time.monotonic() - t0


def _closed(outcome: str) -> bool:
    return outcome in ("eof", "reset") or outcome.startswith("ssl:")


# ------------------------------------------------------------------ half-close (e2e chain)

def _chain(env, app, **kw):
    in_cfg, out_cfg, in_port, out_port = h.chain_configs(env.pki, app.addr, **kw)
    server = env.sidecar(in_cfg, name="l4-inbound")
    client = env.sidecar(out_cfg, name="l4-outbound")
    return SimpleNamespace(server=server, client=client, in_port=in_port, out_port=out_port)


def test_half_close_client_shuts_write_still_gets_reply(env):
    reply = b"reply-sent-after-eof:" + h.pattern_bytes(256 * 1024, seed=9)
    app = env.app("sink", reply=reply)
    ch = _chain(env, app)
    data = h.pattern_bytes(1 * MiB, seed=8)
    s = socket.create_connection((h.HOST, ch.out_port), timeout=h.T(10))
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = h.recv_until_eof(s, timeout=10)
    finally:
        s.close()
    assert got == reply, f"got {len(got)} bytes, expected the {len(reply)}-byte reply"
    rec = app.conns[0]
    assert rec.done.wait(h.T(5))
    assert rec.eof and rec.bytes_in == len(data) and rec.sha256_in == h.sha256(data)


def _greet_then_sink(greeting: bytes):
    """An app that sends greeting, half-closes (FIN) at once, then records everything
    the client still sends until the client's own EOF (the other half of a half-close)."""

    def handler(sock, rec):
        sock.sendall(greeting)
        rec.bytes_out += len(greeting)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(h.T(10))
        while len(rec.data) < 1 << 20:
            b = sock.recv(65536)
            if not b:
                rec.eof = True
                return
            rec.bytes_in += len(b)
            rec.data += b

    return handler


def test_half_close_app_shuts_write_first(env):
    greeting = b"server-first-then-eof\n"

    app = env.app("handler", handler=_greet_then_sink(greeting))
    ch = _chain(env, app)
    late = b"client-writes-after-eof:" + h.pattern_bytes(300 * 1024, seed=10)
    s = socket.create_connection((h.HOST, ch.out_port), timeout=h.T(10))
    try:
        got = h.recv_until_eof(s, timeout=10)
        assert got == greeting
        s.sendall(late)         # must still be accepted after we saw EOF
        s.shutdown(socket.SHUT_WR)
        rest = h.recv_until_eof(s, timeout=10)
        assert rest == b""
    finally:
        s.close()
    rec = app.conns[0]
    assert rec.done.wait(h.T(10))
    assert bytes(rec.data) == late, f"app got {len(rec.data)} of {len(late)} late bytes"
    assert rec.eof


# ------------------------------------------------------------------ shared inbound sidecar

@pytest.fixture(scope="module")
def l4(module_env):
    pki = module_env.pki
    echo = module_env.app("echo", backlog=2048)
    source = module_env.app("source", source_bytes=256 * MiB)
    hold = module_env.app("hold")

    def resetter(sock, rec):
        sock.settimeout(h.T(5))
        b = sock.recv(100)
        rec.bytes_in += len(b)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # close() in the server's finally now sends RST

    reset = module_env.app("handler", handler=resetter)
    ports = {n: h.free_port() for n in ("echo", "source", "hold", "reset", "dead")}
    allow = [{"namespace": "web"}]
    cfg = h.base_config(pki, "payments-api", workers=2, inbound=[
        h.inbound_listener("echo", ports["echo"], echo.addr, allow),
        h.inbound_listener("source", ports["source"], source.addr, allow),
        h.inbound_listener("hold", ports["hold"], hold.addr, allow),
        h.inbound_listener("reset", ports["reset"], reset.addr, allow),
        h.inbound_listener("dead", ports["dead"], h.addr(h.free_port()), allow),
    ])
    sc = module_env.sidecar(cfg, name="l4")
    return SimpleNamespace(sc=sc, pki=pki, ports=ports, echo=echo, source=source, hold=hold,
                           reset=reset)


def test_app_reset_propagates_promptly(l4):
    before = l4.reset.count()
    s = _tls(l4.ports["reset"], l4.pki)
    port = s.getsockname()[1]
    try:
        s.sendall(b"trigger\n")
        outcome, got, dt = _expect_closed(s, timeout=h.PROMPT_S + 10)
    finally:
        s.close()
    assert _closed(outcome), outcome
    assert got == b""
    # not propagated, the connection would stay open until the 600 s idle timeout
    assert dt < h.PROMPT_S, f"reset took {dt:.2f}s to reach the client, expected at once"
    assert l4.reset.count() == before + 1
    e = l4.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["close"] in ("reset", "error"), e


def test_forward_target_refused(l4):
    s = _tls(l4.ports["dead"], l4.pki)
    port = s.getsockname()[1]
    try:
        try:
            s.sendall(b"anyone there?\n")
        except OSError:
            pass
        outcome, got, dt = _expect_closed(s, timeout=h.PROMPT_S)
    finally:
        s.close()
    assert _closed(outcome) and got == b"", outcome
    e = l4.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["close"] == "connect_failed", e
    assert e["bytes_to_peer"] == 0, e


def test_1000_concurrent_connections(l4):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 3 * n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * n + 200), hard))
    ctx = _ctx(l4.pki)
    port = l4.ports["echo"]
    base_active = l4.echo.active

    async def main():
        sem = asyncio.Semaphore(100)

        async def connect(i):
            async with sem:
                return await asyncio.wait_for(
                    asyncio.open_connection(h.HOST, port, ssl=ctx,
                                            server_hostname="api.payments.svc"),
                    h.T(30))

        conns = await asyncio.gather(*(connect(i) for i in range(n)))
        try:
            # every connection is open at once; make sure all reached the app
            t0 = time.monotonic()
            while l4.echo.active - base_active < n and time.monotonic() - t0 < h.T(60):
                await asyncio.sleep(0.05)
            active = l4.echo.active - base_active
            payloads = [(b"conn-%04d|" % i) * 30 for i in range(n)]
            for (r, w), p in zip(conns, payloads):
                w.write(p)
            await asyncio.gather(*(w.drain() for _, w in conns))

            async def read(i):
                r, _ = conns[i]
                return await asyncio.wait_for(r.readexactly(len(payloads[i])), h.T(30))

            got = await asyncio.gather(*(read(i) for i in range(n)))
            bad = [i for i in range(n) if got[i] != payloads[i]]
            return active, bad
        finally:
            for _, w in conns:
                w.close()
            await asyncio.gather(*(w.wait_closed() for _, w in conns),
                                 return_exceptions=True)

    active, bad = asyncio.run(main())
    assert active >= n, f"only {active} of {n} connections reached the app concurrently"
    assert bad == [], f"{len(bad)} connections echoed wrong data, e.g. #{bad[:5]}"
    assert l4.echo.max_active >= n
    l4.sc.assert_alive()


def _warm_rss(l4) -> int:
    s = _tls(l4.ports["echo"], l4.pki)
    port = s.getsockname()[1]
    try:
        s.sendall(b"x" * 65536)
        h.recv_exact(s, 65536)
    finally:
        s.close()
    # the sidecar has torn the warm-up connection down (its access-log line is written then)
    assert l4.sc.log_for_peer_port(port, timeout=h.PROMPT_S) is not None, \
        "no access-log line for the warm-up connection"
    return l4.sc.rss_kib()


def test_backpressure_client_never_reads(l4):
    rss0 = _warm_rss(l4)
    before = l4.source.count()
    s = _tls(l4.ports["source"], l4.pki)
    try:
        assert l4.source.wait_conns(before + 1)
        rec = l4.source.conns[before]
        pushed = h.wait_stalled(lambda: rec.bytes_out, quiet=1.5, timeout=25.0)
        rss1 = l4.sc.rss_kib()
        assert pushed < 256 * MiB, "app pushed all 256 MiB into a client that never reads"
        assert rss1 - rss0 < 32 * 1024, f"sidecar RSS grew {(rss1 - rss0) / 1024:.1f} MiB"
        # the flow resumes once the client reads: read 8 MiB, app makes progress again
        chunk = h.pattern_bytes(MiB)
        first = h.recv_exact(s, 8 * MiB, timeout=20)
        assert h.sha256(first) == h.sha256(chunk * 8), "wrong bytes delivered"
        assert h.wait_until(lambda: rec.bytes_out > pushed, h.T(h.PROMPT_S)), \
            f"flow did not resume: the app is still at {rec.bytes_out} bytes sent"
    finally:
        s.close()


def test_backpressure_app_never_reads(l4):
    rss0 = _warm_rss(l4)
    before = l4.hold.count()
    s = _tls(l4.ports["hold"], l4.pki)
    total = 256 * MiB
    chunk = h.pattern_bytes(256 * 1024)
    sent = 0
    try:
        assert l4.hold.wait_conns(before + 1)
        s.setblocking(False)
        t_end = time.monotonic() + h.T(25)
        last_change = time.monotonic()
        while sent < total and time.monotonic() < t_end:
            try:
                sent += s.send(chunk)
                last_change = time.monotonic()
                continue
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
            if time.monotonic() - last_change >= 1.5:
                break
            time.sleep(0.02)
        rss1 = l4.sc.rss_kib()
    finally:
        s.close()
    assert sent < total, "client pushed all 256 MiB into an app that never reads"
    assert rss1 - rss0 < 32 * 1024, f"sidecar RSS grew {(rss1 - rss0) / 1024:.1f} MiB"


def test_client_reset_mid_transfer_sidecar_survives(l4):
    """The client resets while the sidecar is writing to it (EPIPE/ECONNRESET, SIGPIPE
    territory): the sidecar logs it, closes the app side and keeps serving."""
    before = l4.source.count()
    s = _tls(l4.ports["source"], l4.pki)
    port = s.getsockname()[1]
    h.recv_exact(s, 1 * MiB, timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                                  # RST with the sidecar mid-write
    e = l4.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None, "no access-log line for the reset connection"
    h.check_access_entry(e)
    assert e["close"] in ("reset", "error"), e
    rec = l4.source.conns[before]
    assert rec.done.wait(h.T(h.PROMPT_S)), "app side not closed after the client reset"
    assert rec.bytes_out < 256 * MiB
    l4.sc.assert_alive()
    s2 = _tls(l4.ports["echo"], l4.pki)
    try:
        s2.sendall(b"still alive\n")
        assert h.recv_exact(s2, 12) == b"still alive\n"
    finally:
        s2.close()


def test_tls12_client_renegotiation_refused(l4):
    """BoringSSL refuses renegotiation; the sidecar must survive it and never forward the
    data as if nothing happened (s_client's "R" command renegotiates on TLS 1.2)."""
    pki = l4.pki
    # stdin stays open until the sidecar's answer to the renegotiation is in (s_client reads
    # its stdin only after the handshake, and ends the session once stdin is closed)
    r = h.openssl_s_client(l4.ports["echo"], "-cert", pki.crt("web-frontend"), "-key",
                       pki.key("web-frontend"), "-CAfile", pki.ca, "-tls1_2",
                       stdin_data=b"R\n", until=lambda out: "no renegotiation" in out)
    out = r.stdout + r.stderr
    assert "RENEGOTIATING" in out, out
    assert "no renegotiation" in out, out   # alert 100 from the sidecar
    l4.sc.assert_alive()
    s = _tls(l4.ports["echo"], l4.pki)
    try:
        s.sendall(b"after-reneg\n")
        assert h.recv_exact(s, 12) == b"after-reneg\n"
    finally:
        s.close()


def test_zz_l4_log_well_formed(l4):
    for e in l4.sc.access_log():
        h.check_access_entry(e)
    l4.sc.assert_alive()


# ------------------------------------------------------------------ timeouts
# Each deadline under test gets a sidecar of its own in which it is the only short one: the
# idle tests must not depend on a handshake finishing within a short handshake timeout.

HANDSHAKE_TIMEOUT_MS = 500
IDLE_TIMEOUT_MS = 2000   # ticks every 0.1 s must keep a connection alive: a wide margin


def _timeout_sidecar(module_env, name: str, limits: dict) -> SimpleNamespace:
    pki = module_env.pki
    app = module_env.app("echo")
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", limits=limits, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    sc = module_env.sidecar(cfg, name=name)
    return SimpleNamespace(sc=sc, app=app, port=port, pki=pki)


@pytest.fixture(scope="module")
def hs_timeout(module_env):
    return _timeout_sidecar(module_env, "hs-timeout",
                            {"handshake_timeout_ms": HANDSHAKE_TIMEOUT_MS})


@pytest.fixture(scope="module")
def idle_timeout(module_env):
    return _timeout_sidecar(module_env, "idle-timeout", {"idle_timeout_ms": IDLE_TIMEOUT_MS})


@pytest.mark.parametrize("send", [b"", b"\x16\x03\x01\x02\x00\x01"],
                         ids=["silent", "partial-clienthello"])
def test_handshake_timeout(hs_timeout, send):
    before = hs_timeout.app.count()
    t0 = time.monotonic()    # before the connect: the sidecar's deadline starts later
    s = socket.create_connection((h.HOST, hs_timeout.port), timeout=h.T(10))
    port = s.getsockname()[1]
    try:
        if send:
            s.sendall(send)
        outcome, _got, _ = _expect_closed(s, timeout=h.PROMPT_S + 10)
    finally:
        s.close()
    dt = time.monotonic() - t0
    assert outcome in ("eof", "reset"), outcome
    assert 0.3 <= dt < h.PROMPT_S, \
        f"closed after {dt:.2f}s with handshake_timeout_ms={HANDSHAKE_TIMEOUT_MS}"
    e = hs_timeout.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["decision"] == "deny" and e["reason"] == "timeout", e
    assert hs_timeout.app.count() == before


def test_idle_timeout_closes_idle_connection(idle_timeout):
    idle_s = IDLE_TIMEOUT_MS / 1000
    s = _tls(idle_timeout.port, idle_timeout.pki)
    port = s.getsockname()[1]
    try:
        t0 = time.monotonic()   # the last activity the sidecar sees comes after this
        s.sendall(b"hi\n")
        assert h.recv_exact(s, 3) == b"hi\n"
        outcome, _got, _ = _expect_closed(s, timeout=h.PROMPT_S + 10)
    finally:
        s.close()
    dt = time.monotonic() - t0
    assert _closed(outcome), outcome
    assert idle_s - 0.3 <= dt < h.PROMPT_S, \
        f"idle connection closed after {dt:.2f}s (idle_timeout_ms={IDLE_TIMEOUT_MS})"
    e = idle_timeout.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["decision"] == "allow" and e["close"] == "idle_timeout", e


def test_idle_timeout_spares_active_connection(idle_timeout):
    idle_s = IDLE_TIMEOUT_MS / 1000
    s = _tls(idle_timeout.port, idle_timeout.pki)
    try:
        t_start = time.monotonic()
        t_end = t_start + 3 * idle_s
        i = 0
        while time.monotonic() < t_end and i < 1000:
            msg = b"tick %d\n" % i
            s.sendall(msg)
            assert h.recv_exact(s, len(msg), timeout=h.PROMPT_S) == msg, f"tick {i}"
            time.sleep(0.1)
            i += 1
        alive_for = time.monotonic() - t_start
        assert i >= 5, f"only {i} ticks in {alive_for:.2f} s"
        assert alive_for >= 3 * idle_s, alive_for
    finally:
        s.close()


# ------------------------------------------------------------------ connection limit

def test_max_connections_pauses_accept(env):
    n = 3
    app = env.app("echo")
    port = h.free_port()
    cfg = h.base_config(env.pki, "payments-api", workers=1,
                        limits={"max_connections": n}, inbound=[
                            h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    sc = env.sidecar(cfg, name="maxconn")
    ctx = _ctx(env.pki)
    open_socks = []
    try:
        for i in range(n):
            s = h.tls_connect(port, ctx)
            open_socks.append(s)
            s.sendall(b"ok%d" % i)
            assert h.recv_exact(s, 3) == b"ok%d" % i
        assert app.count() == n
        # connection n+1: TCP connects (kernel backlog) but must not be served yet
        result = {}

        def extra():
            try:
                s = h.tls_connect(port, ctx, timeout=h.PROMPT_S + 10)
                result["sock"] = s
                s.sendall(b"late")
                result["echo"] = h.recv_exact(s, 4, timeout=h.PROMPT_S)
            except Exception as e:
                result["error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=extra, daemon=True)
        t.start()
        t.join(1.5)     # the test condition: not served for 1.5 s while at the limit
        assert t.is_alive() and "echo" not in result, \
            f"connection {n + 1} was handled while {n} were open: {result}"
        assert app.count() == n, "app saw connection N+1 while at the limit"
        open_socks.pop(0).close()
        t.join(h.T(h.PROMPT_S + 10))
        assert not t.is_alive(), "connection N+1 not served after one connection closed"
        assert result.get("echo") == b"late", result
        assert app.count() == n + 1
        if "sock" in result:
            open_socks.append(result["sock"])
    finally:
        for s in open_socks:
            s.close()
    sc.assert_alive()


def test_descriptor_exhaustion_pauses_accept_and_recovers(env):
    """With too few descriptors for max_connections the sidecar caps live
    connections, pauses accepting at the cap instead of failing accept(2) or the
    app connect with EMFILE, and serves again once connections close."""
    app = env.app("echo")
    port = h.free_port()
    # the admin server's connections count against the descriptors too: keep them few
    cfg = h.base_config(env.pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])],
        extra={"admin": {"max_connections": 4}})
    sc = env.sidecar(cfg, name="fdlimit", cmd_prefix=["prlimit", "--nofile=80:80"])
    warn = [e for e in sc.events if "descriptor limit 80" in e.get("msg", "")]
    assert warn, f"no descriptor-cap warning in {sc.events}"
    cap = int(re.search(r"at most (\d+) connections", warn[0]["msg"]).group(1))
    assert 5 <= cap < 40, warn[0]
    ctx = _ctx(env.pki)
    held, failures = [], []
    # Up to the cap every connection is served, however slow the machine (a generous
    # timeout: a slow handshake is not a refusal); the 5 beyond it must stay unserved for
    # a second (the test condition).
    for i in range(cap + 5):
        within = i < cap
        try:
            s = h.tls_connect(port, ctx, timeout=h.PROMPT_S if within else 1.0)
            s.sendall(b"%03d" % i)
            assert h.recv_exact(s, 3, timeout=h.PROMPT_S if within else 1.0) == b"%03d" % i
            held.append(s)
        except (OSError, AssertionError) as e:
            failures.append((i, f"{type(e).__name__}: {e}"))
    assert len(held) == cap, \
        f"served {len(held)} connections with a cap of {cap}; failures: {failures[:8]}"
    assert len(failures) == 5 and [i for i, _ in failures] == list(range(cap, cap + 5)), \
        f"expected connections {cap}..{cap + 4} to stay unserved, failures: {failures}"
    assert app.count() == cap, "the app saw connections beyond the descriptor cap"
    assert sc.wait_for_event("accepting paused", h.PROMPT_S) is not None, \
        "no 'accepting paused' event at the descriptor cap"
    sc.assert_alive()
    for s in held:
        s.close()
    # every queued connection that gave up is drained; then fresh ones work
    ok, errors = 0, []
    deadline = time.monotonic() + h.T(h.PROMPT_S)
    while ok < 3 and time.monotonic() < deadline:
        try:
            s = h.tls_connect(port, ctx, timeout=h.PROMPT_S)
            s.sendall(b"again")
            ok += h.recv_exact(s, 5, timeout=h.PROMPT_S) == b"again"
            s.close()
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.1)
    assert ok == 3, \
        f"sidecar did not serve again after descriptors were released: {ok}/3, {errors[-3:]}"
    assert not any("EMFILE" in e.get("msg", "") or "too many open files" in e.get("msg", "")
                   for e in sc.events), "accept or connect ran into EMFILE"
    sc.assert_alive()


# ------------------------------------------------------------------ shutdown

def test_sigterm_with_open_connection_exits_0(env):
    app = env.app("echo")
    port = h.free_port()
    cfg = h.base_config(env.pki, "payments-api", limits={"drain_timeout_ms": 1000}, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    sc = env.sidecar(cfg, name="sigterm")
    s = _tls(port, env.pki)
    try:
        s.sendall(b"before-term\n")
        assert h.recv_exact(s, 12) == b"before-term\n"
        t0 = time.monotonic()
        rc = sc.stop(timeout=h.PROMPT_S + 10)        # asserts exit code 0
        dt = time.monotonic() - t0
        assert rc == 0
        # without the drain deadline the open connection would hold it until the 600 s
        # idle timeout
        assert dt < h.PROMPT_S, f"took {dt:.2f}s to exit with drain_timeout_ms=1000"
        outcome, _, _ = _expect_closed(s, timeout=h.PROMPT_S)
        assert _closed(outcome), outcome
    finally:
        s.close()
    # the listener is gone
    with pytest.raises(OSError):
        socket.create_connection((h.HOST, port), timeout=1).close()


# ------------------------------------------------------------------ half-close over TLS (inbound)

def _inbound_one(env, app):
    port = h.free_port()
    cfg = h.base_config(env.pki, "payments-api", inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    return env.sidecar(cfg, name="halfclose-tls"), port


def test_tls_half_close_client_close_notify_still_gets_reply(env):
    reply = b"tls-reply-after-close-notify:" + h.pattern_bytes(200 * 1024, seed=11)
    app = env.app("sink", reply=reply)
    sc, port = _inbound_one(env, app)
    data = h.pattern_bytes(512 * 1024, seed=12)
    c = h.BioTLSClient(port, _ctx(env.pki))
    try:
        c.sendall(data)
        c.send_close_notify()                 # our write side is done
        got = c.recv_until_close()
    finally:
        c.close()
    assert got == reply, f"got {len(got)} bytes, expected the {len(reply)}-byte reply"
    rec = app.conns[0]
    assert rec.done.wait(h.T(5))
    assert rec.eof and rec.bytes_in == len(data) and rec.sha256_in == h.sha256(data)


def test_tls_half_close_app_first_client_can_still_send(env):
    greeting = b"tls-server-first-then-eof\n"

    app = env.app("handler", handler=_greet_then_sink(greeting))
    sc, port = _inbound_one(env, app)
    late = b"tls-client-writes-after-eof:" + h.pattern_bytes(100 * 1024, seed=13)
    c = h.BioTLSClient(port, _ctx(env.pki))
    try:
        assert c.recv_until_close() == greeting
        c.sendall(late)
        c.send_close_notify()
        rec_ok = app.wait_conns(1) and app.conns[0].done.wait(h.T(10))
    finally:
        c.close()
    assert rec_ok, "app connection did not finish"
    rec = app.conns[0]
    assert bytes(rec.data) == late, f"app got {len(rec.data)} of {len(late)} late bytes"
    assert rec.eof

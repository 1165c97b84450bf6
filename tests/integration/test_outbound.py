"""Outbound listener: plaintext app -> sidecar -> mTLS upstream (a Python TLS server that
requires a client cert and records what it saw)."""

from __future__ import annotations

import socket
import ssl
import time
from types import SimpleNamespace

import pytest

import harness as h

EXPECT_PAYMENTS_API = [{"namespace": "payments", "service_account": "api"}]

# listener name -> (upstream cert stem, upstream max TLS version)
UPSTREAMS = {
    "good": ("payments-api", None),
    "good12": ("payments-api", ssl.TLSVersion.TLSv1_2),
    "wrongid": ("web-admin", None),
    "wrongns": ("evil-intruder", None),
    "clientonly": ("bad-client-only", None),
    "otherca": ("bad-other-ca", None),
    "expired": ("bad-expired", None),
    "wrongtd": ("bad-wrong-td", None),
    "twouris": ("bad-two-uris", None),
}


@pytest.fixture(scope="module")
def outb(module_env):
    ups, ports, listeners = {}, {}, []
    for name, (stem, maxv) in UPSTREAMS.items():
        ups[name] = module_env.upstream(stem, max_version=maxv)
        ports[name] = h.free_port()
        listeners.append(h.outbound_listener(name, ports[name], ups[name].addr,
                                             EXPECT_PAYMENTS_API))
    # nothing listens on the "dead" upstream
    ports["dead"] = h.free_port()
    listeners.append(h.outbound_listener("dead", ports["dead"], h.addr(h.free_port()),
                                         EXPECT_PAYMENTS_API))
    cfg = h.base_config(module_env.pki, "web-frontend", outbound=listeners)
    sc = module_env.sidecar(cfg, name="outbound")
    return SimpleNamespace(sc=sc, ups=ups, ports=ports, pki=module_env.pki)


class _Done(Exception):
    pass


def _plain(port: int) -> socket.socket:
    return socket.create_connection((h.HOST, port), timeout=h.T(10))


@pytest.mark.parametrize("name,version", [("good", "TLSv1.3"), ("good12", "TLSv1.2")])
def test_bytes_flow_and_upstream_sees_our_identity(outb, name, version):
    up = outb.ups[name]
    before = up.count()
    n = 4 << 20
    data = h.pattern_bytes(n, seed=7)
    s = _plain(outb.ports[name])
    app_addr = "%s:%d" % s.getsockname()
    try:
        got, digest = h.duplex(s, data, n, timeout=60)
    finally:
        s.close()
    assert got == n and digest == h.sha256(data)
    assert h.wait_until(lambda: up.count() > before, h.T(h.PROMPT_S)), "upstream saw no connection"
    rec = up.conns[before]
    assert rec.done.wait(h.T(h.PROMPT_S)), "upstream connection not closed after the app closed"
    assert rec.handshake_ok, rec.handshake_error
    assert rec.version == version
    assert rec.peer_uris == [h.spiffe("web", "frontend")], rec.peer_cert
    assert rec.sni == "api.payments.svc"
    assert rec.bytes_in == n and rec.hasher.hexdigest() == h.sha256(data)
    e = outb.sc.log_for_app_port(int(app_addr.rsplit(":", 1)[1]), timeout=h.PROMPT_S)
    assert e is not None, outb.sc.access_log()[-3:]
    h.check_access_entry(e)
    assert e["direction"] == "outbound" and e["listener"] == name, e
    assert e["decision"] == "allow" and e["reason"] is None, e
    assert e["peer"] == up.addr, e
    assert e["peer_id"] == h.spiffe("payments", "api"), e
    assert e["bytes_from_peer"] == n and e["bytes_to_peer"] == n, e
    assert version[-3:] in str(e["tls_version"]), e


@pytest.mark.parametrize("name,reason,peer_id", [
    ("wrongid", "not_allowed", h.spiffe("web", "admin")),
    ("wrongns", "not_allowed", h.spiffe("evil", "intruder")),
    ("clientonly", "bad_chain", None),
    ("otherca", "bad_chain", None),
    ("expired", "expired", None),
    ("wrongtd", "wrong_trust_domain", None),
    ("twouris", "no_spiffe_id", None),
])
def test_bad_upstream_refused(outb, name, reason, peer_id):
    up = outb.ups[name]
    before = up.count()
    t0 = time.monotonic()
    s, app_port = h.plain_connect_bound(outb.ports[name])
    got = b""
    outcome = "reset" if s is None else None
    try:
        if s is None:   # refused so fast that connect() already saw the RST
            raise _Done
        try:
            s.sendall(b"secret application bytes\n")
        except OSError:
            pass
        s.settimeout(h.T(h.PROMPT_S + 10))
        try:
            got = s.recv(4096)
            outcome = "eof" if not got else "data"
        except ConnectionResetError:
            outcome = "reset"
        except (socket.timeout, TimeoutError):
            outcome = "timeout"
    except _Done:
        pass
    finally:
        if s is not None:
            s.close()
    assert outcome in ("eof", "reset"), f"app connection not closed (outcome={outcome})"
    assert got == b""
    # not refused, the app connection would stay open (generous deadlines only)
    took = time.monotonic() - t0
    assert took < h.PROMPT_S, f"app connection closed {took:.2f} s after the connect, " \
                            f"expected at once"
    assert h.wait_until(lambda: up.count() > before, h.T(h.PROMPT_S)), \
        "sidecar never dialled upstream"
    rec = up.conns[before]
    assert rec.done.wait(h.T(h.PROMPT_S)), "upstream connection not closed"
    assert rec.bytes_in == 0, "upstream received application bytes from a refused session"
    e = outb.sc.log_for_app_port(app_port, timeout=h.PROMPT_S)
    assert e is not None, outb.sc.access_log()[-3:]
    h.check_access_entry(e)
    assert e["direction"] == "outbound" and e["listener"] == name, e
    assert e["decision"] == "deny" and e["reason"] == reason, e
    assert e["peer"] == up.addr, e
    if peer_id is not None:
        assert e["peer_id"] == peer_id, e
    assert e["bytes_to_peer"] == 0, e


@pytest.mark.parametrize("name", ["good", "good12"])
def test_outbound_resumes_tls13_only(outb, name):
    """The upstream (Python) issues tickets and resumes. Over TLS 1.3 the sidecar offers
    the session it holds (one per listener and worker): of three connections over two
    workers, the second or third shares a worker with an earlier one and resumes. Over
    TLS 1.2 it never resumes."""
    up = outb.ups[name]
    before = up.count()
    for i in range(3):
        s = _plain(outb.ports[name])
        try:
            msg = b"conn %d\n" % i
            s.sendall(msg)
            # the upstream sends its TLS 1.3 tickets at the end of its handshake, before any
            # echo: once the echo is back, the sidecar has read them
            assert h.recv_exact(s, len(msg), timeout=h.PROMPT_S) == msg
            s.sendall(msg)
            assert h.recv_exact(s, len(msg), timeout=h.PROMPT_S) == msg
        finally:
            s.close()
        assert h.wait_until(lambda: up.count() > before + i, h.T(h.PROMPT_S)), \
            f"upstream saw {up.count() - before} connections, expected {i + 1}"
        assert up.conns[before + i].done.wait(h.T(h.PROMPT_S)), f"upstream connection {i} open"
    recs = up.conns[before:before + 3]
    assert [r.handshake_ok for r in recs] == [True] * 3
    if name == "good12":
        assert [r.session_reused for r in recs] == [False] * 3, "outbound resumed TLS 1.2"
    else:
        assert any(r.session_reused for r in recs[1:]), "outbound never resumed TLS 1.3"


def test_upstream_connect_failed(outb):
    s, app_port = h.plain_connect_bound(outb.ports["dead"])
    if s is not None:   # else: reset already seen by connect()
        try:
            try:
                s.sendall(b"x")
            except OSError:
                pass
            s.settimeout(h.T(h.PROMPT_S))
            try:
                got = s.recv(10)
            except ConnectionResetError:
                got = b""
            assert got == b""
        finally:
            s.close()
    e = outb.sc.log_for_app_port(app_port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["close"] == "connect_failed", e
    assert e["decision"] != "allow" or e["bytes_to_peer"] == 0, e


def test_zz_outbound_log_well_formed(outb):
    log = outb.sc.access_log()
    assert len(log) >= 10
    for e in log:
        h.check_access_entry(e)
        assert e["direction"] == "outbound"
    outb.sc.assert_alive()


def test_upstream_handshake_timeout(env):
    """Upstream accepts TCP but never speaks TLS: the handshake timeout ends it, the app
    connection is closed, the log says timeout, and the app's bytes never reach it."""
    mute = env.app("hold")
    port = h.free_port()
    cfg = h.base_config(env.pki, "web-frontend", limits={"handshake_timeout_ms": 500},
                        outbound=[h.outbound_listener("mute", port, mute.addr,
                                                      EXPECT_PAYMENTS_API)])
    sc = env.sidecar(cfg, name="outbound-timeout")
    t0 = time.monotonic()    # before the connect: the sidecar's deadline starts later
    s, app_port = h.plain_connect_bound(port)
    assert s is not None
    try:
        s.sendall(b"hello?\n")
        s.settimeout(h.T(h.PROMPT_S + 10))
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
    finally:
        s.close()
    dt = time.monotonic() - t0
    assert got == b""
    assert 0.3 <= dt < h.PROMPT_S, \
        f"app connection closed after {dt:.2f}s with handshake_timeout_ms=500"
    # the upstream's accept thread may record the connection after the sidecar gave up on it
    assert mute.wait_conns(1, timeout=h.PROMPT_S), "the sidecar never dialled the upstream"
    assert mute.count() == 1, f"the upstream saw {mute.count()} connections, expected 1"
    e = sc.log_for_app_port(app_port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["reason"] == "timeout" and e["decision"] in ("deny", "error"), e

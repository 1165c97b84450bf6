"""End to end: app -> outbound sidecar -> mTLS -> inbound sidecar -> app, two real
portcullis processes."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

import harness as h


@pytest.fixture(scope="module")
def mesh(module_env):
    pki = module_env.pki
    app = module_env.app("echo")
    in_cfg, out_cfg, in_port, out_port = h.chain_configs(pki, app.addr)
    server = module_env.sidecar(in_cfg, name="e2e-inbound")
    client = module_env.sidecar(out_cfg, name="e2e-outbound-web")
    evil_port = h.free_port()
    evil_cfg = h.base_config(pki, "evil-intruder", outbound=[
        h.outbound_listener("payments", evil_port, h.addr(in_port),
                            [{"namespace": "payments", "service_account": "api"}])])
    evil = module_env.sidecar(evil_cfg, name="e2e-outbound-evil")
    return SimpleNamespace(app=app, server=server, client=client, evil=evil,
                           in_port=in_port, out_port=out_port, evil_port=evil_port)


def test_e2e_roundtrip_checksum(mesh):
    n = 16 << 20
    data = h.pattern_bytes(n, seed=3)
    before = mesh.app.count()
    s = socket.create_connection((h.HOST, mesh.out_port), timeout=h.T(10))
    app_port = s.getsockname()[1]
    try:
        got, digest = h.duplex(s, data, n, timeout=90)
    finally:
        s.close()
    assert got == n and digest == h.sha256(data)
    assert mesh.app.wait_conns(before + 1, timeout=h.PROMPT_S), "the app saw no connection"
    rec = mesh.app.conns[before]
    assert rec.done.wait(h.T(h.PROMPT_S)), "app did not see the connection end"
    assert rec.bytes_in == n and rec.sha256_in == h.sha256(data)

    out_e = mesh.client.log_for_app_port(app_port, timeout=h.PROMPT_S)
    assert out_e is not None
    h.check_access_entry(out_e)
    assert out_e["decision"] == "allow" and out_e["peer_id"] == h.spiffe("payments", "api")
    assert out_e["bytes_from_peer"] == n and out_e["bytes_to_peer"] == n, out_e
    # the inbound side's TLS peer is the outbound sidecar's upstream socket
    in_e = mesh.server.wait_for_log(
        lambda e: e.get("peer_id") == h.spiffe("web", "frontend")
        and e.get("bytes_from_peer") == n, timeout=h.PROMPT_S)
    assert in_e is not None, mesh.server.access_log()[-3:]
    h.check_access_entry(in_e)
    assert in_e["decision"] == "allow" and in_e["app"] == mesh.app.addr, in_e
    assert in_e["bytes_to_peer"] == n


def test_e2e_many_sequential_connections(mesh):
    for i in range(50):
        s = socket.create_connection((h.HOST, mesh.out_port), timeout=h.T(10))
        try:
            msg = b"msg-%d-" % i * 100
            s.sendall(msg)
            assert h.recv_exact(s, len(msg), timeout=h.PROMPT_S) == msg, f"connection {i}"
        finally:
            s.close()


def test_e2e_evil_client_refused_at_inbound(mesh):
    before = mesh.app.count()
    start = len(mesh.server.access_log())
    s, _ = h.plain_connect_bound(mesh.evil_port)
    got = b"" if s is None else None
    try:
        if s is None:
            raise ConnectionResetError("reset during connect")
        try:
            s.sendall(b"let me in\n")
        except OSError:
            pass
        s.settimeout(h.T(h.PROMPT_S))
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
    except ConnectionResetError:
        pass
    finally:
        if s is not None:
            s.close()
    assert got == b"", f"evil client got {got!r}"
    e = mesh.server.wait_for_log(lambda x: x.get("peer_id") == h.spiffe("evil", "intruder"),
                                 timeout=h.PROMPT_S, start=start)
    assert e is not None, mesh.server.access_log()[start:]
    h.check_access_entry(e)
    assert e["decision"] == "deny" and e["reason"] == "not_allowed", e
    time.sleep(0.2 * h.SCALE)  # give a (buggy) forward connect a chance to show up
    assert mesh.app.count() == before, "the app was contacted for a refused peer"
    # the evil sidecar logged its failed session too
    ee = mesh.evil.wait_for_log(lambda x: x.get("listener") == "payments", timeout=h.PROMPT_S)
    assert ee is not None
    h.check_access_entry(ee)
    assert ee["bytes_from_peer"] == 0, ee

"""gRPC through a sidecar pair (issue 13, README "HTTP/2"): a grpcio client -> outbound
sidecar (prior-knowledge h2c) -> HTTP/2 over mTLS -> inbound sidecar (app_protocol = "h2c")
-> a grpcio server. Unary and streaming calls, large messages, status and trailers,
deadlines, cancellation, and the sidecar's own refusals as trailers-only responses."""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace

import grpc
import pytest

import grpckit as gk
import harness as h

MIB = 1 << 20


@pytest.fixture(scope="module")
def mesh(module_env):
    """client sidecar (web-frontend): outbound "api" -> server sidecar's inbound "api"
       server sidecar (payments-api): inbound "api" (h2c to the app) allows web-frontend
       for /mesh.Echo/ only (Forbidden is not allowed); inbound "down" forwards to a
       closed port (the app is down)."""
    pki = module_env.pki
    app = gk.GrpcApp()
    module_env.apps.append(app)
    dead = h.free_port()
    ports = {n: h.free_port() for n in ("in", "down", "out", "out_down")}
    allow = [{"namespace": "web", "service_account": "frontend",
              "paths": ["/mesh.Echo/Unary", "/mesh.Echo/ServerStream",
                        "/mesh.Echo/ClientStream", "/mesh.Echo/Bidi"]}]
    server_cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        dict(h.inbound_listener("api", ports["in"], app.addr, allow, protocol="http"),
             app_protocol="h2c"),
        dict(h.inbound_listener("down", ports["down"], h.addr(dead), allow, protocol="http"),
             app_protocol="h2c"),
    ])
    server = module_env.sidecar(server_cfg, name="grpc-server")
    expect = [{"namespace": "payments", "service_account": "api"}]
    client_cfg = h.base_config(pki, "web-frontend", workers=1, outbound=[
        h.outbound_listener("api", ports["out"], h.addr(ports["in"]), expect, protocol="http"),
        h.outbound_listener("down", ports["out_down"], h.addr(ports["down"]), expect,
                            protocol="http"),
    ])
    client = module_env.sidecar(client_cfg, name="grpc-client")
    ch = grpc.insecure_channel(f"127.0.0.1:{ports['out']}",
                               options=[("grpc.max_receive_message_length", 64 << 20),
                                        ("grpc.max_send_message_length", 64 << 20)])
    yield SimpleNamespace(app=app, server=server, client=client, ports=ports, ch=ch)
    ch.close()


def method(ch, kind: str, name: str):
    return getattr(ch, kind)(f"/{gk.SERVICE}/{name}")


def test_unary_round_trip_with_trailers_and_identity(mesh):
    n = mesh.app.ncalls()
    call = method(mesh.ch, "unary_unary", "Unary")
    resp, info = call.with_call(b"hello", timeout=h.T(30))
    assert resp == b"hello"
    assert info.code() == grpc.StatusCode.OK
    assert ("x-app-trailer", "kept") in info.trailing_metadata()
    seen = mesh.app.calls[n]
    assert seen["metadata"]["x-forwarded-client-cert"].endswith(
        f"URI={h.spiffe('web', 'frontend')}")
    for sc, direction in ((mesh.client, "outbound"), (mesh.server, "inbound")):
        line = sc.wait_for_log(lambda e: e.get("path") == "/mesh.Echo/Unary"
                               and e.get("protocol") == "HTTP/2")
        assert line is not None, direction
        assert line["status"] == 200 and line["grpc_status"] == 0 and line["decision"] == "allow"


def test_app_status_and_message_pass_through(mesh):
    call = method(mesh.ch, "unary_unary", "Unary")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"x", metadata=(("fail", "5"),), timeout=h.T(30))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert ei.value.details() == "the app says no"


@pytest.mark.parametrize("size", [1, 3 * MIB])
def test_server_streaming(mesh, size):
    call = method(mesh.ch, "unary_stream", "ServerStream")
    got = list(call(f"5:{size}".encode(), timeout=h.T(60)))
    assert [len(m) for m in got] == [size] * 5
    assert all(m == h.pattern_bytes(size, seed=i) for i, m in enumerate(got))


def test_client_streaming_several_mib(mesh):
    msgs = [h.pattern_bytes(2 * MIB, seed=i) for i in range(4)]
    call = method(mesh.ch, "stream_unary", "ClientStream")
    resp = call(iter(msgs), timeout=h.T(60))
    want = hashlib.sha256(b"".join(msgs)).hexdigest()
    assert resp == f"4:{want}".encode()


def test_bidi_streaming(mesh):
    msgs = [f"m{i}".encode() * (i + 1) for i in range(50)]
    call = method(mesh.ch, "stream_stream", "Bidi")
    assert list(call(iter(msgs), timeout=h.T(60))) == msgs


def test_cancellation_reaches_the_app(mesh):
    call = method(mesh.ch, "unary_stream", "ServerStream")
    it = call(b"100000:1024", timeout=h.T(60))
    first = next(it)
    assert len(first) == 1024
    it.cancel()
    assert h.wait_until(lambda: "ServerStream" in mesh.app.cancelled, h.WAIT_S)


def test_refused_path_is_permission_denied_and_never_reaches_app(mesh):
    n = mesh.app.ncalls()
    call = method(mesh.ch, "unary_unary", "Forbidden")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"x", timeout=h.T(30))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not_allowed" in ei.value.details()
    assert mesh.app.ncalls() == n
    line = mesh.server.wait_for_log(lambda e: e.get("path") == "/mesh.Echo/Forbidden")
    assert line["reason"] == "not_allowed" and line["grpc_status"] == 7


def test_app_down_is_unavailable(mesh):
    ch = grpc.insecure_channel(f"127.0.0.1:{mesh.ports['out_down']}")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            method(ch, "unary_unary", "Unary")(b"x", timeout=h.T(30))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()


def test_deadline_propagates(mesh):
    call = method(mesh.ch, "unary_unary", "Unary")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"x", metadata=(("sleep-ms", "3000"),), timeout=0.5)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

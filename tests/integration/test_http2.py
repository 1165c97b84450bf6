"""HTTP/2 on HTTP listeners (issue 13, README "HTTP/2"): inbound ALPN h2 from peers,
outbound prior-knowledge h2c from apps, each stream decided and forwarded as one request
over the HTTP/1.1 pool. Real clients: curl --http2, nghttp, python3-h2 on raw sockets."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from types import SimpleNamespace

import pytest

import h2kit
import harness as h
import httpkit as hk
from httpkit import HttpConn, req

SELF_ID = h.spiffe("payments", "api")
RULES = [
    {"namespace": "web", "service_account": "frontend", "methods": ["GET", "HEAD"],
     "paths": ["/api"]},
    {"namespace": "web", "service_account": "admin"},
]


@pytest.fixture(scope="module")
def h2env(module_env):
    """One sidecar (payments-api, workers=1):
       api   inbound http  -> app   allow web-frontend (GET/HEAD /api), web-admin (all),
                                    payments-api (the outbound hop below: all)
       out   outbound http -> api   expect payments/api"""
    pki = module_env.pki
    app = hk.HttpApp(name="h2app")
    module_env.apps.append(app)
    ports = {n: h.free_port() for n in ("api", "out")}
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", ports["api"], app.addr,
                           RULES + [{"namespace": "payments", "service_account": "api"}],
                           protocol="http"),
    ], outbound=[
        h.outbound_listener("out", ports["out"], h.addr(ports["api"]),
                            [{"namespace": "payments", "service_account": "api"}],
                            protocol="http"),
    ])
    sc = module_env.sidecar(cfg, name="http2")
    return SimpleNamespace(sc=sc, app=app, ports=ports, pki=pki)


def curl(env, *args: str, stem: str = "web-admin", inbound: bool = True) -> subprocess.CompletedProcess:
    pki = env.pki
    if inbound:
        base = ["curl", "-sS", "--http2", "--cacert", pki.ca, "--cert", pki.crt(stem),
                "--key", pki.key(stem), "--resolve", f"api.payments.svc:{env.ports['api']}:127.0.0.1",
                "-o", "-", "-w", "\n%{http_version} %{http_code}"]
        url = f"https://api.payments.svc:{env.ports['api']}"
    else:
        base = ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w",
                "\n%{http_version} %{http_code}"]
        url = f"http://127.0.0.1:{env.ports['out']}"
    args = [a.replace("URL", url) for a in args]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=60)


def split(r: subprocess.CompletedProcess) -> tuple[str, str, int]:
    body, _, tail = r.stdout.rpartition("\n")
    ver, code = tail.split()
    return body, ver, int(code)


def test_inbound_h2_get_reaches_app_as_http11_with_identity(h2env):
    n = h2env.app.nreq()
    r = curl(h2env, "URL/api/x?q=1", stem="web-frontend")
    body, ver, code = split(r)
    assert (ver, code) == ("2", 200), r.stderr
    seen = h2env.app.reqs_since(n)
    assert len(seen) == 1
    req = seen[0]
    assert req.method == "GET" and req.target == "/api/x?q=1" and req.version == "HTTP/1.1"
    assert req.hv("host") == [f"api.payments.svc:{h2env.ports['api']}"]
    xfcc = req.hv(hk.XFCC)
    assert xfcc == [f"By={SELF_ID};Hash={hk.leaf_der_sha256(h2env.pki.crt('web-frontend'))};"
                    f"URI={h.spiffe('web', 'frontend')}"]
    line = h2env.sc.wait_for_log(lambda e: e.get("path") == "/api/x" and e.get("protocol") == "HTTP/2")
    assert line["status"] == 200 and line["decision"] == "allow"
    assert line["peer_id"] == h.spiffe("web", "frontend") and line["grpc_status"] is None


def test_inbound_h2_policy_per_stream(h2env):
    n = h2env.app.nreq()
    r = curl(h2env, "-X", "POST", "-d", "x", "URL/api/y", stem="web-frontend")
    body, ver, code = split(r)
    assert (ver, code) == ("2", 403)
    assert json.loads(body)["reason"] == "not_allowed"
    assert h2env.app.nreq() == n
    line = h2env.sc.wait_for_log(lambda e: e.get("path") == "/api/y" and e.get("protocol") == "HTTP/2")
    assert line["status"] == 403 and line["reason"] == "not_allowed"


def test_unknown_method_refused_over_h2_as_over_http1(h2env):
    """A method the HTTP/1 parser would refuse is refused over HTTP/2 too, before the app."""
    n = h2env.app.nreq()
    r = curl(h2env, "-X", "FROB", "URL/anything")
    body, ver, code = split(r)
    assert (ver, code) == ("2", 400), r.stderr
    assert json.loads(body)["reason"] == "protocol" and "unknown method" in json.loads(body)["detail"]
    c = HttpConn.tls(h2env.ports["api"], h.client_context(h2env.pki, "web-admin"))
    c.send(b"FROB /anything HTTP/1.1\r\nhost: a\r\n\r\n")
    assert c.read_response().status == 400
    assert h2env.app.nreq() == n, "an unknown method reached the app"
    line = h2env.sc.wait_for_log(lambda e: e.get("method") == "FROB" and e.get("protocol") == "HTTP/2")
    assert line["status"] == 400 and line["decision"] == "deny" and line["reason"] == "protocol"


def test_h2load_through_the_pair_multiplexes_over_one_connection(h2env):
    """h2load (nghttp2-client), a real HTTP/2 load generator, through the sidecar pair:
    app -> outbound (h2c) -> HTTP/2 over mTLS -> inbound -> app. Every request succeeds and
    the two sidecars carry them all over at most one new mTLS connection (32 concurrent
    streams stay under the 100 a connection takes)."""
    n = 2000
    m = hk.scrape(h2env.sc)
    connects = m.get("portcullis_http_upstream_connects_total", listener="out")
    seen = h2env.app.nreq()
    r = subprocess.run(["h2load", "-n", str(n), "-c", "4", "-m", "8", "-t", "1",
                        f"http://127.0.0.1:{h2env.ports['out']}/api/load"],
                       capture_output=True, text=True, timeout=h.T(120))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored" \
        in r.stdout, r.stdout
    assert f"status codes: {n} 2xx" in r.stdout, r.stdout
    assert h.wait_until(lambda: h2env.app.nreq() - seen == n, h.WAIT_S), \
        f"the app saw {h2env.app.nreq() - seen} of {n} requests"
    m = hk.wait_metric(h2env.sc, "portcullis_http_requests_total", lambda v: v >= n,
                       listener="out", **{"class": "2xx"})
    new = m.get("portcullis_http_upstream_connects_total", listener="out") - connects
    assert new <= 1, f"{new} new sidecar-to-sidecar connections for {n} requests"


def test_outbound_h2c_prior_knowledge_through_the_pair(h2env):
    n = h2env.app.nreq()
    r = curl(h2env, "-d", "hello", "URL/upload/z", inbound=False)
    body, ver, code = split(r)
    assert (ver, code) == ("2", 200), r.stderr
    seen = h2env.app.reqs_since(n)
    assert len(seen) == 1 and seen[0].method == "POST"


# ============================================================ translation both ways

@pytest.fixture(scope="module")
def tr(module_env):
    """One sidecar (payments-api, workers=1):
       h2app  inbound http, app_protocol = "h2c" -> an h2c app (h2kit.H2App); allow web
       pin    outbound http, upstream_protocol = "h2" -> the sidecar's own inbound "h1app"
       h1app  inbound http -> an HTTP/1.1 app; allow web and payments/api"""
    pki = module_env.pki
    h2app, h1app = h2kit.H2App(), hk.HttpApp(name="h1app")
    module_env.apps += [h2app, h1app]
    ports = {n: h.free_port() for n in ("h2app", "pin", "h1app")}
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        dict(h.inbound_listener("h2app", ports["h2app"], h2app.addr, [{"namespace": "web"}],
                                protocol="http"), app_protocol="h2c"),
        h.inbound_listener("h1app", ports["h1app"], h1app.addr,
                           [{"namespace": "web"}, {"namespace": "payments"}], protocol="http"),
    ], outbound=[
        dict(h.outbound_listener("pin", ports["pin"], h.addr(ports["h1app"]),
                                 [{"namespace": "payments", "service_account": "api"}],
                                 protocol="http"), upstream_protocol="h2"),
    ])
    sc = module_env.sidecar(cfg, name="http2-translate")
    return SimpleNamespace(sc=sc, h2app=h2app, h1app=h1app, ports=ports, pki=pki,
                           ctx=h.client_context(pki, "web-frontend"))


def test_http1_client_reaches_h2c_app_translated(tr):
    n = tr.h2app.nreq()
    c = HttpConn.tls(tr.ports["h2app"], tr.ctx)
    body = b"x" * 5000
    c.send(req("POST", "/echo?a=1", [("X-Test", "one"), ("Connection", "keep-alive, x-test2"),
                                      ("X-Test2", "dropped"), (hk.XFCC, "By=spoof")],
               body=b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
               host="svc.example:8443", length=False)
           .replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n", 1))
    r = c.read_response("POST")
    assert r.status == 200, r.head
    got = r.json()
    assert got["method"] == "POST" and got["path"] == "/echo?a=1"
    assert got["authority"] == "svc.example:8443" and got["scheme"] == "https"
    assert got["body_len"] == 5000
    names = [k for k, _ in got["fields"]]
    assert "x-test" in names
    for gone in ("host", "connection", "x-test2", "transfer-encoding", "keep-alive"):
        assert gone not in names, got["fields"]
    xfcc = [v for k, v in got["fields"] if k == hk.XFCC]
    assert len(xfcc) == 1 and xfcc[0].endswith(f"URI={h.spiffe('web', 'frontend')}")
    # the connection stays usable for the next request
    c.send(req("GET", "/status?code=404", host="svc.example"))
    r2 = c.read_response()
    assert r2.status == 404 and r2.body == b"status 404"
    assert tr.h2app.nreq() == n + 2


def test_http1_client_gets_h2_trailers_in_the_last_chunk(tr):
    c = HttpConn.tls(tr.ports["h2app"], tr.ctx)
    c.send(req("GET", "/trailers", [("Connection", "close")], host="svc"))
    raw = h.recv_until_eof(c.sock, timeout=h.T(20))
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert rest.endswith(b"0\r\nx-trailer: yes\r\ngrpc-status: 0\r\n\r\n"), rest


def test_http1_client_big_download_from_h2c_app(tr):
    size = 3 << 20
    c = HttpConn.tls(tr.ports["h2app"], tr.ctx)
    c.send(req("GET", f"/big?n={size}", host="svc"))
    r = c.read_response(keep_limit=8 << 20)
    assert r.status == 200 and r.length == size
    assert r.sha256 == h.sha256(h.pattern_bytes(size))


def test_http2_client_reaches_h2c_app(tr):
    n = tr.h2app.nreq()
    cmd = ["curl", "-sS", "--http2", "--cacert", tr.pki.ca, "--cert", tr.pki.crt("web-frontend"),
           "--key", tr.pki.key("web-frontend"), "--resolve",
           f"api.payments.svc:{tr.ports['h2app']}:127.0.0.1", "-d", "abc",
           "-w", "\n%{http_version} %{http_code}",
           f"https://api.payments.svc:{tr.ports['h2app']}/echo"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=h.T(30))
    body, _, tail = r.stdout.rpartition("\n")
    assert tail == "2 200", r.stderr
    got = json.loads(body)
    assert got["method"] == "POST" and got["body_len"] == 3
    assert tr.h2app.reqs_since(n)[0].one(":authority") == f"api.payments.svc:{tr.ports['h2app']}"


def test_pinned_h2_upstream_carries_http1_app_traffic(tr):
    n = tr.h1app.nreq()
    cmd = ["curl", "-sS", "--http1.1", "-d", "hello", "-w", "\n%{http_code}",
           f"http://127.0.0.1:{tr.ports['pin']}/upload/a"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=h.T(30))
    assert r.stdout.endswith("\n200"), (r.stdout, r.stderr)
    seen = tr.h1app.reqs_since(n)
    assert len(seen) == 1 and seen[0].method == "POST" and seen[0].target == "/upload/a"
    # the hop between the sidecars was HTTP/2: the inbound listener's line says so
    line = tr.sc.wait_for_log(lambda e: e.get("listener") == "h1app" and e.get("path") == "/upload/a")
    assert line["protocol"] == "HTTP/2" and line["peer_id"] == SELF_ID
    out = tr.sc.wait_for_log(lambda e: e.get("listener") == "pin" and e.get("path") == "/upload/a")
    assert out["protocol"] == "HTTP/1.1" and out["status"] == 200 and out["peer_id"] == SELF_ID


def test_http2_metrics(h2env):
    lab = {"listener": "api", "direction": "inbound"}
    m0 = hk.scrape(h2env.sc)
    before = m0.get("portcullis_http_protocol_requests_total", protocol="HTTP/2", **lab)
    before_h1 = m0.get("portcullis_http_protocol_requests_total", protocol="HTTP/1.1", **lab)
    r = curl(h2env, "URL/api/m", "URL/api/m2", stem="web-frontend")
    assert r.returncode == 0, r.stderr
    m = hk.wait_metric(h2env.sc, "portcullis_http_protocol_requests_total",
                       lambda v: v >= before + 2, protocol="HTTP/2", **lab)
    assert m.get("portcullis_http_protocol_requests_total", protocol="HTTP/2", **lab) == before + 2
    assert m.get("portcullis_http_protocol_requests_total", protocol="HTTP/1.1", **lab) == \
        before_h1
    # every stream has ended: nothing is left open
    hk.wait_metric(h2env.sc, "portcullis_http2_active_streams", lambda v: v == 0, **lab)
    # a client that cancels a stream shows up as a received CANCEL
    c0 = m.get("portcullis_http2_resets_total", side="received", code="CANCEL", **lab)
    import h2.config
    import h2.connection
    ctx = h.client_context(h2env.pki, "web-admin")
    ctx.set_alpn_protocols(["h2"])
    s = h.tls_connect(h2env.ports["api"], ctx)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "svc"),
                          (":path", "/sleep?ms=3000")], end_stream=True)
    conn.reset_stream(1, error_code=8)
    s.sendall(conn.data_to_send())
    hk.wait_metric(h2env.sc, "portcullis_http2_resets_total", lambda v: v == c0 + 1,
                   side="received", code="CANCEL", **lab)
    s.close()


def test_upgrade_to_an_h2c_app_is_refused_and_never_reaches_it(tr):
    """An HTTP/2 hop has no Upgrade: a WebSocket request to an app behind
    app_protocol = "h2c" gets 502 (reason protocol) and the app hears nothing."""
    n = tr.h2app.nreq()
    c = HttpConn.tls(tr.ports["h2app"], tr.ctx)
    c.send(req("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                              ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                              ("Sec-WebSocket-Version", "13")], host="svc"))
    r = c.read_response()
    assert r.status == 502 and r.json()["reason"] == "protocol", r.head
    line = tr.sc.wait_for_log(lambda e: e.get("listener") == "h2app" and e.get("path") == "/ws")
    assert line["status"] == 502 and line["reason"] == "protocol"
    assert tr.h2app.nreq() == n

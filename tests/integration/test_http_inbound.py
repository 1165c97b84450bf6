"""HTTP/1.1 mode, inbound (issue 5, README "HTTP mode"): peer --mTLS--> sidecar --plain
HTTP/1.1 keep-alive pool--> app. Real binary, real clients (Python ssl + http.client, curl
with client certificates, raw TLS sockets), and an HTTP app on raw sockets that records
every connection and request (httpkit.HttpApp)."""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

import harness as h
import httpkit as hk
from httpkit import HttpConn, req

MIB = 1 << 20
BIG = 64 * MIB
SELF_ID = h.spiffe("payments", "api")

RULES = [
    {"namespace": "web", "service_account": "frontend", "methods": ["GET", "HEAD"],
     "paths": ["/api"]},
    {"namespace": "web", "service_account": "frontend", "methods": ["POST"],
     "paths": ["/upload/"]},
    {"namespace": "web", "service_account": "admin"},                 # anything
    {"namespace": "jobs", "paths": ["/jobs", "/health"]},             # any method
]


@pytest.fixture(scope="module")
def hin(module_env):
    """One sidecar (payments-api, workers=1) with three HTTP inbound listeners:
       api   -> app        allow web + jobs/scheduler
       rules -> rules_app  method/path rules (RULES)
       reuse -> reuse_app  allow web (only the pool-reuse test uses it)"""
    pki = module_env.pki
    app, rules_app, reuse_app = hk.HttpApp(name="app"), hk.HttpApp(name="rules"), \
        hk.HttpApp(name="reuse")
    module_env.apps += [app, rules_app, reuse_app]
    ports = {n: h.free_port() for n in ("api", "rules", "reuse")}
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", ports["api"], app.addr,
                           [{"namespace": "web"},
                            {"namespace": "jobs", "service_account": "scheduler"}],
                           protocol="http"),
        h.inbound_listener("rules", ports["rules"], rules_app.addr, RULES, protocol="http"),
        h.inbound_listener("reuse", ports["reuse"], reuse_app.addr, [{"namespace": "web"}],
                           protocol="http"),
    ])  # base_config keeps the pool's idle deadline generous (test_pool_idle_timeout sets it)
    sc = module_env.sidecar(cfg, name="http-inbound")
    return SimpleNamespace(sc=sc, app=app, rules_app=rules_app, reuse_app=reuse_app,
                           ports=ports, port=ports["api"], pki=pki,
                           ctx={s: h.client_context(pki, s) for s in
                                ("web-frontend", "web-admin", "web-viaint", "jobs-scheduler",
                                 "jobs-worker")})


def _conn(hin, stem="web-frontend", listener="api") -> HttpConn:
    return HttpConn.tls(hin.ports[listener], hin.ctx[stem])


def _xfcc(pki, stem: str, ns: str, sa: str) -> str:
    return f"By={SELF_ID};Hash={hk.leaf_der_sha256(pki.crt(stem))};URI={h.spiffe(ns, sa)}"


# ===================================================================== identity header

SPOOF = f"By={SELF_ID};Hash={'0' * 64};URI={h.spiffe('web', 'admin')}"


@pytest.mark.parametrize("stem,ns,sa", [
    ("web-frontend", "web", "frontend"),
    ("web-viaint", "web", "frontend"),          # leaf + intermediate: Hash is the LEAF's
    ("jobs-scheduler", "jobs", "scheduler"),
])
def test_identity_header_present_and_unspoofable(hin, stem, ns, sa):
    """http.client over ssl; the peer sends its own x-forwarded-client-cert three times in
    odd cases: the app sees exactly one, the sidecar's."""
    want = _xfcc(hin.pki, stem, ns, sa)
    n0 = hin.app.nreq()
    c = http.client.HTTPSConnection(h.HOST, hin.port, context=hin.ctx[stem], timeout=h.T(20))
    try:
        c.putrequest("GET", "/echo?who=1")
        c.putheader("X-Forwarded-Client-Cert", SPOOF)
        c.putheader("x-FORWARDED-client-CERT", SPOOF)
        c.putheader("X-Other", "kept")
        c.putheader("X-FORWARDED-CLIENT-CERT", "By=x;URI=spiffe://cluster.local/ns/kube/sa/root")
        c.endheaders()
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, body
        # a second request on the same connection, no spoof: the header is still there
        c.request("GET", "/echo?who=2")
        r2 = c.getresponse()
        body2 = r2.read()
        assert r2.status == 200, (r2.head, r2.body[:300] if r2.body else r2.body)
    finally:
        c.close()
    seen = json.loads(body)
    assert [v for k, v in seen["headers"] if k.lower() == hk.XFCC] == [want], seen["headers"]
    assert [v for k, v in seen["headers"] if k.lower() == "x-other"] == ["kept"]
    seen2 = json.loads(body2)
    assert [v for k, v in seen2["headers"] if k.lower() == hk.XFCC] == [want]
    reqs = hin.app.reqs_since(n0)
    assert [r.target for r in reqs] == ["/echo?who=1", "/echo?who=2"]
    for rq in reqs:
        assert rq.hv(hk.XFCC) == [want], rq.headers
        assert not any(SPOOF in v or "kube" in v for _, v in rq.headers), rq.headers


@pytest.mark.parametrize("name", ["X-Forwarded-Client-Cert ", "x-forwarded-client-cert\t"],
                         ids=["space", "tab"])
def test_identity_spoof_with_whitespace_before_colon(hin, name):
    """`X-Forwarded-Client-Cert : <spoof>` is not a different header to a lenient app (many
    trim the name): RFC 9112 5.1 says such a request MUST get 400. It must never reach the
    app next to the sidecar's own header."""
    b = hk.before(hin.sc, hin.app)
    with _conn(hin) as c:
        r = hk.exchange(c, f"GET /echo?ws-spoof HTTP/1.1\r\nHost: a\r\n{name}: {SPOOF}\r\n"
                           f"\r\n".encode())
        hk.assert_refused(hin.sc, r, b, status=400, reason="protocol", listener="api",
                          app=hin.app, conn=c)


def test_identity_header_fields(hin):
    """Field by field: By = the sidecar's SPIFFE ID, Hash = sha256(client leaf DER),
    URI = the client's SPIFFE ID (computed here independently of the sidecar)."""
    with _conn(hin, "web-frontend") as c:
        c.send(req("GET", "/echo"))
        r = c.read_response()
    assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
    xf = [v for k, v in r.json()["headers"] if k.lower() == hk.XFCC]
    assert len(xf) == 1, xf
    fields = dict(p.split("=", 1) for p in xf[0].split(";"))
    assert set(fields) == {"By", "Hash", "URI"}, xf
    assert fields["By"] == SELF_ID
    assert fields["URI"] == h.spiffe("web", "frontend")
    pem = open(hin.pki.crt("web-frontend")).read()
    der = ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])
    assert fields["Hash"] == h.sha256(der)
    assert fields["Hash"] == fields["Hash"].lower() and len(fields["Hash"]) == 64


def test_identity_is_per_request_over_a_shared_app_connection(hin):
    """Two peers with different identities interleave requests; the pool may put them on
    the same app connection, but each request carries its own peer's identity."""
    a, b = _conn(hin, "web-frontend"), _conn(hin, "web-admin")
    want = {"a": _xfcc(hin.pki, "web-frontend", "web", "frontend"),
            "b": _xfcc(hin.pki, "web-admin", "web", "admin")}
    try:
        conns = set()
        for i in range(6):
            for name, c in (("a", a), ("b", b)):
                c.send(req("GET", f"/echo?{name}={i}"))
                r = c.read_response()
                assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
                j = r.json()
                conns.add(j["conn"])
                assert [v for k, v in j["headers"] if k.lower() == hk.XFCC] == [want[name]], \
                    (name, i, j["headers"])
    finally:
        a.close()
        b.close()
    assert len(conns) <= 2, f"12 sequential requests used {len(conns)} app connections"


def test_curl_with_client_certificate(hin, tmp_path):
    """curl --cert/--key/--cacert (server verified by name: the cert has DNS:api.payments.svc),
    one invocation, three URLs: one TLS connection, three requests, identity header set,
    spoof removed."""
    pki = hin.pki
    n0 = hin.app.nreq()
    base = f"https://api.payments.svc:{hin.port}"
    cmd = ["curl", "-sS", "--http1.1", "--cert", pki.crt("web-frontend"),
           "--key", pki.key("web-frontend"), "--cacert", pki.ca,
           "--resolve", f"api.payments.svc:{hin.port}:127.0.0.1",
           "-H", f"X-Forwarded-Client-Cert: {SPOOF}", "--max-time", str(int(h.T(20))),
           "-w", "\\n@@%{http_code} %{num_connects}\\n",
           f"{base}/echo?c=1", f"{base}/echo?c=2", f"{base}/echo?c=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=h.T(30))
    assert r.returncode == 0, r.stderr
    bodies, stats = [], []
    for p in r.stdout.split("\n"):
        if p.startswith("@@"):
            stats.append(p[2:].split())
        elif p.startswith("{"):
            bodies.append(json.loads(p))
    assert [s[0] for s in stats] == ["200"] * 3, r.stdout
    assert sum(int(s[1]) for s in stats) == 1, f"curl opened >1 connection: {stats}"
    want = _xfcc(pki, "web-frontend", "web", "frontend")
    assert len(bodies) == 3, r.stdout
    for b in bodies:
        assert [v for k, v in b["headers"] if k.lower() == hk.XFCC] == [want], b["headers"]
    assert [x.target for x in hin.app.reqs_since(n0)] == ["/echo?c=1", "/echo?c=2", "/echo?c=3"]

    # curl uploading 3 MiB from a file
    data = h.pattern_bytes(3 * MIB, seed=21)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cert", pki.crt("web-frontend"),
                        "--key", pki.key("web-frontend"), "--cacert", pki.ca,
                        "--resolve", f"api.payments.svc:{hin.port}:127.0.0.1",
                        "--max-time", str(int(h.T(20))), "--data-binary", f"@{f}",
                        "-H", "Content-Type: application/octet-stream", f"{base}/upload"],
                       capture_output=True, text=True, timeout=h.T(30))
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["body_len"] == len(data) and j["body_sha256"] == h.sha256(data)


def test_curl_without_client_certificate_refused(hin):
    snap, start = hin.app.snapshot(), len(hin.sc.access_log())
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", hin.pki.ca,
                        "--resolve", f"api.payments.svc:{hin.port}:127.0.0.1",
                        "--max-time", str(int(h.T(10))),
                        f"https://api.payments.svc:{hin.port}/echo"],
                       capture_output=True, text=True, timeout=h.T(20))
    assert r.returncode != 0, r.stdout
    assert '"method"' not in r.stdout
    e = hin.sc.wait_for_log(lambda x: x.get("reason") == "no_cert", timeout=10, start=start)
    assert e is not None, hin.sc.access_log()[start:]
    h.check_access_entry(e)
    assert e["decision"] == "deny" and "method" not in e, e
    time.sleep(0.2 * h.SCALE)   # absence window: a wrong app connection would show by now
    assert hin.app.snapshot() == snap, \
        f"the app was contacted for a client without a cert: {snap} -> {hin.app.snapshot()}"


# ===================================================================== method / path rules

ALLOWED_NEXT = {"web-frontend": "/api/ok", "web-admin": "/whatever", "jobs-worker": "/jobs",
                "jobs-scheduler": "/jobs/next"}

RULE_CASES = [
    ("web-frontend", "GET", "/api", True),
    ("web-frontend", "GET", "/api/x/y", True),
    ("web-frontend", "GET", "/api?q=1", True),
    ("web-frontend", "HEAD", "/api/", True),
    ("web-frontend", "GET", "/apix", False),          # prefix must end at a '/'
    ("web-frontend", "GET", "/apix?x=/api", False),
    ("web-frontend", "GET", "/ap", False),
    ("web-frontend", "GET", "/", False),
    ("web-frontend", "POST", "/api", False),          # method not in that entry
    ("web-frontend", "DELETE", "/api/x", False),
    ("web-frontend", "POST", "/upload/a", True),
    ("web-frontend", "POST", "/upload/", True),
    ("web-frontend", "POST", "/upload", False),       # "/upload/" does not match "/upload"
    ("web-frontend", "POST", "/uploadx/a", False),
    ("web-frontend", "GET", "/upload/a", False),      # path of one entry, method of another
    ("web-admin", "DELETE", "/anything", True),
    ("web-admin", "PATCH", "/apix", True),
    ("jobs-scheduler", "PUT", "/jobs/1", True),
    ("jobs-worker", "GET", "/jobs", True),
    ("jobs-worker", "POST", "/health?deep=1", True),
    ("jobs-worker", "GET", "/jobsx", False),
    ("jobs-worker", "GET", "/healthz", False),
    ("jobs-worker", "OPTIONS", "/", False),
]


@pytest.mark.parametrize("stem,method,target,allowed", RULE_CASES,
                         ids=[f"{s}-{m}-{t}" for s, m, t, _ in RULE_CASES])
def test_method_path_rules(hin, stem, method, target, allowed):
    app = hin.rules_app
    b = hk.before(hin.sc, app)
    with _conn(hin, stem, "rules") as c:
        r = hk.exchange(c, req(method, target), method)
        if allowed:
            assert r is not None and r.status == 200, r
            got = app.reqs_since(b.app_snap[1])
            assert [(x.method, x.target) for x in got] == [(method, target)]
            e = hk.find_request_line(hin.sc, start=b.log_start, peer=c.peer_addr)
            assert e is not None, f"no access-log line for {c.peer_addr}"
            hk.check_http_entry(e)
            assert e["decision"] == "allow" and e["status"] == 200, e
            assert e["reason"] in ("", None), e
            assert e["listener"] == "rules" and e["method"] == method, e
            assert e["path"] == target.split("?")[0], e
        else:
            hk.assert_refused(hin.sc, r, b, status=403, reason="not_allowed",
                              listener="rules", app=app, conn=c, keep_alive=True,
                              decision="deny", method=method, path=target.split("?")[0])
            # the 403 (request without a body) keeps the connection: next request works
            c.send(req("GET", ALLOWED_NEXT[stem]))
            r2 = c.read_response()
            assert r2.status == 200, r2.head
            assert r2.json()["target"] == ALLOWED_NEXT[stem]
            e = hk.find_request_line(hin.sc, start=b.log_start, peer=c.peer_addr, status=403)
            assert e is not None, f"no 403 access-log line for {c.peer_addr}"


def test_403_with_body_closes_and_body_never_reaches_app(hin):
    app = hin.rules_app
    b = hk.before(hin.sc, app)
    body = b"secret=" + b"x" * 5000
    with _conn(hin, "web-frontend", "rules") as c:
        r = hk.exchange(c, req("POST", "/api/submit", body=body), "POST")
        hk.assert_refused(hin.sc, r, b, status=403, reason="not_allowed", listener="rules",
                          app=app, conn=c, decision="deny", method="POST", path="/api/submit")


def test_403_chunked_body_closes(hin):
    app = hin.rules_app
    b = hk.before(hin.sc, app)
    with _conn(hin, "jobs-worker", "rules") as c:
        r = hk.exchange(c, req("PUT", "/secrets", [("Transfer-Encoding", "chunked")])
                        + hk.chunked(b"hello world"), "PUT")
        hk.assert_refused(hin.sc, r, b, status=403, reason="not_allowed", listener="rules",
                          app=app, conn=c, decision="deny", method="PUT", path="/secrets")


def test_dot_segments_cannot_escape_a_path_rule(hin):
    """/api/../admin would match the /api prefix textually: it must be refused (400)."""
    app = hin.rules_app
    for target in ("/api/../admin", "/api/%2e%2e/admin", "/api/./../admin"):
        b = hk.before(hin.sc, app)
        with _conn(hin, "web-frontend", "rules") as c:
            r = hk.exchange(c, req("GET", target))
            hk.assert_refused(hin.sc, r, b, status=400, reason="protocol", listener="rules",
                              app=app, conn=c)


def test_namespace_refusal_still_at_handshake(hin):
    """evil-intruder's namespace is in no allow entry: refused in the TLS handshake, with
    the per-connection access-log line of tcp mode (no "method" key)."""
    b = hk.before(hin.sc, hin.rules_app)
    r = h.attempt_tls(hin.ports["rules"], h.client_context(hin.pki, "evil-intruder"),
                      probe=req("GET", "/api"))
    assert isinstance(r, h.Refusal), "evil-intruder was served"
    assert r.got_data == b""
    e = hin.sc.log_for_peer_port(r.local_port, timeout=10)
    assert e is not None, f"no access-log line for port {r.local_port}: " \
                          f"{hin.sc.access_log()[-5:]}"
    h.check_access_entry(e)
    assert "method" not in e and "status" not in e, e
    assert e["decision"] == "deny" and e["reason"] == "not_allowed", e
    assert e["peer_id"] == h.spiffe("evil", "intruder"), e
    time.sleep(0.2 * h.SCALE)   # absence window: a wrong app connection would show by now
    assert hin.rules_app.snapshot() == b.app_snap


# ===================================================================== connection reuse

def test_pool_reuse_50_requests_5_connections(hin):
    app = hin.reuse_app
    sc = hin.sc
    m0 = hk.scrape(sc)
    n0, c0 = app.nreq(), app.count()
    for k in range(5):
        with _conn(hin, "web-frontend", "reuse") as c:
            for i in range(10):
                c.send(req("GET", f"/echo?k={k}&i={i}"))
                r = c.read_response()
                assert r.status == 200 and r.json()["target"] == f"/echo?k={k}&i={i}"
    got = app.reqs_since(n0)
    assert len(got) == 50
    new_conns = app.count() - c0
    assert 1 <= new_conns <= 2, f"50 sequential requests used {new_conns} app connections"
    assert len({x.conn for x in got}) == new_conns
    lab = dict(listener="reuse", direction="inbound")
    m1 = hk.wait_metric(sc, "portcullis_http_upstream_reuses_total",
                        lambda v: v >= m0.get("portcullis_http_upstream_reuses_total", **lab)
                        + 48, **lab)
    d_conn = m1.get("portcullis_http_upstream_connects_total", **lab) - \
        m0.get("portcullis_http_upstream_connects_total", **lab)
    d_reuse = m1.get("portcullis_http_upstream_reuses_total", **lab) - \
        m0.get("portcullis_http_upstream_reuses_total", **lab)
    assert d_conn == new_conns, (d_conn, new_conns)
    assert d_conn + d_reuse == 50, (d_conn, d_reuse)


def test_pool_concurrent_clients_get_their_own_answers(hin):
    """8 clients in parallel, 6 requests each, with bodies: every answer belongs to its
    request (no cross-talk between pooled app connections)."""
    errors: list[str] = []

    def client(k: int):
        try:
            with _conn(hin, "web-frontend", "reuse") as c:
                for i in range(6):
                    body = f"client {k} request {i} ".encode() * (50 + 37 * i)
                    c.send(req("POST", f"/upload?k={k}&i={i}", body=body))
                    r = c.read_response()
                    j = r.json()
                    if r.status != 200 or j["target"] != f"/upload?k={k}&i={i}" or \
                            j["body_sha256"] != h.sha256(body):
                        errors.append(f"client {k} req {i}: {r.status} {j.get('target')}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    c0 = hin.reuse_app.count()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + h.T(60)
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), \
        f"{sum(t.is_alive() for t in ts)} of 8 clients still running after {h.T(60):.0f}s"
    assert not errors, errors
    assert hin.reuse_app.count() - c0 <= 8


# ===================================================================== bodies / streaming

def test_upload_64mib_content_length(hin):
    # made before connecting: a client silent after connecting is what deadlines are for
    data = hk.pattern(BIG, seed=11)
    raw = req("POST", "/upload", [("Content-Length", str(BIG))]) + data
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        r = hk.send_while_reading(c, raw, timeout=120)
        assert r.status == 200, r.head
        j = r.json()
        assert j["body_len"] == BIG and j["body_sha256"] == h.sha256(data)
        # connection still usable afterwards
        c.send(req("GET", "/echo?after=1"))
        assert c.read_response().status == 200
        peer = c.peer_addr
    e = hk.find_request_line(hin.sc, start=hin.sc.test_mark, peer=peer)
    assert e is not None and e["request_bytes"] == BIG, e
    rq = hin.app.reqs_since(n0)[0]
    assert rq.complete and rq.content_length == BIG and not rq.chunked
    assert rq.body_sha256 == h.sha256(data)


def test_upload_64mib_chunked_with_trailers(hin):
    data = hk.pattern(BIG, seed=12)
    n0 = hin.app.nreq()
    body = hk.chunked(data, size=1 * MIB + 17, trailers=[("X-Checksum", "abc")])
    raw = req("POST", "/upload", [("Transfer-Encoding", "chunked"),
                                  ("Trailer", "X-Checksum")]) + body
    with _conn(hin) as c:
        r = hk.send_while_reading(c, raw, timeout=120)
        assert r.status == 200, r.head
        j = r.json()
        assert j["body_len"] == BIG and j["body_sha256"] == h.sha256(data)
        peer = c.peer_addr
    e = hk.find_request_line(hin.sc, start=hin.sc.test_mark, peer=peer)
    assert e is not None and e["status"] == 200, e
    assert e["request_bytes"] == BIG, f"request_bytes must count body bytes: {e}"
    rq = hin.app.reqs_since(n0)[0]
    assert rq.complete and rq.chunked, rq.headers
    assert rq.hv("content-length") == [], "re-chunked body must not carry Content-Length"
    assert rq.trailers == [], f"trailers must be dropped: {rq.trailers}"


@pytest.mark.parametrize("chunked", [0, 1], ids=["content-length", "chunked"])
def test_download_64mib(hin, chunked):
    want = h.sha256(hk.pattern(BIG, 0))
    with _conn(hin) as c:
        c.send(req("GET", f"/big?n={BIG}&chunked={chunked}"))
        r = c.read_response(timeout=120, keep_limit=0)
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
        assert r.length == BIG and r.sha256 == want
        if not chunked:
            assert r.framing == "length" and r.hdr("content-length") == str(BIG)
        c.send(req("GET", "/echo?after=download"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?after=download"
        peer = c.peer_addr
    e = hk.find_request_line(hin.sc, start=hin.sc.test_mark, peer=peer)
    assert e is not None and e["path"] == "/big", e
    assert e["response_bytes"] == BIG and e["request_bytes"] == 0, e


def _http_sidecar(env, pki, name: str, app=None):
    """One worker, an HTTP inbound listener ("api", namespace web allowed) in front of app
    (a fresh HttpApp if None). Returns (sidecar, app, port)."""
    if app is None:
        app = hk.HttpApp()
        env.apps.append(app)
    port = h.free_port()
    sc = env.sidecar(h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http")]),
        name=name)
    return sc, app, port


def test_download_backpressure_bounded_memory(env, pki):
    """A client that stops reading a 64 MiB response: the sidecar must not buffer it."""
    sc, app, port = _http_sidecar(env, pki, "http-backpressure")
    ctx = h.client_context(pki, "web-frontend")
    with HttpConn.tls(port, ctx) as c:   # warm-up
        c.send(req("GET", "/echo"))
        assert c.read_response().status == 200
    want = h.sha256(hk.pattern(BIG, 0))   # also the app's body, made before the request
    rss0 = sc.rss_kib()
    n0 = app.nreq()
    with HttpConn.tls(port, ctx) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(req("GET", f"/big?n={BIG}"))
        # wait until the pipe is full: the app's sending has stalled behind the sidecar
        assert app.wait_reqs(n0 + 1), "the request never reached the app"
        stalled = h.wait_stalled(lambda: app.conns[app.reqs_since(n0)[0].conn].bytes_out,
                                 quiet=0.5, timeout=30.0, end=BIG)
        rss1 = sc.rss_kib()
        grown = (rss1 - rss0) / 1024
        assert grown < 24, f"sidecar RSS grew {grown:.1f} MiB while the client did not read"
        assert stalled < BIG, \
            f"the app sent all {BIG} bytes although the client did not read"
        r = c.read_response(timeout=120, keep_limit=0)
        assert r.length == BIG and r.sha256 == want, (r.length, r.sha256, want)
    # and the other way: the app does not read the body for a while (longer than the client
    # pushes, also with scaled timeouts) while the client pushes
    data = hk.pattern(BIG, 3)
    rss0 = sc.rss_kib()
    with HttpConn.tls(port, ctx) as c:
        pause_ms = int(3000 * h.SCALE)
        c.send(req("POST", f"/upload?pause_ms={pause_ms}", [("Content-Length", str(BIG))]))
        c.sock.setblocking(False)
        view, sent, t0 = memoryview(data), 0, time.monotonic()
        while time.monotonic() - t0 < 1.5 * h.SCALE and sent < BIG:
            try:
                sent += c.sock.send(view[sent:sent + 65536])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                time.sleep(0.01)
        rss1 = sc.rss_kib()
        c.sock.setblocking(True)
        grown = (rss1 - rss0) / 1024
        assert sent < BIG, "the whole 64 MiB went in while the app was not reading"
        assert grown < 24, f"sidecar RSS grew {grown:.1f} MiB while the app did not read " \
                           f"({sent >> 20} MiB accepted from the client)"
        c.send(data[sent:])
        r = c.read_response(timeout=120)
        assert r.status == 200 and r.json()["body_sha256"] == h.sha256(data)


def test_pipelining_client_that_never_reads_holds_bounded_answers(env, pki):
    """A client pipelines 3,000 requests for 16 KiB each and reads nothing: the sidecar must
    not go on fetching answers that only pile up in its memory (48 MiB here). Each answer
    comes from the app in one send, so it ends within one read: the sidecar's check of the
    client's queue then never ran before the next request went out. It now starts no next
    request while the client has not read what it was sent, so the app stops being asked;
    once the client reads, every answer arrives complete and in order."""
    n, size = 3000, 16 * 1024
    sc, app, port = _http_sidecar(env, pki, "http-pipeline-unread")
    want = h.sha256(hk.pattern(size, 7))   # also the app's body, made before the requests
    ctx = h.client_context(pki, "web-frontend")
    n0, c0 = app.nreq(), app.count()
    with HttpConn.tls(port, ctx) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(b"".join(req("GET", f"/big?n={size}&seed=7&whole=1&i={i}") for i in range(n)))
        assert app.wait_reqs(n0 + 1), "the first request never reached the app"

        def sent() -> int:
            return sum(x.bytes_out for x in app.conns_since(c0))
        stalled = h.wait_stalled(sent, quiet=0.5, timeout=30.0, end=n * size)
        asked = app.nreq() - n0
        assert stalled < n * size and asked < n, (
            f"expected the app to stop being asked while the client reads nothing; it answered "
            f"{asked} of {n} requests ({stalled} of {n * size} bytes)")
        for i in range(n):
            r = c.read_response(timeout=60, keep_limit=0)
            assert (r.status, r.length, r.sha256) == (200, size, want), \
                f"answer {i}: {r.status} {r.length} bytes, {r.head}"
    targets = [q.target for q in app.reqs_since(n0)]
    assert targets == [f"/big?n={size}&seed=7&whole=1&i={i}" for i in range(n)], targets[:5]
    sc.assert_alive()


def test_pipelined_refusals_never_read_stay_bounded(env, pki):
    """The keep-alive 403 path: a client pipelines 300,000 requests the allow list refuses
    (13 MiB, more than the sockets' buffers hold) and reads none of the answers. The sidecar
    answers them itself, so nothing upstream slows it down: it must stop taking requests once
    the client has not read what it was sent, instead of queueing 60 MiB of 403s. The
    client's sending therefore stalls; once it reads, every request is answered."""
    n = 300_000
    app = hk.HttpApp()
    env.apps.append(app)
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[h.inbound_listener(
        "api", port, app.addr, [{"namespace": "web", "methods": ["GET"]}], protocol="http")])
    cfg["log"] = {"level": "info", "access": False}   # 300,000 lines would only slow the test
    env.sidecar(cfg, name="http-pipeline-403")
    one = req("DELETE", "/refused")
    data = memoryview(one * n)
    s = h.tls_connect(port, h.client_context(pki, "web-frontend"))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.setblocking(False)

        def send_some(sent: int) -> int:
            try:
                return sent + s.send(data[sent:sent + 65536])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return sent
        # phase 1: send without reading until the sending stops making progress
        sent, quiet_since = 0, time.monotonic()
        deadline = time.monotonic() + h.T(60)
        while sent < len(data) and time.monotonic() < deadline:
            more = send_some(sent)
            if more != sent:
                sent, quiet_since = more, time.monotonic()
            elif time.monotonic() - quiet_since >= 1.0:
                break
            else:
                select.select([], [s], [], 0.05)
        assert sent < len(data), (
            f"expected the sidecar to stop taking requests while the client reads nothing; it "
            f"took all {n} ({len(data)} bytes)")
        # phase 2: read every answer, sending the rest as the sidecar takes it
        marker = b"HTTP/1.1 403 "
        seen, tail, deadline = 0, b"", time.monotonic() + h.T(60)
        while seen < n and time.monotonic() < deadline:
            more = send_some(sent) if sent < len(data) else sent
            try:
                chunk = s.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                chunk = None
            if chunk is not None:
                assert chunk, f"the sidecar closed after {seen} of {n} answers"
                # a status line split between two reads is counted once: the tail kept is
                # shorter than the marker, so it never holds a whole one already counted
                buf = tail + chunk
                seen += buf.count(marker)
                tail = buf[-(len(marker) - 1):]
            elif more == sent:
                select.select([s], [s] if sent < len(data) else [], [], 0.05)
            sent = more
        assert seen == n, \
            f"expected {n} answers of 403, read {seen} (sent {sent} of {len(data)} bytes)"
    finally:
        s.close()
    assert app.nreq() == 0, "a refused request reached the app"


def _small_log_buffer_sidecar(env, pki, name):
    """One worker, an HTTP inbound listener in front of a fresh app, access log on, and a
    64 KiB log.buffer_bytes. Returns (sidecar, app, port)."""
    app = hk.HttpApp()
    env.apps.append(app)
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http")])
    cfg["log"] = {"level": "warn", "access": True, "buffer_bytes": 65536}
    return env.sidecar(cfg, name=name), app, port


def test_stalled_access_log_never_holds_up_requests(env, pki):
    """The log collector stops reading stdout. Requests are still answered at once; lines
    beyond log.buffer_bytes are dropped and counted; once stdout is read again every line
    that was kept arrives whole and in order."""
    sc, app, port = _small_log_buffer_sidecar(env, pki, "http-stalled-log")
    assert hk.scrape(sc).get("portcullis_log_lines_dropped_total") == 0
    sc.pause_stdout()
    n = 1500  # about 600 KiB of access log: the pipe (64 KiB) and the buffer fill early
    with HttpConn.tls(port, h.client_context(pki, "web-frontend")) as c:
        for i in range(n):
            c.send(req("GET", f"/seq/{i}"))
            r = c.read_response(timeout=10)
            assert r.status == 200, f"request {i}: {r.status}"
    assert app.nreq() >= n
    dropped = int(hk.scrape(sc).get("portcullis_log_lines_dropped_total"))
    assert 0 < dropped < n, f"{dropped} of {n} lines dropped behind a stalled stdout"
    sc.resume_stdout()

    def kept():
        return [e for e in sc.access_log() if (e.get("path") or "").startswith("/seq/")]

    deadline = time.monotonic() + h.T(30)
    while len(kept()) + dropped < n and time.monotonic() < deadline:
        time.sleep(0.05)
    got = kept()
    assert len(got) + dropped == n, f"{len(got)} lines arrived, {dropped} dropped, of {n}"
    assert not sc.bad_stdout, f"cut or garbled lines: {sc.bad_stdout[:2]}"
    seq = [int(e["path"].rsplit("/", 1)[1]) for e in got]
    assert seq == sorted(seq) and len(set(seq)) == len(seq), "lines out of order or repeated"
    assert all(e["status"] == 200 and e["decision"] == "allow" for e in got)


def test_sigterm_exits_with_stdout_stalled(env, pki):
    """SIGTERM while the log collector is not reading stdout: the sidecar still exits (0),
    giving up the log lines it cannot write instead of waiting forever."""
    sc, _, port = _small_log_buffer_sidecar(env, pki, "http-stalled-exit")
    sc.pause_stdout()
    with HttpConn.tls(port, h.client_context(pki, "web-frontend")) as c:
        for i in range(600):  # more than the pipe holds: the writer is blocked in write
            c.send(req("GET", f"/seq/{i}"))
            assert c.read_response(timeout=10).status == 200
    assert hk.scrape(sc).get("portcullis_log_lines_dropped_total") > 0
    sc.proc.send_signal(signal.SIGTERM)
    try:
        rc = sc.proc.wait(h.T(15))
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        sc.resume_stdout()
    assert rc == 0, "the sidecar did not exit with its stdout stalled"
    sc.stop()


def test_expect_100_continue(hin):
    data = h.pattern_bytes(2 * MIB, seed=13)
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("POST", "/continue", [("Content-Length", str(len(data))),
                                         ("Expect", "100-continue")]))
        r100 = c.read_response(stop_at_1xx=True)
        assert r100.status == 100, r100.head
        assert hin.app.wait_reqs(n0 + 1), "the request never reached the app"
        assert hin.app.reqs_since(n0)[0].body_len == 0, "body arrived before 100 Continue"
        c.send(data)
        r = c.read_response()
        assert r.status == 200, r.head
        assert r.json()["body_sha256"] == h.sha256(data)
    rq = hin.app.reqs_since(n0)[0]
    assert rq.hv("expect") == ["100-continue"], rq.headers
    assert rq.complete and rq.body_len == len(data)


def test_pipelining_answers_in_order(hin):
    reqs = [req("GET", "/sleep?ms=300&tag=0"),
            req("POST", "/upload?tag=1", body=b"pipelined body"),
            req("GET", "/echo?tag=2"),
            req("HEAD", "/big?n=1000&tag=3"),
            req("GET", "/big?n=70000&chunked=1&tag=4"),
            req("GET", "/echo?tag=5")]
    with _conn(hin) as c:
        c.send(b"".join(reqs))          # one send
        out = [c.read_response(m) for m in ("GET", "POST", "GET", "HEAD", "GET", "GET")]
    assert [r.status for r in out] == [200] * 6
    assert out[0].json()["target"] == "/sleep?ms=300&tag=0"
    assert out[1].json()["target"] == "/upload?tag=1"
    assert out[1].json()["body_sha256"] == h.sha256(b"pipelined body")
    assert out[2].json()["target"] == "/echo?tag=2"
    assert out[3].hdr("content-length") == "1000" and out[3].body == b""
    assert out[4].length == 70000 and out[4].sha256 == h.sha256(hk.pattern(70000, 0))
    assert out[5].json()["target"] == "/echo?tag=5"


def test_connection_close_from_client(hin):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/echo?close=1", [("Connection", "close")]))
        r = c.read_response()
        assert r.status == 200 and r.closes, r.head
        assert c.closed_by_peer(10), "sidecar kept the connection after Connection: close"
    rq = hin.app.reqs_since(n0)[0]
    assert rq.hv("connection") == [], "hop-by-hop Connection header reached the app"
    # the app connection is not closed because the CLIENT said close (it stays pooled)
    time.sleep(0.3 * h.SCALE)   # absence window: a wrong close would show by now
    assert not hin.app.conns[rq.conn].done.is_set(), "pooled app connection was closed"


def test_http10_request_answered_then_closed(hin):
    with _conn(hin) as c:
        c.send(b"GET /echo?v=10 HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
        assert r.json()["target"] == "/echo?v=10"
        assert c.closed_by_peer(10), "HTTP/1.0 connection not closed after the response"


def test_http10_client_never_gets_chunked(hin):
    """RFC 9112 6.1: no Transfer-Encoding in a response to an HTTP/1.0 request."""
    n = 300_000
    with _conn(hin) as c:
        c.send(f"GET /big?n={n}&chunked=1 HTTP/1.0\r\nHost: a\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 200, r.head
        assert r.hv("transfer-encoding") == [], r.head
        assert r.length == n and r.sha256 == h.sha256(hk.pattern(n, 0))


def test_hop_by_hop_headers_not_forwarded(hin):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/echo", [("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret"),
                                    ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"),
                                    ("TE", "trailers"), ("X-End", "kept")]))
        r = c.read_response()
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
        assert not c.closed_by_peer(0.3), "keep-alive connection closed by the sidecar"
    rq = hin.app.reqs_since(n0)[0]
    names = {k.lower() for k, _ in rq.headers}
    for hop in ("connection", "x-hop", "keep-alive", "proxy-connection", "te"):
        assert hop not in names, f"{hop} reached the app: {rq.headers}"
    assert rq.hv("x-end") == ["kept"]


def test_connection_header_cannot_strip_identity_or_host(hin):
    """Naming end-to-end fields in Connection ("hop-by-hop abuse"): the identity header is
    still there exactly once, and the request forwarded as HTTP/1.1 keeps its Host (the
    sidecar must not emit a request it would itself refuse with 400)."""
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/echo?hop-abuse", [("Connection", "keep-alive, X-Forwarded-Client-Cert,"
                                                             " Host"),
                                              ("X-Forwarded-Client-Cert", SPOOF)]))
        r = c.read_response()
        assert r.status == 200, r.head
    rq = hin.app.reqs_since(n0)[0]
    assert rq.hv(hk.XFCC) == [_xfcc(hin.pki, "web-frontend", "web", "frontend")], rq.headers
    assert rq.version == "HTTP/1.1"
    assert rq.hv("host") == ["app.local"], f"Host removed via Connection: {rq.headers}"


def test_h2c_upgrade_not_honoured(hin):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/echo?h2c=1", [("Connection", "Upgrade, HTTP2-Settings"),
                                          ("Upgrade", "h2c"),
                                          ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]))
        r = c.read_response()
        assert r.status == 200, r.head
        c.send(req("GET", "/echo?h2c=2"))
        assert c.read_response().json()["target"] == "/echo?h2c=2"
    rq = hin.app.reqs_since(n0)[0]
    names = {k.lower() for k, _ in rq.headers}
    assert "upgrade" not in names and "http2-settings" not in names, rq.headers


# ===================================================================== tunnels

WS_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "websocket"),
              ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


def test_websocket_upgrade_roundtrip(hin):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/ws", WS_HEADERS))
        r = c.read_response()
        assert r.status == 101, r.head
        assert (r.hdr("upgrade") or "").lower() == "websocket", r.head
        assert not c.buf, f"bytes after the 101 head: {bytes(c.buf[:100])!r}"
        for msg in (b"\x81\x05hello", b"ping " * 1000):
            c.send(msg)
            assert h.recv_exact(c.sock, len(msg), timeout=20) == msg
        data = h.pattern_bytes(4 * MIB, seed=14)
        got, digest = h.duplex(c.sock, data, len(data), timeout=60)
        assert got == len(data) and digest == h.sha256(data)
    rq = hin.app.reqs_since(n0)[0]
    assert (rq.hv("upgrade") or [""])[0].lower() == "websocket", rq.headers
    assert any("upgrade" in v.lower() for v in rq.hv("connection")), rq.headers
    conn = hin.app.conns[rq.conn]
    assert conn.done.wait(h.T(10)), "app tunnel connection not closed after the client left"
    assert conn.tunnel_bytes >= len(data)
    # the tunnelled app connection went away; the listener still serves normally
    with _conn(hin) as c:
        c.send(req("GET", "/echo?after=ws"))
        r = c.read_response()
        assert r.status == 200 and r.json()["conn"] != rq.conn


def test_websocket_upgrade_offered_with_h2c_reaches_app_without_h2c(hin):
    """"Upgrade: h2c, websocket": the switch to websocket goes ahead, but the app is never
    offered h2c (nor its HTTP2-Settings): the sidecar does not speak cleartext HTTP/2 on this
    connection, so an app that picked h2c would break the tunnel."""
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/ws", [("Connection", "Upgrade, HTTP2-Settings"),
                                  ("Upgrade", "h2c, websocket"),
                                  ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
                                  *WS_HEADERS[2:]]))
        r = c.read_response()
        assert r.status == 101, r.head
        c.send(b"\x81\x02hi")
        assert h.recv_exact(c.sock, 4, timeout=20) == b"\x81\x02hi"
    rq = hin.app.reqs_since(n0)[0]
    assert rq.hv("upgrade") == ["websocket"], f"expected 'Upgrade: websocket', app saw {rq.headers}"
    assert not rq.hv("http2-settings"), f"HTTP2-Settings reached the app: {rq.headers}"


def test_upgrade_answered_without_101_stays_http(hin):
    with _conn(hin) as c:
        c.send(req("GET", "/echo?ws=no", WS_HEADERS))
        r = c.read_response()
        assert r.status == 200, r.head
        assert r.json()["target"] == "/echo?ws=no"
        c.send(req("GET", "/echo?ws=next"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?ws=next"


def test_connect_tunnel(hin):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        r = c.read_response("CONNECT")
        assert r.status == 200, r.head
        data = h.pattern_bytes(2 * MIB, seed=15)
        got, digest = h.duplex(c.sock, data, len(data), timeout=60)
        assert got == len(data) and digest == h.sha256(data)
    rq = hin.app.reqs_since(n0)[0]
    assert rq.method == "CONNECT" and rq.target == "db.internal:5432"


# ===================================================================== response integrity

@pytest.mark.parametrize("delay_ms", [0, 300], ids=["same-send", "later"])
def test_two_responses_to_one_request_never_reach_next_client(hin, delay_ms):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", f"/double?delay_ms={delay_ms}"))
        r = c.read_response()
        assert r.status == 200 and r.body == b"first", r.head
        double_conn = int(r.hdr("x-app-conn"))
        # The unrequested second response reached the sidecar, which drops that connection:
        # wait for that (instead of a fixed pause) before the next request.
        assert hin.app.conns[double_conn].done.wait(h.T(10)), \
            "the app connection that sent an unsolicited response was not closed"
        # same client connection, next request
        c.send(req("GET", "/echo?next=same-client"))
        r2 = c.read_response()
        assert r2.body != b"SMUGGLED" and r2.status == 200, r2.head + (r2.body or b"")
        assert r2.json()["target"] == "/echo?next=same-client"
        assert r2.json()["conn"] != double_conn
    with _conn(hin, "web-admin") as c:
        for i in range(3):
            c.send(req("GET", f"/echo?next=other-client-{i}"))
            r3 = c.read_response()
            assert r3.status == 200 and r3.body != b"SMUGGLED"
            assert r3.json()["target"] == f"/echo?next=other-client-{i}"
    assert [x.target for x in hin.app.reqs_since(n0)][0].startswith("/double")


READ_SIZE = 48 * 1024   # the sidecar reads a socket this much at a time (PC_STREAM_READ_SIZE)


def _head_for(total: int) -> bytes:
    """The head of a 200 whose head plus body is exactly total bytes."""
    for digits in range(1, 8):   # the body's length has as many digits as the head assumes
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %s\r\n\r\n" % (b"0" * digits)
        body = total - len(head)
        if len(str(body)) == digits:
            return head.replace(b"0" * digits, str(body).encode())
    raise AssertionError(f"no head for {total}")


def test_connection_with_bytes_past_its_answer_is_not_lent_again(env, pki):
    """An app answers the first of two pipelined requests with an answer that fills the
    sidecar's reads exactly, followed at once by a second, unrequested answer. The answer
    ends within the read callback, and the upstream connection went back to the pool and was
    lent to the next request right there, while the unrequested bytes still waited in the
    same socket: they were then read as the next request's answer. The sidecar must close
    such a connection instead of lending it (the app's bytes arrive while the sidecar is
    stopped -- every thread of it, which the test waits for -- so its reads line up with the
    answer's end every time)."""
    total = 2 * READ_SIZE
    first_in, go, sent = threading.Event(), threading.Event(), threading.Event()
    seen: list[bytes] = []

    def handler(sock, rec):
        sock.settimeout(h.T(30))
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                b = sock.recv(65536)
                if not b:
                    return
                buf += b
            head, buf = buf.split(b"\r\n\r\n", 1)
            target = head.split(b" ")[1]
            seen.append(target)
            if target == b"/first":
                first_in.set()
                if not go.wait(h.T(30)):
                    return
                first = _head_for(total)
                first += b"f" * (total - len(first))
                sock.sendall(first + b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED")
                sent.set()
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nREAL")

    sc, app, port = _http_sidecar(env, pki, "http-relend", env.app("handler", handler=handler))
    with HttpConn.tls(port, h.client_context(pki, "web-frontend")) as c:
        c.send(req("GET", "/first") + req("GET", "/second"))
        assert first_in.wait(h.T(20)), "the first request never reached the app"
        sc.stop_process()
        try:
            go.set()
            assert sent.wait(h.T(20)), "the app could not send its answers"
        finally:
            sc.signal(signal.SIGCONT)
        r1 = c.read_response(keep_limit=total)
        assert r1.status == 200 and r1.length == total - len(_head_for(total)), r1.head
        r2 = c.read_response()
        assert (r2.status, r2.body) == (200, b"REAL"), \
            f"the second request was answered with {r2.head!r} {r2.body!r}: bytes the app " \
            f"sent unasked reached it"
    assert seen.count(b"/second") == 1, seen
    assert sc.wait_for_event("unrequested bytes") is not None, \
        "expected a warning that the app sent unrequested bytes"


def test_app_closes_after_response(hin):
    with _conn(hin) as c:
        c.send(req("GET", "/close"))
        r = c.read_response()
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
        first = r.json()["conn"]
        c.send(req("GET", "/echo?after-close"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["conn"] != first


def test_app_response_delimited_by_close(hin):
    n = 500_000
    with _conn(hin) as c:
        c.send(req("GET", f"/nolength?n={n}"))
        r = c.read_response()
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
        assert r.length == n and r.sha256 == h.sha256(hk.pattern(n, 5))


BAD_502_WORDS = {"not_allowed", "bad_chain", "expired", "no_spiffe_id", "wrong_trust_domain",
                 "protocol", "cipher"}


@pytest.mark.parametrize("kind", ["two-cl", "cl-alpha", "cl-te", "bad-chunk", "no-status",
                                  "nul"])
def test_malformed_app_response_not_relayed(hin, kind):
    """RFC 9112 6.3: a proxy that receives a response with an invalid framing MUST discard
    it, close the server connection and answer 502. Whatever the sidecar does, the client
    never gets a misframed response and nothing the app sent leaks to the next request."""
    with _conn(hin) as c:
        c.send(req("GET", f"/badresp?kind={kind}"))
        try:
            r = c.read_response()
        except hk.PeerClosed:
            r = None
        if r is not None:
            if kind == "cl-te" and r.status == 200:
                # Transfer-Encoding overrides Content-Length: allowed if relayed correctly
                assert r.body == b"hello" and r.hv("content-length") == [], r.head
            else:
                assert r.status == 502, (r.head, r.body)
                j = r.json()
                assert j["status"] == 502 and j["reason"] in BAD_502_WORDS, j
        bad_conn = hin.app.reqs_since(0)[-1].conn
    assert hin.app.conns[bad_conn].done.wait(h.T(10)), \
        "app connection with a malformed response was not closed"
    with _conn(hin) as c:
        c.send(req("GET", "/echo?after-bad-response"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?after-bad-response", r2.head
        assert r2.json()["conn"] != bad_conn


def test_truncated_app_response_closes_client(hin):
    """The app promises 100000 bytes, sends 500 and closes: the client must see its
    connection end (it cannot be told "complete"), and the next client is served."""
    with _conn(hin) as c:
        c.send(req("GET", "/truncate?n=100000&send=500"))
        try:
            r = c.read_response()
            raise AssertionError(f"a truncated response was delivered as complete: {r.head!r}"
                                 f" ({r.length} bytes)")
        except hk.PeerClosed:
            pass
    with _conn(hin) as c:
        c.send(req("GET", "/echo?after-truncate"))
        assert c.read_response().json()["target"] == "/echo?after-truncate"


def test_client_abort_mid_response_does_not_poison_pool(hin):
    """A client that leaves in the middle of a 32 MiB response: the rest of that body must
    never reach the next request's client, and the access log tells what happened (the
    client got a 200 head and only part of the body)."""
    n = 32 * MIB
    hk.pattern(n, 9)   # the app's body, made (and cached) before the request
    with _conn(hin) as c:
        c.send(req("GET", f"/big?n={n}&seed=9"))
        got = h.recv_exact(c.sock, 256 * 1024, timeout=20)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        peer = c.peer_addr
        first_conn = None
        for line in got.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"x-app-conn:"):
                first_conn = int(line.split(b":")[1])
    assert first_conn is not None, got[:500]
    for i in range(3):
        with _conn(hin) as c:
            c.send(req("GET", f"/echo?after-abort={i}"))
            r = c.read_response()
            # (the sidecar may drain the rest of the body and reuse that app connection:
            # what matters is that this answer is the right one)
            assert r.status == 200 and r.json()["target"] == f"/echo?after-abort={i}", r.head
    # the aborted request's log line: the client DID get a 200 head and part of the body
    e = hk.find_request_line(hin.sc, start=hin.sc.test_mark, peer=peer)
    assert e is not None, f"no access-log line for {peer}: {hin.sc.access_log()[-5:]}"
    assert e["path"] == "/big", e
    assert e["status"] == 200, f"logged status {e['status']}, but the client got a 200 head: {e}"
    # it read 256 KiB; with socket buffers at most a few MiB can have left the sidecar
    assert 0 < e["response_bytes"] < 16 * MIB, \
        f"response_bytes counts bytes the client never got: {e}"


def test_client_abort_mid_upload_does_not_poison_pool(hin):
    """A client declares 10 MiB, sends 1 MiB and leaves: the app connection holding half a
    body must be closed, not handed to the next request (whose head would become body)."""
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("POST", "/upload", [("Content-Length", str(10 * MIB))]) + b"a" * MIB)
        assert hin.app.wait_reqs(n0 + 1), "the request never reached the app"
        rq = hin.app.reqs_since(n0)[0]
        # the client leaves once the app holds the 1 MiB it sent: half a body
        assert h.wait_until(lambda: rq.body_len >= MIB, h.T(20)), \
            f"the app got {rq.body_len} of the {MIB} body bytes sent"
    assert hin.app.conns[rq.conn].done.wait(h.T(10)), "half-fed app connection not closed"
    assert not rq.complete, f"a 10 MiB request with 1 MiB sent is complete: {rq.body_len}"
    with _conn(hin) as c:
        c.send(req("GET", "/echo?after-upload-abort"))
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/echo?after-upload-abort"


def test_app_closing_idle_pooled_connection_is_harmless(hin):
    """The app closes a keep-alive connection 100 ms after answering (idle close). The next
    request, sent once the sidecar has seen that close, must be served (on a new
    connection), not fail."""
    with _conn(hin) as c:
        c.send(req("GET", "/closeafter?ms=100"))
        r = c.read_response()
        assert r.status == 200, r.head
        first = r.json()["conn"]
        assert hin.app.conns[first].done.wait(h.T(10)), "the app did not close as told"
        assert hk.wait_other_end_closed(hin.app, first), \
            "the sidecar never closed its end of the pooled connection the app closed"
        for i in range(3):
            c.send(req("GET", f"/echo?after-idle-close={i}"))
            r2 = c.read_response()
            assert r2.status == 200, (r2.head, r2.body)
            assert r2.json()["conn"] != first, "served over the connection the app closed"


def test_expect_100_on_refused_request(hin):
    """A request refused by the rules while the client waits for 100 Continue: 403 at once,
    no 100, connection closed (a body was announced), the app sees nothing."""
    app = hin.rules_app
    b = hk.before(hin.sc, app)
    with _conn(hin, "web-frontend", "rules") as c:
        t0 = time.monotonic()
        c.send(req("POST", "/api/x", [("Content-Length", "1000000"),
                                      ("Expect", "100-continue")]))
        r = c.read_response(stop_at_1xx=True)
        dt = time.monotonic() - t0
        assert r.status == 403, r.head
        # at once, not after waiting for the body (which never comes: idle_timeout_ms is 600 s)
        assert dt < h.T(15), f"403 after {dt:.2f}s, expected at once (< {h.T(15):.0f}s)"
        hk.assert_refused(hin.sc, r, b, status=403, reason="not_allowed", listener="rules",
                          app=app, conn=c, decision="deny", method="POST", path="/api/x")


def test_connection_close_request_ends_the_pipeline(hin):
    """A request with Connection: close followed by another in the same send: the second
    must not be forwarded (the connection ends after the first answer)."""
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("GET", "/echo?first", [("Connection", "close")]) +
               req("DELETE", "/echo?second-must-not-run"))
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/echo?first"
        assert c.closed_by_peer(10), "connection kept open after Connection: close"
    time.sleep(0.2 * h.SCALE)   # absence window: a wrongly forwarded 2nd request shows by now
    assert [x.target for x in hin.app.reqs_since(n0)] == ["/echo?first"]


def test_bodyless_responses_keep_framing(hin):
    """HEAD of a chunked resource, 204 and 304: no body follows; the connection stays in
    step (the next answer on it is the right one)."""
    with _conn(hin) as c:
        c.send(req("HEAD", "/big?n=5000&chunked=1"))
        r = c.read_response("HEAD")
        assert r.status == 200 and r.body == b""
        for code in (204, 304):
            c.send(req("GET", f"/status?code={code}"))
            r = c.read_response()
            assert r.status == code and r.body == b"", r.head
        c.send(req("GET", "/echo?after-bodyless"))
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/echo?after-bodyless"


def test_trailer_cannot_smuggle_identity(hin):
    n0 = hin.app.nreq()
    with _conn(hin) as c:
        c.send(req("POST", "/upload", [("Transfer-Encoding", "chunked")]) +
               hk.chunked(b"payload", trailers=[("X-Forwarded-Client-Cert", SPOOF)]))
        r = c.read_response()
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
    rq = hin.app.reqs_since(n0)[0]
    assert rq.hv(hk.XFCC) == [_xfcc(hin.pki, "web-frontend", "web", "frontend")]
    assert not any(SPOOF in v for _, v in rq.trailers), rq.trailers


def test_deep_pipelining(hin):
    """200 requests in one send: 200 answers, in order."""
    n = 200
    with _conn(hin) as c:
        c.send(b"".join(req("GET", f"/echo?p={i}") for i in range(n)))
        targets = [c.read_response(timeout=30).json()["target"] for _ in range(n)]
    assert targets == [f"/echo?p={i}" for i in range(n)]


def _pool_sidecar(env, pki, idle_timeout_ms: int):
    """pool_max_idle = 2 and the given pool_idle_timeout_ms. Returns (app, port, ctx)."""
    app = hk.HttpApp()
    env.apps.append(app)
    port = h.free_port()
    env.sidecar(h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http")],
        extra={"http": {"pool_max_idle": 2, "pool_idle_timeout_ms": idle_timeout_ms}}),
        name="http-pool")
    return app, port, h.client_context(pki, "web-frontend")


def _five_concurrent(app, conns, key: str) -> float:
    """One request on each of the 5 client connections, all held by the app until all 5 have
    arrived (so 5 app connections are busy at once, whatever the machine's load). Returns
    the time the app released them (no pooled connection went idle before it)."""
    for i, c in enumerate(conns):
        c.send(req("GET", f"/gate?key={key}&n=5&i={i}"))
    for c in conns:
        r = c.read_response()
        assert r.status == 200, (r.head, r.body)
    assert app.count() == 5, f"5 concurrent requests, {app.count()} app connections"
    opened = app.gate_opened(key)
    assert opened is not None, "the app never saw all 5 requests at once"
    return opened


def test_pool_max_idle(env, pki):
    """pool_max_idle = 2: after 5 concurrent requests only 2 app connections stay idle (the
    pool idle deadline is generous here: nothing else closes them), and they are reused."""
    app, port, ctx = _pool_sidecar(env, pki, 10 * h.GENEROUS_MS)
    conns = [HttpConn.tls(port, ctx) for _ in range(5)]
    try:
        _five_concurrent(app, conns, "max-idle")
        assert h.wait_until(lambda: app.closed() >= 3, h.T(10)), \
            f"{5 - app.closed()} idle app connections kept, expected pool_max_idle=2"
        # the 2 kept ones serve the next 2 concurrent requests: no new app connection
        for i, c in enumerate(conns[:2]):
            c.send(req("GET", f"/gate?key=reuse&n=2&i={i}"))
        for c in conns[:2]:
            r = c.read_response()
            assert r.status == 200, (r.head, r.body)
        assert app.count() == 5, \
            f"{app.count() - 5} new app connection(s) although 2 idle ones were pooled"
        assert app.closed() == 3, f"{5 - app.closed()} idle app connections kept, expected 2"
    finally:
        for c in conns:
            c.close()


def test_pool_idle_timeout(env, pki):
    """pool_idle_timeout_ms = 1500: the 2 idle app connections pool_max_idle = 2 keeps are
    closed after that, not before; the listener then opens a new one."""
    idle_s = 1.5
    app, port, ctx = _pool_sidecar(env, pki, int(idle_s * 1000))
    conns = [HttpConn.tls(port, ctx) for _ in range(5)]
    try:
        released = _five_concurrent(app, conns, "idle")
        # fired: all 5 closed, long before anything else would close them (the app itself
        # gives up on a connection after 300 s)
        late = h.T(idle_s + 10)
        assert h.wait_until(lambda: app.closed() == 5, late), \
            f"{5 - app.closed()} idle app connections still open {late:.0f}s after they went " \
            f"idle (pool_idle_timeout_ms={int(idle_s * 1000)})"
        # not early: the idle clock of a pooled connection starts at its release, and none
        # was released before the app answered; pool_max_idle closes 3 at once
        early = [c.closed_at - released for c in app.conns if c.closed_at < released +
                 idle_s * 0.8]
        assert len(early) <= 3, \
            f"{len(early)} app connections closed within {idle_s * 0.8:.1f}s of going idle " \
            f"(after {[round(x, 2) for x in early]}s), expected the 3 beyond pool_max_idle=2"
        # still serving: a new connection is opened
        conns[0].send(req("GET", "/echo?after-pool"))
        r = conns[0].read_response()
        assert r.status == 200, r.head
        assert r.json()["conn"] == 5, f"served over app connection {r.json()['conn']}, " \
                                      f"expected a new one (5)"
    finally:
        for c in conns:
            c.close()


# ===================================================================== access log / metrics

def test_access_log_fields(hin):
    start = len(hin.sc.access_log())
    with _conn(hin) as c:
        c.send(req("POST", "/echo?secret=query", body=b"hello"))
        r = c.read_response()
        assert r.status == 200, (r.head, r.body[:300] if r.body else r.body)
        c.send(req("GET", "/sleep?ms=300"))
        r2 = c.read_response()
        assert r2.status == 200, (r2.head, r2.body[:300] if r2.body else r2.body)
        peer = c.peer_addr
        cipher = c.sock.cipher()[0]
    e = hk.find_request_line(hin.sc, start=start, peer=peer)
    assert e is not None, hin.sc.access_log()[start:]
    hk.check_http_entry(e)
    assert e["listener"] == "api" and e["direction"] == "inbound", e
    assert e["app"] == hin.app.addr, e
    assert e["peer_id"] == h.spiffe("web", "frontend"), e
    assert e["method"] == "POST" and e["path"] == "/echo" and e["status"] == 200, e
    assert "secret" not in json.dumps(e), "query string in the access log"
    assert e["decision"] == "allow" and e["reason"] in ("", None), e
    assert e["request_bytes"] == 5, e
    assert e["response_bytes"] == len(r.body), e
    assert isinstance(e["upstream_ms"], (int, float)), e
    assert e["upstream_ms"] <= e["duration_ms"] + 1, e
    assert "1.3" in str(e["tls_version"]), e
    assert e["cipher"] and (e["cipher"] == cipher or "AES" in e["cipher"]
                            or "CHACHA" in e["cipher"]), (e["cipher"], cipher)
    e2 = hin.sc.wait_for_log(lambda x: x.get("peer") == peer and x.get("path") == "/sleep",
                             timeout=10, start=start)
    assert e2 is not None, f"no /sleep line for {peer}: {hin.sc.access_log()[start:]}"
    hk.check_http_entry(e2)
    assert e2["duration_ms"] >= 280 and e2["upstream_ms"] >= 280, e2
    assert e2["response_bytes"] == len(r2.body), e2
    # allowed HTTP connections write no per-connection line (absence window after the close)
    time.sleep(0.5 * h.SCALE)
    mine = [x for x in hin.sc.access_log()[start:] if x.get("peer") == peer]
    assert len(mine) == 2, mine
    assert all("status" in x for x in mine), mine


def test_access_log_reason_null_when_allowed(hin):
    """An allowed request's line says reason null, like a tcp-mode connection line (the
    metric label is "" because Prometheus labels cannot be null)."""
    start = len(hin.sc.access_log())
    with _conn(hin) as c:
        c.send(req("GET", "/echo?reason"))
        assert c.read_response().status == 200
        peer = c.peer_addr
    e = hk.find_request_line(hin.sc, start=start, peer=peer)
    assert e is not None, f"no access-log line for {peer}"
    assert e["decision"] == "allow"
    assert e["reason"] is None, f"reason is {e['reason']!r}: null when allowed, as in tcp mode"


def test_metrics_request_classes_and_histogram(hin):
    sc = hin.sc
    m0 = hk.scrape(sc)
    lab_api = dict(listener="api", direction="inbound")
    ok = dict(lab_api, **{"class": "2xx"}, decision="allow", reason="")
    five = dict(lab_api, **{"class": "5xx"}, decision="allow", reason="")
    with _conn(hin) as c:
        for i in range(7):
            c.send(req("GET", f"/echo?m={i}"))
            assert c.read_response().status == 200
        c.send(req("GET", "/status?code=503"))
        r = c.read_response()
        assert r.status == 503 and r.json() == {"status": 503}, "app's own 503 altered"
        c.send(req("GET", "/status?code=404"))
        assert c.read_response().status == 404
    m1 = hk.wait_metric(sc, hk.REQS, lambda v: v == m0.get(hk.REQS, **ok) + 7, **ok)
    assert m1.get(hk.REQS, **five) == m0.get(hk.REQS, **five) + 1, m1.lines(hk.REQS)
    four = dict(lab_api, **{"class": "4xx"}, decision="allow", reason="")
    assert m1.get(hk.REQS, **four) == m0.get(hk.REQS, **four) + 1, m1.lines(hk.REQS)
    hist = "portcullis_http_request_duration_seconds_count"
    assert m1.get(hist, **lab_api) == m0.get(hist, **lab_api) + 9, m1.lines(hist)
    inf = "portcullis_http_request_duration_seconds_bucket"
    assert m1.get(inf, le="+Inf", **lab_api) == m1.get(hist, **lab_api)


def test_zz_inbound_log_well_formed(hin):
    log = hin.sc.access_log()
    reqs = [e for e in log if "status" in e]
    assert len(reqs) >= 100, len(reqs)
    for e in reqs:
        hk.check_http_entry(e)
    for e in log:
        if "status" not in e:
            h.check_access_entry(e)
            assert e["decision"] != "allow", f"per-connection line for an allowed conn: {e}"
    assert not hin.sc.bad_stdout, hin.sc.bad_stdout[:3]
    hin.sc.assert_alive()

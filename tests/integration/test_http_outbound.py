"""HTTP/1.1 mode, outbound (issue 5 point 3, README "HTTP mode"): the app speaks plain
HTTP/1.1 to the outbound listener; the sidecar keeps a pool of mTLS connections upstream.

Upstreams used here:
  chain     the real thing: outbound sidecar (web-frontend) -> inbound sidecar (payments-api,
            protocol http) -> HttpApp. Both sidecars are real portcullis processes.
  tlsapp    an HttpApp behind TLS presenting payments-api (counts TLS handshakes exactly)
  wrongid / wrongns / expired / otherca   TLS servers with certificates outside `expect`
            or invalid (harness.TLSUpstream, records bytes received after the handshake)
  mute      a TLS server (payments-api) that completes the handshake, reads, never answers
  dead      nothing listens

Sidecars: the main outbound sidecar (fixture hout) keeps every deadline generous
(harness.base_config), so moving 64 MiB or a loaded machine never meets one. The tests of
http.request_timeout_ms (408) and http.response_timeout_ms (504) each get a sidecar of their
own (fixtures hout_req / hout_resp) where only the deadline under test is short.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from types import SimpleNamespace

import pytest

import harness as h
import httpkit as hk
from httpkit import HttpConn, req

MIB = 1 << 20
BIG = 64 * MIB
EXPECT = [{"namespace": "payments", "service_account": "api"}]
RESPONSE_TIMEOUT_MS = 1000
REQUEST_TIMEOUT_MS = 1000

BAD_UPSTREAMS = {
    "wrongid": ("web-admin", "not_allowed", h.spiffe("web", "admin")),
    "wrongns": ("evil-intruder", "not_allowed", h.spiffe("evil", "intruder")),
    "expired": ("bad-expired", "expired", None),
    "otherca": ("bad-other-ca", "bad_chain", None),
}


@pytest.fixture(scope="module")
def hout(module_env):
    pki = module_env.pki
    app = hk.HttpApp(name="chain-app")
    tlsapp = hk.HttpApp(tls_ctx=hk.tls_server_context(pki, "payments-api"), name="tlsapp")
    module_env.apps += [app, tlsapp]
    in_port = h.free_port()
    inbound = module_env.sidecar(h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", in_port, app.addr, [{"namespace": "web"}], protocol="http")]),
        name="http-chain-inbound")
    ups = {name: module_env.upstream(stem) for name, (stem, _, _) in BAD_UPSTREAMS.items()}
    ports = {n: h.free_port() for n in ("chain", "tlsapp", "dead", *ups)}
    targets = {"chain": h.addr(in_port), "tlsapp": tlsapp.addr, "dead": h.addr(h.free_port()),
               **{n: u.addr for n, u in ups.items()}}
    listeners = [h.outbound_listener(n, ports[n], targets[n], EXPECT, protocol="http")
                 for n in ports]
    # every deadline generous (base_config, the pool's idle one included: tests count
    # handshakes and reuses); only hout_req / hout_resp test the HTTP ones
    out = module_env.sidecar(h.base_config(pki, "web-frontend", workers=1, outbound=listeners),
                             name="http-outbound")
    return SimpleNamespace(sc=out, inbound=inbound, app=app, tlsapp=tlsapp, ups=ups,
                           ports=ports, targets=targets, in_port=in_port, pki=pki)


@pytest.fixture(scope="module")
def hout_req(module_env, hout):
    """An outbound sidecar whose only short deadline is http.request_timeout_ms: listener
    "tlsapp" in front of hout's TLS app."""
    port = h.free_port()
    sc = module_env.sidecar(h.base_config(
        module_env.pki, "web-frontend", workers=1,
        outbound=[h.outbound_listener("tlsapp", port, hout.tlsapp.addr, EXPECT,
                                      protocol="http")],
        extra={"http": {"request_timeout_ms": REQUEST_TIMEOUT_MS}}), name="http-outbound-408")
    return SimpleNamespace(sc=sc, tlsapp=hout.tlsapp, ports={"tlsapp": port})


@pytest.fixture(scope="module")
def hout_resp(module_env):
    """An outbound sidecar whose only short deadline is http.response_timeout_ms: listener
    "mute" in front of a TLS upstream (payments-api) that reads and never answers."""
    mute = module_env.upstream("payments-api", mode="sink")
    port = h.free_port()
    sc = module_env.sidecar(h.base_config(
        module_env.pki, "web-frontend", workers=1,
        outbound=[h.outbound_listener("mute", port, mute.addr, EXPECT, protocol="http")],
        extra={"http": {"response_timeout_ms": RESPONSE_TIMEOUT_MS}}),
        name="http-outbound-504")
    return SimpleNamespace(sc=sc, ups={"mute": mute}, ports={"mute": port})


def _conn(hout, name: str) -> HttpConn:
    return HttpConn.plain(hout.ports[name])


# ===================================================================== through the chain

def test_chain_identity_header_and_logs(hout):
    """http.client (plain) -> outbound -> inbound -> app. The app sees the identity of the
    OUTBOUND sidecar (web-frontend) set by the inbound sidecar; a header the local app
    tried to set is gone."""
    n0 = hout.app.nreq()
    start_out, start_in = len(hout.sc.access_log()), len(hout.inbound.access_log())
    c = http.client.HTTPConnection(h.HOST, hout.ports["chain"], timeout=h.T(20))
    try:
        c.connect()
        local = h.addr(c.sock.getsockname()[1])
        c.request("POST", "/echo?via=chain", body=b"abc",
                  headers={"X-Forwarded-Client-Cert": "By=me;URI=spiffe://cluster.local/ns/x/sa/y"})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, body
    finally:
        c.close()
    j = json.loads(body)
    want = (f"By={h.spiffe('payments', 'api')};"
            f"Hash={hk.leaf_der_sha256(hout.pki.crt('web-frontend'))};"
            f"URI={h.spiffe('web', 'frontend')}")
    assert [v for k, v in j["headers"] if k.lower() == hk.XFCC] == [want], j["headers"]
    rq = hout.app.reqs_since(n0)[0]
    assert (rq.target, rq.body) == ("/echo?via=chain", b"abc")
    e = hk.find_request_line(hout.sc, start=start_out, app=local)
    assert e is not None, hout.sc.access_log()[start_out:]
    hk.check_http_entry(e)
    assert e["direction"] == "outbound" and e["listener"] == "chain", e
    assert e["peer"] == h.addr(hout.in_port), e
    assert e["peer_id"] == h.spiffe("payments", "api"), e
    assert e["method"] == "POST" and e["path"] == "/echo" and e["status"] == 200, e
    assert e["decision"] == "allow" and e["reason"] in ("", None), e
    assert e["request_bytes"] == 3 and e["response_bytes"] == len(body), e
    assert isinstance(e["upstream_ms"], (int, float)), e
    ei = hout.inbound.wait_for_log(lambda x: x.get("path") == "/echo" and "status" in x,
                                   timeout=10, start=start_in)
    assert ei is not None, f"no /echo line in the inbound log: {hout.inbound.access_log()[-5:]}"
    hk.check_http_entry(ei)
    assert ei["peer_id"] == h.spiffe("web", "frontend") and ei["direction"] == "inbound", ei


@pytest.mark.parametrize("way", ["upload-cl", "upload-chunked", "download-cl",
                                 "download-chunked"])
def test_chain_64mib_bodies(hout, way):
    # Everything big is made BEFORE connecting: a client that goes silent after connecting
    # is what a request deadline is for. (The download's pattern is cached for the app too.)
    if way.startswith("upload"):
        data = hk.pattern(BIG, seed=31)
        want = h.sha256(data)
        if way == "upload-cl":
            raw = req("POST", "/upload", [("Content-Length", str(BIG))]) + data
        else:
            raw = req("POST", "/upload", [("Transfer-Encoding", "chunked")]) + \
                hk.chunked(data, size=4 * MIB - 3)
    else:
        want = h.sha256(hk.pattern(BIG, 2))
    n0 = hout.app.nreq()
    with _conn(hout, "chain") as c:
        if way.startswith("upload"):
            r = hk.send_while_reading(c, raw, timeout=180)
            assert r.status == 200, r.head
            j = r.json()
            assert j["body_len"] == BIG and j["body_sha256"] == want
            rq = hout.app.reqs_since(n0)[0]
            assert rq.complete and rq.body_sha256 == want
        else:
            chunked = 1 if way == "download-chunked" else 0
            c.send(req("GET", f"/big?n={BIG}&chunked={chunked}&seed=2"))
            r = c.read_response(timeout=180, keep_limit=0)
            assert r.status == 200, r.head
            assert r.length == BIG and r.sha256 == want, \
                f"got {r.length} bytes sha256 {r.sha256}, expected {BIG} bytes sha256 {want}"
        c.send(req("GET", "/echo?after=" + way))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?after=" + way


def test_chain_websocket_upgrade(hout):
    with _conn(hout, "chain") as c:
        c.send(req("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                  ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                  ("Sec-WebSocket-Version", "13")]))
        r = c.read_response()
        assert r.status == 101, r.head
        c.send(b"\x81\x02hi")
        assert h.recv_exact(c.sock, 4, timeout=20) == b"\x81\x02hi"
        data = h.pattern_bytes(3 * MIB, seed=32)
        got, digest = h.duplex(c.sock, data, len(data), timeout=60)
        assert got == len(data) and digest == h.sha256(data)


def test_chain_pipelining_and_expect(hout):
    with _conn(hout, "chain") as c:
        c.send(req("GET", "/sleep?ms=200&i=0") + req("POST", "/upload?i=1", body=b"x" * 1000)
               + req("GET", "/echo?i=2"))
        out = [c.read_response(m) for m in ("GET", "POST", "GET")]
        assert [r.json()["target"] for r in out] == ["/sleep?ms=200&i=0", "/upload?i=1",
                                                      "/echo?i=2"]
        data = h.pattern_bytes(MIB, seed=33)
        c.send(req("POST", "/continue", [("Content-Length", str(len(data))),
                                         ("Expect", "100-continue")]))
        r100 = c.read_response(stop_at_1xx=True)
        assert r100.status == 100, r100.head
        c.send(data)
        r = c.read_response()
        assert r.status == 200 and r.json()["body_sha256"] == h.sha256(data)


# ===================================================================== upstream pool

def test_upstream_pool_one_handshake(hout):
    sc, up = hout.sc, hout.tlsapp
    lab = dict(listener="tlsapp", direction="outbound")
    m0 = hk.scrape(sc)
    c0, n0 = up.count(), up.nreq()
    for k in range(3):
        with _conn(hout, "tlsapp") as c:
            for i in range(10):
                c.send(req("GET", f"/echo?k={k}&i={i}"))
                r = c.read_response()
                assert r.status == 200 and r.json()["target"] == f"/echo?k={k}&i={i}"
    got = up.reqs_since(n0)
    assert len(got) == 30
    new = up.conns_since(c0)
    assert len(new) == 1, f"30 requests made {len(new)} TLS handshakes upstream"
    assert new[0].handshake_ok and new[0].peer_uris == [h.spiffe("web", "frontend")], \
        (new[0].handshake_ok, new[0].peer_uris, new[0].error)
    m1 = hk.wait_metric(sc, "portcullis_http_upstream_reuses_total",
                        lambda v: v >= m0.get("portcullis_http_upstream_reuses_total", **lab)
                        + 29, **lab)
    assert m1.get("portcullis_http_upstream_connects_total", **lab) == \
        m0.get("portcullis_http_upstream_connects_total", **lab) + 1, \
        m1.lines("portcullis_http_upstream")
    ok = dict(lab, **{"class": "2xx"}, decision="allow", reason="")
    assert m1.get(hk.REQS, **ok) >= m0.get(hk.REQS, **ok) + 30


@pytest.mark.parametrize("delay_ms", [0, 300], ids=["same-send", "later"])
def test_upstream_two_responses_never_reach_next_client(hout, delay_ms):
    up = hout.tlsapp
    with _conn(hout, "tlsapp") as c:
        c.send(req("GET", f"/double?delay_ms={delay_ms}"))
        r = c.read_response()
        assert r.status == 200 and r.body == b"first", (r.head, r.body)
        bad = int(r.hdr("x-app-conn"))
        # The unrequested second response reached the sidecar, which drops that connection:
        # wait for that (instead of a fixed pause) before the next request.
        assert up.conns[bad].done.wait(h.T(10)), \
            "upstream connection that sent extra bytes kept (expected: closed by the sidecar)"
        c.send(req("GET", "/echo?after-double"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.body != b"SMUGGLED", r2.head
        assert r2.json()["target"] == "/echo?after-double"
    with _conn(hout, "tlsapp") as c:
        c.send(req("GET", "/echo?other-client"))
        r3 = c.read_response()
        assert r3.status == 200 and r3.json()["target"] == "/echo?other-client"
        assert r3.json()["conn"] != bad


def test_upstream_closing_idle_pooled_connection_is_harmless(hout):
    """The upstream closes its (TLS) keep-alive connection 100 ms after answering; a request
    sent once the sidecar has seen that close must be served over a new connection, not
    fail."""
    up = hout.tlsapp
    with _conn(hout, "tlsapp") as c:
        c.send(req("GET", "/closeafter?ms=100"))
        r = c.read_response()
        assert r.status == 200, r.head
        first = r.json()["conn"]
        assert up.conns[first].done.wait(h.T(10)), "the upstream did not close as told"
        assert hk.wait_other_end_closed(up, first), \
            "the sidecar never closed its end of the pooled connection the upstream closed"
        for i in range(3):
            c.send(req("GET", f"/echo?after-idle-close={i}"))
            r2 = c.read_response()
            assert r2.status == 200, (r2.head, r2.body)
            assert r2.json()["conn"] != first, "served over the connection the upstream closed"


@pytest.mark.parametrize("kind", ["two-cl", "cl-alpha", "bad-chunk"])
def test_malformed_upstream_response_502(hout, kind):
    up = hout.tlsapp
    with _conn(hout, "tlsapp") as c:
        c.send(req("GET", f"/badresp?kind={kind}"))
        try:
            r = c.read_response()
        except hk.PeerClosed:
            r = None
        if r is not None:
            assert r.status == 502, (r.head, r.body)
            assert r.json()["status"] == 502, r.body
        bad = up.reqs_since(0)[-1].conn
    assert up.conns[bad].done.wait(h.T(10)), \
        "upstream connection that sent a malformed response not closed"
    with _conn(hout, "tlsapp") as c:
        c.send(req("GET", "/echo?after-bad-response"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?after-bad-response"


def test_client_abort_mid_response_outbound(hout):
    """Outbound twin of test_http_inbound's abort test: the rest of the body never reaches
    the next client; the log line says 200 and counts only what could have been sent."""
    hk.pattern(32 * MIB, 4)   # the app's body, made (and cached) before the request
    with _conn(hout, "tlsapp") as c:
        c.send(req("GET", f"/big?n={32 * MIB}&seed=4"))
        got = h.recv_exact(c.sock, 256 * 1024, timeout=20)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        peer = c.peer_addr
    for i in range(3):
        with _conn(hout, "tlsapp") as c:
            c.send(req("GET", f"/echo?after-abort={i}"))
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == f"/echo?after-abort={i}", r.head
    # the aborted request's log line: the client DID get a 200 head and part of the body
    e = hk.find_request_line(hout.sc, start=hout.sc.test_mark, app=peer)
    assert e is not None, f"no access-log line for {peer}: {hout.sc.access_log()[-5:]}"
    assert e["path"] == "/big", e
    assert e["status"] == 200, f"logged status {e['status']}, but the client got a 200 head: {e}"
    # it read 256 KiB; with socket buffers at most a few MiB can have left the sidecar
    assert 0 < e["response_bytes"] < 16 * MIB, \
        f"response_bytes counts bytes the client never got: {e}"


@pytest.mark.parametrize("name", ["tlsapp", "chain"])
def test_head_of_chunked_resource_outbound(hout, name):
    """HEAD answered with Transfer-Encoding: chunked has no body: nothing may follow the
    head, and the next answer on the connection is the right one."""
    with _conn(hout, name) as c:
        c.send(req("HEAD", "/big?n=5000&chunked=1"))
        r = c.read_response("HEAD")
        assert r.status == 200 and r.body == b""
        c.send(req("GET", "/echo?after-head"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?after-head", r2.head


SMALL_MALFORMED = [
    ("cl-and-te", b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("missing-host", b"GET /echo HTTP/1.1\r\n\r\n"),
    ("obs-fold", b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n"),
    ("bare-lf", b"GET /echo HTTP/1.1\nHost: a\n\n"),
    ("dot-dot", b"GET /a/../echo HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("two-cl", b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
     b"\r\nab"),
]


@pytest.mark.parametrize("raw", [c[1] for c in SMALL_MALFORMED],
                         ids=[c[0] for c in SMALL_MALFORMED])
def test_outbound_strict_parsing(hout, raw):
    b = hk.before(hout.sc, hout.tlsapp)
    with _conn(hout, "tlsapp") as c:
        r = hk.exchange(c, raw)
        hk.assert_refused(hout.sc, r, b, status=400, reason="protocol", listener="tlsapp",
                          app=hout.tlsapp, direction="outbound", conn=c)


def test_outbound_header_limit_431(hout):
    b = hk.before(hout.sc, hout.tlsapp)
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(120))
    with _conn(hout, "tlsapp") as c:
        r = hk.exchange(c, b"GET /echo HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
        hk.assert_refused(hout.sc, r, b, status=431, reason="limit", listener="tlsapp",
                          app=hout.tlsapp, direction="outbound", conn=c)


def test_outbound_slowloris_408(hout_req):
    """The local app sends half a head and stalls: 408 from the outbound sidecar after
    http.request_timeout_ms, nothing goes upstream."""
    b = hk.before(hout_req.sc, hout_req.tlsapp)
    t0 = time.monotonic()   # before connecting: the deadline runs from the sidecar's accept
    with _conn(hout_req, "tlsapp") as c:
        c.send(b"GET /echo HTTP/1.1\r\nHost: a\r\n")
        r = hk.exchange(c, b"", timeout=REQUEST_TIMEOUT_MS / 1000 + hk.LATE_S + 5)
        dt = time.monotonic() - t0
        hk.assert_refused(hout_req.sc, r, b, status=408, reason="timeout", listener="tlsapp",
                          app=hout_req.tlsapp, direction="outbound", conn=c)
    hk.assert_deadline_fired("408", dt, REQUEST_TIMEOUT_MS / 1000)


def test_chain_concurrent_clients(hout):
    """12 local clients in parallel, 10 requests each with distinct bodies, through both
    sidecars' pools: every answer is the one for its own request."""
    errors: list[str] = []

    def client(k: int):
        try:
            with _conn(hout, "chain") as c:
                for i in range(10):
                    body = f"<{k}:{i}>".encode() * (100 + 53 * i)
                    c.send(req("POST", f"/upload?k={k}&i={i}", body=body))
                    r = c.read_response()
                    j = r.json()
                    if r.status != 200 or j["target"] != f"/upload?k={k}&i={i}" or \
                            j["body_sha256"] != h.sha256(body):
                        errors.append(f"client {k} request {i}: {r.status} {j.get('target')}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + h.T(60)
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), \
        f"{sum(t.is_alive() for t in ts)} of 12 clients still running after {h.T(60):.0f}s"
    assert not errors, errors


# ===================================================================== 502 / 503 / 504

@pytest.mark.parametrize("name", list(BAD_UPSTREAMS))
def test_502_upstream_refused(hout, name):
    stem, reason, peer_id = BAD_UPSTREAMS[name]
    up = hout.ups[name]
    for attempt in range(2):        # a refused upstream connection is never pooled
        before_conns = up.count()
        b = hk.before(hout.sc, up)
        with _conn(hout, name) as c:
            r = hk.exchange(c, req("POST", "/secret", body=b"application secret"), "POST")
            e = hk.assert_refused(hout.sc, r, b, status=502, reason=reason, listener=name,
                                  app=up, direction="outbound", conn=c, app_untouched=False,
                                  method="POST", path="/secret")
        assert h.wait_until(lambda: up.count() > before_conns, h.T(10)), \
            "sidecar never dialled the upstream"
        for rec in up.conns[before_conns:]:
            assert rec.done.wait(h.T(10)), "refused upstream connection still open"
            assert rec.bytes_in == 0, \
                f"refused upstream received {rec.bytes_in} application bytes (expected 0)"
        assert e["peer"] == up.addr, e
        if peer_id is not None:
            assert e["peer_id"] == peer_id, e


def test_503_nothing_listening(hout):
    b = hk.before(hout.sc, hout.tlsapp)
    t0 = time.monotonic()
    with _conn(hout, "dead") as c:
        r = hk.exchange(c, req("GET", "/anything"))
        dt = time.monotonic() - t0
        hk.assert_refused(hout.sc, r, b, status=503, reason="", listener="dead",
                          app=hout.tlsapp, direction="outbound", conn=c, app_untouched=False,
                          method="GET", path="/anything")
    # a refused connect answers at once; connect_timeout_ms (60 s) would take far longer
    limit = h.GENEROUS_MS / 1000 / 2
    assert dt < limit, f"503 after {dt:.2f}s: expected at once (< {limit:.0f}s), " \
                       f"not after limits.connect_timeout_ms"


def test_504_upstream_never_answers(hout_resp):
    up = hout_resp.ups["mute"]
    b = hk.before(hout_resp.sc, up)
    with _conn(hout_resp, "mute") as c:
        t0 = time.monotonic()
        r = hk.exchange(c, req("GET", "/slow"),
                        timeout=RESPONSE_TIMEOUT_MS / 1000 + hk.LATE_S + 5)
        dt = time.monotonic() - t0
        hk.assert_refused(hout_resp.sc, r, b, status=504, reason="timeout", listener="mute",
                          app=up, direction="outbound", conn=c, app_untouched=False,
                          method="GET", path="/slow")
    # dt also spans the connect and TLS handshake upstream (their deadlines are generous)
    hk.assert_deadline_fired("504", dt, RESPONSE_TIMEOUT_MS / 1000)
    assert h.wait_until(lambda: sum(x.bytes_in for x in up.conns) > b.app_snap[2], h.T(10)), \
        "the request never reached the mute upstream"


def test_zz_outbound_logs_well_formed(hout, hout_req, hout_resp):
    for sc in (hout.sc, hout.inbound, hout_req.sc, hout_resp.sc):
        sc.assert_alive()
        assert not sc.bad_stdout, f"{sc.name}: non-JSON stdout lines {sc.bad_stdout[:3]}"
        for e in sc.access_log():
            if "status" in e:
                hk.check_http_entry(e)
            else:
                h.check_access_entry(e)
                assert e["decision"] != "allow", f"per-connection line for allowed HTTP: {e}"

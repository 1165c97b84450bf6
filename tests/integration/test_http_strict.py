"""HTTP/1.1 mode: strict RFC 9112 parsing, size limits and slowloris (issue 5 point 4,
README "HTTP mode"). Every malformed request is sent over a real mTLS connection as raw
bytes; each refusal is checked for its status, JSON reason word, access-log line, metric
counter, connection close, and that NOTHING reached the app (no connection, no bytes).
Positive controls next to the refusals prove the same listener serves the valid forms.

The parsing and limit tests run on sidecars whose deadlines are all generous
(harness.base_config): a loaded machine never turns a parsing test into a 408/504. The tests
of http.request_timeout_ms (408) and http.response_timeout_ms (504) each have a sidecar of
their own (fixtures st_req / st_resp) where only the deadline under test is short."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

import harness as h
import httpkit as hk
from httpkit import HttpConn

REQ_TIMEOUT_MS = 1000
RESP_TIMEOUT_MS = 1500


@pytest.fixture(scope="module")
def st(module_env):
    pki = module_env.pki
    app, small_app = hk.HttpApp(name="strict"), hk.HttpApp(name="small")
    module_env.apps += [app, small_app]
    port, small_port, dead_port = h.free_port(), h.free_port(), h.free_port()
    # every deadline generous (base_config): only st_req / st_resp test the HTTP ones
    sc = module_env.sidecar(h.base_config(
        pki, "payments-api", workers=1,
        inbound=[h.inbound_listener("strict", port, app.addr, [{"namespace": "web"}],
                                    protocol="http"),
                 h.inbound_listener("deadapp", dead_port, h.addr(h.free_port()),
                                    [{"namespace": "web"}], protocol="http")]),
        name="http-strict")
    small = module_env.sidecar(h.base_config(
        pki, "payments-api", workers=1,
        inbound=[h.inbound_listener("small", small_port, small_app.addr,
                                    [{"namespace": "web"}], protocol="http")],
        extra={"http": {"max_headers": 10, "max_request_line": 1024,
                        "max_header_bytes": 4096}}), name="http-small")
    return SimpleNamespace(sc=sc, app=app, port=port, small=small, dead_port=dead_port,
                           small_app=small_app,
                           small_port=small_port, pki=pki,
                           ctx=h.client_context(pki, "web-frontend"))


def _deadline_sidecar(module_env, st, name: str, http: dict) -> SimpleNamespace:
    """A sidecar with one listener "strict" in front of st.app whose only short deadline is
    the one in http."""
    port = h.free_port()
    sc = module_env.sidecar(h.base_config(
        module_env.pki, "payments-api", workers=1,
        inbound=[h.inbound_listener("strict", port, st.app.addr, [{"namespace": "web"}],
                                    protocol="http")],
        extra={"http": http}), name=name)
    return SimpleNamespace(sc=sc, app=st.app, port=port, ctx=st.ctx)


@pytest.fixture(scope="module")
def st_req(module_env, st):
    """http.request_timeout_ms = REQ_TIMEOUT_MS, every other deadline generous."""
    return _deadline_sidecar(module_env, st, "http-strict-408",
                             {"request_timeout_ms": REQ_TIMEOUT_MS})


@pytest.fixture(scope="module")
def st_resp(module_env, st):
    """http.response_timeout_ms = RESP_TIMEOUT_MS, every other deadline generous."""
    return _deadline_sidecar(module_env, st, "http-strict-504",
                             {"response_timeout_ms": RESP_TIMEOUT_MS})


def _conn(st, small: bool = False) -> HttpConn:
    return HttpConn.tls(st.small_port if small else st.port, st.ctx)


def _refused(st, raw: bytes, status: int, reason: str, *, small: bool = False,
             method: str = "GET") -> None:
    sc, app = (st.small, st.small_app) if small else (st.sc, st.app)
    b = hk.before(sc, app)
    with _conn(st, small) as c:
        r = hk.exchange(c, raw, method)
        hk.assert_refused(sc, r, b, status=status, reason=reason,
                          listener="small" if small else "strict", app=app, conn=c)


def _served(st, raw: bytes, method: str, target: str, *, small: bool = False,
            body: bytes = b"") -> hk.HReq:
    app = st.small_app if small else st.app
    n0 = app.nreq()
    with _conn(st, small) as c:
        c.send(raw)
        r = c.read_response(method)
        assert r.status == 200, (r.head, r.body[:300] if r.body else None)
    got = app.reqs_since(n0)
    assert len(got) == 1, [(x.method, x.target) for x in got]
    assert (got[0].method, got[0].target) == (method, target)
    assert (got[0].complete, got[0].body_sha256) == (True, h.sha256(body)), \
        (got[0].body_len, got[0].error)
    return got[0]


H = b"Host: app.local\r\n"

# --------------------------------------------------------------------- 400 "protocol"

SMUGGLING = [
    ("cl-and-te", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-and-cl", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 5\r\n\r\n0\r\n\r\n"),
    ("cl-duplicate-same", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Content-Length: 5\r\n\r\nhello"),
    ("cl-duplicate-different", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Content-Length: 6\r\n\r\nhello!"),
    ("cl-list-conflicting", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\n"
     b"hello!"),
    ("cl-non-numeric", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\nhello"),
    ("cl-negative", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -5\r\n\r\nhello"),
    ("cl-plus", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello"),
    ("cl-hex", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello"),
    ("obs-fold", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n"),
    ("obs-fold-tab", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n"),
    ("obs-fold-te", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n"
     b"0\r\n\r\n"),
    ("ws-first-header-line", b"GET /echo HTTP/1.1\r\n Host: app.local\r\n\r\n"),
    ("ws-first-header-line-te", b"POST /echo HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + H
     + b"Content-Length: 5\r\n\r\nhello"),
    ("ws-before-colon", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n"
     b"0\r\n\r\n"),   # RFC 9112 5.1: MUST be rejected with 400
    ("ws-before-colon-any-field", b"GET /echo HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n"),
    ("tab-before-colon", b"GET /echo HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n"),
    ("ws-before-colon-cl", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\n"
     b"hello"),
    ("empty-field-name", b"GET /echo HTTP/1.1\r\n" + H + b": b\r\n\r\n"),  # not a token
    ("missing-host", b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n"),
    # RFC 9112 3.2: MUST 400 for "a Host header field with an invalid field value"
    ("host-with-space", b"GET /echo HTTP/1.1\r\nHost: app.local evil.local\r\n\r\n"),
    ("host-with-slash", b"GET /echo HTTP/1.1\r\nHost: app.local/evil\r\n\r\n"),
    ("two-hosts", b"GET /echo HTTP/1.1\r\n" + H + b"Host: other.local\r\n\r\n"),
    ("two-hosts-same", b"GET /echo HTTP/1.1\r\n" + H + b"host: app.local\r\n\r\n"),
    ("te-on-http10", b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-gzip-chunked", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n"
     b"\r\n0\r\n\r\n"),
    ("te-chunked-chunked", b"POST /echo HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("te-split", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-identity", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n"
     b"Content-Length: 5\r\n\r\nhello"),
    ("te-xchunked", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n"
     b"0\r\n\r\n"),
    ("bare-lf-everywhere", b"GET /echo HTTP/1.1\nHost: app.local\n\n"),
    ("bare-lf-one-line", b"GET /echo HTTP/1.1\r\nHost: app.local\nX-A: b\r\n\r\n"),
    ("bare-lf-request-line", b"GET /echo HTTP/1.1\nHost: app.local\r\n\r\n"),
    ("bare-cr", b"GET /echo HTTP/1.1\r\nHost: app.local\rX-A: b\r\n\r\n"),
    ("bare-cr-in-value", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n"),
    ("nul-in-value", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n"),
    ("nul-in-name", b"GET /echo HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n"),
    ("nul-in-target", b"GET /ec\x00ho HTTP/1.1\r\n" + H + b"\r\n"),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("http2-version", b"GET /echo HTTP/2.0\r\n" + H + b"\r\n"),
    ("http12-version", b"GET /echo HTTP/1.2\r\n" + H + b"\r\n"),
    ("http09-style", b"GET /echo\r\n\r\n"),
    ("absolute-form", b"GET http://app.local/echo HTTP/1.1\r\n" + H + b"\r\n"),
    ("asterisk-with-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n"),
    ("authority-form-with-get", b"GET app.local:80 HTTP/1.1\r\n" + H + b"\r\n"),
    ("dot-dot", b"GET /a/../b HTTP/1.1\r\n" + H + b"\r\n"),
    ("dot", b"GET /./a HTTP/1.1\r\n" + H + b"\r\n"),
    ("dot-dot-encoded", b"GET /a/%2e%2e/b HTTP/1.1\r\n" + H + b"\r\n"),
    ("dot-dot-encoded-upper", b"GET /a/%2E%2E/b HTTP/1.1\r\n" + H + b"\r\n"),
    ("dot-dot-trailing", b"GET /a/.. HTTP/1.1\r\n" + H + b"\r\n"),
    ("dot-dot-before-query", b"GET /a/..?x=1 HTTP/1.1\r\n" + H + b"\r\n"),
]


@pytest.mark.parametrize("raw", [c[1] for c in SMUGGLING], ids=[c[0] for c in SMUGGLING])
def test_malformed_request_400(st, raw):
    _refused(st, raw, 400, "protocol",
             method=raw.split(b" ", 1)[0].decode("latin-1", "replace"))


VALID = [
    ("plain-get", b"GET /echo HTTP/1.1\r\n" + H + b"\r\n", "GET", "/echo", b""),
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", "OPTIONS", "*", b""),
    ("dotdot-inside-segment", b"GET /a/..b/c.. HTTP/1.1\r\n" + H + b"\r\n", "GET",
     "/a/..b/c..", b""),
    ("dot-prefixed-segment", b"GET /.well-known/x HTTP/1.1\r\n" + H + b"\r\n", "GET",
     "/.well-known/x", b""),
    ("host-with-port", b"GET /echo?q=1 HTTP/1.1\r\nHost: app.local:8080\r\n\r\n", "GET",
     "/echo?q=1", b""),
    ("lowercase-names-ows", b"GET /echo HTTP/1.1\r\nhost:app.local\r\nx-a: \t a b \t\r\n\r\n",
     "GET", "/echo", b""),
    ("empty-value", b"GET /echo HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n", "GET", "/echo", b""),
    ("cl-zero", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n", "POST",
     "/echo", b""),
    ("cl-body", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello", "POST",
     "/echo", b"hello"),
    ("chunked", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "POST", "/echo", b"hello world"),
    ("chunked-ext-and-trailer", b"POST /echo HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n5;name=val\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
     "POST", "/echo", b"hello"),
    ("http10-no-host", b"GET /echo HTTP/1.0\r\n\r\n", "GET", "/echo", b""),
    ("http10-cl-body", b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", "POST",
     "/echo", b"abc"),
]


@pytest.mark.parametrize("raw,method,target,body", [v[1:] for v in VALID],
                         ids=[v[0] for v in VALID])
def test_valid_forms_served(st, raw, method, target, body):
    _served(st, raw, method, target, body=body)


BAD_CHUNKS = [
    ("size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("no-crlf-after-data", b"5\r\nhelloXX0\r\n\r\n"),
    ("negative-size", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size-overflow", b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf-chunk-lines", b"5\nhello\n0\n\n"),
    ("empty-size-line", b"\r\nhello\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("body", [c[1] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
def test_bad_chunk_syntax(st, body):
    """The head went to the app already: the sidecar answers 400 (or closes), the app never
    gets a complete request, and that app connection is not reused for anyone else."""
    b = hk.before(st.sc, st.app)
    head = b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    with _conn(st) as c:
        r = hk.exchange(c, head + body, "POST")
        if r is not None:
            hk.assert_refused(st.sc, r, b, status=400, reason="protocol", listener="strict",
                              app=st.app, conn=c, app_untouched=False)
        else:
            e = st.sc.wait_for_log(lambda x: x.get("peer") == c.peer_addr and "status" in x,
                                   timeout=10, start=b.log_start)
            assert e is not None and e["reason"] == "protocol", \
                f"expected a log line with reason protocol for {c.peer_addr}, got {e}"
    # absence window: a body wrongly forwarded after the refusal would arrive in this time
    time.sleep(0.3 * h.SCALE)
    new = st.app.reqs_since(b.app_snap[1])
    assert all(not x.complete for x in new), [(x.target, x.body_len, x.error) for x in new]
    for x in new:
        assert st.app.conns[x.conn].done.wait(h.T(10)), \
            "app connection with a half-forwarded body was not closed"
    # and the next client is served correctly
    _served(st, b"GET /echo?after-bad-chunk HTTP/1.1\r\n" + H + b"\r\n", "GET",
            "/echo?after-bad-chunk")


# --------------------------------------------------------------------- 431 "limit"

def _fields(n: int, size: int = 8) -> bytes:
    return b"".join(b"X-F%d: %s\r\n" % (i, b"v" * size) for i in range(n))


def test_request_line_limit(st):
    _refused(st, b"GET /echo?" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 431, "limit")
    target = "/echo?" + "a" * 7000
    _served(st, f"GET {target} HTTP/1.1\r\n".encode() + H + b"\r\n", "GET", target)


def test_header_bytes_limit(st):
    _refused(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(17, 4000) + b"\r\n", 431, "limit")
    _refused(st, b"GET /echo HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n",
             431, "limit")
    _served(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(15, 4000) + b"\r\n", "GET", "/echo")


def test_header_count_limit(st):
    _refused(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(100) + b"\r\n", 431, "limit")
    _served(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(99) + b"\r\n", "GET", "/echo")


def test_configured_small_limits(st):
    # max_headers = 10: Host + 9 accepted, Host + 10 refused
    rq = _served(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(9) + b"\r\n", "GET", "/echo",
                 small=True)
    assert len(rq.hv("x-f8")) == 1
    _refused(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(10) + b"\r\n", 431, "limit",
             small=True)
    # max_request_line = 1024
    t = "/echo?" + "b" * 900
    _served(st, f"GET {t} HTTP/1.1\r\n".encode() + H + b"\r\n", "GET", t, small=True)
    _refused(st, b"GET /echo?" + b"b" * 1100 + b" HTTP/1.1\r\n" + H + b"\r\n", 431, "limit",
             small=True)
    # max_header_bytes = 4096
    _served(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(3, 1000) + b"\r\n", "GET", "/echo",
            small=True)
    _refused(st, b"GET /echo HTTP/1.1\r\n" + H + _fields(5, 1000) + b"\r\n", 431, "limit",
             small=True)


# --------------------------------------------------------------------- 408 slowloris

def _timed_408(st, c: HttpConn, b: hk.Before, t0: float) -> None:
    r = c.read_response(timeout=REQ_TIMEOUT_MS / 1000 + hk.LATE_S + 5)
    dt = time.monotonic() - t0
    hk.assert_deadline_fired("408", dt, REQ_TIMEOUT_MS / 1000)
    hk.assert_refused(st.sc, r, b, status=408, reason="timeout", listener="strict",
                      app=st.app, conn=c)


def _conn_ready(st) -> tuple[HttpConn, float]:
    """A connection and a time no later than the sidecar's "connection ready" (the end of
    its handshake), from which the first request's deadline runs."""
    t0 = time.monotonic()
    return _conn(st), t0


def test_slowloris_half_head(st_req):
    b = hk.before(st_req.sc, st_req.app)
    c, t0 = _conn_ready(st_req)
    with c:
        c.send(b"GET /echo HTTP/1.1\r\n" + H + b"X-Slow: 1\r\n")
        _timed_408(st_req, c, b, t0)


def test_slowloris_nothing_sent(st_req):
    b = hk.before(st_req.sc, st_req.app)
    c, t0 = _conn_ready(st_req)
    with c:
        _timed_408(st_req, c, b, t0)


def test_slowloris_trickle(st_req):
    """One byte every 150 ms keeps the connection busy but the head never completes in
    time: the deadline is absolute, not an idle timeout."""
    b = hk.before(st_req.sc, st_req.app)
    data = b"GET /echo HTTP/1.1\r\n" + H + b"X-Slow: " + b"s" * 100
    c, t0 = _conn_ready(st_req)
    with c:
        for i in range(40):                      # at most 40 bytes / ~6 s of trickling
            if time.monotonic() - t0 > REQ_TIMEOUT_MS / 1000 * 3:
                break
            if not c.try_send(data[i:i + 1]):
                break
            c.sock.settimeout(0.15)
            try:
                got = c.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                break
            if got:
                c.buf += got                     # the sidecar answered
            else:
                c.eof = True
            break
        _timed_408(st_req, c, b, t0)


def test_keepalive_idle_then_request_is_fine_then_slow_second_head_408(st_req):
    """Later requests: the clock starts at the head's first byte, so an idle keep-alive
    connection is not 408'd; a second head that stalls is."""
    n0 = st_req.app.nreq()
    with _conn(st_req) as c:
        c.send(b"GET /echo?one HTTP/1.1\r\n" + H + b"\r\n")
        r = c.read_response()
        assert r.status == 200, r.head
        time.sleep(REQ_TIMEOUT_MS / 1000 * 1.6)  # idle for longer than the deadline
        c.send(b"GET /echo?two HTTP/1.1\r\n" + H + b"\r\n")
        r = c.read_response()
        assert r.status == 200, r.head
        assert r.json()["target"] == "/echo?two"
        assert st_req.app.nreq() == n0 + 2, \
            [x.target for x in st_req.app.reqs_since(n0)]
        b = hk.before(st_req.sc, st_req.app)
        t0 = time.monotonic()
        c.send(b"GET /echo?three HTTP/1.1\r\n" + H)
        _timed_408(st_req, c, b, t0)


def test_slow_body_is_not_a_slowloris(st_req):
    """request_timeout_ms covers the head only: a body trickling in for 2x that is fine."""
    body = b"0123456789" * 100
    with _conn(st_req) as c:
        c.send(b"POST /upload?slow-body HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n")
        for i in range(10):
            time.sleep(REQ_TIMEOUT_MS / 1000 / 5)  # the trickle under test
            c.send(body[i * 100:(i + 1) * 100])
        r = c.read_response()
        assert r.status == 200, (r.head, r.body)
        assert r.json()["body_sha256"] == h.sha256(body)


# --------------------------------------------------------------------- inbound 503 / 504

def test_inbound_app_down_503(st):
    b = hk.before(st.sc, st.app)
    with HttpConn.tls(st.dead_port, st.ctx) as c:
        r = hk.exchange(c, b"GET /x HTTP/1.1\r\n" + H + b"\r\n")
        hk.assert_refused(st.sc, r, b, status=503, reason="", listener="deadapp", app=st.app,
                          conn=c, method="GET", path="/x")


def test_inbound_app_silent_504(st_resp):
    b = hk.before(st_resp.sc, st_resp.app)
    with _conn(st_resp) as c:
        t0 = time.monotonic()
        r = hk.exchange(c, b"GET /silent HTTP/1.1\r\n" + H + b"\r\n",
                        timeout=RESP_TIMEOUT_MS / 1000 + hk.LATE_S + 5)
        dt = time.monotonic() - t0
        hk.assert_refused(st_resp.sc, r, b, status=504, reason="timeout", listener="strict",
                          app=st_resp.app, conn=c, method="GET", path="/silent",
                          app_untouched=False)
    hk.assert_deadline_fired("504", dt, RESP_TIMEOUT_MS / 1000)
    rq = st_resp.app.reqs_since(b.app_snap[1])
    assert [x.target for x in rq] == ["/silent"]
    assert st_resp.app.conns[rq[0].conn].done.wait(h.T(10)), \
        "the app connection of a timed-out request was not closed"


def test_zz_strict_sidecars_healthy(st, st_req, st_resp):
    for sc in (st.sc, st.small, st_req.sc, st_resp.sc):
        sc.assert_alive()
        assert not sc.bad_stdout, f"{sc.name}: non-JSON stdout lines {sc.bad_stdout[:3]}"
        for e in sc.access_log():
            if "status" in e:
                hk.check_http_entry(e)
    # nothing malformed ever reached the strict app: every request it saw parsed cleanly
    for rq in st.app.requests:
        assert rq.error is None or rq.target == "/upload", (rq.target, rq.error)

"""Issue 14, item 6: a request body has a progress deadline (http.body_timeout_ms).

A client that sends a request head announcing a body, some of the body, and then nothing,
is answered 408 (reason timeout) once no body byte has arrived for http.body_timeout_ms,
over HTTP/1.1 and HTTP/2, or reset (HTTP/2: RST_STREAM INTERNAL_ERROR) if the app's
response had already begun; the request the app was receiving is cut off (its connection
to the sidecar ends before the body is whole), never completed; one access-log line and
the request counter say deny/timeout. The deadline does not fire early.

Every wait is bounded; ports come from h.free_port().
"""

from __future__ import annotations

import json
import time

import h2.events
import pytest

import harness as h
import httpkit as hk
from test_http2_lifecycle import H2Client  # noqa: E402  (python3-h2 over mTLS)

BODY_TIMEOUT_MS = 1000
ANNOUNCED = 100000
SENT = 1000


def _sidecar(env, pki, app, name: str) -> tuple[h.Sidecar, int]:
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1,
                        extra={"http": {"body_timeout_ms": BODY_TIMEOUT_MS}},
                        inbound=[h.inbound_listener("api", port, app.addr,
                                                    [{"namespace": "web"}], protocol="http")])
    return env.sidecar(cfg, name=name), port


def _app_saw_cut_off_request(app: hk.HttpApp, n: int, sent: int = SENT) -> None:
    """The app got the head and the bytes sent, then its connection ended: never a whole
    request."""
    assert app.wait_reqs(n + 1), "the request never reached the app"
    rq = app.reqs_since(n)[0]
    conn = app.conns[rq.conn]
    assert conn.done.wait(h.T(h.PROMPT_S)), "the app's connection stayed open"
    assert not rq.complete, rq
    assert rq.content_length == ANNOUNCED and rq.body_len == sent, (rq.content_length,
                                                                    rq.body_len)


def _check_log_and_metric(sc: h.Sidecar, protocol: str, path: str = "/upload",
                          status: int = 408, sent: int = SENT) -> None:
    e = sc.wait_for_log(lambda e: e.get("path") == path and e.get("protocol") == protocol,
                        h.PROMPT_S, sc.test_mark)
    assert e is not None, "no access-log line for the stalled request"
    assert (e["status"], e["decision"], e["reason"]) == (status, "deny", "timeout"), e
    assert e["request_bytes"] == sent, e
    hk.wait_metric(sc, hk.REQS, lambda v: v == 1, decision="deny", reason="timeout")
    ev = sc.wait_for_event("stalled for", h.PROMPT_S)
    assert ev is not None and "(timeout)" in ev["msg"], ev


@pytest.mark.parametrize("sent", [SENT, 0], ids=["some_body", "head_alone"])
def test_http1_stalled_body_gets_408_and_the_app_request_is_cut(env, pki, sent):
    """With some of the body, or the head alone (the deadline runs from the head, not from
    the first body byte)."""
    app = hk.HttpApp(name="bodyapp1")
    env.apps.append(app)
    sc, port = _sidecar(env, pki, app, "body1")
    n = app.nreq()
    c = hk.HttpConn.tls(port, h.client_context(pki, "web-frontend"))
    try:
        c.send(hk.req("POST", "/upload", [("Content-Length", str(ANNOUNCED))]) + b"x" * sent)
        t_sent = time.monotonic()
        r = c.read_response(timeout=h.PROMPT_S)
        took = time.monotonic() - t_sent
        assert r.status == 408 and r.closes, (r.status, r.headers, r.body)
        assert r.json()["reason"] == "timeout", r.body
        assert took >= BODY_TIMEOUT_MS / 1000, f"408 after {took:.3f} s, before the deadline"
        assert c.closed_by_peer(h.PROMPT_S), "the connection stayed open after the 408"
    finally:
        c.close()
    _app_saw_cut_off_request(app, n, sent)
    _check_log_and_metric(sc, "HTTP/1.1", sent=sent)


def test_http2_stalled_body_gets_408_and_the_app_request_is_cut(env, pki):
    app = hk.HttpApp(name="bodyapp2")
    env.apps.append(app)
    sc, port = _sidecar(env, pki, app, "body2")
    n = app.nreq()
    c = H2Client(port, h.client_context(pki, "web-frontend"))
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                  (":authority", c.authority), (":path", "/upload"),
                                  ("content-length", str(ANNOUNCED))], end_stream=False)
        c.conn.send_data(sid, b"x" * SENT, end_stream=False)
        c.sock.sendall(c.conn.data_to_send())
        t_sent = time.monotonic()
        c.bodies[sid] = bytearray()

        def reset(cl) -> bool:
            return any(isinstance(e, h2.events.StreamReset) and e.stream_id == sid
                       for e in cl.events)
        assert c.pump(lambda cl: cl.ended(sid) and reset(cl), h.PROMPT_S), c.events[-6:]
        took = time.monotonic() - t_sent
        assert c.status(sid) == 408, c.events[-6:]
        assert b'"timeout"' in bytes(c.bodies[sid]), bytes(c.bodies[sid])
        rst = [e for e in c.events if isinstance(e, h2.events.StreamReset)][0]
        assert rst.error_code == 0, rst   # NO_ERROR: stop sending the rest (RFC 9113 8.1)
        assert took >= BODY_TIMEOUT_MS / 1000, f"408 after {took:.3f} s, before the deadline"
        # the connection itself goes on: another stream is served
        sid2 = c.get("/echo")
        assert c.pump(lambda cl: cl.ended(sid2)) and c.status(sid2) == 200
    finally:
        c.close()
    _app_saw_cut_off_request(app, n)
    _check_log_and_metric(sc, "HTTP/2")


def test_http1_stalled_body_after_the_response_began_is_reset(env, pki):
    app = hk.HttpApp(name="bodyapp3")
    env.apps.append(app)
    sc, port = _sidecar(env, pki, app, "body3")
    n = app.nreq()
    c = hk.HttpConn.tls(port, h.client_context(pki, "web-frontend"))
    try:
        c.send(hk.req("POST", "/early", [("Content-Length", str(ANNOUNCED))]) + b"x" * SENT)
        t_sent = time.monotonic()
        got, how = b"", None
        c.sock.settimeout(h.T(h.PROMPT_S))
        try:
            while len(got) < 4096:
                b = c.sock.recv(4096)
                if not b:
                    how = "eof"
                    break
                got += b
        except (ConnectionResetError, OSError) as e:
            how = f"reset: {e}"
        took = time.monotonic() - t_sent
        assert how is not None, f"still open after {took:.1f} s: {got!r}"
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\nearly"), got
        assert took >= BODY_TIMEOUT_MS / 1000, f"cut after {took:.3f} s, before the deadline"
    finally:
        c.close()
    _app_saw_cut_off_request_at(app, n, "/early")
    _check_log_and_metric(sc, "HTTP/1.1", path="/early", status=200)


def _app_saw_cut_off_request_at(app: hk.HttpApp, n: int, path: str) -> None:
    assert app.wait_reqs(n + 1), "the request never reached the app"
    rq = [r for r in app.reqs_since(n) if r.path == path][0]
    assert app.conns[rq.conn].done.wait(h.T(h.PROMPT_S)), "the app's connection stayed open"
    assert not rq.complete and rq.body_len == SENT, (rq.complete, rq.body_len)


def test_http2_stalled_body_after_the_response_began_is_reset(env, pki):
    app = hk.HttpApp(name="bodyapp4")
    env.apps.append(app)
    sc, port = _sidecar(env, pki, app, "body4")
    n = app.nreq()
    c = H2Client(port, h.client_context(pki, "web-frontend"))
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                  (":authority", c.authority), (":path", "/early"),
                                  ("content-length", str(ANNOUNCED))], end_stream=False)
        c.conn.send_data(sid, b"x" * SENT, end_stream=False)
        c.sock.sendall(c.conn.data_to_send())
        t_sent = time.monotonic()
        c.bodies[sid] = bytearray()

        def resets(cl) -> list:
            return [e for e in cl.events
                    if isinstance(e, h2.events.StreamReset) and e.stream_id == sid]
        assert c.pump(lambda cl: resets(cl), h.PROMPT_S), c.events[-6:]
        took = time.monotonic() - t_sent
        assert c.status(sid) == 200 and not c.ended(sid), c.events[-6:]
        assert resets(c)[0].error_code == 2, resets(c)   # INTERNAL_ERROR: cut, not whole
        assert took >= BODY_TIMEOUT_MS / 1000, f"cut after {took:.3f} s, before the deadline"
    finally:
        c.close()
    _app_saw_cut_off_request_at(app, n, "/early")
    _check_log_and_metric(sc, "HTTP/2", path="/early", status=200)


# ------------------------------------------------------------------ Expect: 100-continue
# A client that sends Expect: 100-continue holds its body back until the upstream answers:
# that wait is the upstream's, never counted against the client's body deadline. The
# upstream gets http.response_timeout_ms to answer (100 or final), then the client 504.

PAUSE_MS = 3 * BODY_TIMEOUT_MS


def _continue_sidecar(env, pki, target: str, name: str,
                      response_timeout_ms: int = 60000) -> tuple[h.Sidecar, int]:
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1,
                        extra={"http": {"body_timeout_ms": BODY_TIMEOUT_MS,
                                        "response_timeout_ms": response_timeout_ms}},
                        inbound=[h.inbound_listener("api", port, target,
                                                    [{"namespace": "web"}], protocol="http")])
    return env.sidecar(cfg, name=name), port


def _no_body_timeout(sc: h.Sidecar, protocol: str, path: str = "/continue",
                     status: int = 200) -> None:
    """The request's line says status and allow; no body timeout was reported."""
    e = sc.wait_for_log(lambda e: e.get("path", "").startswith(path)
                        and e.get("protocol") == protocol, h.PROMPT_S, sc.test_mark)
    assert e is not None and (e["status"], e["decision"]) == (status, "allow"), e
    assert sc.wait_for_event("stalled for", 0) is None, "a body timeout was reported"


def test_http1_waiting_for_100_continue_is_not_a_stalled_body(env, pki):
    """The app sends 100 Continue only after three body deadlines: the client, which waited
    for it, then sends its body and gets 200 (not 408)."""
    app = hk.HttpApp(name="continue1")
    env.apps.append(app)
    sc, port = _continue_sidecar(env, pki, app.addr, "continue1")
    c = hk.HttpConn.tls(port, h.client_context(pki, "web-frontend"))
    try:
        c.send(hk.req("POST", f"/continue?pause_ms={PAUSE_MS}",
                      [("Content-Length", "5"), ("Expect", "100-continue")]))
        r100 = c.read_response(stop_at_1xx=True, timeout=h.PROMPT_S + PAUSE_MS / 1000)
        assert r100.status == 100, (r100.status, r100.body)
        c.send(b"hello")
        r = c.read_response(method="POST", timeout=h.PROMPT_S)
        assert r.status == 200 and r.json()["body_len"] == 5, (r.status, r.body)
    finally:
        c.close()
    _no_body_timeout(sc, "HTTP/1.1")


def test_http2_waiting_for_100_continue_is_not_a_stalled_body(env, pki):
    app = hk.HttpApp(name="continue2")
    env.apps.append(app)
    sc, port = _continue_sidecar(env, pki, app.addr, "continue2")
    c = H2Client(port, h.client_context(pki, "web-frontend"))
    try:
        sid = c.post_expecting_100(f"/continue?pause_ms={PAUSE_MS}", 5)
        assert c.pump(lambda cl: cl.interim(sid) or cl.status(sid) is not None,
                      h.PROMPT_S + PAUSE_MS / 1000), c.events[-6:]
        assert c.status(sid) is None, f"a final answer while waiting for 100: {c.events[-6:]}"
        assert dict(c.interim(sid)[0].headers)[b":status"] == b"100"
        c.conn.send_data(sid, b"hello", end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        assert c.pump(lambda cl: cl.ended(sid)), c.events[-6:]
        assert c.status(sid) == 200, c.events[-6:]
        assert json.loads(bytes(c.bodies[sid]))["body_len"] == 5
    finally:
        c.close()
    _no_body_timeout(sc, "HTTP/2")


def test_http1_final_answer_to_expect_ends_the_request(env, pki):
    """The app answers 417 to Expect: 100-continue without reading the body: the client
    gets the 417 and the connection closes after it (the unsent body can never come in
    order); no body deadline fires."""
    app = hk.HttpApp(name="expectfail1")
    env.apps.append(app)
    sc, port = _continue_sidecar(env, pki, app.addr, "expectfail1")
    c = hk.HttpConn.tls(port, h.client_context(pki, "web-frontend"))
    try:
        c.send(hk.req("POST", "/expectfail", [("Content-Length", "5"),
                                               ("Expect", "100-continue")]))
        r = c.read_response(method="POST", timeout=h.PROMPT_S)
        assert r.status == 417, (r.status, r.body)
        assert c.closed_by_peer(h.PROMPT_S), "the connection stayed open after the 417"
    finally:
        c.close()
    _no_body_timeout(sc, "HTTP/1.1", "/expectfail", 417)


def test_http2_final_answer_to_expect_resets_the_stream_with_no_error(env, pki):
    """Over HTTP/2 the 417 ends the stream, then RST_STREAM NO_ERROR tells the client not to
    send the body (RFC 9113 8.1), at once rather than after the body deadline; the
    connection goes on."""
    app = hk.HttpApp(name="expectfail2")
    env.apps.append(app)
    sc, port = _continue_sidecar(env, pki, app.addr, "expectfail2")
    c = H2Client(port, h.client_context(pki, "web-frontend"))
    try:
        sid = c.post_expecting_100("/expectfail", 5)

        def resets(cl):
            return [e for e in cl.of(h2.events.StreamReset) if e.stream_id == sid]
        assert c.pump(lambda cl: cl.ended(sid) and resets(cl)), c.events[-6:]
        assert c.status(sid) == 417, c.events[-6:]
        assert resets(c)[0].error_code == 0, resets(c)   # NO_ERROR
        sid2 = c.get("/echo")
        assert c.pump(lambda cl: cl.ended(sid2)) and c.status(sid2) == 200
    finally:
        c.close()
    _no_body_timeout(sc, "HTTP/2", "/expectfail", 417)


def test_upstream_that_never_answers_expect_gets_504_not_408(env, pki):
    """The app never answers at all: the client that waits for 100 Continue gets 504 after
    http.response_timeout_ms (the upstream's fault, decision error), not 408 after the
    body deadline."""
    hold = env.app("hold")
    sc, port = _continue_sidecar(env, pki, hold.addr, "continue3",
                                 response_timeout_ms=2 * BODY_TIMEOUT_MS)
    c = hk.HttpConn.tls(port, h.client_context(pki, "web-frontend"))
    try:
        c.send(hk.req("POST", "/continue", [("Content-Length", "5"),
                                            ("Expect", "100-continue")]))
        t_sent = time.monotonic()
        r = c.read_response(method="POST", timeout=h.PROMPT_S)
        took = time.monotonic() - t_sent
        assert r.status == 504 and r.json()["reason"] == "timeout", (r.status, r.body)
        assert took >= 2 * BODY_TIMEOUT_MS / 1000, f"504 after {took:.3f} s"
    finally:
        c.close()
    e = sc.wait_for_log(lambda e: e.get("path") == "/continue", h.PROMPT_S, sc.test_mark)
    assert e is not None and (e["status"], e["decision"], e["reason"]) == \
        (504, "error", "timeout"), e
    assert sc.wait_for_event("stalled for", 0) is None, "reported as a stalled body"

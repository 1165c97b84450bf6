"""TLS truncation (issue 14 item 4; README "TLS truncation", "Access log", "Metrics"): a TCP
FIN without TLS close_notify, also in the middle of a record, is a reset, never a clean end.

Both TLS sides are tested: the inbound peer (a TLS client the test drives) and the outbound
upstream (a fake upstream sidecar: a TLS server presenting payments-api, the identity the
outbound listeners expect). Both run TLS over ssl.MemoryBIO on a plain socket, so the test
decides which TLS bytes leave: whole records then FIN ("boundary"), part of the last record
then FIN ("mid-record"), or whole records, close_notify, then FIN ("clean", which must stay
a clean end: the fix is no blanket reset).

What each truncation must give: L4, the other side's connection is reset (the app, or the
app's client, reads ECONNRESET, never EOF) and the access log says close "reset"; HTTP, a
body cut short never ends well-formed (no final 0-chunk, no END_STREAM): the client is reset
(HTTP/2: RST_STREAM) and the request line says decision "error". Always: a server event
naming the side, and portcullis_tls_truncations_total counts it.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest

import harness as h
import httpkit as hk

EXPECT = [{"namespace": "payments", "service_account": "api"}]
TRUNC = "portcullis_tls_truncations_total"
EVENT = "closed TCP without TLS close_notify"
TRUNCATED = ("boundary", "mid-record")


# --------------------------------------------------------------------------- TLS over BIOs

def _records(data: bytes) -> list[bytes]:
    """Split TLS bytes into records (5-byte header: type, version, length)."""
    out, i = [], 0
    while i < len(data):
        n = 5 + int.from_bytes(data[i + 3:i + 5], "big")
        out.append(data[i:i + n])
        i += n
    assert i == len(data), "not whole TLS records"
    return out


class BioTLS:
    """One TLS connection over ssl.MemoryBIO on a plain socket: nothing leaves but what the
    test sends, so it can end TCP with or without close_notify, also mid-record."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool):
        self.sock = sock
        sock.settimeout(h.T(h.WAIT_S))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side,
                                server_hostname=None if server_side else "api.payments.svc")
        self._do(self.obj.do_handshake)

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _do(self, fn, *a):
        deadline = time.monotonic() + h.T(h.WAIT_S)
        while True:
            try:
                r = fn(*a)
                self._flush()
                return r
            except ssl.SSLWantReadError:
                self._flush()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"BioTLS: {fn.__name__} did not complete")
                b = self.sock.recv(65536)
                if b:
                    self.inc.write(b)
                else:
                    self.inc.write_eof()

    def read(self) -> bytes:
        """Plaintext; b"" at the peer's close_notify."""
        try:
            return self._do(self.obj.read, 65536)
        except ssl.SSLZeroReturnError:
            return b""

    def read_until(self, marker: bytes) -> bytes:
        buf = b""
        while marker not in buf:
            b = self.read()
            assert b, f"the peer ended before {marker!r}; got {buf!r}"
            buf += b
        return buf

    def send(self, data: bytes) -> None:
        """data as whole records."""
        self.obj.write(data)
        self._flush()

    def end(self, how: str, tail: bytes) -> None:
        """Sends tail, then ends TCP: "clean" whole records, close_notify, FIN; "boundary"
        whole records, FIN; "mid-record" all but the second half of tail's last record, FIN."""
        self.obj.write(tail)
        recs = _records(self.out.read())
        if how == "mid-record":
            recs[-1] = recs[-1][:len(recs[-1]) // 2]
        self.sock.sendall(b"".join(recs))
        if how == "clean":
            try:
                self.obj.unwrap()
            except ssl.SSLWantReadError:
                pass
            self._flush()
        self.sock.shutdown(socket.SHUT_WR)

    def wait_closed(self) -> str:
        """Reads raw bytes until the other end closes: "reset" or "eof"."""
        deadline = time.monotonic() + h.T(h.WAIT_S)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return "eof"
            except ConnectionResetError:
                return "reset"
            except (socket.timeout, TimeoutError):
                continue
        return "timeout"


class FakeUpstream:
    """A TLS server standing in for an upstream sidecar (payments-api, client certificate
    required): each connection is handed to script(conn) in a thread of its own; then it
    waits for the sidecar to close the connection and records how ("eof"/"reset")."""

    def __init__(self, pki: h.PKI, script, *, max_version=None, alpn: list[str] | None = None):
        self.ctx = hk.tls_server_context(pki, "payments-api")
        if max_version is not None:
            self.ctx.maximum_version = max_version
        if alpn:
            self.ctx.set_alpn_protocols(alpn)
        self.script = script
        self.errors: list[str] = []
        self.ends: list[str] = []
        self.conns = 0
        self._stop = threading.Event()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((h.HOST, 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.addr = h.addr(self.lsock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self.lsock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        try:
            c = BioTLS(s, self.ctx, server_side=True)
            self.script(c)
            self.ends.append(c.wait_closed())
        except Exception as e:  # asserted on by the tests
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            s.close()

    def stop(self) -> None:
        self._stop.set()
        self.lsock.close()


def _peer_ctx(pki: h.PKI, **kw) -> ssl.SSLContext:
    return h.client_context(pki, "web-frontend", **kw)


def _read_raw(s: socket.socket, stop: bytes | None = None) -> tuple[bytes, str]:
    """Bytes from a plain socket until EOF ("eof"), a reset ("reset"), or until they end
    with stop ("stop")."""
    s.settimeout(h.T(h.WAIT_S))
    buf = b""
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return buf, "reset"
        if not b:
            return buf, "eof"
        buf += b
        if stop is not None and buf.endswith(stop):
            return buf, "stop"


def _truncations(sc: h.Sidecar, direction: str, listener: str) -> float:
    return hk.scrape(sc).get(TRUNC, listener=listener, direction=direction)


def _assert_truncation_seen(sc: h.Sidecar, *, direction: str, listener: str, side: str,
                            addr: str, before: float) -> None:
    """The operator's view of one truncation: a server event naming the side and its
    address, and the counter one up."""
    ev = sc.wait_for_event(lambda e: EVENT in e.get("msg", "")
                           and f"{side} {addr} " in e.get("msg", ""))
    assert ev is not None, (f"no server event '{side} {addr} ... {EVENT}': "
                            f"{[e.get('msg') for e in sc.events[-5:]]}")
    assert ev.get("level") == "info", ev
    hk.wait_metric(sc, TRUNC, lambda v: v == before + 1, listener=listener,
                   direction=direction)


def _assert_no_truncation(sc: h.Sidecar, *, direction: str, listener: str) -> None:
    m = hk.scrape(sc)
    series = f'{TRUNC}{{listener="{listener}",direction="{direction}"}} 0'
    assert series in m.text.splitlines(), m.lines(TRUNC)
    assert not sc.events_matching(EVENT), sc.events_matching(EVENT)


# --------------------------------------------------------------------------- L4, inbound

def _reader_app(sock: socket.socket, rec: h.AppConn) -> None:
    """Reads until EOF (rec.eof) or an error (a reset: rec.error, set by AppServer)."""
    sock.settimeout(h.T(h.WAIT_S))
    while True:
        b = sock.recv(65536)
        if not b:
            rec.eof = True
            return
        rec.data += b


@pytest.fixture
def l4_in(env):
    app = env.app("handler", handler=_reader_app)
    port = h.free_port()
    sc = env.sidecar(h.base_config(env.pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])]), name="trunc-l4-in")
    return app, sc, port


@pytest.mark.parametrize("how", TRUNCATED)
def test_l4_inbound_peer_fin_without_close_notify_resets_the_app(l4_in, pki, how):
    app, sc, port = l4_in
    before = _truncations(sc, "inbound", "api")
    c = BioTLS(socket.create_connection((h.HOST, port)), _peer_ctx(pki), server_side=False)
    local = h.addr(c.sock.getsockname()[1])
    try:
        c.send(b"first-record\n")
        c.end(how, b"second-record\n")
        assert app.wait_conns(1)
        rec = app.conns[0]
        assert rec.done.wait(h.T(h.WAIT_S)), "the app's connection never ended"
        assert not rec.eof, "the app read a clean EOF: the truncation passed as the end of data"
        assert rec.error and "ConnectionResetError" in rec.error, rec.error
        assert b"first-record\nsecond-record\n".startswith(bytes(rec.data)), rec.data
        if how == "mid-record":
            assert b"second" not in rec.data, f"a partial record was passed on: {rec.data!r}"
        assert c.wait_closed() == "reset", "the peer was not reset"
    finally:
        c.sock.close()
    e = sc.log_for_peer_port(int(local.rsplit(":", 1)[1]))
    assert e is not None, "no access-log line"
    h.check_access_entry(e)
    assert (e["decision"], e["reason"], e["close"]) == ("allow", None, "reset"), e
    _assert_truncation_seen(sc, direction="inbound", listener="api", side="peer", addr=local,
                            before=before)


def test_l4_inbound_peer_close_notify_then_fin_stays_clean(l4_in, pki):
    app, sc, port = l4_in
    c = BioTLS(socket.create_connection((h.HOST, port)), _peer_ctx(pki), server_side=False)
    local_port = c.sock.getsockname()[1]
    try:
        c.send(b"first-record\n")
        c.end("clean", b"second-record\n")
        assert app.wait_conns(1)
        rec = app.conns[0]
        assert rec.done.wait(h.T(h.WAIT_S)), "the app's connection never ended"
        assert rec.eof and rec.error is None, (rec.eof, rec.error)
        assert bytes(rec.data) == b"first-record\nsecond-record\n", rec.data
        # the app closed after its EOF: the sidecar ends the peer's side cleanly too
        assert c.read() == b"", "expected the sidecar's close_notify"
    finally:
        c.sock.close()
    e = sc.log_for_peer_port(local_port)
    assert e is not None, "no access-log line"
    assert (e["decision"], e["close"]) == ("allow", "eof"), e
    _assert_no_truncation(sc, direction="inbound", listener="api")


# --------------------------------------------------------------------------- L4, outbound

def _l4_out(env, script, **kw):
    up = FakeUpstream(env.pki, script, **kw)
    env.apps.append(up)
    port = h.free_port()
    sc = env.sidecar(h.base_config(env.pki, "web-frontend", workers=1, outbound=[
        h.outbound_listener("payments", port, up.addr, EXPECT)]), name="trunc-l4-out")
    return up, sc, port


@pytest.mark.parametrize("how,version", [("boundary", None), ("mid-record", None),
                                         ("mid-record", ssl.TLSVersion.TLSv1_2)])
def test_l4_outbound_upstream_fin_without_close_notify_resets_the_app(env, how, version):
    def script(c: BioTLS) -> None:
        c.read_until(b"ping\n")
        c.send(b"pong-1\n")
        c.end(how, b"pong-2\n")

    up, sc, port = _l4_out(env, script, max_version=version)
    before = _truncations(sc, "outbound", "payments")
    s = socket.create_connection((h.HOST, port), timeout=h.T(h.WAIT_S))
    app_port = s.getsockname()[1]
    try:
        s.sendall(b"ping\n")
        got, end = _read_raw(s)
    finally:
        s.close()
    assert end == "reset", f"the app read {end} after {got!r}: the truncation passed as an end"
    assert b"pong-1\npong-2\n".startswith(got), got
    if how == "mid-record":
        assert b"pong-2" not in got, f"a partial record was passed on: {got!r}"
    assert h.wait_until(lambda: up.ends, h.T(h.WAIT_S)) and up.ends == ["reset"], \
        (up.ends, up.errors)
    assert not up.errors, up.errors
    e = sc.log_for_app_port(app_port)
    assert e is not None, "no access-log line"
    h.check_access_entry(e)
    assert (e["decision"], e["close"]) == ("allow", "reset"), e
    _assert_truncation_seen(sc, direction="outbound", listener="payments", side="upstream",
                            addr=up.addr, before=before)


def test_l4_outbound_upstream_close_notify_then_fin_stays_clean(env):
    def script(c: BioTLS) -> None:
        c.read_until(b"ping\n")
        c.send(b"pong-1\n")
        c.end("clean", b"pong-2\n")

    up, sc, port = _l4_out(env, script)
    s = socket.create_connection((h.HOST, port), timeout=h.T(h.WAIT_S))
    app_port = s.getsockname()[1]
    try:
        s.sendall(b"ping\n")
        got, end = _read_raw(s)
    finally:
        s.close()  # the app's end: both directions are then over
    assert (got, end) == (b"pong-1\npong-2\n", "eof")
    e = sc.log_for_app_port(app_port)
    assert e is not None, "no access-log line"
    assert (e["decision"], e["close"]) == ("allow", "eof"), e
    assert h.wait_until(lambda: up.ends, h.T(h.WAIT_S)) and up.ends == ["eof"], \
        (up.ends, up.errors)
    _assert_no_truncation(sc, direction="outbound", listener="payments")


# --------------------------------------------------------------------------- HTTP, outbound

# framing -> (response head, first part of the body, the rest; together shorter than any
# length the head announces)
FRAMINGS = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"a" * 40, b"b" * 30),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"28\r\n" + b"a" * 40 + b"\r\n", b"1e\r\n" + b"b" * 30 + b"\r\n"),
    "close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"a" * 40, b"b" * 30),
}


def _http_out(env, framing: str, how: str, **listener):
    head, first, rest = FRAMINGS[framing]

    def script(c: BioTLS) -> None:
        c.read_until(b"\r\n\r\n")
        c.send(head + first)
        c.end(how, rest)

    up = FakeUpstream(env.pki, script)
    env.apps.append(up)
    port = h.free_port()
    lst = h.outbound_listener("payments", port, up.addr, EXPECT, protocol="http")
    lst.update(listener)
    sc = env.sidecar(h.base_config(env.pki, "web-frontend", workers=1, outbound=[lst]),
                     name="trunc-http-out")
    return up, sc, port


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("how", TRUNCATED)
def test_http_outbound_truncated_response_body_is_never_completed(env, framing, how):
    up, sc, port = _http_out(env, framing, how)
    before = _truncations(sc, "outbound", "payments")
    m0 = hk.scrape(sc)
    start = len(sc.access_log())
    s = socket.create_connection((h.HOST, port), timeout=h.T(h.WAIT_S))
    app = h.addr(s.getsockname()[1])
    try:
        s.sendall(hk.req("GET", "/download"))
        got, end = _read_raw(s, stop=b"0\r\n\r\n")
    finally:
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), got[:200]
    assert end == "reset", (f"the client read {end} after {got!r}: a truncated body must "
                            f"end with a reset")
    assert not body.endswith(b"0\r\n\r\n"), f"a final 0-chunk reached the client: {got!r}"
    if framing == "length":
        assert len(body) < 100, body
    if how == "mid-record":
        assert b"b" not in body.replace(b"\r\n", b""), \
            f"a partial record was passed on: {body!r}"
    e = hk.find_request_line(sc, start=start, app=app)
    assert e is not None, "no access-log line for the request"
    hk.check_http_entry(e)
    assert (e["status"], e["decision"], e["reason"]) == (200, "error", "protocol"), e
    lab = dict(listener="payments", direction="outbound", decision="error", reason="protocol",
               **{"class": "2xx"})
    hk.wait_metric(sc, hk.REQS, lambda v: v == m0.get(hk.REQS, **lab) + 1, **lab)
    _assert_truncation_seen(sc, direction="outbound", listener="payments", side="upstream",
                            addr=up.addr, before=before)
    assert not up.errors, up.errors


def test_http_outbound_close_delimited_body_with_close_notify_stays_complete(env):
    up, sc, port = _http_out(env, "close", "clean")
    start = len(sc.access_log())
    with hk.HttpConn.plain(port) as c:
        c.send(hk.req("GET", "/download"))
        r = c.read_response()
        app = c.peer_addr
    assert r.status == 200 and r.framing == "chunked", (r.status, r.framing)
    assert r.body == b"a" * 40 + b"b" * 30, r.body
    e = hk.find_request_line(sc, start=start, app=app)
    assert e is not None and (e["status"], e["decision"]) == (200, "allow"), e
    assert e["response_bytes"] == 70, e
    _assert_no_truncation(sc, direction="outbound", listener="payments")


def test_http2_client_stream_is_reset_when_the_upstream_truncates(env):
    """An h2c app through an outbound listener whose upstream speaks HTTP/1.1: a
    close-delimited body cut short ends with RST_STREAM, never END_STREAM."""
    up, sc, port = _http_out(env, "close", "mid-record", upstream_protocol="http/1.1")
    before = _truncations(sc, "outbound", "payments")
    m0 = hk.scrape(sc)
    rst = dict(listener="payments", direction="outbound", side="sent", code="INTERNAL_ERROR")
    s = socket.create_connection((h.HOST, port), timeout=h.T(h.WAIT_S))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                            (":authority", "api.payments.svc"), (":path", "/download")],
                      end_stream=True)
    s.sendall(conn.data_to_send())
    events, body = [], b""
    try:
        deadline = time.monotonic() + h.T(h.WAIT_S)
        while not any(isinstance(ev, (h2.events.StreamReset, h2.events.StreamEnded))
                      for ev in events) and time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                events.append(ev)
                if isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            s.sendall(conn.data_to_send())
    finally:
        s.close()
    kinds = [type(ev).__name__ for ev in events]
    assert "ResponseReceived" in kinds, kinds
    assert "StreamEnded" not in kinds, f"the cut body ended as complete: {kinds} {body!r}"
    assert "StreamReset" in kinds, kinds
    assert b"b" not in body, f"a partial record was passed on: {body!r}"
    hk.wait_metric(sc, "portcullis_http2_resets_total",
                   lambda v: v == m0.get("portcullis_http2_resets_total", **rst) + 1, **rst)
    e = sc.wait_for_log(lambda e: e.get("protocol") == "HTTP/2")
    assert e is not None and e["decision"] == "error", e
    _assert_truncation_seen(sc, direction="outbound", listener="payments", side="upstream",
                            addr=up.addr, before=before)


def test_http_outbound_h2_upstream_truncating_a_body_resets_the_client(env):
    """An HTTP/2 upstream (upstream_protocol = "h2") whose DATA is cut mid-record: the
    HTTP/1.1 client (its body chunked, as the upstream sent no content-length) is reset."""
    def script(c: BioTLS) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        c.send(conn.data_to_send())
        sid = None
        while sid is None:
            data = c.read()
            assert data, "the sidecar closed before its request"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    sid = ev.stream_id
            c.send(conn.data_to_send())
        conn.send_headers(sid, [(":status", "200")])
        conn.send_data(sid, b"a" * 40)
        c.send(conn.data_to_send())
        conn.send_data(sid, b"b" * 30)
        c.end("mid-record", conn.data_to_send())

    up = FakeUpstream(env.pki, script, alpn=["h2"])
    env.apps.append(up)
    port = h.free_port()
    lst = h.outbound_listener("payments", port, up.addr, EXPECT, protocol="http")
    lst["upstream_protocol"] = "h2"
    sc = env.sidecar(h.base_config(env.pki, "web-frontend", workers=1, outbound=[lst]),
                     name="trunc-h2-up")
    before = _truncations(sc, "outbound", "payments")
    start = len(sc.access_log())
    s = socket.create_connection((h.HOST, port), timeout=h.T(h.WAIT_S))
    app = h.addr(s.getsockname()[1])
    try:
        s.sendall(hk.req("GET", "/download"))
        got, end = _read_raw(s, stop=b"0\r\n\r\n")
    finally:
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), got[:200]
    assert end == "reset", f"the client read {end} after {got!r}"
    assert b"b" not in body.replace(b"\r\n", b""), f"a partial record was passed on: {body!r}"
    e = hk.find_request_line(sc, start=start, app=app)
    assert e is not None and e["decision"] == "error", e
    assert not up.errors, up.errors
    _assert_truncation_seen(sc, direction="outbound", listener="payments", side="upstream",
                            addr=up.addr, before=before)


# --------------------------------------------------------------------------- HTTP, inbound

@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_http_inbound_peer_truncating_a_request_body_never_completes_it(env, pki, framing):
    app = hk.HttpApp(name="trunc-app")
    env.apps.append(app)
    port = h.free_port()
    sc = env.sidecar(h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http")]),
        name="trunc-http-in")
    before = _truncations(sc, "inbound", "api")
    start = len(sc.access_log())
    if framing == "length":
        head = hk.req("POST", "/upload", [("Content-Length", "100")])
        first, rest = b"a" * 40, b"b" * 30
    else:
        head = hk.req("POST", "/upload", [("Transfer-Encoding", "chunked")])
        first, rest = b"28\r\n" + b"a" * 40 + b"\r\n", b"1e\r\n" + b"b" * 30 + b"\r\n0\r\n\r\n"
    c = BioTLS(socket.create_connection((h.HOST, port)), _peer_ctx(pki), server_side=False)
    local = h.addr(c.sock.getsockname()[1])
    try:
        c.send(head + first)
        c.end("mid-record", rest)
        assert c.wait_closed() == "reset", "the peer was not reset"
    finally:
        c.sock.close()
    e = hk.find_request_line(sc, start=start, peer=local)
    assert e is not None, "no access-log line for the request"
    hk.check_http_entry(e)
    assert (e["status"], e["decision"]) == (0, "error"), e
    _assert_truncation_seen(sc, direction="inbound", listener="api", side="peer", addr=local,
                            before=before)
    assert h.wait_until(lambda: app.closed() == app.count(), h.T(h.WAIT_S))
    for r in app.reqs_since(0):
        assert not r.complete, f"the app got a complete request: {vars(r)}"
        assert b"b" * 30 not in r.body


def test_http_inbound_peer_ending_after_a_whole_request_still_gets_its_answer(env, pki):
    """A FIN without close_notify right after a complete request cut nothing short (Python's
    ssl half-closes exactly so): the request is answered, then the connection ends. Nothing
    is counted as a truncation."""
    app = hk.HttpApp(name="trunc-whole-app")
    env.apps.append(app)
    port = h.free_port()
    sc = env.sidecar(h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http")]),
        name="trunc-http-whole")
    before = _truncations(sc, "inbound", "api")
    start = len(sc.access_log())
    c = BioTLS(socket.create_connection((h.HOST, port)), _peer_ctx(pki), server_side=False)
    local = h.addr(c.sock.getsockname()[1])
    try:
        c.end("boundary", hk.req("GET", "/whole"))
        got = c.read_until(b'"target": "/whole"')
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    finally:
        c.sock.close()
    e = hk.find_request_line(sc, start=start, peer=local)
    assert e is not None and (e["status"], e["decision"]) == (200, "allow"), e
    assert app.nreq() == 1
    assert _truncations(sc, "inbound", "api") == before

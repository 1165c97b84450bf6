"""HTTP/2 abuse on an inbound HTTP listener (README "HTTP/2"): a peer on mTLS with ALPN h2
that floods frames, resets streams as fast as it opens them, makes the sidecar reset
streams for it, never ends a header block, or sends header lists the sidecar refuses.

Contract under test (the sidecar's own counts, per connection):
  * budgets, each 100 + credit + the connection's age in seconds:
      PING (ACKs too) + SETTINGS (non-ACK) + PRIORITY
        + WINDOW_UPDATE + frames of unknown types         credit: streams opened
                                                          + DATA frames sent
      empty DATA frames without END_STREAM                credit: streams opened
        (no data: a frame with only a pad length is as empty)
      client RST_STREAM before the response finished     credit: streams completed
      RST_STREAM nghttp2 sends for the client's mistakes  credit: streams completed
        ("MadeYouReset": a malformed header block, e.g. an uppercase field name)
    Going over one ends the connection: GOAWAY ENHANCE_YOUR_CALM (11), a warn line in the
    server log naming "GOAWAY ENHANCE_YOUR_CALM" and the client's address, and
    portcullis_http2_goaways_sent_total{reason="limit"} + 1. So does nghttp2's own limit
    of 8 CONTINUATION frames per header block.
  * mistakes nghttp2 1.52 makes connection errors at once (WINDOW_UPDATE 0 on a stream,
    DATA after END_STREAM) cannot be repeated: GOAWAY, counted with reason "protocol"
    and logged.
  * per stream: a decoded header list (pseudo-header fields included) over
    http.max_header_bytes (name + value + 4 per field) or http.max_headers fields -> 431
    reason "limit"; :authority != host -> 400 "protocol"; dot-segments in :path -> 400
    "protocol". The app never sees these.
  * SETTINGS: MAX_CONCURRENT_STREAMS = http2.max_concurrent_streams, INITIAL_WINDOW_SIZE =
    http2.stream_window, MAX_HEADER_LIST_SIZE = http.max_header_bytes, and the connection
    window raised to http2.connection_window (defaults 100, 262144, 65536, 1048576).
  * a well-behaved client (PINGs, many requests, a few cancels) is never cut off.

Real clients only: python3-h2 (H2Connection) for well-formed traffic, hyperframe frames and
hpack header blocks written straight onto the TLS socket for the malformed floods. Every
wait is bounded (harness.T scales it for sanitizer builds); no fixed sleeps."""

from __future__ import annotations

import json
import select
import ssl
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2 import events as ev
from hpack import Decoder, Encoder
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

import harness as h
import httpkit as hk

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113 error codes
PROTOCOL_ERROR, CANCEL, ENHANCE_YOUR_CALM = 0x1, 0x8, 0xB
# What a flood sends: far over any budget a connection this young can have (100 + credit +
# age in seconds), far under anything that takes long to write.
FLOOD = 1000
AUTHORITY = "api.payments.svc"

GOAWAYS = "portcullis_http2_goaways_sent_total"
RESETS = "portcullis_http2_resets_total"
ACTIVE = "portcullis_http2_active_streams"
PROTO_REQS = "portcullis_http_protocol_requests_total"

RULES = [
    {"namespace": "web", "service_account": "frontend", "methods": ["GET", "HEAD"],
     "paths": ["/api"]},
    {"namespace": "web", "service_account": "admin"},
]


@pytest.fixture(scope="module")
def abuse(module_env):
    """One sidecar (payments-api, workers=1, default http / http2 limits):
       api   inbound http -> app   allow web-frontend (GET/HEAD /api), web-admin (all)"""
    pki = module_env.pki
    app = hk.HttpApp(name="h2abuse")
    module_env.apps.append(app)
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, RULES, protocol="http")])
    sc = module_env.sidecar(cfg, name="h2abuse")
    return SimpleNamespace(sc=sc, app=app, port=port, pki=pki, listener="api")


# =========================================================================== clients

class Transport:
    """A TLS connection to a sidecar listener that negotiated ALPN h2, non-blocking: sends
    never wait for the sidecar to read (a flood's answers are read meanwhile), reads are
    bounded by the caller's deadline."""

    def __init__(self, port: int, pki: h.PKI, stem: str = "web-admin"):
        ctx = h.client_context(pki, stem)
        ctx.set_alpn_protocols(["h2"])
        self.sock = h.tls_connect(port, ctx, server_hostname=AUTHORITY)
        alpn = self.sock.selected_alpn_protocol()
        if alpn != "h2":
            self.sock.close()
            raise AssertionError(f"ALPN {alpn!r}, expected 'h2'")
        self.peer = h.addr(self.sock.getsockname()[1])  # how the sidecar names this client
        self.sock.setblocking(False)
        self.eof = False
        self.send_error: str | None = None
        self.on_bytes: Callable[[bytes], None] = lambda b: None

    def _recv_once(self, wait: float) -> bool:
        """At most one read (waiting up to `wait` s for it). True if bytes came."""
        if self.eof:
            return False
        if not self.sock.pending():
            r, _, _ = select.select([self.sock], [], [], wait)
            if not r:
                return False
        try:
            b = self.sock.recv(262144)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError, OSError):
            b = b""
        if not b:
            self.eof = True
            return False
        self.on_bytes(b)
        return True

    def send(self, data: bytes, timeout: float = h.WAIT_S) -> bool:
        """Writes all of data, reading whatever arrives meanwhile. False (send_error set)
        once the sidecar has closed: the rest of a flood is then simply not sent."""
        view = memoryview(data)
        sent = 0
        deadline = time.monotonic() + h.T(timeout)
        while sent < len(data) and self.send_error is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"send: {sent}/{len(data)} bytes after {h.T(timeout):.0f}s")
            try:
                sent += self.sock.send(view[sent:sent + 16384])
                continue
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
            except (ssl.SSLError, ConnectionError, OSError) as e:
                self.send_error = f"{type(e).__name__}: {e}"
                break
            self._recv_once(0)
            select.select([self.sock], [self.sock], [], 0.05)
        return self.send_error is None

    def wait(self, pred: Callable[[], bool], timeout: float = h.WAIT_S) -> bool:
        """Reads until pred() holds, the sidecar closes, or timeout (scaled) passes."""
        deadline = time.monotonic() + h.T(timeout)
        while not pred():
            if self.eof or time.monotonic() > deadline:
                return pred()
            self._recv_once(0.05)
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def nv(method: str, path: str, authority: str, extra=()) -> list[tuple]:
    """A request header list for hpack, every field never-indexed (sensitive): the sidecar's
    HPACK decoder and ours can never disagree about a dynamic table, however many header
    blocks of a flood it skipped."""
    fields = [(":method", method), (":scheme", "https"), (":path", path),
              (":authority", authority), *extra]
    return [(n, v, True) for (n, v) in fields]


class RawH2:
    """HTTP/2 frame by frame: whatever we write (hyperframe frames, hpack blocks, raw bytes)
    goes onto the socket as is; every frame the sidecar sends is parsed (hyperframe) and
    kept, header blocks decoded in order (hpack)."""

    def __init__(self, port: int, pki: h.PKI, stem: str = "web-admin"):
        self.t = Transport(port, pki, stem)
        self.t.on_bytes = self._feed
        self.peer = self.t.peer
        self.authority = f"{AUTHORITY}:{port}"
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.heads: list[tuple[int, list[tuple[str, str]]]] = []  # (stream, decoded fields)
        self._block = bytearray()
        self.enc, self.dec = Encoder(), Decoder()
        self.t.send(PREFACE + SettingsFrame(0).serialize())

    def _feed(self, b: bytes) -> None:
        self.buf += b
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            f, length = Frame.parse_frame_header(memoryview(bytes(self.buf[:9])))
            f.parse_body(memoryview(bytes(self.buf[9:9 + length])))
            del self.buf[:9 + length]
            self.frames.append(f)
            if isinstance(f, (HeadersFrame, ContinuationFrame)):
                self._block += f.data
                if "END_HEADERS" in f.flags:
                    fields = self.dec.decode(bytes(self._block))
                    self.heads.append((f.stream_id, [(str(a), str(b)) for a, b in fields]))
                    self._block.clear()

    def send(self, *frames) -> bool:
        return self.t.send(b"".join(f if isinstance(f, bytes) else f.serialize()
                                    for f in frames))

    def block(self, method: str, path: str, extra=(), authority: str | None = None) -> bytes:
        return self.enc.encode(nv(method, path, authority or self.authority, extra))

    def headers(self, sid: int, method: str, path: str, *, end_stream: bool = True,
                extra=()) -> HeadersFrame:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        return HeadersFrame(sid, self.block(method, path, extra), flags=flags)

    def of(self, kind: type, **attrs) -> list:
        return [f for f in self.frames if isinstance(f, kind)
                and all(getattr(f, k) == v for k, v in attrs.items())]

    def wait(self, pred: Callable[[], bool], timeout: float = h.WAIT_S) -> bool:
        return self.t.wait(pred, timeout)

    def until_goaway(self) -> GoAwayFrame | None:
        self.wait(lambda: bool(self.of(GoAwayFrame)))
        g = self.of(GoAwayFrame)
        return g[0] if g else None

    def summary(self, last: int = 12) -> str:
        kinds: dict[str, int] = {}
        for f in self.frames:
            kinds[type(f).__name__] = kinds.get(type(f).__name__, 0) + 1
        return (f"frames received {kinds}, last: {[repr(f) for f in self.frames[-last:]]}, "
                f"eof={self.t.eof}, send_error={self.t.send_error}")

    def close(self) -> None:
        self.t.close()


@dataclass
class Stream:
    status: int | None = None
    headers: dict = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None     # RST_STREAM error code from the sidecar

    def json(self):
        return json.loads(bytes(self.body))


class H2Peer:
    """A well-formed HTTP/2 client: h2.connection.H2Connection over a Transport. It answers
    the sidecar's SETTINGS and PINGs, gives back every window, and records per stream the
    response, and per connection the PING ACKs and any GOAWAY."""

    def __init__(self, port: int, pki: h.PKI, stem: str = "web-admin", *,
                 validate: bool = True):
        self.t = Transport(port, pki, stem)
        self.peer = self.t.peer
        self.authority = f"{AUTHORITY}:{port}"
        self.h2 = H2Connection(H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=validate,
            normalize_outbound_headers=validate))
        self.streams: dict[int, Stream] = {}
        self.ping_acks: list[bytes] = []
        self.goaway: ev.ConnectionTerminated | None = None
        self.t.on_bytes = self._feed
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.t.send(data)

    def _feed(self, b: bytes) -> None:
        for e in self.h2.receive_data(b):
            s = self.streams.get(getattr(e, "stream_id", None) or 0)
            if isinstance(e, ev.ResponseReceived) and s is not None:
                s.headers = dict(e.headers)
                s.status = int(s.headers[":status"])
            elif isinstance(e, ev.DataReceived):
                if s is not None:
                    s.body += e.data
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, ev.StreamEnded) and s is not None:
                s.ended = True
            elif isinstance(e, ev.StreamReset) and s is not None:
                s.reset = e.error_code
            elif isinstance(e, ev.PingAckReceived):
                self.ping_acks.append(e.ping_data)
            elif isinstance(e, ev.ConnectionTerminated):
                self.goaway = e

    def wait(self, pred: Callable[[], bool], timeout: float = h.WAIT_S) -> bool:
        """As Transport.wait, sending h2's answers (SETTINGS and PING ACKs, WINDOW_UPDATEs)
        as they come up."""
        def step() -> bool:
            self.flush()
            return pred()
        return self.t.wait(step, timeout)

    def request(self, method: str, path: str, extra=(), *, end_stream: bool = True,
                authority: str | None = None, host: str | None = None,
                flush: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "https"), (":path", path),
                  (":authority", authority or self.authority)]
        if host is not None:
            fields.append(("host", host))
        self.h2.send_headers(sid, fields + list(extra), end_stream=end_stream)
        self.streams[sid] = Stream()
        if flush:
            self.flush()
        return sid

    def response(self, sid: int, timeout: float = h.WAIT_S) -> Stream:
        s = self.streams[sid]
        self.wait(lambda: s.ended or s.reset is not None or self.goaway is not None, timeout)
        assert s.ended or s.reset is not None, \
            f"stream {sid}: no complete response within {h.T(timeout):.0f}s " \
            f"(status {s.status}, goaway {self.goaway}, eof {self.t.eof})"
        return s

    def ping(self, data: bytes) -> None:
        self.h2.ping(data)
        self.flush()

    def close(self) -> None:
        self.t.close()


# =========================================================================== checks

@dataclass
class Mark:
    """The sidecar and app state before a test's traffic."""
    metrics: hk.Metrics
    events: int
    log: int
    nreq: int


def mark(env) -> Mark:
    return Mark(hk.scrape(env.sc), env.sc.event_count(), len(env.sc.access_log()),
                env.app.nreq())


def calm_events(env, b: Mark, peer: str) -> list[dict]:
    return [e for e in env.sc.events[b.events:]
            if "GOAWAY ENHANCE_YOUR_CALM" in str(e.get("msg", "")) and peer in str(e.get("msg"))]


def assert_calm(env, b: Mark, c: RawH2) -> GoAwayFrame:
    """The sidecar cut this client off for abuse: GOAWAY ENHANCE_YOUR_CALM first (no other
    GOAWAY before it), then the connection ends; one more limit GOAWAY in the metrics, and
    its warn line in the server log."""
    g = c.until_goaway()
    assert g is not None, f"no GOAWAY within {h.T(h.WAIT_S):.0f}s: {c.summary()}"
    assert g.error_code == ENHANCE_YOUR_CALM, \
        f"GOAWAY error code {g.error_code}, expected ENHANCE_YOUR_CALM (11): {c.summary()}"
    assert c.wait(lambda: c.t.eof), \
        f"the connection is still open {h.T(h.WAIT_S):.0f}s after the GOAWAY: {c.summary()}"
    labels = dict(listener=env.listener, direction="inbound")
    want = b.metrics.get(GOAWAYS, reason="limit", **labels) + 1
    m = hk.wait_metric(env.sc, GOAWAYS, lambda v: v == want, reason="limit", **labels)
    for other in ("protocol", "drain"):
        assert m.get(GOAWAYS, reason=other, **labels) == \
            b.metrics.get(GOAWAYS, reason=other, **labels), m.lines(GOAWAYS)
    e = env.sc.wait_for_event(
        lambda e: "GOAWAY ENHANCE_YOUR_CALM" in str(e.get("msg", ""))
        and c.peer in str(e.get("msg", "")), start=b.events)
    assert e is not None, f"no server-log line with 'GOAWAY ENHANCE_YOUR_CALM' for {c.peer}: " \
                          f"{env.sc.stderr_lines[-5:]}"
    assert e.get("level") == "warn", e
    assert len(calm_events(env, b, c.peer)) == 1, calm_events(env, b, c.peer)
    env.sc.assert_alive()
    return g


def assert_app_untouched(env, b: Mark) -> None:
    got = env.app.reqs_since(b.nreq)
    assert not got, f"the app saw {len(got)} request(s): {[(r.method, r.target) for r in got][:5]}"


def assert_not_cut_off(env, b: Mark, c, what: str) -> None:
    m = hk.scrape(env.sc)
    labels = dict(listener=env.listener, direction="inbound", reason="limit")
    assert m.get(GOAWAYS, **labels) == b.metrics.get(GOAWAYS, **labels), \
        f"{what}: a limit GOAWAY was counted\n{m.lines(GOAWAYS)}"
    assert not calm_events(env, b, c.peer), calm_events(env, b, c.peer)


def pings(n: int, start: int = 0) -> bytes:
    return b"".join(PingFrame(0, opaque_data=(start + i).to_bytes(8, "big")).serialize()
                    for i in range(n))


# =========================================================================== floods

def test_ping_flood_goaway_enhance_your_calm(abuse):
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        c.send(pings(FLOOD))
        g = assert_calm(abuse, b, c)
        assert g.last_stream_id == 0, g
        acks = [f for f in c.of(PingFrame) if "ACK" in f.flags]
        assert len(acks) < FLOOD, f"the sidecar answered all {FLOOD} PINGs: {c.summary()}"
    finally:
        c.close()
    assert_app_untouched(abuse, b)


def test_settings_flood_goaway_enhance_your_calm(abuse):
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        flood = [SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535 + i % 2})
                 for i in range(FLOOD)]
        c.send(*flood)
        assert_calm(abuse, b, c)
        acks = [f for f in c.of(SettingsFrame) if "ACK" in f.flags]
        assert len(acks) < FLOOD + 1, f"the sidecar acknowledged every SETTINGS: {c.summary()}"
    finally:
        c.close()
    assert_app_untouched(abuse, b)


def test_priority_flood_goaway_enhance_your_calm(abuse):
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        c.send(*[PriorityFrame(2 * i + 1, depends_on=0, stream_weight=i % 256)
                 for i in range(FLOOD)])
        assert_calm(abuse, b, c)
    finally:
        c.close()
    assert_app_untouched(abuse, b)


@pytest.mark.parametrize("kind", ["ping-ack", "window-update", "unknown-type"])
def test_other_control_floods_goaway_enhance_your_calm(abuse, kind):
    """Unsolicited PING ACKs, connection WINDOW_UPDATE +1 and frames of an unknown type
    (0xfa, which nghttp2 skips silently) share the control-frame budget."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        if kind == "ping-ack":
            frames = [PingFrame(0, opaque_data=i.to_bytes(8, "big"), flags=["ACK"])
                      for i in range(FLOOD)]
            c.send(*frames)
        elif kind == "window-update":
            c.send(*[WindowUpdateFrame(0, window_increment=1) for _ in range(FLOOD)])
        else:
            unknown = bytes([0, 0, 4, 0xfa, 0, 0, 0, 0, 0]) + b"junk"
            c.send(unknown * FLOOD)
        assert_calm(abuse, b, c)
    finally:
        c.close()
    assert_app_untouched(abuse, b)


def test_ping_settings_priority_share_one_budget(abuse):
    """50 of each kind: none of them alone is over 100, together they are."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        frames = []
        for i in range(50):
            frames += [PingFrame(0, opaque_data=i.to_bytes(8, "big")),
                       SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}),
                       PriorityFrame(2 * i + 1, depends_on=0, stream_weight=15)]
        c.send(*frames)
        assert_calm(abuse, b, c)
    finally:
        c.close()
    assert_app_untouched(abuse, b)


def test_empty_data_flood_goaway_enhance_your_calm(abuse):
    """An upload stream that reached the app, then empty DATA frames without END_STREAM."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        c.send(c.headers(1, "POST", "/upload/empty-data", end_stream=False))
        assert abuse.app.wait_reqs(b.nreq + 1), "the upload's head never reached the app"
        c.send(*[DataFrame(1, b"") for _ in range(FLOOD)])
        g = assert_calm(abuse, b, c)
        assert g.last_stream_id == 1, g
    finally:
        c.close()
    got = abuse.app.reqs_since(b.nreq)
    assert [(r.method, r.target) for r in got] == [("POST", "/upload/empty-data")], got


def test_padding_only_data_flood_goaway_enhance_your_calm(abuse):
    """The same flood with DATA frames that carry no data, only a pad length of 0 (PADDED,
    frame length 1): as empty as the frames above, for the client and the sidecar alike."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        c.send(c.headers(1, "POST", "/upload/padded-data", end_stream=False))
        assert abuse.app.wait_reqs(b.nreq + 1), "the upload's head never reached the app"
        c.send(*[DataFrame(1, b"", flags=["PADDED"], pad_length=0) for _ in range(FLOOD)])
        assert_calm(abuse, b, c)
    finally:
        c.close()
    got = abuse.app.reqs_since(b.nreq)
    assert [(r.method, r.target) for r in got] == [("POST", "/upload/padded-data")], got


def test_rapid_reset_goaway_enhance_your_calm(abuse):
    """CVE-2023-44487: open a stream, cancel it at once, FLOOD times over."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    last = 2 * FLOOD - 1
    try:
        frames = []
        for sid in range(1, last + 1, 2):
            frames += [c.headers(sid, "GET", f"/rr/{sid}"), RstStreamFrame(sid, error_code=CANCEL)]
        c.send(*frames)
        g = assert_calm(abuse, b, c)
    finally:
        c.close()
    assert g.last_stream_id < last, f"every stream was taken: {g}"
    processed = (g.last_stream_id + 1) // 2
    got = abuse.app.reqs_since(b.nreq)
    # A stream reset at once may or may not have reached the app; none past the GOAWAY may.
    assert len(got) <= processed, (len(got), processed)
    assert all(int(r.target.rsplit("/", 1)[1]) <= g.last_stream_id for r in got), \
        [r.target for r in got if int(r.target.rsplit("/", 1)[1]) > g.last_stream_id][:5]
    m = hk.scrape(abuse.sc)
    lab = dict(listener=abuse.listener, direction="inbound", side="received", code="CANCEL")
    assert m.get(RESETS, **lab) - b.metrics.get(RESETS, **lab) > 100, m.lines(RESETS)


def made_you_reset(c: RawH2, extra: list[tuple[str, str]], per: int = 25) -> None:
    """Streams whose header block is malformed, `per` at a time, each round waiting for the
    sidecar's resets: an attacker who keeps under MAX_CONCURRENT_STREAMS (a stream nghttp2
    resets stays open until that RST_STREAM is written). Up to FLOOD streams."""
    sid = 1
    for _ in range(FLOOD // per):
        batch = set(range(sid, sid + 2 * per, 2))
        sid += 2 * per
        if not c.send(*[c.headers(s, "GET", f"/myr/{s}", extra=extra) for s in sorted(batch)]):
            return
        if not c.wait(lambda: bool(c.of(GoAwayFrame))
                      or {f.stream_id for f in c.of(RstStreamFrame)} >= batch):
            return
        if c.of(GoAwayFrame):
            return


@pytest.mark.parametrize("extra", [
    [("X-Upper", "1")],                 # uppercase field name
    [("connection", "keep-alive")],     # connection-specific field (RFC 9113 8.2.2)
    [("te", "gzip")],                   # te other than "trailers"
], ids=["uppercase-name", "connection-field", "te-gzip"])
def test_made_you_reset_goaway_enhance_your_calm(abuse, extra):
    """MadeYouReset: a malformed header block makes nghttp2 reset the stream
    (PROTOCOL_ERROR) for the client. Past 100 (+ streams completed) such resets: GOAWAY."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        made_you_reset(c, extra)
        g = assert_calm(abuse, b, c)
        taken = [f for f in c.of(RstStreamFrame) if f.stream_id <= g.last_stream_id]
        assert len(taken) > 100, f"expected the sidecar's resets first: {c.summary()}"
        assert {f.error_code for f in taken} == {PROTOCOL_ERROR}, c.summary()
        assert g.last_stream_id < 2 * FLOOD - 1, g
    finally:
        c.close()
    assert_app_untouched(abuse, b)
    m = hk.scrape(abuse.sc)
    lab = dict(listener=abuse.listener, direction="inbound", side="sent", code="PROTOCOL_ERROR")
    assert m.get(RESETS, **lab) - b.metrics.get(RESETS, **lab) > 100, m.lines(RESETS)


@pytest.mark.parametrize("kind", ["window-update-0", "data-after-end-stream"])
def test_stream_mistakes_nghttp2_makes_connection_errors(abuse, kind):
    """Two other mistakes that could have made the sidecar reset streams: WINDOW_UPDATE 0 on
    an open stream, DATA after END_STREAM. nghttp2 1.52 answers either with a connection
    error at once (GOAWAY PROTOCOL_ERROR / STREAM_CLOSED), so neither can be repeated on
    one connection. That GOAWAY is one the sidecar sent for a protocol error: reason
    "protocol" in the metrics, not "limit". The requests are ones the policy refuses."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki, stem="web-frontend")
    try:
        if kind == "window-update-0":
            c.send(c.headers(1, "POST", "/wu0", end_stream=False),
                   WindowUpdateFrame(1, window_increment=0))
            want = PROTOCOL_ERROR
        else:
            c.send(c.headers(1, "POST", "/data-after-end", end_stream=True),
                   DataFrame(1, b"late"))
            want = 0x5   # STREAM_CLOSED
        g = c.until_goaway()
        assert g is not None and g.error_code == want, c.summary()
        assert c.wait(lambda: c.t.eof), f"still open after the GOAWAY: {c.summary()}"
    finally:
        c.close()
    assert_app_untouched(abuse, b)
    labels = dict(listener=abuse.listener, direction="inbound")
    want_n = b.metrics.get(GOAWAYS, reason="protocol", **labels) + 1
    m = hk.wait_metric(abuse.sc, GOAWAYS, lambda v: v == want_n, reason="protocol", **labels)
    assert m.get(GOAWAYS, reason="limit", **labels) == \
        b.metrics.get(GOAWAYS, reason="limit", **labels), m.lines(GOAWAYS)


def test_continuation_flood_goaway_enhance_your_calm(abuse):
    """CVE-2024-27316 class: one header block in HEADERS + 100 CONTINUATION frames, never
    ended. nghttp2 allows 8 CONTINUATION frames per block."""
    b = mark(abuse)
    c = RawH2(abuse.port, abuse.pki)
    try:
        first = c.block("GET", "/continuation")
        pieces = [c.enc.encode([(f"x-cont-{i:03d}", "v" * 64, True)]) for i in range(100)]
        frames = [HeadersFrame(1, first, flags=["END_STREAM"])]
        frames += [ContinuationFrame(1, p) for p in pieces]
        c.send(*frames)
        assert_calm(abuse, b, c)
        assert not c.heads, f"a response to the unfinished header block: {c.heads}"
    finally:
        c.close()
    assert_app_untouched(abuse, b)
    lines = [e for e in abuse.sc.access_log()[b.log:] if e.get("peer") == c.peer]
    assert all(e["status"] == 0 and e["decision"] == "error" for e in lines), lines


# =========================================================================== per-stream refusals

def assert_refusal(env, b: Mark, c: H2Peer, sid: int, status: int, reason: str,
                   path: str) -> None:
    """The sidecar answered stream sid itself (JSON), logged it, the app saw nothing, and
    the connection goes on: one more request on it reaches the app."""
    s = c.response(sid)
    assert s.reset is None, f"stream {sid} reset ({s.reset}) instead of a {status}"
    assert s.status == status, (s.status, bytes(s.body)[:300])
    assert s.headers.get("content-type", "").startswith("application/json"), s.headers
    body = s.json()
    assert body.get("status") == status and body.get("reason") == reason, body
    assert isinstance(body.get("detail"), str), body
    line = env.sc.wait_for_log(lambda e: e.get("peer") == c.peer and e.get("status") == status,
                               start=b.log)
    assert line is not None, f"no access-log line for {c.peer}: {env.sc.access_log()[b.log:]}"
    assert line["protocol"] == "HTTP/2" and line["reason"] == reason, line
    assert line["decision"] == "deny" and line["path"] == path, line
    assert line["upstream_ms"] is None, line
    assert_app_untouched(env, b)
    ok = c.request("GET", "/after-refusal")
    r = c.response(ok)
    assert r.status == 200, (r.status, bytes(r.body)[:300])
    got = env.app.reqs_since(b.nreq)
    assert [(x.method, x.target) for x in got] == [("GET", "/after-refusal")], got
    assert c.goaway is None, c.goaway


def pseudo(c: H2Peer, path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "https"), (":path", path),
            (":authority", c.authority)]


def size(fields) -> int:
    """The sidecar's count of a header list: name + value + 4 per field."""
    return sum(len(n) + len(v) + 4 for n, v in fields)


def big_fields(c: H2Peer, path: str, total: int) -> list[tuple[str, str]]:
    """Regular fields that make the decoded header list of GET path exactly `total` bytes:
    18 of 3514 (each far under any per-field limit) and one filler."""
    fields = [(f"x-big-{i:04d}", "b" * 3500) for i in range(18)]
    rest = total - size(pseudo(c, path)) - size(fields) - len("x-fill") - 4
    assert rest > 0
    return fields + [("x-fill", "f" * rest)]


@pytest.mark.parametrize("over", [0, 1], ids=["65536-bytes-passes", "65537-bytes-431"])
def test_header_list_bytes_limit(abuse, over):
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki)
    path = f"/header-bytes-{over}"
    try:
        extra = big_fields(c, path, 65536 + over)
        assert size(pseudo(c, path) + extra) == 65536 + over
        sid = c.request("GET", path, extra)
        if over:
            assert_refusal(abuse, b, c, sid, 431, "limit", path)
            return
        s = c.response(sid)
        assert s.status == 200, (s.status, bytes(s.body)[:300])
    finally:
        c.close()
    got = abuse.app.reqs_since(b.nreq)
    assert len(got) == 1 and got[0].hv("x-fill") == [extra[-1][1]], got


@pytest.mark.parametrize("over", [0, 1], ids=["100-fields-pass", "101-fields-431"])
def test_header_fields_limit(abuse, over):
    """http.max_headers (100) fields in the decoded list, its 4 pseudo-header fields
    included."""
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki)
    path = f"/header-fields-{over}"
    try:
        extra = [(f"x-f-{i:03d}", "v") for i in range(96 + over)]
        sid = c.request("GET", path, extra)
        if over:
            assert_refusal(abuse, b, c, sid, 431, "limit", path)
            return
        s = c.response(sid)
        assert s.status == 200, (s.status, bytes(s.body)[:300])
    finally:
        c.close()
    got = abuse.app.reqs_since(b.nreq)
    assert len(got) == 1 and got[0].hv("x-f-095") == ["v"], got


def test_authority_host_mismatch_400(abuse):
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki, validate=False)
    try:
        sid = c.request("GET", "/mismatch", host="evil.example")
        assert_refusal(abuse, b, c, sid, 400, "protocol", "/mismatch")
    finally:
        c.close()


@pytest.mark.parametrize("path", ["/a/../b", "/api/../admin", "/a/%2e%2e/b"])
def test_dot_segment_path_400(abuse, path):
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki)
    try:
        sid = c.request("GET", path)
        assert_refusal(abuse, b, c, sid, 400, "protocol", path)
    finally:
        c.close()


# =========================================================================== settings

def server_settings(c: RawH2, conn_window: int) -> dict[int, int]:
    """The sidecar's first SETTINGS and its connection-window WINDOW_UPDATE."""
    ok = c.wait(lambda: any("ACK" not in f.flags for f in c.of(SettingsFrame))
                and bool(c.of(WindowUpdateFrame, stream_id=0)))
    assert ok, f"no SETTINGS + connection WINDOW_UPDATE from the sidecar: {c.summary()}"
    first = next(f for f in c.frames if isinstance(f, SettingsFrame))
    assert "ACK" not in first.flags, c.summary()
    wu = c.of(WindowUpdateFrame, stream_id=0)
    assert sum(f.window_increment for f in wu) == conn_window - 65535, c.summary()
    return dict(first.settings)


def test_settings_advertise_default_limits(abuse):
    c = RawH2(abuse.port, abuse.pki)
    try:
        got = server_settings(c, 1048576)
    finally:
        c.close()
    want = {SettingsFrame.MAX_CONCURRENT_STREAMS: 100,
            SettingsFrame.INITIAL_WINDOW_SIZE: 262144,
            SettingsFrame.MAX_HEADER_LIST_SIZE: 65536}
    assert {k: got.get(k) for k in want} == want, got


def test_settings_follow_config_and_are_enforced(env, pki):
    """A sidecar with its own http2 group and http.max_header_bytes: the SETTINGS say so,
    a fourth concurrent stream is refused, and 4096 bytes of header list is the limit."""
    app = hk.HttpApp(name="h2tuned")
    env.apps.append(app)
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("tuned", port, app.addr, RULES, protocol="http")],
        extra={"http": {"max_header_bytes": 4096},
               "http2": {"max_concurrent_streams": 3, "stream_window": 70000,
                         "connection_window": 300000}})
    sc = env.sidecar(cfg, name="h2tuned")
    tuned = SimpleNamespace(sc=sc, app=app, port=port, pki=pki, listener="tuned")

    c = RawH2(port, pki)
    try:
        got = server_settings(c, 300000)
        want = {SettingsFrame.MAX_CONCURRENT_STREAMS: 3,
                SettingsFrame.INITIAL_WINDOW_SIZE: 70000,
                SettingsFrame.MAX_HEADER_LIST_SIZE: 4096}
        assert {k: got.get(k) for k in want} == want, got
        # A client that acknowledged them and still opens a fourth stream.
        c.send(SettingsFrame(0, flags=["ACK"]))
        for sid in (1, 3, 5):
            c.send(c.headers(sid, "POST", f"/upload/held-{sid}", end_stream=False))
        assert app.wait_reqs(3), f"the three held uploads did not reach the app: {c.summary()}"
        hk.wait_metric(sc, ACTIVE, lambda v: v == 3, listener="tuned", direction="inbound")
        c.send(c.headers(7, "POST", "/upload/fourth", end_stream=False))
        refused = c.wait(lambda: bool(c.of(RstStreamFrame, stream_id=7)) or any(
            g.last_stream_id < 7 for g in c.of(GoAwayFrame)))
        assert refused, f"the fourth concurrent stream was not refused: {c.summary()}"
        if not c.of(GoAwayFrame):
            # streams 1, 3, 5 go on: each ends and is answered
            c.send(*[DataFrame(sid, b"x", flags=["END_STREAM"]) for sid in (1, 3, 5)])
            assert c.wait(lambda: {s for s, _ in c.heads} >= {1, 3, 5}), c.summary()
            assert all(dict(f)[":status"] == "200" for s, f in c.heads if s in (1, 3, 5)), \
                c.heads
    finally:
        c.close()
    hk.wait_metric(sc, ACTIVE, lambda v: v == 0, listener="tuned", direction="inbound")
    assert sorted(r.target for r in app.reqs_since(0)) == \
        ["/upload/held-1", "/upload/held-3", "/upload/held-5"], \
        [r.target for r in app.reqs_since(0)]

    # http.max_header_bytes = 4096 holds for HTTP/2 too
    b = mark(tuned)
    p = H2Peer(port, pki)
    try:
        sid = p.request("GET", "/over-4k", [("x-a", "a" * 2100), ("x-b", "b" * 2100)])
        assert_refusal(tuned, b, p, sid, 431, "limit", "/over-4k")
    finally:
        p.close()


# =========================================================================== good clients

def test_well_behaved_client_is_not_cut_off(abuse):
    """20 PINGs, 50 requests (10 at a time), a SETTINGS change and 5 cancelled requests the
    app had already received, all on one connection: never a GOAWAY."""
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki)
    try:
        done = []
        for batch in range(5):
            for k in range(4):
                c.ping((batch * 4 + k).to_bytes(8, "big"))
            sids = [c.request("GET", f"/echo/good-{batch}-{i}") for i in range(10)]
            for sid in sids:
                done.append(c.response(sid))
            if batch == 2:
                c.h2.update_settings({SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20})
                c.flush()
        assert [s.status for s in done] == [200] * 50, [s.status for s in done]
        assert all(s.ended and s.reset is None for s in done)
        # cancels of requests in flight (the app holds /silent forever)
        for i in range(5):
            sid = c.request("GET", f"/silent?i={i}")
            assert abuse.app.wait_reqs(b.nreq + 51 + i), f"/silent {i} never reached the app"
            c.h2.reset_stream(sid, error_code=CANCEL)
            c.flush()
        assert c.wait(lambda: len(c.ping_acks) == 20), f"{len(c.ping_acks)} PING ACKs of 20"
        assert sorted(c.ping_acks) == [i.to_bytes(8, "big") for i in range(20)]
        last = c.response(c.request("GET", "/echo/last"))
        assert last.status == 200 and c.goaway is None, (last.status, c.goaway)
        assert not c.t.eof
    finally:
        c.close()
    got = abuse.app.reqs_since(b.nreq)
    assert len(got) == 56, len(got)
    assert_not_cut_off(abuse, b, c, "well-behaved client")
    # lines are written as streams close: wait for the last one before counting
    assert abuse.sc.wait_for_log(lambda e: e.get("peer") == c.peer and e.get("path") == "/echo/last",
                                 start=b.log), "no access-log line for /echo/last"
    lines = abuse.sc.access_log()[b.log:]
    mine = [e for e in lines if e.get("peer") == c.peer and e.get("protocol") == "HTTP/2"]
    assert sum(e.get("status") == 200 for e in mine) == 51, mine[-3:]
    proto = dict(listener="api", direction="inbound", protocol="HTTP/2")
    m = hk.wait_metric(abuse.sc, PROTO_REQS,
                       lambda v: v == b.metrics.get(PROTO_REQS, **proto) + 56, **proto)
    lab = dict(listener="api", direction="inbound", side="received", code="CANCEL")
    assert m.get(RESETS, **lab) - b.metrics.get(RESETS, **lab) == 5, m.lines(RESETS)


def test_budget_credit_grows_with_streams(abuse):
    """The budgets grow with the connection's good work. After 150 completed requests:
    200 PINGs (control frames may be 100 + streams opened) and 200 requests cancelled as
    they are sent (resets may be 100 + streams completed) do not cut the client off; the
    same 200 at the start of a connection would (the PING flood, the rapid reset)."""
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki, stem="web-frontend")   # GET /api only
    try:
        for batch in range(3):
            sids = [c.request("GET", f"/api/credit-{batch}-{i}") for i in range(50)]
            assert all(c.response(sid).status == 200 for sid in sids)
        for i in range(200):
            c.h2.ping(i.to_bytes(8, "big"))
        c.flush()
        assert c.wait(lambda: len(c.ping_acks) == 200 or c.goaway is not None), \
            f"{len(c.ping_acks)} PING ACKs of 200"
        # HEADERS and RST_STREAM of each in one write: the sidecar has not answered any
        # (a 403: the policy refuses POST, so none reaches the app) when its reset comes.
        for i in range(200):
            sid = c.request("POST", f"/api/cancelled-{i}", flush=False)
            c.h2.reset_stream(sid, error_code=CANCEL)
        c.flush()
        last = c.response(c.request("GET", "/api/credit-last"))
        assert last.status == 200, (last.status, bytes(last.body)[:200])
        assert c.goaway is None, c.goaway
    finally:
        c.close()
    got = abuse.app.reqs_since(b.nreq)
    assert len(got) == 151 and all(r.method == "GET" for r in got), len(got)
    assert_not_cut_off(abuse, b, c, "150 streams, then 200 PINGs and 200 cancels")
    lab = dict(listener=abuse.listener, direction="inbound", side="received", code="CANCEL")
    hk.wait_metric(abuse.sc, RESETS, lambda v: v == b.metrics.get(RESETS, **lab) + 200, **lab)


# ======================================================================== smuggling

def test_content_length_with_leading_zeros_smuggles_nothing(abuse):
    """nghttp2 reads every digit of "000...066"; so must the translation, or the head says
    content-length: 0 and the body reaches the app as a second, never-checked request."""
    smuggled = b"DELETE /admin/users/42 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    n = abuse.app.nreq()
    c = RawH2(abuse.port, abuse.pki, stem="web-admin")
    try:
        cl = "0" * 19 + str(len(smuggled))
        c.send(c.headers(1, "POST", "/api/x", end_stream=False, extra=[("content-length", cl)]),
               DataFrame(1, smuggled, flags=["END_STREAM"]))
        assert h.wait_until(lambda: abuse.app.nreq() >= n + 1, h.WAIT_S)
        assert c.wait(lambda: any(getattr(f, "stream_id", 0) == 1 and "END_STREAM" in f.flags
                                  for f in c.of(DataFrame) + c.of(HeadersFrame))), c.summary()
    finally:
        c.close()
    seen = abuse.app.reqs_since(n)
    assert [(r.method, r.path) for r in seen] == [("POST", "/api/x")], \
        [(r.method, r.target) for r in seen]
    assert seen[0].hv("content-length") == [str(len(smuggled))]


def test_connect_over_http2_400(abuse):
    """CONNECT (no :path) is not served over HTTP/2: 400, and the app hears nothing."""
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki, validate=False)
    try:
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", "db.internal:5432")],
                          end_stream=True)
        c.streams[sid] = Stream()
        c.flush()
        assert_refusal(abuse, b, c, sid, 400, "protocol", None)
    finally:
        c.close()


def test_trailers_over_the_limits_refuse_the_request(abuse):
    """Trailers count against http.max_headers too: 101 trailer fields after a body turn
    the request into a 431, and the app never gets a complete request."""
    b = mark(abuse)
    c = H2Peer(abuse.port, abuse.pki)
    try:
        sid = c.request("POST", "/upload/trailers", end_stream=False)
        c.h2.send_data(sid, b"x" * 100)
        c.h2.send_headers(sid, [(f"x-t{i}", "v") for i in range(101)], end_stream=True)
        c.flush()
        s = c.response(sid)
        assert s.reset is None and s.status == 431, (s.status, s.reset, bytes(s.body)[:200])
        assert s.json()["reason"] == "limit"
    finally:
        c.close()
    line = abuse.sc.wait_for_log(lambda e: e.get("path") == "/upload/trailers", start=b.log)
    assert line["status"] == 431 and line["reason"] == "limit" and line["decision"] == "deny"
    seen = abuse.app.reqs_since(b.nreq)
    assert all(not r.complete for r in seen), [(r.method, r.target, r.complete) for r in seen]

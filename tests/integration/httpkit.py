"""HTTP/1.1 helpers for the HTTP-mode integration tests (issue 5, README "HTTP mode").

* HttpApp       -- a threaded HTTP/1.1 server on raw sockets (optionally TLS, then it stands
                   in for an upstream peer sidecar). It parses requests itself (strictly:
                   Content-Length and chunked bodies) and records every TCP connection and
                   every request (headers as a list of (name, value) pairs, duplicates kept,
                   body sha256/length, whether the message was complete).
* HttpConn      -- a client connection (TLS or plain) with a read buffer: send raw bytes,
                   read and parse responses (1xx, Content-Length, chunked, until-close),
                   check that the server closed the connection.
* Metrics       -- one /metrics scrape parsed by prometheus_client.
* assert_refused() -- the checks every sidecar-generated refusal gets: status, JSON body
                   reason word, connection handling, access-log line, metric counter, and
                   that the app saw nothing.

Every loop here is bounded in iterations and/or wall-clock time (harness.T scales).
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client.parser import text_string_to_metric_families

import harness as h

XFCC = "x-forwarded-client-cert"
KEEP_BODY = 1 << 20          # bodies up to this size are kept verbatim (larger: hash only)
MAX_HEAD = 1 << 20           # the app refuses (closes on) heads larger than this
OCTETS = ("content-type", "application/octet-stream")

_pattern_cache: dict[tuple[int, int], bytes] = {}
_pattern_lock = threading.Lock()


def pattern(n: int, seed: int = 0) -> bytes:
    """h.pattern_bytes, cached (64 MiB bodies are generated once per run)."""
    with _pattern_lock:
        key = (n, seed)
        if key not in _pattern_cache:
            if len(_pattern_cache) > 8:
                _pattern_cache.clear()
            _pattern_cache[key] = h.pattern_bytes(n, seed)
        return _pattern_cache[key]


def leaf_der_sha256(pem_path: str) -> str:
    """lowercase hex sha256 of the DER of the FIRST certificate in a PEM file."""
    pem = open(pem_path).read()
    end = "-----END CERTIFICATE-----"
    first = pem[pem.index("-----BEGIN CERTIFICATE-----"): pem.index(end) + len(end)]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [v for (k, v) in headers if k.lower() == name]


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    v = header_values(headers, name)
    return v[0] if v else None


# =========================================================================== app server

class _Closed(Exception):
    """The peer closed (or the server is stopping) in the middle of something."""


GATE_TIMEOUT_S = 30.0


@dataclass
class _Gate:
    arrived: int = 0
    opened_at: float | None = None
    event: threading.Event = field(default_factory=threading.Event)


@dataclass
class HConn:
    id: int
    peer: tuple
    accepted_at: float
    tls: bool = False
    peer_uris: list = field(default_factory=list)     # TLS: client cert URI SANs
    handshake_ok: bool | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    nreq: int = 0
    eof: bool = False
    error: str | None = None
    raw: bytearray = field(default_factory=bytearray)  # first 64 KiB received, for messages
    done: threading.Event = field(default_factory=threading.Event)
    closed_at: float | None = None   # time.monotonic() when the app closed it (set before done)
    tunnel_bytes: int = 0


@dataclass
class HReq:
    conn: int
    seq: int
    method: str
    target: str
    version: str
    headers: list
    at: float
    chunked: bool = False
    content_length: int | None = None
    body_len: int = 0
    body_sha256: str = ""
    body: bytes = b""
    trailers: list = field(default_factory=list)
    complete: bool = False     # the whole message (head + body) arrived and parsed
    error: str | None = None   # parse error of the head or body

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def hv(self, name: str) -> list[str]:
        return header_values(self.headers, name)


class _Reader:
    """Buffered reads from one app-side socket, honouring the server's stop flag."""

    def __init__(self, app: "HttpApp", s: socket.socket, rec: HConn, deadline: float):
        self.app, self.s, self.rec = app, s, rec
        self.buf = bytearray()
        self.deadline = deadline

    def fill(self) -> None:
        while True:
            if self.app._stop.is_set() or time.monotonic() > self.deadline:
                raise _Closed("stopped")
            try:
                b = self.s.recv(262144)
            except (socket.timeout, TimeoutError):
                continue
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
                self.rec.eof = True
                raise _Closed(str(e))
            if not b:
                self.rec.eof = True
                raise _Closed("eof")
            self.rec.bytes_in += len(b)
            if len(self.rec.raw) < 65536:
                self.rec.raw += b[: 65536 - len(self.rec.raw)]
            self.buf += b
            return

    def head(self) -> bytes | None:
        """Bytes up to and including CRLFCRLF; None on a clean EOF between messages."""
        start = 0
        while True:
            i = self.buf.find(b"\r\n\r\n", max(0, start - 3))
            if i >= 0:
                out = bytes(self.buf[: i + 4])
                del self.buf[: i + 4]
                return out
            if len(self.buf) > MAX_HEAD:
                raise ValueError("head too large")
            start = len(self.buf)
            try:
                self.fill()
            except _Closed:
                if not self.buf:
                    return None
                raise

    def line(self, limit: int = 65536) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            if len(self.buf) > limit:
                raise ValueError("line too long")
            self.fill()

    def exact(self, n: int, sink: Callable[[bytes], None]) -> None:
        while n > 0:
            if not self.buf:
                self.fill()
            take = min(n, len(self.buf))
            sink(bytes(self.buf[:take]))
            del self.buf[:take]
            n -= take

    def some(self) -> bytes:
        if not self.buf:
            self.fill()
        out = bytes(self.buf)
        self.buf.clear()
        return out


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """Strict-ish parse of a request head (CRLF lines). Raises ValueError."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0][:200]!r}")
    method, target, version = (p.decode("latin-1") for p in parts)
    hdrs: list[tuple[str, str]] = []
    for ln in lines[1:]:
        if not ln or ln[:1] in (b" ", b"\t") or b":" not in ln:
            raise ValueError(f"bad header line {ln[:200]!r}")
        k, v = ln.split(b":", 1)
        hdrs.append((k.decode("latin-1"), v.strip(b" \t").decode("latin-1")))
    return method, target, version, hdrs


class HttpApp:
    """Threaded HTTP/1.1 app (plain, or TLS when tls_ctx is a server context).

    Per-path behaviour (path = target up to '?'):
      /echo (and any unknown path)  200, JSON summary of the request (all headers, body sha)
      /upload                       same as /echo (reads the whole body first)
      ?pause_ms=N (any path)        waits N ms after the head before reading the body
      /continue                     sends "HTTP/1.1 100 Continue" BEFORE reading the body
                                    (when the request has Expect: 100-continue), then /echo
      /expectfail                   with Expect: 100-continue, answers 417 and closes
                                    without reading the body (else /echo)
      /big?n=BYTES&chunked=1&seed=S pattern body (Content-Length, or chunked 256 KiB chunks;
                                    &whole=1: Content-Length, head and body in one send)
      /ws                           101 Switching Protocols, then echoes raw bytes to EOF
      CONNECT (any target)          200, then echoes raw bytes to EOF
      /double?delay_ms=N            two complete responses ("first", then "SMUGGLED" after
                                    N ms, default 0: in one send)
      /sleep?ms=N                   sleeps, then /echo
      /close                        answers with Connection: close and closes
      /status?code=N                answers N with a small body
      /silent                       reads the request and never answers
      /nolength                     200 without Content-Length/chunked; body ends at close
      /badresp?kind=K               a malformed response (two-cl, cl-alpha, cl-te, bad-chunk,
                                    no-status, nul), then keeps the connection open
      /truncate?n=N&send=M          Content-Length N but only M body bytes, then closes
      /closeafter?ms=N              a normal keep-alive answer, then closes after N ms
      /early                        sends a head (content-length 100) and 5 body bytes
                                    BEFORE reading the request body, then reads it
      /gate?key=K&n=N               holds the request until N requests with key K have
                                    arrived (each on its own connection, as each is held),
                                    then /echo; 500 if that does not happen within
                                    GATE_TIMEOUT_S (scaled). gate_opened(K) = when it opened;
                                    open_gate(K) opens it from the test
    HEAD gets the headers of the GET answer without a body.
    Every response carries x-app-conn (connection id) and x-app-seq (request number on it).
    """

    def __init__(self, *, tls_ctx: ssl.SSLContext | None = None, name: str = "httpapp",
                 host: str = h.HOST, port: int = 0):
        """host/port: where to listen (any 127.x.y.z or ::1 works; port 0 = any)."""
        self.tls_ctx = tls_ctx
        self.host = host
        self.name = name
        self.conns: list[HConn] = []
        self.requests: list[HReq] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._gates: dict[str, _Gate] = {}
        self.lsock = h.listen_socket(host, port, 512)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"{name}-{self.port}")
        self._thread.start()

    @property
    def addr(self) -> str:
        return h.addr(self.port, self.host)

    # -- observation
    def count(self) -> int:
        with self._lock:
            return len(self.conns)

    def nreq(self) -> int:
        with self._lock:
            return len(self.requests)

    def bytes_in(self) -> int:
        with self._lock:
            return sum(c.bytes_in for c in self.conns)

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return len(self.conns), len(self.requests), sum(c.bytes_in for c in self.conns)

    def reqs_since(self, n: int) -> list[HReq]:
        with self._lock:
            return list(self.requests[n:])

    def conns_since(self, n: int) -> list[HConn]:
        with self._lock:
            return list(self.conns[n:])

    def wait_reqs(self, n: int, timeout: float = 10.0) -> bool:
        return bool(h.wait_until(lambda: self.nreq() >= n, h.T(timeout)))

    def closed(self) -> int:
        """How many of its connections the app has seen end."""
        with self._lock:
            return sum(c.done.is_set() for c in self.conns)

    def gate_opened(self, key: str) -> float | None:
        """time.monotonic() at which /gate?key=key opened (None: not yet)."""
        with self._lock:
            g = self._gates.get(key)
        return g.opened_at if g is not None else None

    def open_gate(self, key: str) -> None:
        """Let every request held at /gate?key=key go on (and later ones pass at once)."""
        with self._lock:
            g = self._gates.setdefault(key, _Gate())
            if g.opened_at is None:
                g.opened_at = time.monotonic()
            g.event.set()

    def _gate(self, key: str, n: int) -> bool:
        """Count one arrival at gate key; wait (bounded) until n have arrived."""
        with self._lock:
            g = self._gates.setdefault(key, _Gate())
            g.arrived += 1
            if g.arrived >= n and g.opened_at is None:
                g.opened_at = time.monotonic()
                g.event.set()
        return g.event.wait(h.T(GATE_TIMEOUT_S))

    # -- server
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, peer = self.lsock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            with self._lock:
                rec = HConn(id=len(self.conns), peer=peer, accepted_at=time.monotonic(),
                            tls=self.tls_ctx is not None)
                self.conns.append(rec)
                self._socks.append(s)
            threading.Thread(target=self._serve, args=(s, rec), daemon=True).start()

    def _send(self, s: socket.socket, rec: HConn, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + h.T(120)
        while view:
            if self._stop.is_set() or time.monotonic() > deadline:
                raise _Closed("stopped while sending")
            try:
                n = s.send(view[:262144])
            except (socket.timeout, TimeoutError, ssl.SSLWantWriteError):
                continue
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
                raise _Closed(str(e))
            rec.bytes_out += n
            view = view[n:]

    def _serve(self, s: socket.socket, rec: HConn) -> None:
        try:
            if self.tls_ctx is not None:
                s.settimeout(h.T(5))
                try:
                    s = self.tls_ctx.wrap_socket(s, server_side=True)
                    rec.handshake_ok = True
                    cert = s.getpeercert() or {}
                    rec.peer_uris = [v for (k, v) in cert.get("subjectAltName", ())
                                     if k == "URI"]
                except (ssl.SSLError, OSError) as e:
                    rec.handshake_ok = False
                    rec.error = f"handshake: {e}"
                    return
            s.settimeout(0.2)
            rd = _Reader(self, s, rec, time.monotonic() + h.T(300))
            while not self._stop.is_set():
                if not self._one_request(s, rd, rec):
                    break
        except _Closed:
            pass
        except Exception as e:  # recorded; tests look at it when something is off
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            try:
                s.close()
            except OSError:
                pass
            rec.closed_at = time.monotonic()
            rec.done.set()

    def _one_request(self, s: socket.socket, rd: _Reader, rec: HConn) -> bool:
        """Serve one request; False = close the connection."""
        try:
            head = rd.head()
        except ValueError as e:
            rec.error = str(e)
            return False
        if head is None:
            return False
        seq = rec.nreq
        rec.nreq += 1
        try:
            method, target, version, hdrs = parse_head(head)
        except ValueError as e:
            with self._lock:
                self.requests.append(HReq(rec.id, seq, "?", "?", "?", [], time.monotonic(),
                                          error=str(e)))
            return False
        req = HReq(rec.id, seq, method, target, version, hdrs, time.monotonic())
        with self._lock:
            self.requests.append(req)
        te = [v.lower() for v in req.hv("transfer-encoding")]
        cl = req.hv("content-length")
        if te:
            if te != ["chunked"] or cl:
                req.error = f"bad framing te={te} cl={cl}"
                return False
            req.chunked = True
        elif cl:
            if len(cl) != 1 or not cl[0].isdigit():
                req.error = f"bad content-length {cl}"
                return False
            req.content_length = int(cl[0])
        u = urlsplit(target) if target.startswith("/") else None
        path = u.path if u else target
        q = {k: v[-1] for k, v in parse_qs(u.query).items()} if u else {}
        expect = (header(hdrs, "expect") or "").lower() == "100-continue"

        if method == "CONNECT":
            self._read_body(rd, req)
            self._send(s, rec, b"HTTP/1.1 200 Connection Established\r\n"
                               b"x-app-conn: %d\r\n\r\n" % rec.id)
            self._tunnel(s, rd, rec)
            return False
        if "pause_ms" in q:   # do not read the body for a while (backpressure tests)
            time.sleep(int(q["pause_ms"]) / 1000)
        if path == "/expectfail" and expect:   # refuses the body it was asked about
            self._send(s, rec, b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\n"
                               b"connection: close\r\nx-app-conn: %d\r\n\r\n" % rec.id)
            return False
        if path == "/continue" and expect:
            self._send(s, rec, b"HTTP/1.1 100 Continue\r\n\r\n")
        if path == "/early":   # the response begins before the request body is read
            self._send(s, rec, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n"
                               b"x-app-conn: %d\r\n\r\nearly" % rec.id)
        self._read_body(rd, req)

        conn_hdr = ",".join(req.hv("connection")).lower()
        close = ("close" in conn_hdr) or (version == "HTTP/1.0" and "keep-alive" not in conn_hdr)
        base = [("x-app-conn", str(rec.id)), ("x-app-seq", str(seq))]
        head_only = method == "HEAD"

        if path == "/ws" and (header(hdrs, "upgrade") or "").lower() == "websocket":
            self._send(s, rec, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               b"Connection: Upgrade\r\n"
                               b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                               b"x-app-conn: %d\r\n\r\n" % rec.id)
            self._tunnel(s, rd, rec)
            return False
        if path == "/big":
            n = int(q.get("n", "0"))
            body = pattern(n, int(q.get("seed", "0")))
            if q.get("chunked") == "1":
                self._send(s, rec, self._head(200, base + [("transfer-encoding", "chunked"),
                                                           OCTETS], close))
                if not head_only:
                    step = 256 << 10
                    for off in range(0, n, step):
                        piece = body[off: off + step]
                        self._send(s, rec, b"%x\r\n" % len(piece) + piece + b"\r\n")
                    self._send(s, rec, b"0\r\n\r\n")
            elif q.get("whole") == "1":   # head and body in one send: one read upstream
                self._send(s, rec, self._response(200, body, base + [OCTETS], close, head_only))
            else:
                self._send(s, rec, self._head(200, base + [("content-length", str(n)), OCTETS],
                                              close))
                if not head_only:
                    self._send(s, rec, body)
            return not close
        if path == "/double":
            first = self._response(200, b"first", base, close=False)
            second = self._response(200, b"SMUGGLED", [("x-app-conn", str(rec.id)),
                                                       ("x-app-seq", "smuggled")], close=False)
            delay = int(q.get("delay_ms", "0"))
            if delay:
                self._send(s, rec, first)
                time.sleep(delay / 1000)
                self._send(s, rec, second)
            else:
                self._send(s, rec, first + second)
            return True
        if path == "/silent":
            # never answer; keep the connection until the sidecar closes it
            while True:
                rd.some()
        if path == "/status":
            code = int(q.get("code", "200"))
            if code in (204, 304):     # no body, no Content-Length
                self._send(s, rec, self._head(code, base, close))
                return not close
            self._send(s, rec, self._response(code, b'{"status":%d}' % code,
                                              base + [("content-type", "application/json")],
                                              close, head_only))
            return not close
        if path == "/nolength":
            body = pattern(int(q.get("n", "1000")), 5)
            self._send(s, rec, b"HTTP/1.1 200 OK\r\nx-app-conn: %d\r\nconnection: close\r\n\r\n"
                       % rec.id + body)
            return False
        if path == "/badresp":
            kind = q.get("kind", "two-cl")
            bad = {
                "two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n"
                          b"helloSM",
                "cl-alpha": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
                "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nSM: 1\r\n\r\n",
                "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello"
                             b"\r\n0\r\n\r\n",
                "no-status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
                "nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
            }[kind]
            self._send(s, rec, bad)
            # keep the connection open (as a buggy app would); the sidecar must drop it
            while True:
                rd.some()
        if path == "/truncate":
            n, send = int(q.get("n", "1000")), int(q.get("send", "500"))
            self._send(s, rec, self._head(200, base + [("content-length", str(n))], False)
                       + pattern(n, 6)[:send])
            return False
        if path == "/closeafter":
            # a normal keep-alive answer, then the app closes the idle connection itself
            self._send(s, rec, self._response(200, json.dumps(self.summary(req)).encode(),
                                              base + [("content-type", "application/json")],
                                              False))
            time.sleep(int(q.get("ms", "100")) / 1000)
            return False
        if path == "/sleep":
            time.sleep(int(q.get("ms", "0")) / 1000)
        if path == "/gate" and not self._gate(q.get("key", ""), int(q.get("n", "1"))):
            self._send(s, rec, self._response(500, b"gate timeout", base, True, head_only))
            return False
        if path == "/close":
            close = True
        summary = self.summary(req)
        self._send(s, rec, self._response(200, json.dumps(summary).encode(),
                                          base + [("content-type", "application/json")],
                                          close, head_only))
        return not close

    @staticmethod
    def summary(req: HReq) -> dict:
        return {"conn": req.conn, "seq": req.seq, "method": req.method, "target": req.target,
                "version": req.version, "headers": [list(p) for p in req.headers],
                "chunked": req.chunked, "content_length": req.content_length,
                "body_len": req.body_len, "body_sha256": req.body_sha256,
                "trailers": [list(p) for p in req.trailers]}

    @staticmethod
    def _head(status: int, hdrs: list, close: bool) -> bytes:
        phrase = {200: "OK", 101: "Switching Protocols"}.get(status, "Whatever")
        out = [f"HTTP/1.1 {status} {phrase}"] + [f"{k}: {v}" for k, v in hdrs]
        if close:
            out.append("connection: close")
        return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")

    def _response(self, status: int, body: bytes, hdrs: list, close: bool,
                  head_only: bool = False) -> bytes:
        return self._head(status, hdrs + [("content-length", str(len(body)))], close) + \
            (b"" if head_only else body)

    def _read_body(self, rd: _Reader, req: HReq) -> None:
        hasher = hashlib.sha256()
        kept = bytearray()

        def sink(b: bytes) -> None:
            hasher.update(b)
            req.body_len += len(b)
            if len(kept) < KEEP_BODY:
                kept.extend(b[: KEEP_BODY - len(kept)])

        try:
            if req.chunked:
                for _ in range(10_000_000):
                    line = rd.line(4096)
                    size_s = line.split(b";", 1)[0].strip()
                    if not size_s or any(c not in b"0123456789abcdefABCDEF" for c in size_s):
                        raise ValueError(f"bad chunk size line {line[:100]!r}")
                    size = int(size_s, 16)
                    if size == 0:
                        break
                    rd.exact(size, sink)
                    if rd.line(2) != b"":
                        raise ValueError("no CRLF after chunk data")
                for _ in range(1000):
                    t = rd.line(65536)
                    if t == b"":
                        break
                    k, _, v = t.partition(b":")
                    req.trailers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
            elif req.content_length:
                rd.exact(req.content_length, sink)
        except ValueError as e:
            req.error = str(e)
            req.body_sha256 = hasher.hexdigest()
            req.body = bytes(kept)
            raise _Closed(str(e))
        except _Closed:
            req.body_sha256 = hasher.hexdigest()
            req.body = bytes(kept)
            raise
        req.body_sha256 = hasher.hexdigest()
        req.body = bytes(kept)
        req.complete = True

    def _tunnel(self, s: socket.socket, rd: _Reader, rec: HConn) -> None:
        if rd.buf:   # bytes that followed the head: tunnel data already
            data = rd.some()
            rec.tunnel_bytes += len(data)
            self._send(s, rec, data)
        for _ in range(10_000_000):
            data = rd.some()
            rec.tunnel_bytes += len(data)
            self._send(s, rec, data)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        self._thread.join(h.T(5))
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def tls_server_context(pki: h.PKI, stem: str) -> ssl.SSLContext:
    """A server context like a peer sidecar's: presents pki/<stem>, requires a client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.crt(stem), pki.key(stem))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tcp_states(local_port: int, remote_port: int) -> list[str]:
    """Kernel TCP states (hex, /proc/net/tcp) of 127.0.0.1:local_port -> 127.0.0.1:remote_port."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    out = []
    with open("/proc/net/tcp") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) > 3 and (parts[1], parts[2]) == want:
                out.append(parts[3])
    return out


def wait_other_end_closed(app: "HttpApp", conn_id: int, timeout: float = 10.0) -> bool:
    """After the app closed its connection conn_id, wait (bounded, scaled) until the other end
    (the sidecar) has closed its socket too, i.e. the sidecar noticed: its end of the
    connection is no longer ESTABLISHED or CLOSE_WAIT in the kernel's table."""
    local_port = app.conns[conn_id].peer[1]
    return bool(h.wait_until(
        lambda: not set(_tcp_states(local_port, app.port)) & {"01", "08"}, h.T(timeout)))


# =========================================================================== client

@dataclass
class Resp:
    status: int
    reason: str
    version: str
    headers: list
    head: bytes
    body: bytes | None = b""       # None when the body was too large to keep
    length: int = 0
    sha256: str = ""
    framing: str = ""              # "length" | "chunked" | "close" | "none"
    interim: list = field(default_factory=list)   # 1xx responses seen before this one

    def hv(self, name: str) -> list[str]:
        return header_values(self.headers, name)

    def hdr(self, name: str) -> str | None:
        return header(self.headers, name)

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return any("close" in v.lower() for v in self.hv("connection"))


class PeerClosed(Exception):
    pass


class HttpConn:
    """One client connection (TLS or plain) to a sidecar listener."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.local_port = sock.getsockname()[1]

    @classmethod
    def tls(cls, port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> "HttpConn":
        return cls(h.tls_connect(port, ctx, timeout=timeout))

    @classmethod
    def plain(cls, port: int, timeout: float = 10.0) -> "HttpConn":
        return cls(socket.create_connection((h.HOST, port), timeout=h.T(timeout)))

    @property
    def peer_addr(self) -> str:
        return h.addr(self.local_port)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """sendall that tolerates the server having closed already."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return False

    def _fill(self, deadline: float) -> None:
        if self.eof:
            raise PeerClosed("eof")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no data (have {len(self.buf)} buffered bytes: "
                                   f"{bytes(self.buf[:200])!r})")
            self.sock.settimeout(min(left, 1.0))
            try:
                b = self.sock.recv(262144)
            except (socket.timeout, TimeoutError):
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError):
                b = b""
            except ssl.SSLError as e:
                if "EOF" in str(e) or "UNEXPECTED" in str(e).upper():
                    b = b""
                else:
                    raise
            if not b:
                self.eof = True
                raise PeerClosed("eof")
            self.buf += b
            return

    def _line(self, deadline: float) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            if len(self.buf) > (1 << 20):
                raise AssertionError("response line longer than 1 MiB")
            self._fill(deadline)

    def _exact(self, n: int, deadline: float, sink: Callable[[bytes], None]) -> None:
        while n > 0:
            if not self.buf:
                self._fill(deadline)
            take = min(n, len(self.buf))
            sink(bytes(self.buf[:take]))
            del self.buf[:take]
            n -= take

    def read_response(self, method: str = "GET", timeout: float = 20.0,
                      keep_limit: int = 8 << 20, stop_at_1xx: bool = False) -> Resp:
        """Read one response (following 1xx interim ones unless stop_at_1xx).
        Raises PeerClosed if the connection ends before a status line."""
        deadline = time.monotonic() + h.T(timeout)
        interim = []
        for _ in range(20):
            head_lines = []
            first = self._line(deadline)
            while True:
                ln = self._line(deadline)
                if ln == b"":
                    break
                head_lines.append(ln)
                if len(head_lines) > 1000:
                    raise AssertionError("more than 1000 response header lines")
            parts = first.split(b" ", 2)
            assert len(parts) >= 2 and parts[0] in (b"HTTP/1.1", b"HTTP/1.0"), \
                f"bad status line {first!r}"
            status = int(parts[1])
            hdrs = []
            for ln in head_lines:
                k, _, v = ln.partition(b":")
                hdrs.append((k.decode("latin-1"), v.strip().decode("latin-1")))
            r = Resp(status, parts[2].decode("latin-1") if len(parts) > 2 else "",
                     parts[0].decode(), hdrs, first + b"\r\n" + b"\r\n".join(head_lines))
            if 100 <= status < 200 and status != 101:
                interim.append(r)
                if stop_at_1xx:
                    r.framing = "none"
                    return r
                continue
            r.interim = interim
            self._read_body(r, method, deadline, keep_limit)
            return r
        raise AssertionError("more than 20 interim responses")

    def _read_body(self, r: Resp, method: str, deadline: float, keep_limit: int) -> None:
        hasher = hashlib.sha256()
        kept = bytearray()
        too_big = False

        def sink(b: bytes) -> None:
            nonlocal too_big
            hasher.update(b)
            r.length += len(b)
            if not too_big:
                if len(kept) + len(b) > keep_limit:
                    too_big = True
                    kept.clear()
                else:
                    kept.extend(b)

        te = [v.lower() for v in r.hv("transfer-encoding")]
        cl = r.hv("content-length")
        if method == "HEAD" or r.status in (101, 204, 304) or \
                (method == "CONNECT" and 200 <= r.status < 300):
            r.framing = "none"
        elif te:
            assert te == ["chunked"], f"response transfer-encoding {te}"
            assert not cl, "response has both Content-Length and Transfer-Encoding"
            r.framing = "chunked"
            for _ in range(10_000_000):
                line = self._line(deadline)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                self._exact(size, deadline, sink)
                assert self._line(deadline) == b"", "no CRLF after a response chunk"
            for _ in range(1000):
                if self._line(deadline) == b"":
                    break
        elif cl:
            assert len(set(cl)) == 1, f"response content-length {cl}"
            r.framing = "length"
            self._exact(int(cl[0]), deadline, sink)
        else:
            r.framing = "close"
            for _ in range(10_000_000):
                if self.buf:
                    sink(bytes(self.buf))
                    self.buf.clear()
                try:
                    self._fill(deadline)
                except PeerClosed:
                    break
        r.sha256 = hasher.hexdigest()
        r.body = None if too_big else bytes(kept)

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True if the server closed the connection (EOF / reset) within timeout without
        sending anything more; False if it stayed open or sent more bytes."""
        if self.buf:
            return False
        deadline = time.monotonic() + h.T(timeout)
        try:
            self._fill(deadline)
        except PeerClosed:
            return True
        except TimeoutError:
            return False
        except OSError:
            return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def req(method: str, target: str, headers: list[tuple[str, str]] | None = None,
        body: bytes = b"", host: str | None = "app.local", version: str = "HTTP/1.1",
        length: bool = True) -> bytes:
    """Raw request bytes. Adds Host (unless host is None) and, for a body, Content-Length."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body and length and not any(k.lower() in ("content-length", "transfer-encoding")
                                   for k, _ in headers or []):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(data: bytes, size: int = 1 << 20, trailers: list[tuple[str, str]] = ()) -> bytes:
    out = bytearray()
    for off in range(0, len(data), size):
        piece = data[off: off + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    out += b"0\r\n"
    for k, v in trailers:
        out += f"{k}: {v}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


def send_while_reading(conn: HttpConn, data: bytes, method: str = "POST",
                       timeout: float = 120.0) -> Resp:
    """Send a (large) request while also reading whatever comes back (single thread,
    non-blocking: one SSL object must not be used from two threads), so an early answer
    (an error, or a server that answers before the body ends) cannot deadlock. Then read
    the response."""
    s = conn.sock
    s.setblocking(False)
    view = memoryview(data)
    sent = 0
    deadline = time.monotonic() + h.T(timeout)
    want = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)
    try:
        while sent < len(data):
            if time.monotonic() > deadline:
                raise TimeoutError(f"send_while_reading: sent {sent}/{len(data)}")
            progressed = False
            try:
                n = s.send(view[sent:sent + 262144])
                sent += n
                progressed = n > 0
            except want:
                pass
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                break          # the server stopped reading: its answer tells why
            try:
                b = s.recv(262144)
                if not b:
                    conn.eof = True
                    break
                conn.buf += b
                progressed = True
            except want:
                pass
            except (ConnectionResetError, ssl.SSLError):
                conn.eof = True
                break
            if not progressed:
                select.select([s], [s], [], 0.05)
    finally:
        s.setblocking(True)
    return conn.read_response(method, timeout=max(1.0, deadline - time.monotonic()))


# =========================================================================== metrics

class Metrics:
    """One /metrics scrape, parsed (and thereby validated) by prometheus_client."""

    def __init__(self, text: str):
        self.text = text
        self.samples = [(s.name, dict(s.labels), s.value)
                        for f in text_string_to_metric_families(text) for s in f.samples]

    def get(self, name: str, **labels) -> float:
        return sum(v for (n, lab, v) in self.samples
                   if n == name and all(lab.get(k) == w for k, w in labels.items()))

    def lines(self, prefix: str) -> str:
        return "\n".join(ln for ln in self.text.splitlines() if ln.startswith(prefix))


def scrape(sc: h.Sidecar) -> Metrics:
    r = sc.admin_get("/metrics")
    assert r.status == 200, (r.status, r.text[:300])
    return Metrics(r.text)


def wait_metric(sc: h.Sidecar, name: str, pred: Callable[[float], bool],
                timeout: float = 10.0, **labels) -> Metrics:
    """Scrape until pred(value) (bounded); asserts it."""
    deadline = time.monotonic() + h.T(timeout)
    m = scrape(sc)
    for _ in range(2000):
        if pred(m.get(name, **labels)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        m = scrape(sc)
    assert pred(m.get(name, **labels)), \
        f"{name}{labels} = {m.get(name, **labels)}\n" + m.lines(name)
    return m


REQS = "portcullis_http_requests_total"


# =========================================================================== log + refusal

HTTP_LOG_KEYS = ("listener", "direction", "peer", "app", "peer_id", "method", "path", "status",
                 "decision", "reason", "request_bytes", "response_bytes", "duration_ms",
                 "upstream_ms", "tls_version", "cipher")


def check_http_entry(e: dict) -> None:
    """Schema of one per-request access-log line (README "Access log")."""
    for k in HTTP_LOG_KEYS:
        assert k in e, f"HTTP access-log line lacks {k!r}: {e}"
    assert e["direction"] in ("inbound", "outbound"), e
    assert e["decision"] in ("allow", "deny", "error"), e
    assert isinstance(e["status"], int), e
    if e["status"] == 0:   # no (complete) response: the client or the upstream left
        assert e["decision"] == "error", e
    else:
        assert 100 <= e["status"] <= 599, e
    if e["decision"] == "allow":
        assert e["reason"] is None, e
    else:
        assert e["reason"] is None or isinstance(e["reason"], str), e
    if e["path"] is not None:
        assert "?" not in e["path"], e
    for k in ("request_bytes", "response_bytes"):
        assert isinstance(e[k], int) and e[k] >= 0, e
    assert isinstance(e["duration_ms"], (int, float)) and e["duration_ms"] >= 0, e
    assert e["upstream_ms"] is None or (isinstance(e["upstream_ms"], (int, float))
                                        and e["upstream_ms"] >= 0), e


def status_class(code: int) -> str:
    return f"{code // 100}xx"


@dataclass
class Before:
    """State captured before a request that must be refused."""
    app_snap: tuple
    metrics: Metrics
    log_start: int


def before(sc: h.Sidecar, app: Any) -> Before:
    snap = app.snapshot() if isinstance(app, HttpApp) else (app.count(), 0,
                                                            sum(c.bytes_in for c in app.conns))
    return Before(snap, scrape(sc), len(sc.access_log()))


def find_request_line(sc: h.Sidecar, *, start: int, peer: str | None = None,
                      app: str | None = None, status: int | None = None,
                      timeout: float = 10.0) -> dict | None:
    """The first per-request access-log line (it has a "status" key) for this client."""
    def pred(e: dict) -> bool:
        if "status" not in e:
            return False
        if peer is not None and e.get("peer") != peer:
            return False
        if app is not None and e.get("app") != app:
            return False
        return status is None or e.get("status") == status
    return sc.wait_for_log(pred, timeout=timeout, start=start)


# A deadline test's upper bound: far above the deadline under test (so CPU load cannot push a
# correct sidecar past it), far below the generous deadlines (harness.GENEROUS_MS) that would
# answer if the tested one never fired.
LATE_S = 10


def assert_deadline_fired(what: str, dt: float, deadline_s: float) -> None:
    """dt (seconds from a moment no later than the start of the deadline under test to the
    answer) shows that this deadline answered: not before it (the sidecar cannot fire
    early), and long before the generous deadlines that would answer otherwise."""
    lo, hi = deadline_s * 0.8, h.T(deadline_s + LATE_S)
    assert lo <= dt <= hi, \
        f"{what} after {dt:.2f}s: expected {lo:.2f}..{hi:.2f}s (deadline {deadline_s}s)"


def assert_refused(sc: h.Sidecar, r: Resp | None, b: Before, *, status: int, reason: str,
                   listener: str, app: Any, direction: str = "inbound",
                   conn: HttpConn | None = None, keep_alive: bool = False,
                   decision: str | None = None, method: str | None = None,
                   path: str | None = None, app_untouched: bool = True) -> dict:
    """The full check of a sidecar-generated refusal. `conn` is the client connection:
    its local port identifies the access-log line (peer for inbound, app for outbound)
    and, unless keep_alive, it must be closed by the sidecar after the response."""
    assert r is not None, "no response at all"
    assert r.status == status, f"status {r.status}, expected {status}: {r.head!r} {r.body!r}"
    assert (r.hdr("content-type") or "").startswith("application/json"), r.head
    assert r.body is not None
    try:
        body = json.loads(r.body)
    except ValueError:
        raise AssertionError(f"refusal body is not JSON: {r.body[:300]!r}")
    assert body.get("status") == status, body
    assert body.get("reason") == reason, f"body reason {body.get('reason')!r}, want {reason!r}"
    assert isinstance(body.get("detail"), str), body
    if keep_alive:
        assert not r.closes, f"a {status} here must keep the connection: {r.head!r}"
    else:
        assert r.closes, f"a {status} must carry connection: close: {r.head!r}"
        if conn is not None:
            assert conn.closed_by_peer(10.0), \
                f"connection still open {h.T(10.0):.0f}s after the {status} (expected: closed)"
    # the app saw nothing
    if app_untouched:
        time.sleep(0.15 * h.SCALE)
        now = app.snapshot() if isinstance(app, HttpApp) else (
            app.count(), 0, sum(c.bytes_in for c in app.conns))
        assert now[0] == b.app_snap[0], f"the app got {now[0] - b.app_snap[0]} new connection(s)"
        assert now[1] == b.app_snap[1], \
            f"the app got request(s): {[vars(x) for x in app.reqs_since(b.app_snap[1])][:2]}" \
            if isinstance(app, HttpApp) else "the app got requests"
        assert now[2] == b.app_snap[2], f"the app received {now[2] - b.app_snap[2]} bytes"
    # metric: exactly one more request of this listener/direction/class/reason, refused
    labels = dict(listener=listener, direction=direction, **{"class": status_class(status)},
                  reason=reason)
    want = b.metrics.get(REQS, **labels) + 1
    m = wait_metric(sc, REQS, lambda v: v == want, **labels)
    grew = [lab["decision"] for (n, lab, v) in m.samples
            if n == REQS and all(lab.get(k) == w for k, w in labels.items())
            and v == b.metrics.get(REQS, **lab) + 1]
    assert len(grew) == 1 and grew[0] != "allow", (grew, m.lines(REQS))
    if decision is not None:
        assert grew[0] == decision, (grew, decision)
    # access log
    key = {}
    if conn is not None:
        key = {"peer": conn.peer_addr} if direction == "inbound" else {"app": conn.peer_addr}
    e = find_request_line(sc, start=b.log_start, status=status, **key)
    assert e is not None, f"no access-log line with status {status} for {key}: " \
                          f"{sc.access_log()[b.log_start:][-5:]} (non-JSON stdout lines: " \
                          f"{sc.bad_stdout[-3:]})"
    check_http_entry(e)
    assert e["listener"] == listener and e["direction"] == direction, e
    assert (e["reason"] or "") == reason, e      # null and "" both mean "no reason word"
    assert e["decision"] == grew[0], (e, grew)
    if method is not None:
        assert e["method"] == method, e
    if path is not None:
        assert e["path"] == path, e
    if app_untouched:
        assert e["upstream_ms"] is None, f"upstream_ms set although the app was not used: {e}"
    return e


def exchange(conn: HttpConn, data: bytes, method: str = "GET", timeout: float = 20.0
             ) -> Resp | None:
    """Send raw bytes (tolerating an early close) and read one response; None if the
    connection ended without any response."""
    conn.try_send(data)
    try:
        return conn.read_response(method, timeout=timeout)
    except PeerClosed:
        return None

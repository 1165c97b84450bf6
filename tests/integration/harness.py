"""Integration-test harness for portcullis.

Everything here talks to the REAL binary over real sockets on 127.0.0.1:
no mocks.  Pieces:

* free_port()            -- a TCP port on 127.0.0.1 outside the ephemeral range, free
* AppServer              -- threaded plaintext "local app" (echo / sink / source / hold /
                            custom handler) that records every accepted connection
* TLSUpstream            -- threaded TLS server standing in for a peer sidecar
                            (requires a client cert, records peer cert, SNI, resumption)
* render_config()        -- libconfig text from Python dicts, with a line map
* Sidecar                -- writes a config, starts the binary, parses the JSON access
                            log (stdout) and server events (stderr), stops it with SIGTERM
* client_context() etc.  -- ssl.SSLContext helpers using the dev PKI

Every loop in here is bounded in iterations and/or wall-clock time.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import ssl
import weakref
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PORTCULLIS_BIN", str(REPO / "build" / "portcullis")))
PKI_SCRIPT = REPO / "certs" / "gen-dev-pki.sh"
TRUST_DOMAIN = "cluster.local"
# Multiply every timeout by this (e.g. 3 for ASan/valgrind builds).
SCALE = float(os.environ.get("PORTCULLIS_TIMEOUT_SCALE", "1"))
HOST = "127.0.0.1"
# A deadline in a sidecar config that its test is not about: far beyond anything CPU load or a
# sanitizer build can stretch a handshake, a connect or an app's answer to.
GENEROUS_MS = 60000
# Upper bound (s) for "the deadline under test fired / the sidecar acted promptly": far above
# the short deadlines tests set (a few s at most) plus any delay a loaded machine or a
# sanitizer build adds, far below the deadlines they do not test (GENEROUS_MS). Not scaled: it
# separates orders of magnitude, and T() would push it past those generous deadlines.
PROMPT_S = 20.0
# How long the harness waits by default for something that should happen (a log line, a
# handshake, an admin answer): a bound for when it never does, not an expectation of speed.
WAIT_S = 15.0
# Set (to 1) for ThreadSanitizer builds: a sidecar counts as started only once its admin
# listener has answered, i.e. once the main loop polls. Under TSan a SIGTERM sent between the
# "ready" event and the main loop's first poll was now and then lost (the process never
# drained: about 1 in 60 quick starts and stops, never once the admin had answered), and
# tests that stop a sidecar right after it is ready then hang.
WAIT_ADMIN = os.environ.get("PORTCULLIS_READY_ADMIN", "") not in ("", "0")

# The first line of a sanitizer's report on the sidecar's stderr (ASan and LSan print
# "==PID==ERROR: ...", TSan "WARNING: ThreadSanitizer: ...", UBSan "file:line:col: runtime
# error: ..."). Any such line fails the test (conftest's teardown), even when the test does not
# check the exit code: a sidecar it kills, or one expected to exit non-zero anyway.
SANITIZER_REPORT = re.compile(r"^(==\d+==)?(ERROR|WARNING): (Address|Leak|Thread)Sanitizer:"
                              r"|: runtime error: ")

REASONS = {
    "no_cert", "bad_chain", "expired", "no_spiffe_id", "wrong_trust_domain",
    "not_allowed", "protocol", "cipher", "timeout", "limit",
}
CLOSES = {"eof", "reset", "idle_timeout", "connect_failed", "shutdown", "error", "refused",
          "timeout", "upstream_refused", "peer_alert"}
# issue 3 (hot reload): a connection whose peer is no longer allowed after a reload, or whose
# certificate expired mid-connection, is closed with close "revoked" (SPEC3.md).
CLOSES.add("revoked")
# issue 15 (service names): a connection whose upstream name has never resolved is closed with
# close "unresolved" (decision "error").
CLOSES.add("unresolved")


def T(seconds: float) -> float:
    """A timeout, scaled for slow (sanitizer) builds."""
    return seconds * SCALE


def spiffe(ns: str, sa: str, td: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


# --------------------------------------------------------------------------- ports

sys.path.insert(0, str(REPO / "scripts"))
import portalloc  # noqa: E402


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that nothing else can take before the
    sidecar binds it: it lies outside the kernel's ephemeral range, so no port-0 bind or
    outgoing connection gets it, and no other caller in this run is handed it again
    (scripts/portalloc.py)."""
    return portalloc.take_port()


def addr(port: int, host: str = HOST) -> str:
    """host:port, an IPv6 host in brackets ("[::1]:8080")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host (IPv4 or IPv6 literal; any 127.x.y.z works on Linux
    loopback) and port (0: any)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll pred() until it returns something truthy or timeout (seconds) elapses."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def wait_stalled(progress: Callable[[], int], *, quiet: float, timeout: float,
                 end: int | None = None) -> int:
    """Poll progress() (a growing count) until it stops growing for `quiet` seconds, or
    reaches end, bounded by timeout (scaled). Returns the last value."""
    deadline = time.monotonic() + T(timeout)
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline and (end is None or last < end):
        time.sleep(0.05)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern_bytes(n: int, seed: int = 0) -> bytes:
    """n deterministic, non-repeating-looking bytes (fast: hash-chained blocks)."""
    block = hashlib.sha256(f"portcullis-{seed}".encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    i = 0
    while len(out) < n:
        # vary each 64 KiB block so a misordered/duplicated block changes the hash
        out += i.to_bytes(8, "big") + block[8:]
        i += 1
    return bytes(out[:n])


# --------------------------------------------------------------------------- app server

@dataclass
class AppConn:
    """What the plaintext app saw on one accepted connection."""
    peer: tuple
    accepted_at: float
    bytes_in: int = 0
    bytes_out: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    eof: bool = False            # app read EOF from the sidecar
    error: str | None = None     # exception text if the connection broke
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    data: bytearray = field(default_factory=bytearray)  # only kept when keep_data

    @property
    def sha256_in(self) -> str:
        return self.hasher.hexdigest()


class AppServer:
    """A threaded plaintext TCP server standing in for the local app.

    modes:
      echo        -- echo everything back; close after EOF.
      sink        -- read to EOF, count + sha256, then close (reply with `reply` first if set).
      source      -- send `source_bytes` of pattern data (recording progress), then shut down
                     write; keep reading (counting) until EOF.
      hold        -- accept and never read or write; close when the server stops.
      handler     -- call handler(sock, AppConn) in the connection thread.
    Every accepted connection is recorded in .conns (so a test can assert "no connection").
    """

    def __init__(self, mode: str = "echo", *, source_bytes: int = 0, reply: bytes = b"",
                 handler: Callable[[socket.socket, AppConn], None] | None = None,
                 keep_data: bool = False, port: int | None = None, backlog: int = 1024,
                 host: str = HOST):
        self.mode = mode
        self.host = host
        self.source_bytes = source_bytes
        self.reply = reply
        self.handler = handler
        self.keep_data = keep_data
        self.conns: list[AppConn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.active = 0
        self.max_active = 0
        self.lsock = listen_socket(host, port or 0, backlog)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"app-{mode}-{self.port}")
        self._thread.start()

    @property
    def addr(self) -> str:
        return addr(self.port, self.host)

    def count(self) -> int:
        with self._lock:
            return len(self.conns)

    def wait_conns(self, n: int, timeout: float = WAIT_S) -> bool:
        return bool(wait_until(lambda: self.count() >= n, T(timeout)))

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, peer = self.lsock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            rec = AppConn(peer=peer, accepted_at=time.monotonic())
            with self._lock:
                self.conns.append(rec)
                self._socks.append(s)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            t = threading.Thread(target=self._serve, args=(s, rec), daemon=True)
            t.start()

    def _read_some(self, s: socket.socket, rec: AppConn, n: int = 262144) -> bytes | None:
        """One recv with the stop flag honoured. None = stopped/timeout-loop exit."""
        while not self._stop.is_set():
            try:
                b = s.recv(n)
            except (socket.timeout, TimeoutError):
                continue
            rec.bytes_in += len(b)
            rec.hasher.update(b)
            if self.keep_data:
                rec.data += b
            if not b:
                rec.eof = True
            return b
        return None

    def _send_all(self, s: socket.socket, rec: AppConn, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                n = s.send(view[:262144])
            except (socket.timeout, TimeoutError):
                continue
            rec.bytes_out += n
            view = view[n:]
        return not view

    def _serve(self, s: socket.socket, rec: AppConn) -> None:
        s.settimeout(0.2)
        try:
            if self.mode == "echo":
                while True:
                    b = self._read_some(s, rec)
                    if not b:
                        break
                    if not self._send_all(s, rec, b):
                        break
            elif self.mode == "sink":
                while self._read_some(s, rec):
                    pass
                if self.reply and rec.eof:
                    self._send_all(s, rec, self.reply)
            elif self.mode == "source":
                chunk = pattern_bytes(1 << 20)
                left = self.source_bytes
                while left > 0 and not self._stop.is_set():
                    piece = chunk[: min(left, len(chunk))]
                    if not self._send_all(s, rec, piece):
                        break
                    left -= len(piece)
                if left == 0:
                    s.shutdown(socket.SHUT_WR)
                    while self._read_some(s, rec):
                        pass
            elif self.mode == "hold":
                self._stop.wait(T(120))
            elif self.mode == "handler":
                assert self.handler is not None
                self.handler(s, rec)
            else:
                raise ValueError(self.mode)
        except Exception as e:  # recorded, asserted on by tests
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            try:
                s.close()
            except OSError:
                pass
            rec.closed = True
            with self._lock:
                self.active -= 1
            rec.done.set()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        self._thread.join(T(5))
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()


# --------------------------------------------------------------------------- PKI / TLS helpers

class PKI:
    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def crt(self, stem: str) -> str:
        return str(self.dir / f"{stem}.crt")

    def key(self, stem: str) -> str:
        return str(self.dir / f"{stem}.key")

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")


def client_context(pki: PKI, stem: str | None, *, min_version=ssl.TLSVersion.TLSv1_2,
                   max_version=None, ciphers: str | None = None, verify_server: bool = True
                   ) -> ssl.SSLContext:
    """A TLS client context presenting pki/<stem>.crt (None = no client cert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the SPIFFE ID, not a hostname
    if verify_server:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers:
        ctx.set_ciphers(ciphers)
    if stem is not None:
        ctx.load_cert_chain(pki.crt(stem), pki.key(stem))
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext, *, timeout: float = WAIT_S,
                session: ssl.SSLSession | None = None,
                server_hostname: str | None = "api.payments.svc",
                raw: socket.socket | None = None) -> ssl.SSLSocket:
    """Connect (or take raw, a connected TCP socket) + complete the handshake (client's
    view). Caller closes."""
    raw = raw or socket.create_connection((HOST, port), timeout=T(timeout))
    try:
        s = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session,
                            do_handshake_on_connect=False)
        s.do_handshake()
        return s
    except BaseException:
        raw.close()
        raise


@dataclass
class Refusal:
    """How a TLS client saw a refusal."""
    local_port: int
    stage: str            # "handshake" or "post-handshake"
    error: str            # exception text, "" if clean EOF
    kind: str             # "ssl" | "eof" | "reset"
    got_data: bytes = b""


def attempt_tls(port: int, ctx: ssl.SSLContext, *, probe: bytes = b"ping\n",
                timeout: float = WAIT_S) -> Refusal | ssl.SSLSocket:
    """Try a TLS connection the way a careful client does (TLS 1.3 trap: read after the
    handshake to see the post-handshake alert). Returns the open socket if the server
    actually served the connection (app bytes came back), else a Refusal.
    The probe is sent, then we read: an echo app behind an accepting sidecar returns it.
    """
    raw = socket.create_connection((HOST, port), timeout=T(timeout))
    local_port = raw.getsockname()[1]
    s = ctx.wrap_socket(raw, server_hostname="api.payments.svc", do_handshake_on_connect=False)
    try:
        s.do_handshake()
    except ssl.SSLError as e:
        s.close()
        return Refusal(local_port, "handshake", str(e), "ssl")
    except (ConnectionResetError, BrokenPipeError) as e:
        s.close()
        return Refusal(local_port, "handshake", str(e), "reset")
    except OSError as e:
        s.close()
        return Refusal(local_port, "handshake", str(e), "eof")
    # Handshake looked complete from our side. Read first (alert arrives here in TLS 1.3).
    got = b""
    try:
        try:
            s.sendall(probe)
        except (ssl.SSLError, OSError):
            pass  # a write may fail after the server refused; the read tells us why
        got = s.recv(4096)
        if got:
            return s  # served
        s.close()
        return Refusal(local_port, "post-handshake", "", "eof")
    except ssl.SSLError as e:
        s.close()
        return Refusal(local_port, "post-handshake", str(e), "ssl", got)
    except (ConnectionResetError, BrokenPipeError) as e:
        s.close()
        return Refusal(local_port, "post-handshake", str(e), "reset", got)
    except (socket.timeout, TimeoutError):
        s.close()
        return Refusal(local_port, "post-handshake", "timeout", "timeout", got)


def recv_exact(s: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + T(timeout)
    buf = bytearray()
    while len(buf) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"recv_exact: got {len(buf)} of {n} bytes")
        b = s.recv(min(262144, n - len(buf)))
        if not b:
            raise EOFError(f"recv_exact: EOF after {len(buf)} of {n} bytes")
        buf += b
    return bytes(buf)


def recv_until_eof(s: socket.socket, timeout: float = 10.0, limit: int = 1 << 30) -> bytes:
    deadline = time.monotonic() + T(timeout)
    buf = bytearray()
    while len(buf) < limit:
        if time.monotonic() > deadline:
            raise TimeoutError(f"recv_until_eof: no EOF after {len(buf)} bytes")
        b = s.recv(262144)
        if not b:
            return bytes(buf)
        buf += b
    return bytes(buf)


def openssl_s_client(port: int, *args: str, stdin_data: bytes,
                     until: Callable[[str], bool] = lambda out: False,
                     timeout: float = 20.0) -> subprocess.CompletedProcess:
    """`openssl s_client -connect 127.0.0.1:port ARGS`, fed stdin_data. Its stdin stays open
    until until(stdout + stderr so far) holds (e.g. the echo of stdin_data came back, so any
    session ticket or alert sent before it has arrived too) or s_client exits by itself (a
    refused handshake), at most timeout (scaled) s; then stdin is closed (s_client then ends
    the session) and the whole output collected. (A fixed hold time would be outlasted by a
    loaded machine before the handshake is even done.)"""
    cmd = ["openssl", "s_client", "-connect", addr(port), *args]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    chunks: dict[int, list[bytes]] = {1: [], 2: []}
    lock = threading.Lock()

    def pump(stream, key: int) -> None:
        fd = stream.fileno()
        while True:
            b = os.read(fd, 65536)
            if not b:
                return
            with lock:
                chunks[key].append(b)

    def text(key: int) -> str:
        with lock:
            return b"".join(chunks[key]).decode(errors="replace")

    readers = [threading.Thread(target=pump, args=(p.stdout, 1), daemon=True),
               threading.Thread(target=pump, args=(p.stderr, 2), daemon=True)]
    for t in readers:
        t.start()
    try:
        try:
            p.stdin.write(stdin_data)
            p.stdin.flush()
        except BrokenPipeError:
            pass      # s_client already gone (refused): its output says why
        wait_until(lambda: p.poll() is not None or until(text(1) + text(2)), T(timeout))
        try:
            p.stdin.close()
        except BrokenPipeError:
            pass
        try:
            p.wait(T(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        for t in readers:
            t.join(5)
        for f in (p.stdout, p.stderr):
            f.close()
    return subprocess.CompletedProcess(cmd, p.returncode, text(1), text(2))


# --------------------------------------------------------------------------- TLS upstream

@dataclass
class UpstreamConn:
    peer: tuple
    sni: str | None = None
    handshake_ok: bool = False
    handshake_error: str | None = None
    peer_cert: dict | None = None
    peer_uris: list = field(default_factory=list)
    session_reused: bool | None = None
    version: str | None = None
    bytes_in: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    done: threading.Event = field(default_factory=threading.Event)


class TLSUpstream:
    """A TLS server standing in for the peer sidecar that an outbound listener dials.

    Presents pki/<stem>.crt, requires a client certificate chaining to ca.crt, records
    per connection: SNI, the client's cert / URI SANs, whether the session was resumed,
    plaintext bytes received. mode "echo" echoes, "sink" only reads.
    Session resumption is deliberately ENABLED here (tickets), so a client that offers
    a session would be resumed and session_reused would be True.
    """

    def __init__(self, pki: PKI, stem: str, *, mode: str = "echo",
                 max_version: ssl.TLSVersion | None = None, host: str = HOST, port: int = 0):
        self.mode = mode
        self.host = host
        self.conns: list[UpstreamConn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.crt(stem), pki.key(stem))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if max_version is not None:
            ctx.maximum_version = max_version
        ctx.sni_callback = self._sni
        self.ctx = ctx
        self._sni_by_obj: dict[int, str | None] = {}
        self.lsock = listen_socket(host, port, 128)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return addr(self.port, self.host)

    def _sni(self, sslobj, server_name, ctx):
        self._sni_by_obj[id(sslobj)] = server_name
        return None

    def count(self) -> int:
        with self._lock:
            return len(self.conns)

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                raw, peer = self.lsock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            rec = UpstreamConn(peer=peer)
            with self._lock:
                self.conns.append(rec)
            threading.Thread(target=self._serve, args=(raw, rec), daemon=True).start()

    def _serve(self, raw: socket.socket, rec: UpstreamConn):
        raw.settimeout(T(5))
        s = None
        try:
            s = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            s.do_handshake()
            rec.handshake_ok = True
            rec.sni = self._sni_by_obj.pop(id(s), None)
            rec.peer_cert = s.getpeercert()
            rec.peer_uris = [v for (k, v) in rec.peer_cert.get("subjectAltName", ()) if k == "URI"]
            rec.session_reused = s.session_reused
            rec.version = s.version()
            s.settimeout(0.2)
            deadline = time.monotonic() + T(60)
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    b = s.recv(262144)
                except (socket.timeout, TimeoutError):
                    continue
                if not b:
                    break
                rec.bytes_in += len(b)
                rec.hasher.update(b)
                if self.mode == "echo":
                    s.sendall(b)
        except Exception as e:
            if not rec.handshake_ok:
                rec.handshake_error = f"{type(e).__name__}: {e}"
        finally:
            try:
                (s or raw).close()
            except OSError:
                pass
            rec.done.set()

    def stop(self):
        self._stop.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        self._thread.join(T(5))

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()


# --------------------------------------------------------------------------- config

class Raw(str):
    """A value emitted verbatim into the libconfig file (e.g. a deliberately bad token)."""


def _scalar(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot render {v!r}")


def render_config(cfg: dict) -> tuple[str, dict[str, int]]:
    """Render a dict as libconfig text, one setting per line.

    Returns (text, lines) where lines maps a dotted setting path such as
    "inbound[0].allow[1].namespace" (and group/list paths like "identity",
    "inbound[0]") to its 1-based line number.
    Dicts are groups, lists of dicts are lists `( {..}, {..} )`, lists of scalars are
    arrays `[ a, b ]`.
    """
    out: list[str] = []
    lines: dict[str, int] = {}

    def emit(s: str) -> int:
        out.append(s)
        return len(out)

    def group_body(d: dict, path: str, ind: str):
        for k, v in d.items():
            p = f"{path}.{k}" if path else k
            setting(k, v, p, ind)

    def setting(k: str, v: Any, p: str, ind: str):
        if isinstance(v, dict):
            lines[p] = emit(f"{ind}{k} = {{")
            group_body(v, p, ind + "  ")
            emit(f"{ind}}};")
        elif isinstance(v, list) and (not v or isinstance(v[0], dict)):
            lines[p] = emit(f"{ind}{k} = (")
            list_body(v, p, ind + "  ")
            emit(f"{ind});")
        elif isinstance(v, list):
            lines[p] = emit(f"{ind}{k} = [ " + ", ".join(_scalar(x) for x in v) + " ];")
        else:
            lines[p] = emit(f"{ind}{k} = {_scalar(v)};")

    def list_body(items: list, path: str, ind: str):
        for i, item in enumerate(items):
            p = f"{path}[{i}]"
            lines[p] = emit(f"{ind}{{")
            group_body(item, p, ind + "  ")
            emit(f"{ind}}}" + ("," if i < len(items) - 1 else ""))

    emit("# generated by tests/integration/harness.py")
    group_body(cfg, "", "")
    return "\n".join(out) + "\n", lines


# admin.listen values that base_config() / Sidecar chose by themselves (a fresh free port per
# config). Sidecar.write_config() swaps such a value for the running sidecar's own admin
# address, so a test that builds a new config for SIGHUP does not move the admin listener.
_AUTO_ADMIN: set[str] = set()


def auto_admin_listen(port: int | None = None) -> str:
    """A fresh 127.0.0.1:PORT for admin.listen (every sidecar gets its own admin port, so
    parallel sidecars never collide on the binary's default 127.0.0.1:15000)."""
    a = addr(port if port is not None else free_port())
    _AUTO_ADMIN.add(a)
    return a


def base_config(pki: PKI, identity: str = "payments-api", *, workers: int = 2,
                inbound: Iterable[dict] = (), outbound: Iterable[dict] = (),
                limits: dict | None = None, tls: dict | None = None,
                extra: dict | None = None, admin_port: int | None = None) -> dict:
    """A config dict. admin.listen is always set: to 127.0.0.1:admin_port if given, else to
    a fresh free port, unless extra={"admin": {"listen": ...}} names one (other keys of
    extra["admin"] are merged into the admin group)."""
    # Deadlines a test does not set are generous: a loaded machine or a sanitizer build must
    # never make them fire. A test of one deadline sets that one (small) itself. The drain
    # deadline stays short: it only bounds how long teardown waits for open connections.
    lim = {
        "max_connections": 10000,
        "handshake_timeout_ms": GENEROUS_MS,
        "connect_timeout_ms": GENEROUS_MS,
        "idle_timeout_ms": 10 * GENEROUS_MS,
        "drain_timeout_ms": 1000,
        # Many test modules refuse handshakes from 127.0.0.1 on purpose, dozens within a
        # few seconds on a fast machine: the per-source throttle would then close their
        # later connections at accept. test_admission.py tests it with its own limits.
        "handshake_failures_per_source": 1000000,
    }
    lim.update(limits or {})
    cfg: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "workers": workers,
        "identity": {"cert": pki.crt(identity), "key": pki.key(identity), "ca": pki.ca},
    }
    if tls:
        cfg["tls"] = dict(tls)
    extra = dict(extra or {})
    admin = dict(extra.pop("admin", None) or {})
    if "listen" not in admin:
        admin = {"listen": auto_admin_listen(admin_port), **admin}
    cfg["admin"] = admin
    cfg["log"] = {"level": "info", "access": True}
    cfg["limits"] = lim
    inbound, outbound = list(inbound), list(outbound)
    if inbound:
        cfg["inbound"] = inbound
    if outbound:
        cfg["outbound"] = outbound
    # The HTTP deadlines too, the pool's idle one included (tests count pooled connections);
    # a module that tests one sets its own in extra["http"].
    cfg["http"] = {"request_timeout_ms": GENEROUS_MS, "response_timeout_ms": GENEROUS_MS,
                   "pool_idle_timeout_ms": 10 * GENEROUS_MS,
                   **(extra.pop("http", None) or {})}
    if extra:
        cfg.update(extra)
    return cfg


def admin_port_of(cfg: dict) -> int | None:
    listen = (cfg.get("admin") or {}).get("listen")
    if not isinstance(listen, str) or ":" not in listen:
        return None
    try:
        return int(listen.rsplit(":", 1)[1])
    except ValueError:
        return None


@dataclass
class AdminResponse:
    status: int
    reason: str
    headers: Any          # http.client.HTTPMessage (case-insensitive .get())
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def http_get(port: int, path: str, method: str = "GET", *, timeout: float = WAIT_S,
             headers: dict | None = None, body: bytes | None = None) -> AdminResponse:
    """One HTTP/1.1 request to 127.0.0.1:port with http.client (a new connection each)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=T(timeout))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return AdminResponse(r.status, r.reason, r.headers, data)
    finally:
        conn.close()


def inbound_listener(name: str, listen_port: int, forward: str,
                     allow: list[dict], protocol: str = "tcp") -> dict:
    return {"name": name, "listen": addr(listen_port), "forward": forward,
            "protocol": protocol, "allow": allow}


def outbound_listener(name: str, listen_port: int, upstream: str, expect: list[dict],
                      server_name: str = "api.payments.svc", protocol: str = "tcp") -> dict:
    return {"name": name, "listen": addr(listen_port), "upstream": upstream,
            "server_name": server_name, "expect": expect, "protocol": protocol}


# --------------------------------------------------------------------------- sidecar

class SidecarError(AssertionError):
    pass


class Sidecar:
    live: "weakref.WeakSet[Sidecar]" = weakref.WeakSet()
    created: "list[weakref.ref[Sidecar]]" = []   # every sidecar started, in order (reports)

    """One running portcullis process with a generated config."""

    def __init__(self, workdir: Path, cfg: dict, *, name: str = "sidecar",
                 binary: Path = BIN, ready_timeout: float = 2 * WAIT_S,
                 cmd_prefix: Iterable[str] = (), ready: str = "auto"):
        """ready: how to tell the sidecar is up -- "event" (the stderr "ready" server event),
        "http" (GET /ready on the admin listener answers 200), or "auto" (= "http" when
        log.level is "warn" or "error", which suppress the info-level "ready" event; else
        "event")."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if admin_port_of(cfg) is None and "listen" not in (cfg.get("admin") or {}):
            cfg = dict(cfg)
            cfg["admin"] = {"listen": auto_admin_listen(), **(cfg.get("admin") or {})}
        self.admin_listen: str | None = (cfg.get("admin") or {}).get("listen")
        self.admin_port: int | None = admin_port_of(cfg)
        if ready == "auto":
            level = (cfg.get("log") or {}).get("level", "info")
            ready = "http" if level in ("warn", "error") else "event"
        if ready not in ("event", "http"):
            raise ValueError(f"ready={ready!r}")
        self.ready_mode = ready
        self.cfg = cfg
        self.name = name
        self.conf_path = self.workdir / f"{name}.conf"
        text, self.lines = render_config(cfg)
        self.conf_path.write_text(text)
        # Everything the sidecar prints also goes to files beside its config, so a failed
        # test can name them (conftest adds their paths and tails to the failure report).
        self.stdout_path = self.workdir / f"{name}.access.log"
        self.stderr_path = self.workdir / f"{name}.server.log"
        self._files = {True: open(self.stdout_path, "w", buffering=1),
                       False: open(self.stderr_path, "w", buffering=1)}
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.log: list[dict] = []          # parsed access log (stdout)
        self.events: list[dict] = []       # parsed server events (stderr)
        self.bad_stdout: list[str] = []    # stdout lines that are not JSON objects
        self._cv = threading.Condition()
        self._ready = threading.Event()
        self._stdout_open = threading.Event()  # cleared: stop reading stdout (a stalled pipe)
        self._stdout_open.set()
        self.proc = subprocess.Popen([*cmd_prefix, str(binary), "-c", str(self.conf_path)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._t_out = threading.Thread(target=self._pump, args=(self.proc.stdout, True),
                                       daemon=True)
        self._t_err = threading.Thread(target=self._pump, args=(self.proc.stderr, False),
                                       daemon=True)
        self._t_out.start()
        self._t_err.start()
        self.stopped = False
        # Index of the first access-log entry written during the current test
        # (see conftest's _mark_logs): port-based lookups start there, so an
        # ephemeral client port reused from an earlier test's connection to a
        # module-shared sidecar never matches that older entry.
        self.test_mark = 0
        Sidecar.live.add(self)
        Sidecar.created.append(weakref.ref(self))
        deadline = time.monotonic() + T(ready_timeout)
        while not (self._ready.wait(0.05) if ready == "event" else self._http_ready()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                rc = self.proc.poll()
                self.kill()
                self._t_err.join(2)
                what = "'ready' event" if ready == "event" else "200 from GET /ready"
                raise SidecarError(
                    f"{name}: no {what} within {ready_timeout}s (rc={rc})\n"
                    f"config:\n{text}\nstderr:\n" + "\n".join(self.stderr_lines[-40:]))
        if WAIT_ADMIN and ready == "event" and self.admin_port is not None:
            self._wait_admin_answers(deadline)

    def _wait_admin_answers(self, deadline: float) -> None:
        """Until the admin listener answers anything (see WAIT_ADMIN), the process exits or
        deadline passes; the test then goes on either way and judges what it sees."""
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self.admin_get("/healthz", timeout=0.5)
                return
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)

    def _http_ready(self) -> bool:
        if self.admin_port is None:
            raise SidecarError(f"{self.name}: ready='http' needs admin.listen")
        try:
            r = self.admin_get("/ready", timeout=0.5)
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
            return False
        if r.status != 200:
            time.sleep(0.05)
        return r.status == 200

    # -- admin endpoint (issue 4)
    def admin_get(self, path: str, method: str = "GET", *, timeout: float = WAIT_S,
                  headers: dict | None = None, body: bytes | None = None) -> AdminResponse:
        """One request to this sidecar's admin listener (http.client, new connection)."""
        if self.admin_port is None:
            raise SidecarError(f"{self.name}: no admin.listen in the config")
        return http_get(self.admin_port, path, method, timeout=timeout, headers=headers,
                        body=body)

    # -- output capture
    def pause_stdout(self):
        """Stops reading the sidecar's stdout, as a stalled log collector would: once the
        pipe's buffer is full, the sidecar's writes to it block."""
        self._stdout_open.clear()

    def resume_stdout(self):
        self._stdout_open.set()

    def _pump(self, stream, is_stdout: bool):
        while True:
            if is_stdout:
                self._stdout_open.wait()
            raw = stream.readline()
            if not raw:
                break
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            try:
                self._files[is_stdout].write(line + "\n")
            except (OSError, ValueError):
                pass
            obj = None
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    obj = None
            except ValueError:
                obj = None
            with self._cv:
                if is_stdout:
                    self.stdout_lines.append(line)
                    if obj is None:
                        self.bad_stdout.append(line)
                    else:
                        self.log.append(obj)
                else:
                    self.stderr_lines.append(line)
                    if obj is not None:
                        self.events.append(obj)
                        if obj.get("msg") == "ready":
                            self._ready.set()
                self._cv.notify_all()
        stream.close()
        self._files[is_stdout].close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def access_log(self) -> list[dict]:
        with self._cv:
            return list(self.log)

    def _wait_in(self, entries: list[dict], pred: Callable[[dict], bool], timeout: float,
                 start: int) -> dict | None:
        """First entry of entries (index >= start) matching pred, waiting up to timeout
        for the capture threads to append more."""
        deadline = time.monotonic() + T(timeout)
        with self._cv:
            while True:
                for e in entries[start:]:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(min(left, 0.1))

    def wait_for_log(self, pred: Callable[[dict], bool], timeout: float = WAIT_S,
                     start: int = 0) -> dict | None:
        """First access-log entry (index >= start) matching pred, waiting up to timeout."""
        return self._wait_in(self.log, pred, timeout, start)

    def mark_test_start(self) -> None:
        with self._cv:
            self.test_mark = len(self.log)

    def log_for_peer_port(self, port: int, timeout: float = WAIT_S,
                          start: int | None = None) -> dict | None:
        want = addr(port)
        return self.wait_for_log(lambda e: e.get("peer") == want, timeout,
                                 self.test_mark if start is None else start)

    def log_for_app_port(self, port: int, timeout: float = WAIT_S,
                         start: int | None = None) -> dict | None:
        want = addr(port)
        return self.wait_for_log(lambda e: e.get("app") == want, timeout,
                                 self.test_mark if start is None else start)

    # -- reload helpers (issue 3)
    def write_config(self, cfg: "dict | str") -> str:
        """Replace the config file atomically (rename) with a dict (rendered) or raw text.
        Does not signal; see sighup()."""
        if isinstance(cfg, str):
            text, lines = self._keep_admin_text(cfg), {}
        else:
            cfg = self._keep_admin(cfg)
            text, lines = render_config(cfg)
            self.cfg = cfg
        tmp = self.conf_path.with_name(self.conf_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf_path)
        self.lines = lines
        return text

    def _keep_admin(self, cfg: dict) -> dict:
        """A config for SIGHUP: an admin.listen the harness picked itself (or none at all)
        becomes this sidecar's current admin address; one a test set explicitly stays."""
        listen = (cfg.get("admin") or {}).get("listen")
        if self.admin_listen is None or listen == self.admin_listen:
            return cfg
        if listen is None or listen in _AUTO_ADMIN:
            cfg = dict(cfg)
            cfg["admin"] = {**(cfg.get("admin") or {}), "listen": self.admin_listen}
            return cfg
        self.admin_listen, self.admin_port = listen, admin_port_of(cfg)
        return cfg

    def _keep_admin_text(self, text: str) -> str:
        """Same for raw config text rendered by render_config()."""
        if self.admin_listen is None:
            return text

        def sub(m: "re.Match[str]") -> str:
            return m.group(1) + (self.admin_listen if m.group(2) in _AUTO_ADMIN
                                 else m.group(2)) + m.group(3)
        return re.sub(r'(admin = \{\n\s*listen = ")([^"]*)(";)', sub, text, count=1)

    def sighup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def signal(self, sig: int) -> None:
        """Send a signal (e.g. SIGTERM for a drain test) without waiting."""
        self.proc.send_signal(sig)

    def stop_process(self) -> None:
        """SIGSTOP, then wait (bounded) until every thread of the sidecar has stopped: the
        signal takes effect only when each thread is next scheduled."""
        self.proc.send_signal(signal.SIGSTOP)

        def all_stopped() -> bool:
            task = Path(f"/proc/{self.proc.pid}/task")
            try:
                return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
                           for t in task.iterdir())
            except OSError:
                return False
        if not wait_until(all_stopped, T(WAIT_S)):
            raise SidecarError(f"{self.name}: not stopped {T(WAIT_S):.0f}s after SIGSTOP")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to timeout (scaled) for the process to exit by itself; returns the exit
        code (then output is fully captured and the sidecar counts as stopped) or None."""
        try:
            rc = self.proc.wait(T(timeout))
        except subprocess.TimeoutExpired:
            return None
        self.stopped = True
        self._t_out.join(2)
        self._t_err.join(2)
        return rc

    def event_count(self) -> int:
        with self._cv:
            return len(self.events)

    def events_matching(self, substr: str, start: int = 0) -> list[dict]:
        with self._cv:
            return [e for e in self.events[start:] if substr in str(e.get("msg", ""))]

    def wait_for_event(self, pred: "Callable[[dict], bool] | str", timeout: float = WAIT_S,
                       start: int = 0) -> dict | None:
        """First server event (stderr JSON, index >= start) matching pred -- a callable, or a
        substring of "msg" -- waiting up to timeout (scaled)."""
        if isinstance(pred, str):
            sub = pred
            pred = lambda e: sub in str(e.get("msg", ""))  # noqa: E731
        return self._wait_in(self.events, pred, timeout, start)

    def all_output(self) -> str:
        with self._cv:
            return "\n".join(self.stdout_lines + self.stderr_lines)

    def failure_report(self, tail: int = 25) -> str:
        """Where this sidecar's config and logs are, and their last lines: appended to the
        report of a failed test so that CI output can be read without a rerun."""
        state = "running" if self.alive() else f"exited rc={self.proc.returncode}"
        with self._cv:
            err = self.stderr_lines[-tail:]
            out = self.stdout_lines[-10:]
        return "\n".join([
            f"sidecar {self.name} (pid {self.proc.pid}, {state})",
            f"  config:     {self.conf_path}",
            f"  access log: {self.stdout_path} ({len(self.stdout_lines)} lines)",
            f"  server log: {self.stderr_path} ({len(self.stderr_lines)} lines)",
            f"  last {len(err)} server-log lines:",
            *("    " + ln for ln in err),
            f"  last {len(out)} access-log lines:",
            *("    " + ln for ln in out)])

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def sanitizer_report(self, context: int = 40) -> list[str]:
        """The first sanitizer report in this sidecar's stderr (see SANITIZER_REPORT), up to
        context lines of it; [] if there is none. Once the process has exited, waits (bounded)
        for the capture thread to read the rest of its stderr first."""
        if self.proc.poll() is not None:
            self._t_err.join(5)
        with self._cv:
            lines = list(self.stderr_lines)
        for i, line in enumerate(lines):
            if not line.startswith("{") and SANITIZER_REPORT.search(line):  # not a JSON event
                return lines[i:i + context]
        return []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self):
        if not self.alive():
            raise SidecarError(f"{self.name} died rc={self.proc.returncode}; stderr tail:\n"
                               + "\n".join(self.stderr_lines[-30:]))

    def stop(self, timeout: float = 10.0, expect_rc: int | None = 0) -> int:
        """SIGTERM, wait (bounded), then SIGKILL. Asserts the exit code if expect_rc set."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        self.resume_stdout()  # a paused reader would hold the exit's final log writes
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(T(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            self._t_out.join(2)
            self._t_err.join(2)
            raise SidecarError(f"{self.name}: did not exit within {timeout}s of SIGTERM")
        self._t_out.join(2)
        self._t_err.join(2)
        if expect_rc is not None and rc != expect_rc:
            raise SidecarError(f"{self.name}: exit code {rc} after SIGTERM, expected "
                               f"{expect_rc}; stderr tail:\n" + "\n".join(self.stderr_lines[-30:]))
        return rc

    def kill(self):
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *a):
        if exc_type is None:
            self.stop()
        else:
            try:
                self.stop(expect_rc=None)
            except SidecarError:
                pass


def check_access_entry(e: dict) -> None:
    """Schema check of one access-log entry per SPEC.md."""
    for k in ("time", "listener", "direction", "peer", "app", "peer_id", "decision",
              "reason", "close", "bytes_from_peer", "bytes_to_peer", "duration_ms",
              "tls_version", "cipher"):
        assert k in e, f"access log entry lacks {k!r}: {e}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]), e["time"]
    assert e["direction"] in ("inbound", "outbound"), e
    assert e["decision"] in ("allow", "deny", "error"), e
    assert e["reason"] is None or e["reason"] in REASONS, e
    if e["decision"] == "allow":
        assert e["reason"] is None, e
    if e["decision"] == "deny":
        assert e["reason"] in REASONS, e
    assert e["close"] in CLOSES, e
    assert isinstance(e["bytes_from_peer"], int) and e["bytes_from_peer"] >= 0, e
    assert isinstance(e["bytes_to_peer"], int) and e["bytes_to_peer"] >= 0, e
    assert isinstance(e["duration_ms"], (int, float)) and e["duration_ms"] >= 0, e


def encrypt_key(src: str, out: Path, passphrase: str) -> Path:
    """Writes src (a PEM private key) to out as encrypted PKCS#8 (AES-256-CBC, PBKDF2),
    the at-rest form identity.key_passphrase_file unlocks. Returns out."""
    passfile = out.with_name(out.name + ".openssl-pass")
    passfile.write_text(passphrase + "\n")
    r = subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", src,
                        "-out", str(out), "-passout", f"file:{passfile}"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    passfile.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"openssl pkcs8 failed: {r.stderr}")
    return out


def gtime(epoch: float) -> str:
    """epoch as the YYYYMMDDHHMMSSZ time `gen-dev-pki.sh --leaf` and `openssl ca` take."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(int(epoch)))


def mint_leaf(pki: PKI, out: Path, stem: str, ns: str, sa: str,
              end: float) -> tuple[str, str]:
    """A leaf for ns/sa signed by the session CA, valid from an hour ago until end, written
    to out/stem.crt and out/stem.key; returns those two paths."""
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["bash", str(PKI_SCRIPT), "--leaf", str(out), pki.ca,
                        str(pki.dir / "ca.key"), stem, ns, sa, TRUST_DOMAIN,
                        gtime(time.time() - 3600), gtime(end)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return str(out / f"{stem}.crt"), str(out / f"{stem}.key")


def not_after(crt: str) -> float:
    """A certificate file's notAfter, as epoch seconds."""
    r = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", crt],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return ssl.cert_time_to_seconds(r.stdout.strip().split("=", 1)[1])


def run_binary(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True,
                          timeout=T(timeout), stdin=subprocess.DEVNULL)


def duplex(s: socket.socket, data: bytes, expect: int, timeout: float = 60.0,
           shutdown_after_send: bool = False) -> tuple[int, str]:
    """Send `data` while concurrently receiving `expect` bytes on one (TLS or plain)
    socket, single-threaded and non-blocking. Returns (bytes_received, sha256 hex)."""
    old_timeout = s.gettimeout()
    s.setblocking(False)
    view = memoryview(data)
    sent = got = 0
    hasher = hashlib.sha256()
    want_block = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)
    deadline = time.monotonic() + T(timeout)
    shut = False
    try:
        while got < expect or sent < len(data):
            if time.monotonic() > deadline:
                raise TimeoutError(f"duplex: sent {sent}/{len(data)} got {got}/{expect}")
            progressed = False
            if sent < len(data):
                try:
                    n = s.send(view[sent:sent + 65536])
                    sent += n
                    progressed = n > 0
                except want_block:
                    pass
            elif shutdown_after_send and not shut:
                s.shutdown(socket.SHUT_WR)
                shut = True
            if got < expect:
                try:
                    b = s.recv(262144)
                    if not b:
                        raise EOFError(f"duplex: EOF after {got}/{expect} bytes "
                                       f"(sent {sent}/{len(data)})")
                    got += len(b)
                    hasher.update(b)
                    progressed = True
                except want_block:
                    pass
            if not progressed:
                select.select([s] if got < expect else [],
                              [s] if sent < len(data) else [], [], 0.05)
    finally:
        s.settimeout(old_timeout)
    return got, hasher.hexdigest()


def chain_configs(pki: PKI, app_addr: str, *, client_identity: str = "web-frontend",
                  allow: list[dict] | None = None, limits: dict | None = None,
                  workers: int = 2) -> tuple[dict, dict, int, int]:
    """Configs for  app-client -> [outbound sidecar, client_identity] -> mTLS ->
    [inbound sidecar, payments-api, allow web] -> app.
    Returns (inbound_cfg, outbound_cfg, inbound_port, outbound_port)."""
    in_port, out_port = free_port(), free_port()
    in_cfg = base_config(pki, "payments-api", workers=workers, limits=limits, inbound=[
        inbound_listener("api", in_port, app_addr, allow or [{"namespace": "web"}])])
    out_cfg = base_config(pki, client_identity, workers=workers, limits=limits, outbound=[
        outbound_listener("payments", out_port, addr(in_port),
                          [{"namespace": "payments", "service_account": "api"}])])
    return in_cfg, out_cfg, in_port, out_port


class BioTLSClient:
    """A TLS client over ssl.MemoryBIO, so the test controls close_notify exactly:
    send_close_notify() half-closes (TLS close_notify, TCP stays open for reading),
    which SSLSocket cannot do."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 10.0):
        self.sock = socket.create_connection((HOST, port), timeout=T(timeout))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="api.payments.svc")
        self.deadline_s = T(timeout)
        self.peer_closed = False
        self._do(self.obj.do_handshake)

    def _flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self):
        b = self.sock.recv(262144)
        if b:
            self.inc.write(b)
        else:
            self.inc.write_eof()

    def _do(self, fn, *a):
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            try:
                r = fn(*a)
                self._flush()
                return r
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        raise TimeoutError(f"BioTLSClient: {fn.__name__} did not complete")

    def sendall(self, data: bytes):
        view = memoryview(data)
        while view:
            n = self._do(self.obj.write, view[:65536])
            view = view[n:]

    def recv(self, n: int = 262144) -> bytes:
        """b"" once the peer's close_notify (or TCP EOF) arrived."""
        if self.peer_closed:
            return b""
        try:
            b = self._do(self.obj.read, n)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            b = b""
        if not b:
            self.peer_closed = True
        return b

    def recv_until_close(self, limit: int = 1 << 28) -> bytes:
        buf = bytearray()
        while len(buf) < limit:
            b = self.recv()
            if not b:
                return bytes(buf)
            buf += b
        raise AssertionError("recv_until_close: limit reached")

    def send_close_notify(self):
        try:
            self.obj.unwrap()          # sends close_notify, then wants the peer's
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLError):
            pass
        self._flush()

    def close(self):
        self.sock.close()


def plain_connect_bound(port: int, timeout: float = 10.0) -> tuple[socket.socket | None, int]:
    """Plain TCP connect with the local port fixed before connecting, so the caller
    knows it even when the peer resets so fast that connect() itself reports
    ECONNRESET. Returns (socket or None if reset during connect, local port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    local_port = s.getsockname()[1]
    s.settimeout(T(timeout))
    try:
        s.connect((HOST, port))
    except ConnectionResetError:
        s.close()
        return None, local_port
    return s, local_port

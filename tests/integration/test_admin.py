"""Issue 4: the admin listener, Prometheus metrics and graceful drain, against the real
binary with real clients (http.client, raw sockets, Python ssl, Debian's
python3-prometheus-client parser). Contract: /tmp/pc/SPEC4.md.

  1. /healthz, /ready, 404, 405 + Allow, 400 for malformed heads, 431 for a 20 KiB header,
     408 (or close) for a head that never completes, HEAD without a body.
  2. /metrics: parsed by prometheus_client; build info, generation, own-cert expiry, exact
     connection / byte / handshake counts after known traffic (allowed and refused, inbound
     and outbound), the active-connection gauge, reload counters.
  3. /config: the effective config (explicit values and defaults); with an encrypted key the
     passphrase and the key's PEM body appear nowhere (admin responses, stdout, stderr).
  4. /certs: serial and SHA-256 fingerprint as openssl prints them, the bundle, generation.
  5. Drain on SIGTERM: /ready 503 at once, new connections refused, open streams keep
     working until the deadline, then close "shutdown" and exit 0; early exit once the last
     connection ends; a second SIGTERM or a SIGINT exits at once.
  6. log.access = false and log.level = "error" (readiness then comes from GET /ready).

Every loop is bounded in count and time.
"""

from __future__ import annotations

import calendar
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness as h

# Debian's python3-prometheus-client (scripts/install-deps.sh installs it). A missing
# parser is an install bug: fail at collection rather than skip the metrics tests.
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from test_reload import Minter  # noqa: E402  (test-side leaf minting, `openssl ca`)


HANDSHAKE_BUCKETS = ["0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
                     "0.5", "1.0", "2.5", "5.0", "+Inf"]
DEFAULT_CIPHERS = {f"ECDHE-{a}-{c}" for a in ("ECDSA", "RSA")
                   for c in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")}
DRAIN_LONG_MS = 60000


# ===================================================================== helpers

def _run(cmd: list[str], timeout: float = 30.0) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed rc={r.returncode}\n{r.stderr}")
    return r.stdout


def openssl_facts(pem_path: str) -> dict:
    """serial (uppercase hex), sha256 (lowercase hex, no colons), not_after / not_before
    (unix seconds) of the first certificate in pem_path, as the openssl CLI prints them."""
    out = _run(["openssl", "x509", "-in", pem_path, "-noout", "-serial", "-fingerprint",
                "-sha256", "-startdate", "-enddate"])
    serial = re.search(r"^serial=([0-9A-Fa-f]+)$", out, re.M).group(1).upper()
    fp = re.search(r"^sha256 Fingerprint=([0-9A-Fa-f:]+)$", out, re.M | re.I).group(1)

    def when(field: str) -> int:
        v = re.search(rf"^{field}=(.+)$", out, re.M).group(1).strip()
        return calendar.timegm(time.strptime(v, "%b %d %H:%M:%S %Y %Z"))

    return {"serial": serial, "sha256": fp.replace(":", "").lower(),
            "not_after": when("notAfter"), "not_before": when("notBefore")}


def rfc3339_to_epoch(s: str) -> int:
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", s)
    assert m, f"not an RFC3339 UTC time: {s!r}"
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))


class Metrics:
    """One /metrics scrape, parsed (and thereby validated) by prometheus_client."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [(s.name, dict(s.labels), s.value)
                        for f in self.families.values() for s in f.samples]

    def find(self, name: str, **labels) -> list[tuple[str, dict, float]]:
        return [s for s in self.samples
                if s[0] == name and all(s[1].get(k) == v for k, v in labels.items())]

    def get(self, name: str, **labels) -> float:
        """Sum of every sample of `name` whose labels include `labels` (0 if none)."""
        return sum(s[2] for s in self.find(name, **labels))

    def one(self, name: str, **labels) -> tuple[dict, float]:
        found = self.find(name, **labels)
        assert len(found) == 1, f"expected exactly one {name}{labels}, got {found}"
        return found[0][1], found[0][2]

    def label_values(self, name: str, label: str, **labels) -> set[str]:
        return {s[1].get(label) for s in self.find(name, **labels)}


def scrape(sc: h.Sidecar) -> Metrics:
    r = sc.admin_get("/metrics")
    assert r.status == 200, (r.status, r.text[:300])
    ctype = r.headers.get("Content-Type", "")
    assert ctype.replace(" ", "").startswith("text/plain;version=0.0.4"), ctype
    return Metrics(r.text)


def wait_metric(sc: h.Sidecar, name: str, want: float, timeout: float = 20.0,
                **labels) -> Metrics:
    """Scrape until get(name, **labels) == want (bounded); returns the last scrape."""
    deadline = time.monotonic() + h.T(timeout)
    m = scrape(sc)
    for _ in range(2000):
        if m.get(name, **labels) == want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        m = scrape(sc)
    assert m.get(name, **labels) == want, \
        f"{name}{labels} = {m.get(name, **labels)}, expected {want}\n" + \
        "\n".join(l for l in m.text.splitlines() if l.startswith(name))
    return m


def wait_ready(sc: h.Sidecar, timeout: float = 20.0) -> h.AdminResponse:
    """GET /ready until 200 (bounded). The "ready" event may precede it (BUGS4.md #2;
    test_ready_event_means_ready_endpoint is the test for that), other tests must not
    depend on that race."""
    deadline = time.monotonic() + h.T(timeout)
    r = sc.admin_get("/ready")
    for _ in range(1000):
        if r.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
        r = sc.admin_get("/ready")
    return r


def raw_http(port: int, data: bytes, timeout: float = 5.0, shut_wr: bool = False) -> bytes:
    """Send raw bytes to the admin port, return whatever comes back until EOF (a reset
    after some bytes returns those bytes)."""
    s = socket.create_connection((h.HOST, port), timeout=h.T(timeout))
    buf = bytearray()
    try:
        try:
            s.sendall(data)
            if shut_wr:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server answered and closed before taking everything: read the answer
        deadline = time.monotonic() + h.T(timeout)
        while len(buf) < 1 << 20 and time.monotonic() < deadline:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            buf += b
    finally:
        s.close()
    return bytes(buf)


def status_of(resp: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", resp)
    return int(m.group(1)) if m else None


def echo_conn(port: int, ctx: ssl.SSLContext, payload: bytes) -> int:
    """One TLS connection: send payload, read the echo, close cleanly (close_notify).
    Returns the client's local port (the access log's `peer`)."""
    s = h.tls_connect(port, ctx)
    try:
        lp = s.getsockname()[1]
        got = bytearray()
        view = memoryview(payload)
        # interleave so large payloads cannot deadlock on full buffers
        while view:
            n = s.send(view[:16384])
            view = view[n:]
            while len(got) < len(payload) - len(view) - 65536:
                got += s.recv(65536)
        got += h.recv_exact(s, len(payload) - len(got))
        assert bytes(got) == payload, "echo differs"
        try:
            s.unwrap()
        except (ssl.SSLError, OSError):
            pass
        return lp
    finally:
        s.close()


def refuse(sc: h.Sidecar, port: int, ctx: ssl.SSLContext, reason: str) -> None:
    r = h.attempt_tls(port, ctx)
    if isinstance(r, ssl.SSLSocket):
        r.close()
        raise AssertionError(f"served; expected a refusal with reason {reason}")
    e = sc.log_for_peer_port(r.local_port, timeout=h.PROMPT_S)
    assert e is not None and e["decision"] == "deny" and e["reason"] == reason, (reason, e)


def inbound_sidecar(env, pki, app, *, name: str, limits: dict | None = None,
                    log: dict | None = None, identity: dict | None = None,
                    workers: int = 2, **kw) -> tuple[h.Sidecar, int]:
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=workers, limits=limits, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    if log is not None:
        cfg["log"] = log
    if identity is not None:
        cfg["identity"] = identity
    return env.sidecar(cfg, name=name, **kw), port


class Ticker(threading.Thread):
    """A long TLS stream through an echo app: a small chunk every 100 ms, each echo checked.
    Records the time of every completed round trip and how the stream ended."""

    def __init__(self, port: int, ctx: ssl.SSLContext, max_time: float = 30.0):
        super().__init__(daemon=True)
        self.sock = h.tls_connect(port, ctx)
        self.local_port = self.sock.getsockname()[1]
        # a round trip that takes this long is a stall (a loaded machine takes far less)
        self.sock.settimeout(h.T(20))
        self.ok_times: list[float] = []
        self.sent = 0
        self.end: str | None = None
        self.end_time: float | None = None
        self.stop_ev = threading.Event()
        self.max_time = h.T(max_time)

    def run(self):
        deadline = time.monotonic() + self.max_time
        i = 0
        try:
            while not self.stop_ev.is_set() and time.monotonic() < deadline and i < 100000:
                chunk = b"tick %06d\n" % i
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                got = b""
                while len(got) < len(chunk):
                    b = self.sock.recv(len(chunk) - len(got))
                    if not b:
                        self.end = "eof"
                        return
                    got += b
                assert got == chunk, f"echo differs: {got!r} != {chunk!r}"
                self.ok_times.append(time.monotonic())
                i += 1
                self.stop_ev.wait(0.1)
            self.end = "stopped"
        except (ssl.SSLError, OSError) as e:
            self.end = f"{type(e).__name__}: {e}"
        except AssertionError as e:
            self.end = f"assert: {e}"
        finally:
            self.end_time = time.monotonic()

    def rounds_after(self, t: float) -> int:
        return sum(1 for x in list(self.ok_times) if x > t)

    def close_clean(self) -> None:
        """Stop ticking, send close_notify, read until the proxy closes too."""
        self.stop_ev.set()
        self.join(h.T(5))
        try:
            self.sock.unwrap()
        except (ssl.SSLError, OSError):
            pass
        self.sock.close()


def new_conn_refused(port: int, ctx: ssl.SSLContext) -> str:
    """Try a new TLS connection; return how it was refused, or raise if it was served."""
    try:
        s = h.tls_connect(port, ctx, timeout=2)
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except ssl.SSLError as e:
        return f"ssl: {e}"
    except (socket.timeout, TimeoutError):
        raise AssertionError("a new connection during the drain hung in the handshake "
                             "(the listener still accepts but does not serve)")
    except OSError as e:
        return f"oserror: {e}"
    try:
        s.sendall(b"hello?\n")
        got = s.recv(100)
    except (ssl.SSLError, OSError) as e:
        return f"closed after handshake: {e}"
    finally:
        s.close()
    if got:
        raise AssertionError("a new connection was served during the drain")
    return "eof after handshake"


# ===================================================================== 1. basic endpoints

def test_endpoints_status_codes(env, pki):
    app = env.app("echo")
    sc, _ = inbound_sidecar(env, pki, app, name="basic")

    r = sc.admin_get("/healthz")
    assert (r.status, r.body) == (200, b"ok\n"), (r.status, r.body)
    assert r.headers.get("Content-Type", "").startswith("text/plain"), dict(r.headers)
    assert r.headers.get("Connection", "").lower() == "close", dict(r.headers)
    r = wait_ready(sc)
    assert (r.status, r.body) == (200, b"ready\n"), (r.status, r.body)
    # query strings are ignored
    r = sc.admin_get("/healthz?verbose=1&x=%20")
    assert (r.status, r.body) == (200, b"ok\n")

    for path in ("/nope", "/healthz/extra", "/metricsx", "/"):
        r = sc.admin_get(path)
        assert r.status == 404, (path, r.status)

    for method in ("POST", "PUT", "DELETE"):
        r = sc.admin_get("/healthz", method, body=b"x=1",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 405, (method, r.status)
        allow = {m.strip() for m in r.headers.get("Allow", "").split(",")}
        assert allow == {"GET", "HEAD"}, (method, r.headers.get("Allow"))
    r = sc.admin_get("/metrics", "POST", body=b"")
    assert r.status == 405

    # HEAD: status and headers, no body (checked on the wire, not through http.client)
    resp = raw_http(sc.admin_port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(resp) == 200, resp[:200]
    head, sep, body = resp.partition(b"\r\n\r\n")
    assert sep and body == b"", f"HEAD returned a body: {resp!r}"
    r = sc.admin_get("/healthz", "HEAD")
    assert r.status == 200 and r.body == b""

    # malformed heads -> 400
    for bad in (b"GARBAGE\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nThisLineHasNoColon\r\n\r\n",
                b"GET /healthz HTTP/9.Z\r\n\r\n",
                b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40):  # TLS hello
        resp = raw_http(sc.admin_port, bad, shut_wr=True)
        assert status_of(resp) == 400, f"{bad[:40]!r} -> {resp[:200]!r}"

    # a 20 KiB header -> 431 (head limit 8 KiB)
    big = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024) + b"\r\n\r\n")
    resp = raw_http(sc.admin_port, big)
    assert status_of(resp) == 431, resp[:200]
    # many small headers adding up to > 8 KiB -> 431 as well
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%04d: %s\r\n" % (i, b"v" * 60) for i in range(200)) + b"\r\n"
    resp = raw_http(sc.admin_port, many)
    assert status_of(resp) == 431, resp[:200]

    # HTTP/1.0 without Host works too
    resp = raw_http(sc.admin_port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status_of(resp) == 200 and resp.endswith(b"\r\n\r\nok\n"), resp
    # the server is still fine after all that
    assert sc.admin_get("/healthz").status == 200
    sc.assert_alive()


def test_ready_event_means_ready_endpoint(env, pki):
    """The stderr "ready" event and GET /ready agree: right after the event, /ready is 200
    and a connection is served. Busy-looping helper processes make slow worker threads
    (the race this guards) likely; 10 starts."""
    app = env.app("echo")
    web = h.client_context(pki, "web-frontend")
    hog = "import time\nt = time.monotonic() + 10\nwhile time.monotonic() < t: pass\n"
    hogs = [subprocess.Popen(["/usr/bin/python3", "-c", hog]) for _ in range(3)]
    not_ready = []
    try:
        for i in range(10):
            sc, port = inbound_sidecar(env, pki, app, name=f"readyrace{i}", workers=4)
            r = sc.admin_get("/ready")
            if r.status != 200:
                not_ready.append((i, r.status, r.body))
            echo_conn(port, web, b"first\n")
            sc.stop()
    finally:
        for p in hogs:
            p.kill()
            p.wait(5)
    assert not not_ready, (f"/ready was not 200 right after the 'ready' event in "
                           f"{len(not_ready)}/10 starts: {not_ready[:3]}")


def test_incomplete_head_times_out_and_does_not_block_admin(env, pki):
    """A client that never finishes its request head gets 408 (or a close) after ~5 s, and
    the admin server answers others meanwhile (it runs on the main loop)."""
    app = env.app("echo")
    sc, _ = inbound_sidecar(env, pki, app, name="slowloris")
    t0 = time.monotonic()       # before the connection: its head deadline starts later
    s = socket.create_connection((h.HOST, sc.admin_port), timeout=h.T(h.PROMPT_S + 10))
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # no blank line, ever
        # The listener accepts in order: every request below is accepted after this one.
        for i in range(3):
            r = sc.admin_get("/healthz", timeout=h.PROMPT_S)
            assert r.status == 200, f"/healthz #{i} while a head is incomplete: {r.status}"
        # ... and answered while the incomplete head is still pending (an admin server that
        # waited for it would answer only after closing it at its deadline)
        s.setblocking(False)
        try:
            pending = s.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pending = None
        except OSError as e:
            pending = f"{type(e).__name__}: {e}"
        s.settimeout(h.T(h.PROMPT_S + 10))
        assert pending is None, (f"the incomplete head was answered or closed ({pending!r}) "
                                 f"before three other requests were served, "
                                 f"{time.monotonic() - t0:.1f} s after it was sent")
        buf = b""
        try:
            while len(buf) < 65536:
                b = s.recv(4096)
                if not b:
                    break
                buf += b
        except ConnectionResetError:
            pass
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"an incomplete request head was held open for "
                                 f"{time.monotonic() - t0:.1f} s, expected about 5 s")
        took = time.monotonic() - t0
    finally:
        s.close()
    assert buf == b"" or status_of(buf) == 408, buf[:200]
    assert 3.5 <= took <= h.PROMPT_S, f"closed after {took:.1f} s, expected about 5 s"
    sc.assert_alive()


def _closed_unanswered(s: socket.socket, timeout: float) -> str | None:
    """Reads s until its end: "eof" or "reset" if it ended without a byte, None if it
    answered or stayed open for timeout (scaled)."""
    s.settimeout(h.T(timeout))
    try:
        return "eof" if s.recv(4096) == b"" else None
    except ConnectionResetError:
        return "reset"
    except (socket.timeout, TimeoutError):
        return None


def test_admin_connection_cap(env, pki):
    """admin.max_connections: the connection past the cap is closed at once, unanswered,
    counted (reason limit) and logged; once the others go, /ready answers again."""
    cap = 3
    app = env.app("echo")
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", extra={"admin": {"max_connections": cap}},
                        inbound=[h.inbound_listener("api", port, app.addr,
                                                    [{"namespace": "web"}])])
    sc = env.sidecar(cfg, name="admincap")
    assert wait_ready(sc).status == 200
    assert scrape(sc).one("portcullis_admin_refused_total", reason="limit")[1] == 0
    # Held connections send half a head (their 5 s head deadline is far off for this test;
    # checked below). The listener accepts in order: each is counted before the next.
    held = []
    try:
        for _ in range(cap - 1):
            held.append(socket.create_connection((h.HOST, sc.admin_port), timeout=h.T(5)))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
        m = scrape(sc)  # the last free place
        assert m.one("portcullis_admin_connections")[1] == cap
        held.append(socket.create_connection((h.HOST, sc.admin_port), timeout=h.T(5)))
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
        ev = sc.event_count()
        extra = socket.create_connection((h.HOST, sc.admin_port), timeout=h.T(5))
        try:
            try:
                extra.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            except OSError:
                pass  # already closed: that is the point
            how = _closed_unanswered(extra, h.PROMPT_S)
        finally:
            extra.close()
        assert how in ("eof", "reset"), "the connection past admin.max_connections was " \
            "answered or held open"
        assert sc.wait_for_event("admin.max_connections=3 reached", h.PROMPT_S, ev), \
            "no server event for the refused admin connection"
        e = sc.events_matching("admin.max_connections=3 reached", ev)[0]
        assert e["level"] == "warn" and "(limit)" in e["msg"], e
        # the held ones were still waiting for their heads (not answered, not closed)
        for s in held:
            s.setblocking(False)
            try:
                got = s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                got = None
            assert got is None, f"a held admin connection ended early: {got!r}"
    finally:
        for s in held:
            s.close()
    # the held connections' closes reach the sidecar in their own time: until then a probe
    # may still be refused (bounded retry)
    def ready() -> bool:
        try:
            return sc.admin_get("/ready", timeout=h.PROMPT_S).status == 200
        except (OSError, http.client.HTTPException):
            return False
    assert h.wait_until(ready, h.T(h.PROMPT_S)), "/ready does not answer after the cap"
    m = scrape(sc)
    assert m.one("portcullis_admin_refused_total", reason="limit")[1] >= 1
    assert m.one("portcullis_admin_refused_total", reason="timeout")[1] == 0


def test_admin_write_timeout_closes_a_client_that_does_not_read(env, pki):
    """A client that asks for /metrics and never reads it is closed (reset) once
    admin.write_timeout_ms passes without the kernel taking the whole response; not
    before. Counted (reason timeout) and logged; others are served meanwhile."""
    wt_ms = 500
    app = env.app("echo")
    # 40 HTTP listeners make /metrics about 200 KB: more than a non-reading client's
    # receive buffer and the sidecar's send buffer hold
    listeners = [h.inbound_listener(f"api{i}", h.free_port(), app.addr,
                                    [{"namespace": "web"}], protocol="http")
                 for i in range(40)]
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=listeners,
                        extra={"admin": {"write_timeout_ms": wt_ms}})
    sc = env.sidecar(cfg, name="adminwt")
    size = len(sc.admin_get("/metrics").body)
    assert size > 150000, size
    ev = sc.event_count()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(h.T(5))
    s.connect((h.HOST, sc.admin_port))
    try:
        t0 = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        # served meanwhile
        assert sc.admin_get("/healthz").status == 200
        e = sc.wait_for_event("did not read its response", h.PROMPT_S, ev)
        took = time.monotonic() - t0
        assert e is not None, "the non-reading admin client was not closed"
        assert e["level"] == "warn" and "(timeout)" in e["msg"], e
        assert took >= wt_ms / 1000, f"closed {took:.3f} s after the request, before " \
            f"admin.write_timeout_ms={wt_ms}"
        got, ended = b"", None
        s.settimeout(h.T(h.PROMPT_S))
        try:
            while len(got) < 2 * size:
                b = s.recv(65536)
                if not b:
                    ended = "eof"
                    break
                got += b
        except ConnectionResetError:
            ended = "reset"
        assert ended is not None, "the connection stayed open"
        assert len(got) < size, f"the whole response ({len(got)} bytes) arrived"
    finally:
        s.close()
    m = scrape(sc)
    assert m.one("portcullis_admin_refused_total", reason="timeout")[1] == 1
    assert m.one("portcullis_admin_refused_total", reason="limit")[1] == 0
    assert m.one("portcullis_admin_connections")[1] == 1


# ===================================================================== 2. metrics

def test_metrics_basics_and_inbound_traffic(env, pki):
    app = env.app("echo")
    sc, port = inbound_sidecar(env, pki, app, name="metrics")
    m = scrape(sc)

    # build info: version as --version prints it
    ver = re.match(r"portcullis (\d+\.\d+\.\d+)", h.run_binary("--version").stdout).group(1)
    labels, v = m.one("portcullis_build_info")
    assert v == 1 and labels.get("version") == ver, labels
    assert labels.get("tls_library") == "BoringSSL", labels
    assert re.fullmatch(r"\d+\.\d+\.\d+", labels.get("libuv", "")), labels
    assert m.families["portcullis_build_info"].type == "gauge"
    # generation, draining, own-cert expiry
    assert m.one("portcullis_config_generation")[1] == 1
    assert m.one("portcullis_draining")[1] == 0
    assert m.one("portcullis_log_lines_dropped_total")[1] == 0
    assert m.families["portcullis_log_lines_dropped"].type == "counter"
    want_exp = openssl_facts(pki.crt("payments-api"))["not_after"]
    assert m.one("portcullis_certificate_expiry_timestamp_seconds")[1] == want_exp
    # all four reload series present (and zero)
    for kind in ("certs", "config"):
        for result in ("ok", "failed"):
            assert m.one("portcullis_reloads_total", kind=kind, result=result)[1] == 0
    # types
    types = {n: f.type for n, f in m.families.items()}
    assert types.get("portcullis_connections") == "counter", types
    assert types.get("portcullis_bytes") == "counter", types
    assert types.get("portcullis_active_connections") == "gauge", types
    assert types.get("portcullis_handshake_duration_seconds") == "histogram", types
    assert types.get("portcullis_reloads") == "counter", types
    for n in m.families:
        assert n.startswith("portcullis_"), n
    lab = dict(listener="api", direction="inbound")
    assert m.get("portcullis_active_connections", **lab) == 0

    # ---- N allowed connections with known byte counts
    web = h.client_context(pki, "web-frontend")
    sizes = [1, 1000, 16384, 65537, 300001]
    t_conns = time.monotonic()
    ports = [echo_conn(port, web, h.pattern_bytes(n, seed=i)) for i, n in enumerate(sizes)]
    # every handshake the sidecar timed lies inside one of these sequential connections
    conns_took = time.monotonic() - t_conns
    for lp in ports:
        e = sc.log_for_peer_port(lp, timeout=h.PROMPT_S)
        assert e is not None and e["decision"] == "allow", e
    m1 = wait_metric(sc, "portcullis_connections_total", m.get(
        "portcullis_connections_total", decision="allow", reason="", **lab) + len(sizes),
        decision="allow", reason="", **lab)
    assert m1.get("portcullis_bytes_total", flow="from_peer", **lab) - \
        m.get("portcullis_bytes_total", flow="from_peer", **lab) == sum(sizes)
    assert m1.get("portcullis_bytes_total", flow="to_peer", **lab) - \
        m.get("portcullis_bytes_total", flow="to_peer", **lab) == sum(sizes)
    hs = "portcullis_handshake_duration_seconds"
    assert m1.get(hs + "_count", **lab) - m.get(hs + "_count", **lab) == len(sizes)
    # histogram shape: the spec's buckets, cumulative, +Inf == count, sum plausible
    buckets = {float(s[1]["le"]): s[2] for s in m1.find(hs + "_bucket", **lab)}
    bounds = sorted(buckets)     # checked against SPEC4's list at the end (not to mask the rest)
    vals = [buckets[k] for k in sorted(buckets)]
    assert vals == sorted(vals), f"buckets not cumulative: {buckets}"
    assert buckets[float("inf")] == m1.get(hs + "_count", **lab)
    hs_sum = m1.get(hs + "_sum", **lab) - m.get(hs + "_sum", **lab)
    assert 0 < hs_sum <= conns_took + 0.01, \
        (f"handshake durations sum to {hs_sum:.4f} s; expected > 0 and at most the "
         f"{conns_took:.4f} s the {len(sizes)} sequential connections took in all")
    # the connections are logged and counted before their handles are closed and the gauge
    # drops: wait for that instead of reading it from the scrape above
    wait_metric(sc, "portcullis_active_connections", 0, **lab)

    # ---- refusals: 3 x not_allowed, 1 x expired, and one of several other reasons
    m2 = scrape(sc)
    refused = [("evil-intruder", "not_allowed")] * 3 + [
        ("bad-expired", "expired"), (None, "no_cert"), ("bad-other-ca", "bad_chain"),
        ("bad-no-uri", "no_spiffe_id"), ("bad-wrong-td", "wrong_trust_domain")]
    for stem, reason in refused:
        refuse(sc, port, h.client_context(pki, stem), reason)
    # plaintext on the mTLS port (a kubelet tcp probe or a confused client) -> protocol
    s, lp = h.plain_connect_bound(port)
    if s is not None:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(h.T(5))
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        finally:
            s.close()
    e = sc.log_for_peer_port(lp, timeout=h.PROMPT_S)
    assert e is not None and e["decision"] == "deny" and e["reason"] == "protocol", e
    happened = {"not_allowed": 3, "expired": 1, "no_cert": 1, "bad_chain": 1,
                "no_spiffe_id": 1, "wrong_trust_domain": 1, "protocol": 1}
    m3 = wait_metric(sc, "portcullis_connections_total",
                     m2.get("portcullis_connections_total", decision="deny", **lab)
                     + sum(happened.values()), decision="deny", **lab)
    for reason, n in happened.items():
        got = (m3.get("portcullis_connections_total", decision="deny", reason=reason, **lab)
               - m2.get("portcullis_connections_total", decision="deny", reason=reason, **lab))
        assert got == n, f"deny/{reason}: +{got}, expected +{n}"
    assert m3.label_values("portcullis_connections_total", "reason", decision="deny") == \
        set(happened), m3.label_values("portcullis_connections_total", "reason")
    assert m3.label_values("portcullis_connections_total", "reason", decision="allow") == {""}
    # refusals are not successful handshakes, move no bytes and leave nothing active
    assert m3.get(hs + "_count", **lab) == m1.get(hs + "_count", **lab)
    for flow in ("from_peer", "to_peer"):
        assert m3.get("portcullis_bytes_total", flow=flow, **lab) == \
            m1.get("portcullis_bytes_total", flow=flow, **lab)
    wait_metric(sc, "portcullis_active_connections", 0, **lab)

    # ---- active connections rise and fall; bytes count while a connection is open
    m4 = scrape(sc)
    opened = []
    for i in range(3):
        s = h.tls_connect(port, web)
        s.sendall(b"x" * 1234)
        assert h.recv_exact(s, 1234) == b"x" * 1234
        opened.append(s)
        wait_metric(sc, "portcullis_active_connections", i + 1, **lab)
    m5 = scrape(sc)
    assert m5.get("portcullis_bytes_total", flow="from_peer", **lab) - \
        m4.get("portcullis_bytes_total", flow="from_peer", **lab) == 3 * 1234, \
        "bytes are not counted while the connections are open"
    assert m5.get(hs + "_count", **lab) - m4.get(hs + "_count", **lab) == 3
    # connections_total counts at close: not yet
    assert m5.get("portcullis_connections_total", decision="allow", **lab) == \
        m4.get("portcullis_connections_total", decision="allow", **lab)
    for i, s in enumerate(opened):
        try:
            s.unwrap()
        except (ssl.SSLError, OSError):
            pass
        s.close()
        wait_metric(sc, "portcullis_active_connections", 2 - i, **lab)
    wait_metric(sc, "portcullis_connections_total",
                m4.get("portcullis_connections_total", decision="allow", **lab) + 3,
                decision="allow", reason="", **lab)
    m6 = scrape(sc)
    assert m6.get("portcullis_upstream_connect_failures_total", **lab) == 0
    assert m6.one("portcullis_config_generation")[1] == 1
    assert bounds == sorted(float(b) for b in HANDSHAKE_BUCKETS), \
        f"handshake histogram buckets {bounds}, SPEC4 says {HANDSHAKE_BUCKETS}"


def test_metrics_outbound_and_connect_failures(env, pki):
    app = env.app("echo")
    in_cfg, out_cfg, in_port, out_port = h.chain_configs(pki, app.addr)
    server = env.sidecar(in_cfg, name="m-in")
    client = env.sidecar(out_cfg, name="m-out")
    assert server.admin_port != client.admin_port
    lab = dict(listener="payments", direction="outbound")
    sizes = [10, 5000, 200000]
    for i, n in enumerate(sizes):
        data = h.pattern_bytes(n, seed=50 + i)
        s = socket.create_connection((h.HOST, out_port), timeout=h.T(5))
        got, digest = h.duplex(s, data, n, shutdown_after_send=True, timeout=20)
        assert got == n and digest == h.sha256(data)
        assert h.recv_until_eof(s) == b""
        s.close()
    m = wait_metric(client, "portcullis_connections_total", len(sizes), decision="allow",
                    reason="", **lab)
    # outbound: to_peer = what the app sent to the upstream, from_peer = what came back
    assert m.get("portcullis_bytes_total", flow="to_peer", **lab) == sum(sizes)
    assert m.get("portcullis_bytes_total", flow="from_peer", **lab) == sum(sizes)
    assert m.get("portcullis_handshake_duration_seconds_count", **lab) == len(sizes)
    ms = wait_metric(server, "portcullis_connections_total", len(sizes),
                     listener="api", direction="inbound", decision="allow")
    assert ms.get("portcullis_bytes_total", listener="api", flow="from_peer") == sum(sizes)

    # the upstream goes away: connect failures are counted
    server.stop()
    for _ in range(2):
        # the sidecar may reset the app's connection so fast that connect() sees it
        s, _lp = h.plain_connect_bound(out_port, timeout=5)
        if s is not None:
            try:
                s.recv(10)
            except OSError:
                pass
            s.close()
    wait_metric(client, "portcullis_upstream_connect_failures_total", 2, **lab)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_metrics_reloads_and_generation(env, pki, tmp_path):
    ident = tmp_path / "ident"
    ident.mkdir()
    for src, dst in ((pki.crt("payments-api"), "tls.crt"), (pki.key("payments-api"), "tls.key"),
                     (pki.ca, "ca.crt")):
        (ident / dst).write_bytes(Path(src).read_bytes())
    identity = {"cert": str(ident / "tls.crt"), "key": str(ident / "tls.key"),
                "ca": str(ident / "ca.crt"), "watch": True, "poll_interval_ms": 1000}
    app = env.app("echo")
    sc, port = inbound_sidecar(env, pki, app, name="reloads", identity=identity)
    m0 = scrape(sc)
    assert m0.one("portcullis_config_generation")[1] == 1
    assert sc.admin_get("/certs").json()["generation"] == 1

    def reloads(m, kind, result):
        return m.one("portcullis_reloads_total", kind=kind, result=result)[1]

    # ---- a valid rotation: a freshly minted payments/api leaf (key first, then cert)
    minter = Minter(tmp_path / "mint", pki.ca, str(pki.dir / "ca.key"))
    crt, key = minter.leaf("fresh-payments-api", "payments", "api")
    fresh = openssl_facts(crt)
    ev = sc.event_count()
    _write_atomic(ident / "tls.key", Path(key).read_bytes())
    _write_atomic(ident / "tls.crt", Path(crt).read_bytes())
    e = sc.wait_for_event("reload ok: kind=certs", h.PROMPT_S, ev)
    assert e is not None, "\n".join(sc.stderr_lines[-10:])
    gen = int(re.search(r"generation=(\d+)", e["msg"]).group(1))
    assert gen == 2, e
    m1 = wait_metric(sc, "portcullis_reloads_total", 1, kind="certs", result="ok")
    assert m1.one("portcullis_config_generation")[1] == gen
    assert reloads(m1, "certs", "failed") == 0
    assert m1.one("portcullis_certificate_expiry_timestamp_seconds")[1] == fresh["not_after"]
    certs = sc.admin_get("/certs").json()
    assert certs["generation"] == gen and certs["identity"][0]["serial"] == fresh["serial"]
    assert sc.admin_get("/config").json()["generation"] == gen

    # ---- SIGHUP with a broken config: config/failed += 1, generation unchanged
    m3 = scrape(sc)
    gen3 = m3.one("portcullis_config_generation")[1]
    assert gen3 == gen
    good_text = sc.conf_path.read_text()
    sc.write_config(good_text.replace("workers = 2;", "workers = = 2 {;"))
    ev = sc.event_count()
    sc.sighup()
    assert sc.wait_for_event("reload failed: kind=config", h.PROMPT_S, ev) is not None, \
        "\n".join(sc.stderr_lines[-10:])
    m4 = wait_metric(sc, "portcullis_reloads_total", reloads(m3, "config", "failed") + 1,
                     kind="config", result="failed")
    assert reloads(m4, "config", "ok") == reloads(m3, "config", "ok")
    assert m4.one("portcullis_config_generation")[1] == gen3

    # ---- a good SIGHUP: config/ok += 1, generation += 1 (as the event says)
    sc.write_config(good_text)
    ev = sc.event_count()
    sc.sighup()
    e = sc.wait_for_event("reload ok: kind=config", h.PROMPT_S, ev)
    assert e is not None, "\n".join(sc.stderr_lines[-10:])
    gen5 = int(re.search(r"generation=(\d+)", e["msg"]).group(1))
    assert gen5 == gen3 + 1, (gen3, e)
    m5 = wait_metric(sc, "portcullis_reloads_total", reloads(m3, "config", "ok") + 1,
                     kind="config", result="ok")
    assert m5.one("portcullis_config_generation")[1] == gen5
    assert sc.admin_get("/config").json()["generation"] == gen5
    assert sc.admin_get("/certs").json()["generation"] == gen5

    # ---- an invalid rotation (expired certificate): failed, generation unchanged
    ev = sc.event_count()
    _write_atomic(ident / "tls.key", Path(pki.key("bad-expired")).read_bytes())
    _write_atomic(ident / "tls.crt", Path(pki.crt("bad-expired")).read_bytes())
    assert sc.wait_for_event("reload failed: kind=certs", h.PROMPT_S, ev) is not None, \
        "\n".join(sc.stderr_lines[-10:])
    m6 = wait_metric(sc, "portcullis_reloads_total", 1, kind="certs", result="failed")
    assert reloads(m6, "certs", "ok") == reloads(m5, "certs", "ok")
    assert m6.one("portcullis_config_generation")[1] == gen5
    assert m6.one("portcullis_certificate_expiry_timestamp_seconds")[1] == fresh["not_after"]
    # counters match the events the sidecar logged
    for kind in ("certs", "config"):
        for ok in (True, False):
            n = len(sc.events_matching(f"reload {'ok' if ok else 'failed'}: kind={kind}"))
            assert reloads(m6, kind, "ok" if ok else "failed") == n, (kind, ok, n)
    # still serving, with the fresh certificate
    s = h.tls_connect(port, h.client_context(pki, "web-frontend"))
    der = s.getpeercert(binary_form=True)
    s.close()
    assert h.sha256(der) == fresh["sha256"]


# ===================================================================== 3. /config + secrets

def test_config_endpoint_and_no_secrets_anywhere(env, pki, tmp_path):
    secret = "pc-AdminPass-" + os.urandom(8).hex()
    enc = h.encrypt_key(pki.key("payments-api"), tmp_path / "payments-api.enc.key", secret)
    passfile = tmp_path / "key.pass"
    passfile.write_text(secret + "\n")

    app = env.app("echo")
    in_port, out_port, up_port = h.free_port(), h.free_port(), h.free_port()
    # explicit, non-default values; the deadlines generous (h.GENEROUS_MS or more): the
    # connection below must not depend on how fast a loaded machine does a handshake
    limits = {"max_connections": 777, "handshake_timeout_ms": 64321, "idle_timeout_ms": 654321,
              "drain_timeout_ms": 1500}
    tls = {"min_version": "1.2",
           "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
           "curves": "X25519:P-256"}
    cfg = h.base_config(pki, "payments-api", workers=2, limits=limits, tls=tls, inbound=[
        h.inbound_listener("api", in_port, app.addr,
                           [{"namespace": "web"},
                            {"namespace": "jobs", "service_account": "scheduler"}])],
        outbound=[h.outbound_listener("ledger", out_port, h.addr(up_port),
                                      [{"namespace": "payments", "service_account": "api"}],
                                      server_name="ledger.payments.svc")])
    # base_config's defaults do not name connect_timeout_ms here -> drop it to see the default
    del cfg["limits"]["connect_timeout_ms"]
    cfg["identity"]["key"] = str(enc)
    cfg["identity"]["key_passphrase_file"] = str(passfile)
    cfg["identity"]["expiry_warning_hours"] = 24
    sc = env.sidecar(cfg, name="cfgsecret")
    # some traffic so the key is used in anger
    echo_conn(in_port, h.client_context(pki, "web-frontend"), b"hello\n")

    r = sc.admin_get("/config")
    assert r.status == 200
    assert r.headers.get("Content-Type", "").startswith("application/json"), dict(r.headers)
    c = r.json()
    assert c["generation"] == 1
    assert Path(c["file"]).resolve() == sc.conf_path.resolve()
    assert c["trust_domain"] == "cluster.local" and c["workers"] == 2
    idn = c["identity"]
    assert idn["cert"] == pki.crt("payments-api") and idn["key"] == str(enc)
    assert idn["ca"] == pki.ca
    assert idn["key_passphrase_file"] == str(passfile)
    assert idn["poll_interval_ms"] == 60000, idn           # default
    assert idn["expiry_warning_hours"] == 24, idn
    assert isinstance(idn["watch"], bool), idn
    assert c["tls"]["min_version"] == "1.2"
    assert c["tls"]["ciphers"] == tls["ciphers"] and c["tls"]["curves"] == tls["curves"], c["tls"]
    assert c["tls"]["verify_depth"] == 8, c["tls"]                 # default
    assert c["admin"]["listen"] == sc.admin_listen
    assert c["log"] == {"level": "info", "access": True}, c["log"]
    lim = c["limits"]
    for k, v in limits.items():
        assert lim[k] == v, (k, lim)
    assert lim["connect_timeout_ms"] == 5000, lim                  # defaults
    assert lim["revoke_grace_ms"] == 10000, lim
    assert len(c["inbound"]) == 1 and len(c["outbound"]) == 1
    ib = c["inbound"][0]
    assert (ib["name"], ib["listen"], ib["forward"], ib["protocol"]) == \
        ("api", h.addr(in_port), app.addr, "tcp"), ib
    assert ib["allow"] == [{"namespace": "web", "service_account": None},
                           {"namespace": "jobs", "service_account": "scheduler"}], ib["allow"]
    ob = c["outbound"][0]
    assert (ob["name"], ob["listen"], ob["upstream"], ob["server_name"], ob["protocol"]) == \
        ("ledger", h.addr(out_port), h.addr(up_port), "ledger.payments.svc", "tcp"), ob
    assert ob["expect"] == [{"namespace": "payments", "service_account": "api"}], ob

    # secrets: neither the passphrase nor any piece of the key's PEM body, anywhere
    texts = {"/config": r.text}
    for path in ("/certs", "/metrics", "/healthz", "/ready"):
        texts[path] = sc.admin_get(path).text
    ev = sc.event_count()
    sc.sighup()                              # a reload re-reads the key with the passphrase
    assert sc.wait_for_event("reload ok: kind=config", h.PROMPT_S, ev) is not None, \
        "no 'reload ok: kind=config' event after SIGHUP:\n" + "\n".join(sc.stderr_lines[-10:])
    texts["/config after reload"] = sc.admin_get("/config").text
    sc.stop()
    texts["stdout"] = "\n".join(sc.stdout_lines)
    texts["stderr"] = "\n".join(sc.stderr_lines)

    def pem_lines(path) -> list[str]:
        return [l for l in Path(path).read_text().splitlines()
                if l and not l.startswith("-----") and ":" not in l and len(l) >= 16]
    needles = {"passphrase": [secret]}
    needles["encrypted key body"] = pem_lines(enc)
    needles["plain key body"] = pem_lines(pki.key("payments-api"))
    assert needles["encrypted key body"] and needles["plain key body"]
    for where, text in texts.items():
        flat = text.replace("\\n", "").replace("\n", "").replace("\\/", "/")
        for what, ns in needles.items():
            for n in ns:
                assert n not in text and n not in flat, f"{what} appears in {where}"
        assert "PRIVATE KEY" not in text, f"PEM key markers appear in {where}"


def test_config_endpoint_defaults(env, pki):
    """Everything left out of the file is shown with its default value."""
    app = env.app("echo")
    port = h.free_port()
    cfg = {"trust_domain": "cluster.local",
           "identity": {"cert": pki.crt("payments-api"), "key": pki.key("payments-api"),
                        "ca": pki.ca},
           "admin": {"listen": h.auto_admin_listen()},
           "inbound": [{"name": "api", "listen": h.addr(port), "forward": app.addr,
                        "allow": [{"namespace": "web"}]}]}
    sc = env.sidecar(cfg, name="defaults")
    c = sc.admin_get("/config").json()
    # 0 = one per core: shown as written (0) or as resolved (the number of cores)
    assert c["workers"] in (0, os.cpu_count(), len(os.sched_getaffinity(0))), c["workers"]
    assert c["identity"]["key_passphrase_file"] is None, c["identity"]
    assert c["identity"]["poll_interval_ms"] == 60000
    assert c["identity"]["expiry_warning_hours"] == 168
    assert c["tls"]["min_version"] == "1.2" and c["tls"]["verify_depth"] == 8, c["tls"]
    ciphers = c["tls"]["ciphers"]
    ciphers = set(ciphers.split(":") if isinstance(ciphers, str) else ciphers)
    assert ciphers == DEFAULT_CIPHERS, ciphers
    assert c["log"] == {"level": "info", "access": True}, c["log"]
    assert c["limits"] == {"max_connections": 10000, "handshake_timeout_ms": 10000,
                           "connect_timeout_ms": 5000, "idle_timeout_ms": 300000,
                           "drain_timeout_ms": 20000, "revoke_grace_ms": 10000,
                           "max_pending_handshakes": 1024,
                           "handshake_failures_per_source": 20, "throttle_window_ms": 10000,
                           "throttle_cooldown_ms": 30000,
                           "throttle_ipv6_prefix": 64}, c["limits"]
    assert c["admin"] == {"listen": sc.admin_listen, "max_connections": 64,
                          "write_timeout_ms": 10000}, c["admin"]
    assert c["inbound"][0]["protocol"] == "tcp"
    assert c["outbound"] == []
    # nothing is open, so the exit on SIGTERM is immediate, not at the 20 s default drain
    # deadline
    t0 = time.monotonic()
    sc.stop(timeout=30)
    took = time.monotonic() - t0
    assert took < 15, f"idle sidecar exited {took:.2f} s after SIGTERM, expected at once " \
                      f"(the default drain deadline is 20 s)"


# ===================================================================== 4. /certs

@pytest.mark.parametrize("stem,chain_len", [("payments-api", 1), ("web-viaint", 2)])
def test_certs_endpoint(env, pki, stem, chain_len):
    app = env.app("echo")
    port = h.free_port()
    cfg = h.base_config(pki, stem, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}])])
    sc = env.sidecar(cfg, name=f"certs-{stem}")
    r = sc.admin_get("/certs")
    assert r.status == 200
    assert r.headers.get("Content-Type", "").startswith("application/json")
    c = r.json()
    assert c["generation"] == scrape(sc).one("portcullis_config_generation")[1] == 1
    assert len(c["identity"]) == chain_len, c["identity"]
    leaf = c["identity"][0]
    want = openssl_facts(pki.crt(stem))
    ns, sa = {"payments-api": ("payments", "api"), "web-viaint": ("web", "frontend")}[stem]
    assert leaf["spiffe_id"] == h.spiffe(ns, sa), leaf
    assert leaf["serial"] == want["serial"], (leaf["serial"], want["serial"])
    assert leaf["sha256"] == want["sha256"], (leaf["sha256"], want["sha256"])
    assert rfc3339_to_epoch(leaf["not_after"]) == want["not_after"], leaf
    assert rfc3339_to_epoch(leaf["not_before"]) == want["not_before"], leaf
    for k in ("subject", "issuer"):
        assert isinstance(leaf[k], str) and leaf[k], leaf
    if chain_len == 2:
        inter = c["identity"][1]
        iw = openssl_facts(str(pki.dir / "int-ca.crt"))
        assert inter["spiffe_id"] is None, inter
        assert (inter["serial"], inter["sha256"]) == (iw["serial"], iw["sha256"]), inter
    ca = openssl_facts(pki.ca)
    assert [b["sha256"] for b in c["bundle"]] == [ca["sha256"]], c["bundle"]
    assert c["bundle"][0]["serial"] == ca["serial"] and c["bundle"][0]["spiffe_id"] is None
    # the JSON is the served truth: the leaf the sidecar presents has that fingerprint
    s = h.tls_connect(port, h.client_context(pki, "web-frontend"))
    der = s.getpeercert(binary_form=True)
    s.close()
    assert h.sha256(der) == leaf["sha256"]


# ===================================================================== 5. drain

def _drain_sidecar(env, pki, drain_ms: int, name: str):
    app = env.app("echo")
    sc, port = inbound_sidecar(env, pki, app, name=name,
                               limits={"drain_timeout_ms": drain_ms})
    return app, sc, port


def test_drain_sigterm_deadline(env, pki):
    # Long enough that the checks below fit well inside the drain and that the stream can be
    # seen working in its second half on a loaded machine.
    drain_s = 5.0
    app, sc, port = _drain_sidecar(env, pki, int(drain_s * 1000), "drain")
    web = h.client_context(pki, "web-frontend")
    assert wait_ready(sc).status == 200
    assert scrape(sc).one("portcullis_draining")[1] == 0
    tk = Ticker(port, web)
    tk.start()
    assert wait_until_rounds(tk, 3), f"stream not flowing: {tk.end}"
    ev = sc.event_count()

    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    # /ready flips at the start of the drain, not at its end
    r = None
    for _ in range(500):
        r = sc.admin_get("/ready", timeout=h.PROMPT_S)
        if r.status == 503 or time.monotonic() - t0 > drain_s / 2:
            break
        time.sleep(0.02)
    assert r.status == 503 and r.body == b"draining\n", \
        (f"/ready {r.status} {r.body!r} {time.monotonic() - t0:.2f} s after SIGTERM, "
         f"expected 503 draining within {drain_s / 2} s")
    assert sc.admin_get("/healthz").status == 200, "admin must keep answering while draining"
    assert scrape(sc).one("portcullis_draining")[1] == 1
    assert sc.wait_for_event("draining", h.PROMPT_S, ev) is not None
    # new connections are refused and never reach the app (checked again after the exit)
    n_app = app.count()
    hows = [new_conn_refused(port, web) for _ in range(3)]
    print(f"new connections during the drain: {hows}")
    assert app.count() == n_app, "a connection opened during the drain reached the app"
    # the long stream keeps working during the drain, in its second half too
    half = t0 + drain_s / 2
    h.wait_until(lambda: tk.rounds_after(half) >= 3 or tk.end is not None,
                 h.T(drain_s + h.PROMPT_S))
    assert tk.rounds_after(half) >= 3, \
        (f"{tk.rounds_after(half)} round trips in the second half of the drain "
         f"({drain_s / 2}-{drain_s} s after SIGTERM), expected >= 3; stream end: {tk.end} "
         f"at {(tk.end_time or t0) - t0:.2f} s")
    # at the deadline: the stream is closed, the process exits 0
    rc = sc.wait_exit(drain_s + h.PROMPT_S)
    t_exit = time.monotonic() - t0
    assert rc == 0, (rc, t_exit, "\n".join(sc.stderr_lines[-10:]))
    assert drain_s - 0.3 <= t_exit <= drain_s + h.PROMPT_S, \
        f"exited {t_exit:.2f} s after SIGTERM, expected at the {drain_s} s drain deadline"
    tk.join(h.T(5))
    assert tk.end is not None and tk.end != "stopped", tk.end
    assert tk.end_time - t0 >= drain_s - 0.3, \
        f"stream closed {tk.end_time - t0:.2f} s after SIGTERM, before the {drain_s} s deadline"
    assert app.count() == n_app, "a connection opened during the drain reached the app"
    e = sc.log_for_peer_port(tk.local_port, timeout=1)
    assert e is not None, "no access-log line for the drained stream"
    assert e["decision"] == "allow" and e["close"] == "shutdown", e
    assert e["bytes_from_peer"] >= 11 * len(tk.ok_times), e
    assert sc.wait_for_event("stopped", 1, ev) is not None
    tk.sock.close()


def wait_until_rounds(tk: Ticker, n: int, timeout: float = h.PROMPT_S) -> bool:
    return bool(h.wait_until(lambda: len(tk.ok_times) >= n or tk.end is not None,
                             h.T(timeout))) and len(tk.ok_times) >= n


def drain_started_and_stream_lives(sc: h.Sidecar, tk: Ticker, ev: int,
                                   min_s: float) -> float:
    """After a first SIGTERM: waits for the "draining" event, then for the stream to complete
    two more round trips and for at least min_s s to pass; asserts the sidecar is still
    running and the stream open. Returns when the drain started (as the test saw it)."""
    assert sc.wait_for_event("draining", h.PROMPT_S, ev) is not None, \
        "no 'draining' event after SIGTERM"
    t_drain = time.monotonic()
    h.wait_until(lambda: (tk.rounds_after(t_drain) >= 2
                          and time.monotonic() - t_drain >= min_s) or tk.end is not None
                 or not sc.alive(), h.T(h.PROMPT_S))
    assert sc.alive(), "exited on the first SIGTERM although a connection was still open"
    assert tk.end is None, f"stream ended during the drain: {tk.end}"
    assert tk.rounds_after(t_drain) >= 2, \
        f"{tk.rounds_after(t_drain)} round trips after the drain started, expected >= 2"
    return t_drain


def test_drain_exits_early_when_last_connection_ends(env, pki):
    drain_s = DRAIN_LONG_MS / 1000
    app, sc, port = _drain_sidecar(env, pki, DRAIN_LONG_MS, "drain-early")
    web = h.client_context(pki, "web-frontend")
    tk = Ticker(port, web)
    tk.start()
    assert wait_until_rounds(tk, 2), f"stream not flowing: {tk.end}"
    ev = sc.event_count()
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    drain_started_and_stream_lives(sc, tk, ev, 0.6)
    r = sc.admin_get("/ready")
    assert r.status == 503 and r.body == b"draining\n", (r.status, r.body)
    t_close = time.monotonic()
    tk.close_clean()
    rc = sc.wait_exit(h.PROMPT_S)
    t_exit = time.monotonic()
    assert rc == 0, (rc, "\n".join(sc.stderr_lines[-10:]))
    assert t_exit - t_close <= h.PROMPT_S, \
        f"exit {t_exit - t_close:.2f} s after the last close, expected at once"
    assert t_exit - t0 < drain_s, \
        (f"exit {t_exit - t0:.2f} s after SIGTERM: the drain ran to its {drain_s} s deadline "
         f"instead of ending with the last connection")
    e = sc.log_for_peer_port(tk.local_port, timeout=1)
    assert e is not None and e["close"] == "eof" and e["decision"] == "allow", e


@pytest.mark.parametrize("how", ["double-sigterm", "sigint"])
def test_drain_cut_short(env, pki, how):
    drain_s = DRAIN_LONG_MS / 1000
    app, sc, port = _drain_sidecar(env, pki, DRAIN_LONG_MS, f"drain-{how}")
    web = h.client_context(pki, "web-frontend")
    tk = Ticker(port, web)
    tk.start()
    assert wait_until_rounds(tk, 2), f"stream not flowing: {tk.end}"
    t0 = time.monotonic()
    if how == "double-sigterm":
        ev = sc.event_count()
        sc.signal(signal.SIGTERM)
        drain_started_and_stream_lives(sc, tk, ev, 0.4)   # the first SIGTERM drains
        assert sc.admin_get("/ready").status == 503
        t0 = time.monotonic()
        sc.signal(signal.SIGTERM)
    else:
        sc.signal(signal.SIGINT)
    rc = sc.wait_exit(h.PROMPT_S)
    took = time.monotonic() - t0
    assert rc == 0, (rc, "\n".join(sc.stderr_lines[-10:]))
    assert took <= h.PROMPT_S, \
        f"{how}: exit took {took:.2f} s, expected at once (the drain deadline is {drain_s} s)"
    tk.join(h.T(5))
    assert tk.end is not None and tk.end != "stopped", tk.end
    e = sc.log_for_peer_port(tk.local_port, timeout=1)
    assert e is not None and e["close"] == "shutdown", e
    tk.sock.close()


# ===================================================================== 6. logging switches

def test_access_log_off_still_counts(env, pki):
    app = env.app("echo")
    sc, port = inbound_sidecar(env, pki, app, name="noaccess",
                               log={"level": "info", "access": False})
    web = h.client_context(pki, "web-frontend")
    for i in range(3):
        echo_conn(port, web, b"y" * (100 + i))
    for _ in range(2):
        r = h.attempt_tls(port, h.client_context(pki, "evil-intruder"))
        assert not isinstance(r, ssl.SSLSocket)
    lab = dict(listener="api", direction="inbound")
    wait_metric(sc, "portcullis_connections_total", 3, decision="allow", **lab)
    m = wait_metric(sc, "portcullis_connections_total", 2, decision="deny",
                    reason="not_allowed", **lab)
    assert m.get("portcullis_bytes_total", flow="from_peer", **lab) == 303
    assert m.get("portcullis_handshake_duration_seconds_count", **lab) == 3
    sc.stop()
    assert sc.stdout_lines == [], f"access lines with log.access = false: {sc.stdout_lines[:3]}"
    assert any(e.get("msg") == "ready" for e in sc.events), "info events should still be there"


def test_log_level_error_suppresses_info(env, pki):
    """With log.level = "error" there is no "ready" event: the harness waits for GET /ready
    = 200 instead (Sidecar ready="auto" picks that for warn/error)."""
    app = env.app("echo")
    sc, port = inbound_sidecar(env, pki, app, name="quiet",
                               log={"level": "error", "access": True})
    assert sc.ready_mode == "http"
    web = h.client_context(pki, "web-frontend")
    lp = echo_conn(port, web, b"quiet please\n")
    e = sc.log_for_peer_port(lp, timeout=h.PROMPT_S)
    assert e is not None, "access log is independent of log.level"
    # an ok reload (info) is not logged, but it happened
    sc.sighup()
    wait_metric(sc, "portcullis_reloads_total", 1, kind="config", result="ok")
    # a failed reload (error) is logged
    good = sc.conf_path.read_text()
    sc.write_config(good.replace("workers = 2;", "workers = = 2 {;"))
    ev = sc.event_count()
    sc.sighup()
    e = sc.wait_for_event("reload failed: kind=config", h.PROMPT_S, ev)
    assert e is not None and e.get("level") == "error", "\n".join(sc.stderr_lines[-5:])
    sc.write_config(good)
    sc.stop()
    bad = [l for l in sc.stderr_lines if not l.strip()]
    levels = []
    for line in sc.stderr_lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        levels.append(obj.get("level"))
        assert obj.get("level") == "error", f"non-error event with log.level=error: {line}"
    assert not bad, f"non-JSON stderr lines: {bad[:3]}"
    assert not any(e.get("msg") == "ready" for e in sc.events)

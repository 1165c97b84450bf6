"""HTTP/2 lifecycle (issue 13 item 6, README "HTTP/2"): SIGTERM drains with GOAWAY while
streams in flight finish; a revoked peer's connection gets GOAWAY; an upstream's GOAWAY
moves new streams to a fresh connection; pooled HTTP/2 upstreams serve only their
generation; the gRPC answers the sidecar gives for its own deadline and limits. Real
clients: python3-h2 over TLS, grpcio, curl."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

import grpckit as gk
import h2kit
import harness as h
import httpkit as hk


class H2Client:
    """A python3-h2 client over mTLS (ALPN h2) that collects every event."""

    def __init__(self, port: int, ctx: ssl.SSLContext, authority: str = "api.payments.svc"):
        ctx.set_alpn_protocols(["h2"])
        self.sock = h.tls_connect(port, ctx)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.authority = authority
        self.events: list = []
        self.bodies: dict[int, bytearray] = {}
        self.eof = False

    def get(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                     (":authority", self.authority), (":path", path)],
                               end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.bodies[sid] = bytearray()
        return sid

    def post_expecting_100(self, path: str, length: int) -> int:
        """A POST head with expect: 100-continue and a content-length; no body yet."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                     (":authority", self.authority), (":path", path),
                                     ("expect", "100-continue"),
                                     ("content-length", str(length))])
        self.sock.sendall(self.conn.data_to_send())
        self.bodies[sid] = bytearray()
        return sid

    def interim(self, sid: int) -> list:
        """The informational (1xx) responses of stream sid so far."""
        return [e for e in self.of(h2.events.InformationalResponseReceived)
                if e.stream_id == sid]

    def pump(self, until, timeout: float = h.WAIT_S) -> bool:
        """Reads and handles frames until until(self) or EOF or timeout (scaled)."""
        deadline = time.monotonic() + h.T(timeout)
        while not until(self):
            if self.eof or time.monotonic() > deadline:
                return until(self)
            self.sock.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                self.eof = True
                continue
            if not data:
                self.eof = True
                continue
            for ev in self.conn.receive_data(data):
                self.events.append(ev)
                if isinstance(ev, h2.events.DataReceived):
                    self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            out = self.conn.data_to_send()
            if out:
                try:
                    self.sock.sendall(out)
                except OSError:
                    self.eof = True
        return True

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def status(self, sid: int) -> int | None:
        for e in self.of(h2.events.ResponseReceived):
            if e.stream_id == sid:
                return int(dict(e.headers)[b":status"])
        return None

    def ended(self, sid: int) -> bool:
        return any(e.stream_id == sid for e in self.of(h2.events.StreamEnded))

    def goaway(self):
        g = self.of(h2.events.ConnectionTerminated)
        return g[0] if g else None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _inbound_sidecar(env, app_addr: str, *, allow=None, name: str, **limits):
    port = h.free_port()
    cfg = h.base_config(env.pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app_addr, allow or [{"namespace": "web"}],
                           protocol="http")])
    cfg["limits"].update(limits)
    return env.sidecar(cfg, name=name), port, cfg


def test_sigterm_drains_with_goaway_and_the_stream_in_flight_finishes(env):
    # nghttp, not python3-h2: h2 refuses frames after a GOAWAY, even those of streams the
    # GOAWAY lets finish.
    app = hk.HttpApp(name="drainapp")
    env.apps.append(app)
    sc, port, _ = _inbound_sidecar(env, app.addr, name="h2-drain", drain_timeout_ms=60000)
    p = subprocess.Popen(["nghttp", "-v", "--cert", env.pki.crt("web-frontend"),
                          "--key", env.pki.key("web-frontend"),
                          f"https://127.0.0.1:{port}/sleep?ms=1500"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert h.wait_until(lambda: app.nreq() == 1, h.WAIT_S), "the request never reached the app"
        sc.signal(15)
        out, _ = p.communicate(timeout=h.T(30))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    goaway = [ln for ln in out.splitlines() if "recv GOAWAY frame" in ln]
    assert goaway, out
    assert "error_code=NO_ERROR" in out.split("recv GOAWAY frame", 1)[1].split("\n", 3)[1]
    assert ":status: 200" in out, out
    # the drain ends by itself once the stream is done (a second SIGTERM would cut it short)
    assert sc.wait_exit(h.PROMPT_S) == 0
    lines = [e for e in sc.access_log() if e.get("protocol") == "HTTP/2"]
    assert lines and lines[0]["status"] == 200 and lines[0]["decision"] == "allow"
    m_after = [e for e in sc.events_matching("draining")]
    assert m_after, "no drain event"


def test_revoked_peer_gets_goaway(env):
    app = hk.HttpApp(name="revapp")
    env.apps.append(app)
    sc, port, cfg = _inbound_sidecar(env, app.addr, name="h2-revoke",
                                     allow=[{"namespace": "web"}, {"namespace": "jobs"}],
                                     revoke_grace_ms=0)
    c = H2Client(port, h.client_context(env.pki, "web-frontend"))
    sid = c.get("/echo")
    assert c.pump(lambda cl: cl.ended(sid)) and c.status(sid) == 200
    cfg["inbound"][0]["allow"] = [{"namespace": "jobs"}]
    sc.write_config(cfg)
    ev = sc.event_count()
    sc.sighup()
    assert sc.wait_for_event("reload ok", h.WAIT_S, ev), "no 'reload ok' event"
    assert c.pump(lambda cl: cl.goaway() is not None and cl.eof), c.events
    assert c.goaway().error_code == 0
    m = hk.wait_metric(sc, "portcullis_http2_goaways_sent_total", lambda v: v >= 1,
                       reason="revoked")
    assert m.get("portcullis_http2_goaways_sent_total", reason="revoked") == 1
    line = sc.wait_for_log(lambda e: e.get("close") == "revoked")
    assert line["decision"] == "deny" and line["reason"] == "not_allowed"


@pytest.fixture
def h2pair(env):
    """A sidecar whose inbound listener talks h2c to an h2kit app."""
    app = h2kit.H2App()
    env.apps.append(app)
    port = h.free_port()
    cfg = h.base_config(env.pki, "payments-api", workers=1, inbound=[
        dict(h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http"),
             app_protocol="h2c")])
    sc = env.sidecar(cfg, name="h2-upstream")
    return sc, port, app, cfg


def _curl_h2(env, port: int, path: str) -> str:
    cmd = ["curl", "-sS", "--http2", "--cacert", env.pki.ca, "--cert", env.pki.crt("web-frontend"),
           "--key", env.pki.key("web-frontend"), "--resolve", f"api.payments.svc:{port}:127.0.0.1",
           "-o", "/dev/null", "-w", "%{http_code}", f"https://api.payments.svc:{port}{path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=h.T(30)).stdout


def test_upstream_goaway_sends_new_streams_to_a_fresh_connection(env, h2pair):
    sc, port, app, _ = h2pair
    assert _curl_h2(env, port, "/echo") == "200"
    assert app.conns == 1
    assert _curl_h2(env, port, "/goaway") == "200"
    # the next request cannot use the connection the app said GOAWAY on
    assert _curl_h2(env, port, "/echo?after=1") == "200"
    assert app.conns == 2
    assert h.wait_until(lambda: app.closed >= 1, h.WAIT_S), \
        "the sidecar kept the connection the app sent GOAWAY on"
    assert _curl_h2(env, port, "/echo?again=1") == "200"
    assert app.conns == 2, "a healthy pooled HTTP/2 connection was not reused"


def test_pooled_h2_upstream_serves_only_its_generation(env, h2pair):
    sc, port, app, cfg = h2pair
    assert _curl_h2(env, port, "/echo") == "200"
    assert app.conns == 1
    cfg["log"]["level"] = "debug"  # any change makes a new generation
    sc.write_config(cfg)
    ev = sc.event_count()
    sc.sighup()
    assert sc.wait_for_event("reload ok", h.WAIT_S, ev)
    # requests decided under the new generation ride a new connection; the old one closes
    assert h.wait_until(lambda: _curl_h2(env, port, "/echo?n") == "200" and app.conns == 2,
                        h.WAIT_S)
    assert h.wait_until(lambda: app.closed >= 1, h.WAIT_S), "the old generation's connection stayed"
    assert _curl_h2(env, port, "/echo?m") == "200" and app.conns == 2


# ------------------------------------------------------------------ gRPC: the sidecar's own

@pytest.fixture
def grpc_tight(env):
    """client sidecar -> server sidecar (h2c app) with a 500 ms response deadline and small
    header limits on the server side."""
    app = gk.GrpcApp()
    env.apps.append(app)
    pin, pout = h.free_port(), h.free_port()
    scfg = h.base_config(env.pki, "payments-api", workers=1, inbound=[
        dict(h.inbound_listener("api", pin, app.addr, [{"namespace": "web"}], protocol="http"),
             app_protocol="h2c")])
    scfg["http"].update(response_timeout_ms=500, max_header_bytes=4096)
    server = env.sidecar(scfg, name="grpc-tight-server")
    ccfg = h.base_config(env.pki, "web-frontend", workers=1, outbound=[
        h.outbound_listener("api", pout, h.addr(pin),
                            [{"namespace": "payments", "service_account": "api"}],
                            protocol="http")])
    client = env.sidecar(ccfg, name="grpc-tight-client")
    ch = grpc.insecure_channel(f"127.0.0.1:{pout}")
    yield app, server, client, ch
    ch.close()


def test_grpc_sidecar_deadline_is_deadline_exceeded(grpc_tight):
    app, server, _, ch = grpc_tight
    call = ch.unary_unary(f"/{gk.SERVICE}/Unary")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"x", metadata=(("sleep-ms", "3000"),), timeout=h.T(60))
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout" in ei.value.details(), "expected the sidecar's message, not the client's"
    line = server.wait_for_log(lambda e: e.get("path") == "/mesh.Echo/Unary")
    assert line["status"] == 504 or line["grpc_status"] == 4
    assert line["reason"] == "timeout"


def test_grpc_oversized_metadata_is_resource_exhausted(grpc_tight):
    app, server, _, ch = grpc_tight
    n = app.ncalls()
    call = ch.unary_unary(f"/{gk.SERVICE}/Unary")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"x", metadata=(("x-big", "v" * 6000),), timeout=h.T(30))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit" in ei.value.details()
    assert app.ncalls() == n


def test_interim_100_continue_reaches_the_h2_client_before_the_body_is_sent(env):
    """An HTTP/1.1 app's 100 Continue is relayed to an HTTP/2 client as an interim HEADERS
    frame: a client that waits for it before sending its body (Expect: 100-continue) is not
    left hanging."""
    app = hk.HttpApp(name="continueapp")
    env.apps.append(app)
    sc, port, _ = _inbound_sidecar(env, app.addr, name="h2-continue")
    c = H2Client(port, h.client_context(env.pki, "web-frontend"))
    try:
        sid = c.post_expecting_100("/continue", 5)
        assert c.pump(lambda cl: cl.interim(sid) or cl.status(sid) is not None), \
            "no answer at all while the body was held back"
        assert c.interim(sid), f"no 100 Continue before the body: {c.events}"
        assert dict(c.interim(sid)[0].headers)[b":status"] == b"100"
        assert c.status(sid) is None, "a final answer before the body was sent"
        c.conn.send_data(sid, b"hello", end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        assert c.pump(lambda cl: cl.ended(sid)), c.events
        assert c.status(sid) == 200
        seen = json.loads(bytes(c.bodies[sid]))
        assert seen["body_len"] == 5 and seen["target"] == "/continue", seen
    finally:
        c.close()
    assert h.wait_until(lambda: any(e.get("path") == "/continue" for e in sc.access_log()),
                        h.WAIT_S), "no access-log line"
    line = [e for e in sc.access_log() if e.get("path") == "/continue"]
    assert line[0]["status"] == 200 and line[0]["protocol"] == "HTTP/2", line

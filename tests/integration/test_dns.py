"""Service names (issue 15): `forward` and `upstream` as NAME:PORT, resolved with c-ares
against a real DNS server (dnsmasq, tests/integration/dnskit.py) whose answers a test
rewrites; endpoint sets spread with power-of-two-choices; passive health (ejection, retries
on another endpoint); the last good answer kept when DNS fails; names that never resolve;
`/endpoints`, the metrics and the access log's `endpoint`.

Endpoints are apps on distinct loopback addresses sharing one port (127.0.0.2:P,
127.0.0.3:P, ...; ::1 for IPv6). Every sidecar here resolves through its test's own dnsmasq
(dns.servers) with a short minimum TTL, so a changed answer is followed within about a
second; ejections last a minute (health.ejection_base_ms) so an ejected endpoint stays
ejected for as long as a test looks at it.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import grpc
import pytest

import dnskit as dk
import grpckit as gk
import harness as h
import httpkit as hk
from httpkit import HttpConn, req

ALLOW = [{"namespace": "web"}]
EXPECT = [{"namespace": "payments", "service_account": "api"}]
EJECT_MS = 60000
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")
RESULTS = {"ok", "nxdomain", "servfail", "timeout"}

RESOLUTIONS = "portcullis_dns_resolutions_total"
ENDPOINTS = "portcullis_upstream_endpoints"
EJECTIONS = "portcullis_upstream_ejections_total"
STALE = "portcullis_dns_stale"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def dns(tmp_path):
    if not dk.available():
        pytest.fail(f"{dk.DNSMASQ} not found: install dnsmasq-base (scripts/install-deps.sh)")
    d = dk.Dnsmasq(tmp_path / "dns", ttl=1)
    yield d
    d.close()


def dns_settings(dns: dk.Dnsmasq, **kw) -> dict:
    return {"servers": [dns.server], "min_ttl_ms": 200, "max_ttl_ms": 1000,
            "timeout_ms": 500, **kw}


def config(env, dns: dk.Dnsmasq, *, inbound=(), outbound=(), identity="payments-api",
           dns_extra: dict | None = None, health: dict | None = None) -> dict:
    return h.base_config(env.pki, identity, workers=1, inbound=inbound, outbound=outbound,
                         extra={"dns": dns_settings(dns, **(dns_extra or {})),
                                "health": health or {"ejection_base_ms": EJECT_MS,
                                                     "ejection_max_ms": 2 * EJECT_MS}})


def inbound_sidecar(env, dns, target: str, *, protocol: str = "tcp", name: str = "api",
                    **kw) -> tuple[h.Sidecar, int]:
    port = h.free_port()
    sc = env.sidecar(config(env, dns, inbound=[
        h.inbound_listener(name, port, target, ALLOW, protocol=protocol)], **kw))
    return sc, port


def http_apps(env, ips: list[str], port: int, **kw) -> list[hk.HttpApp]:
    apps = [hk.HttpApp(host=ip, port=port, name=f"app-{ip}", **kw) for ip in ips]
    env.apps += apps
    return apps


def tcp_apps(env, ips: list[str], port: int) -> list[h.AppServer]:
    apps = [h.AppServer("echo", host=ip, port=port) for ip in ips]
    env.apps += apps
    return apps


def ep(ip: str, port: int) -> str:
    return h.addr(port, ip)


def client_ctx(env) -> ssl.SSLContext:
    return h.client_context(env.pki, "web-frontend")


# --------------------------------------------------------------------------- /endpoints

def endpoints_doc(sc: h.Sidecar) -> dict:
    r = sc.admin_get("/endpoints")
    assert r.status == 200, (r.status, r.text[:300])
    assert "json" in (r.headers.get("content-type") or ""), r.headers
    return r.json()


def view(sc: h.Sidecar, listener: str) -> dict:
    doc = endpoints_doc(sc)
    found = [x for x in doc["listeners"] if x.get("name") == listener]
    assert len(found) == 1, f"listener {listener!r} in /endpoints: {doc}"
    return found[0]


def addrs(v: dict) -> set[str]:
    return {e["address"] for e in v["endpoints"]}


def states(v: dict) -> dict[str, str]:
    return {e["address"]: e["state"] for e in v["endpoints"]}


def wait_view(sc: h.Sidecar, listener: str, pred, timeout: float = 2 * h.WAIT_S,
              what: str = "") -> dict:
    """Poll /endpoints (bounded) until pred(listener's entry); asserts it."""
    last = {}

    def ok():
        nonlocal last
        last = view(sc, listener)
        return pred(last)
    assert h.wait_until(ok, h.T(timeout), interval=0.05), \
        f"/endpoints[{listener}] never {what or 'matched'}: {last}"
    return last


def wait_addrs(sc, listener, want: set[str]) -> dict:
    return wait_view(sc, listener, lambda v: addrs(v) == want, what=f"had addresses {want}")


def wall(rfc3339: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC time."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def has_sample(m: hk.Metrics, name: str, **labels) -> bool:
    return any(n == name and all(lab.get(k) == v for k, v in labels.items())
               for (n, lab, _) in m.samples)


# --------------------------------------------------------------------------- traffic

def get(c: HttpConn, path: str = "/echo") -> hk.Resp:
    c.send(req("GET", path))
    return c.read_response(timeout=h.PROMPT_S)


def gets(port: int, ctx: ssl.SSLContext | None, n: int, path: str = "/echo") -> list[int]:
    """n sequential bodiless GETs on one keep-alive connection (TLS when ctx, else plain);
    their statuses. A connection the sidecar closes is replaced."""
    out = []
    c = None
    try:
        for _ in range(n):
            if c is None:
                c = HttpConn.tls(port, ctx) if ctx else HttpConn.plain(port)
            r = get(c, path)
            out.append(r.status)
            if r.closes:
                c.close()
                c = None
    finally:
        if c is not None:
            c.close()
    return out


def request_lines(sc: h.Sidecar, start: int, n: int) -> list[dict]:
    """The first n per-request access-log lines from index start (waits, bounded)."""
    assert h.wait_until(lambda: sum("status" in e for e in sc.access_log()[start:]) >= n,
                        h.T(h.PROMPT_S)), sc.access_log()[start:]
    return [e for e in sc.access_log()[start:] if "status" in e][:n]


def tcp_echo(port: int, ctx: ssl.SSLContext | None, msg: bytes) -> tuple[socket.socket, int]:
    """A connection (TLS when ctx) through the listener, proven to echo msg; and its local
    port. Caller closes."""
    if ctx is None:
        s = socket.create_connection((h.HOST, port), timeout=h.T(h.PROMPT_S))
    else:
        s = h.tls_connect(port, ctx, timeout=h.PROMPT_S)
    local = s.getsockname()[1]
    s.sendall(msg)
    assert h.recv_exact(s, len(msg), timeout=h.PROMPT_S) == msg
    return s, local


def closed_without_data(s: socket.socket) -> bool:
    """The sidecar closes this connection without sending anything (EOF or reset)."""
    s.settimeout(h.T(h.PROMPT_S))
    try:
        return s.recv(100) == b""
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        return True
    except (socket.timeout, TimeoutError):
        return False


def closed_and_logged(env, sc: h.Sidecar, lport: int, probe: bytes) -> dict:
    """A client connection to lport sends probe and is closed without data; returns the
    listener "api"'s access-log line for it."""
    start = len(sc.access_log())
    s = h.tls_connect(lport, client_ctx(env))
    try:
        try:
            s.sendall(probe)
        except OSError:
            pass
        assert closed_without_data(s), "the connection was not closed"
    finally:
        s.close()
    e = sc.wait_for_log(lambda e: e.get("listener") == "api", timeout=h.PROMPT_S, start=start)
    assert e is not None
    return e


# =========================================================================== the fixture

def test_dnsmasq_fixture_answers_and_follows_rewrites(dns):
    """The DNS server every other test relies on: A and AAAA from the hosts file, a
    rewrite served once set_hosts() returns, NXDOMAIN for a removed name, no answer while
    paused or stopped, the same port after a restart."""
    dns.set_hosts({"app.test": ["127.0.0.2", "127.0.0.3"], "dual.test": ["127.0.0.2", "::1"]})
    a = dk.query(dns.port, "app.test", dk.A)
    assert a is not None and a.rcode == dk.NOERROR, a
    assert sorted(a.addresses) == ["127.0.0.2", "127.0.0.3"] and set(a.ttls) == {1}, a
    assert dk.resolve(dns.port, "dual.test") == (dk.NOERROR, {"127.0.0.2", "::1"})
    assert dk.query(dns.port, "none.test").rcode == dk.NXDOMAIN
    dns.set_hosts({"app.test": ["127.0.0.4"]})
    assert dk.resolve(dns.port, "app.test") == (dk.NOERROR, {"127.0.0.4"})
    assert dk.query(dns.port, "dual.test").rcode == dk.NXDOMAIN
    dns.set_hosts({"app.test": ["127.0.0.4"]}, servfail=["bad.test"])
    assert dk.query(dns.port, "bad.test").rcode == dk.SERVFAIL
    assert dk.query(dns.port, "app.test").addresses == ["127.0.0.4"]
    dns.pause()
    assert dk.query(dns.port, "app.test", timeout=0.3) is None
    dns.resume()
    assert dk.query(dns.port, "app.test", timeout=h.T(5)).addresses == ["127.0.0.4"]
    dns.stop()
    assert dk.query(dns.port, "app.test", timeout=0.3) is None
    dns.start()
    assert dk.resolve(dns.port, "app.test") == (dk.NOERROR, {"127.0.0.4"})
    assert dk.query(dns.port, "bad.test").rcode == dk.SERVFAIL


# =========================================================================== spread

def _spread_setup(env, dns, protocol: str = "tcp"):
    """Two apps (HTTP, or TCP echo) on 127.0.0.2 and 127.0.0.3 behind app.test, and an
    inbound sidecar forwarding to app.test:PORT that has resolved both: (port, ips, apps,
    sidecar, listen port)."""
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    apps = http_apps(env, ips, port) if protocol == "http" else tcp_apps(env, ips, port)
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol=protocol)
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    return port, ips, apps, sc, lport


def test_http_inbound_requests_spread_across_the_set(env, dns):
    """forward = "app.test:P" with two addresses: bodiless GETs on one keep-alive client
    connection are spread over both endpoints, and each request's access-log line names
    the endpoint (IP:PORT) that served it."""
    port, ips, apps, sc, lport = _spread_setup(env, dns, "http")
    start = len(sc.access_log())
    n = 40
    assert gets(lport, client_ctx(env), n) == [200] * n
    counts = [a.nreq() for a in apps]
    assert sum(counts) == n and min(counts) >= 5, f"requests per endpoint: {counts}"
    lines = request_lines(sc, start, n)
    for e in lines:
        hk.check_http_entry(e)
    assert Counter(e.get("endpoint") for e in lines) == \
        {ep(ip, port): c for ip, c in zip(ips, counts)}, lines


def test_tcp_inbound_connections_spread_across_the_set(env, dns):
    """An L4 inbound listener forwarding to a name: new connections go to both endpoints;
    each connection's access-log line names the endpoint its app saw it on."""
    port, ips, apps, sc, lport = _spread_setup(env, dns)
    ctx = client_ctx(env)
    start = len(sc.access_log())
    n = 30
    for i in range(n):
        s, _ = tcp_echo(lport, ctx, b"conn-%d\n" % i)
        s.close()
    counts = [a.count() for a in apps]
    assert sum(counts) == n and min(counts) >= 4, f"connections per endpoint: {counts}"
    assert h.wait_until(lambda: len(sc.access_log()) - start >= n, h.T(h.PROMPT_S))
    lines = sc.access_log()[start:start + n]
    for e in lines:
        h.check_access_entry(e)
        assert e["decision"] == "allow", e
    assert Counter(e.get("endpoint") for e in lines) == \
        {ep(ip, port): c for ip, c in zip(ips, counts)}, lines


def test_http_outbound_upstream_name_spread(env, dns):
    """upstream = "mesh.test:P": the outbound listener's pooled mTLS connections go to both
    upstreams behind the name, and its access-log lines name them."""
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    apps = http_apps(env, ips, port, tls_ctx=hk.tls_server_context(env.pki, "payments-api"))
    dns.set_hosts({"mesh.test": ips})
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[
        h.outbound_listener("payments", lport, f"mesh.test:{port}", EXPECT,
                            protocol="http")]))
    v = wait_addrs(sc, "payments", {ep(ip, port) for ip in ips})
    assert v["direction"] == "outbound" and v["target"] == f"mesh.test:{port}", v
    start = len(sc.access_log())
    n = 40
    assert gets(lport, None, n) == [200] * n
    counts = [a.nreq() for a in apps]
    assert sum(counts) == n and min(counts) >= 5, f"requests per upstream: {counts}"
    lines = request_lines(sc, start, n)
    assert Counter(e.get("endpoint") for e in lines) == \
        {ep(ip, port): c for ip, c in zip(ips, counts)}, lines
    for a in apps:   # an mTLS upstream: the sidecar presented its identity to both
        assert all(c.peer_uris == [h.spiffe("web", "frontend")] for c in a.conns_since(0))


def test_tcp_new_connection_goes_to_the_less_loaded_endpoint(env, dns):
    """Power of two choices over a two-address set is the less loaded of the two: with
    connections held open, each new one goes where fewer are open, so 2k open connections
    sit k and k."""
    port, ips, apps, sc, lport = _spread_setup(env, dns)
    ctx = client_ctx(env)
    held = []
    try:
        for i in range(10):
            s, _ = tcp_echo(lport, ctx, b"held-%d\n" % i)   # open at the app once it echoes
            held.append(s)
            if i % 2 == 1:
                assert [a.count() for a in apps] == [(i + 1) // 2] * 2, \
                    f"after {i + 1} open connections: {[a.count() for a in apps]}"
        v = view(sc, "api")
        assert [e["in_flight"] for e in v["endpoints"]] == [5, 5], v
    finally:
        for s in held:
            s.close()


def test_http_request_goes_to_the_endpoint_with_fewer_in_flight(env, dns):
    """HTTP load is requests in flight: with requests held by the apps, each new request
    goes to the endpoint holding fewer, so 4 held requests sit 2 and 2."""
    port, ips, apps, sc, lport = _spread_setup(env, dns, "http")
    ctx = client_ctx(env)
    conns = []
    try:
        for i in range(4):
            c = HttpConn.tls(lport, ctx)
            conns.append(c)
            c.send(req("GET", "/gate?key=held&n=1000000"))
            assert h.wait_until(lambda: sum(a.nreq() for a in apps) == i + 1,
                                h.T(h.PROMPT_S)), "the held request did not reach an app"
            if i % 2 == 1:
                assert [a.nreq() for a in apps] == [(i + 1) // 2] * 2, \
                    f"after {i + 1} held requests: {[a.nreq() for a in apps]}"
        for a in apps:
            a.open_gate("held")
        assert [c.read_response(timeout=h.PROMPT_S).status for c in conns] == [200] * 4
    finally:
        for c in conns:
            c.close()


def test_grpc_through_a_name_spread_over_two_sidecars(env, dns):
    """gRPC (HTTP/2 end to end) through an outbound listener whose upstream is a name for
    two real inbound sidecars (127.0.0.2:P and 127.0.0.3:P, both in front of one gRPC
    app): calls on one client channel are spread over both, each on an HTTP/2 connection
    of its own endpoint."""
    app = gk.GrpcApp()
    env.apps.append(app)
    port = h.free_port()
    servers = []
    for ip in ("127.0.0.2", "127.0.0.3"):
        lst = dict(h.inbound_listener("api", port, app.addr, ALLOW, protocol="http"),
                   listen=ep(ip, port), app_protocol="h2c")
        servers.append(env.sidecar(h.base_config(env.pki, "payments-api", workers=1,
                                                 inbound=[lst]), name=f"server-{ip}"))
    dns.set_hosts({"mesh.test": ["127.0.0.2", "127.0.0.3"]})
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[dict(
        h.outbound_listener("api", lport, f"mesh.test:{port}", EXPECT, protocol="http"),
        upstream_protocol="h2")]), name="client")
    wait_addrs(sc, "api", {ep("127.0.0.2", port), ep("127.0.0.3", port)})
    start = len(sc.access_log())
    n = 30
    ch = grpc.insecure_channel(f"127.0.0.1:{lport}")
    try:
        call = ch.unary_unary(f"/{gk.SERVICE}/Unary")
        for i in range(n):
            assert call(b"call-%d" % i, timeout=h.T(h.PROMPT_S)) == b"call-%d" % i
    finally:
        ch.close()
    def served_now():
        return [sum(1 for e in s.access_log() if e.get("path") == f"/{gk.SERVICE}/Unary")
                for s in servers]
    # an inbound sidecar writes its line as the response ends: the client may have it first
    h.wait_until(lambda: sum(served_now()) >= n, h.WAIT_S)
    served = served_now()
    assert sum(served) == n and min(served) >= 4, f"calls per inbound sidecar: {served}"
    lines = request_lines(sc, start, n)
    assert all(e.get("protocol") == "HTTP/2" and e.get("grpc_status") == 0 for e in lines), lines
    assert Counter(e.get("endpoint") for e in lines) == \
        {ep("127.0.0.2", port): served[0], ep("127.0.0.3", port): served[1]}, lines
    # calls to one endpoint share its pooled HTTP/2 connection(s): a handful of client
    # connections per inbound sidecar, not one per call
    for s in servers:
        conns = {e.get("peer") for e in s.access_log() if e.get("path")}
        assert 1 <= len(conns) <= 2, conns


def test_outbound_sessions_resume_per_endpoint(env, dns):
    """An L4 outbound listener whose upstream is a name for two real inbound sidecars
    (127.0.0.2:P and 127.0.0.3:P): each issues its own tickets, so the client keeps a
    session per endpoint and every connection after the first to an endpoint resumes. (One
    session per listener offers one pod's ticket to the other, which then does a full
    handshake.)"""
    app = env.app("echo")
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    for ip in ips:
        lst = dict(h.inbound_listener("api", port, app.addr, ALLOW), listen=ep(ip, port))
        env.sidecar(h.base_config(env.pki, "payments-api", workers=1, inbound=[lst]),
                    name=f"server-{ip}")
    dns.set_hosts({"mesh.test": ips})
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[
        h.outbound_listener("api", lport, f"mesh.test:{port}", EXPECT)]), name="client")
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    start = len(sc.access_log())
    n = 16
    for i in range(n):
        msg = b"conn-%d\n" % i
        s, _ = tcp_echo(lport, None, msg)
        s.close()
        # one line at a time: the log's order is the connections' order
        assert h.wait_until(lambda i=i: len(sc.access_log()) - start > i, h.T(h.PROMPT_S))
    lines = sc.access_log()[start:start + n]
    by_ep: dict[str, list[bool]] = {}
    for e in lines:
        assert e["decision"] == "allow", e
        by_ep.setdefault(e.get("endpoint"), []).append(e["resumed"])
    assert set(by_ep) == {ep(ip, port) for ip in ips}, by_ep
    for resumed in by_ep.values():
        assert resumed == [False] + [True] * (len(resumed) - 1), by_ep
    hk.wait_metric(sc, "portcullis_tls_resumptions_total", lambda v: v == n - 2,
                   listener="api", direction="outbound")


# =========================================================================== changes

def test_changed_answer_followed_and_old_pool_closed(env, dns):
    """The name moves from 127.0.0.2 to 127.0.0.3: /endpoints follows within a bounded
    wait (TTL 1 s), the idle pooled connection to the removed endpoint is closed (without
    waiting for more traffic), and every later request goes to the new address only."""
    port = h.free_port()
    old, new = http_apps(env, ["127.0.0.2", "127.0.0.3"], port)
    dns.set_hosts({"app.test": ["127.0.0.2"]})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http")
    wait_addrs(sc, "api", {ep("127.0.0.2", port)})
    ctx = client_ctx(env)
    assert gets(lport, ctx, 5) == [200] * 5
    assert (old.nreq(), new.nreq()) == (5, 0)
    assert old.count() >= 1
    ok_before = hk.scrape(sc).get(RESOLUTIONS, listener="api", result="ok")

    dns.set_hosts({"app.test": ["127.0.0.3"]})
    v = wait_addrs(sc, "api", {ep("127.0.0.3", port)})
    assert v["last_result"] == "ok" and v["stale"] is False, v
    assert hk.scrape(sc).get(RESOLUTIONS, listener="api", result="ok") > ok_before
    # the pooled connection to the removed endpoint carries nothing: it is closed, with
    # no further traffic needed to notice
    assert h.wait_until(lambda: old.closed() == old.count(), h.T(h.PROMPT_S)), \
        f"{old.count() - old.closed()} connection(s) to the removed endpoint stay open"
    start = len(sc.access_log())
    assert gets(lport, ctx, 10) == [200] * 10
    assert (old.nreq(), new.nreq()) == (5, 10), "a request went to the removed endpoint"
    assert {e.get("endpoint") for e in request_lines(sc, start, 10)} == {ep("127.0.0.3", port)}


def test_changed_answer_request_in_flight_finishes_then_its_connection_closes(env, dns):
    """A request in flight to an endpoint that leaves the answer is answered (200); its
    connection then closes instead of going back to the pool, and the next request goes
    to the new endpoint."""
    port = h.free_port()
    old, new = http_apps(env, ["127.0.0.2", "127.0.0.3"], port)
    dns.set_hosts({"app.test": ["127.0.0.2"]})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http")
    wait_addrs(sc, "api", {ep("127.0.0.2", port)})
    with HttpConn.tls(lport, client_ctx(env)) as c:
        c.send(req("GET", "/gate?key=held&n=1000000"))
        assert h.wait_until(lambda: old.nreq() == 1, h.T(h.PROMPT_S))
        dns.set_hosts({"app.test": ["127.0.0.3"]})
        wait_addrs(sc, "api", {ep("127.0.0.3", port)})
        old.open_gate("held")
        assert c.read_response(timeout=h.PROMPT_S).status == 200
        assert h.wait_until(lambda: old.closed() == old.count(), h.T(h.PROMPT_S)), \
            "the connection to the removed endpoint stayed open after its request"
        assert get(c).status == 200
    assert (old.nreq(), new.nreq()) == (1, 1)


def test_changed_answer_tcp_connection_in_flight_finishes(env, dns):
    """A TCP connection to an endpoint that leaves the answer carries on (it echoes after
    the change); the next connection goes to the new endpoint."""
    port = h.free_port()
    old, new = tcp_apps(env, ["127.0.0.2", "127.0.0.3"], port)
    dns.set_hosts({"app.test": ["127.0.0.2"]})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}")
    wait_addrs(sc, "api", {ep("127.0.0.2", port)})
    ctx = client_ctx(env)
    s1, p1 = tcp_echo(lport, ctx, b"before\n")
    try:
        assert (old.count(), new.count()) == (1, 0)
        dns.set_hosts({"app.test": ["127.0.0.3"]})
        wait_addrs(sc, "api", {ep("127.0.0.3", port)})
        s1.sendall(b"after the change\n")
        assert h.recv_exact(s1, 17, timeout=h.PROMPT_S) == b"after the change\n"
        s2, p2 = tcp_echo(lport, ctx, b"new\n")
        s2.close()
        assert (old.count(), new.count()) == (1, 1)
    finally:
        s1.close()
    e1 = sc.wait_for_log(lambda e: e.get("endpoint") == ep("127.0.0.2", port),
                         timeout=h.PROMPT_S)
    assert e1 is not None and e1["decision"] == "allow", sc.access_log()
    assert e1["bytes_from_peer"] == len(b"before\nafter the change\n"), e1
    e2 = sc.wait_for_log(lambda e: e.get("endpoint") == ep("127.0.0.3", port),
                         timeout=h.PROMPT_S)
    assert e2 is not None and e2["decision"] == "allow", sc.access_log()


def _ttl_sidecar(env, tmp_path, name: str, ttl: int, dns_extra: dict):
    """A dnsmasq of its own answering app.test with TTL ttl, and a sidecar (dns_extra in its
    dns settings) forwarding to app.test:9 once it resolved it: (dnsmasq, sidecar, view)."""
    d = dk.Dnsmasq(tmp_path / name, ttl=ttl)
    env.apps.append(_Killer(d))
    d.set_hosts({"app.test": ["127.0.0.2"]})
    assert dk.query(d.port, "app.test").ttls == [ttl]
    sc, _ = inbound_sidecar(env, d, "app.test:9", dns_extra=dns_extra)
    return d, sc, wait_addrs(sc, "api", {"127.0.0.2:9"})


def test_ttl_clamped_to_max_drives_re_resolution(env, tmp_path):
    """A record TTL of an hour is clamped to dns.max_ttl_ms (500 ms): a changed answer is
    followed long before the record would expire."""
    d, sc, v = _ttl_sidecar(env, tmp_path, "dns-long", 3600, {"max_ttl_ms": 500})
    assert v["ttl_ms"] == 500, v     # /endpoints shows the clamped TTL
    d.set_hosts({"app.test": ["127.0.0.3"]})
    wait_addrs(sc, "api", {"127.0.0.3:9"})


def test_ttl_zero_clamped_to_min(env, tmp_path):
    """A record TTL of 0 is clamped up to dns.min_ttl_ms (shown as ttl_ms), and the name
    is still asked again."""
    _, sc, v = _ttl_sidecar(env, tmp_path, "dns-zero", 0, {"min_ttl_ms": 700})
    assert v["ttl_ms"] == 700, v
    hk.wait_metric(sc, RESOLUTIONS, lambda x: x >= 3, listener="api", result="ok")


class _Killer:
    """Lets env's teardown stop a dnsmasq started inside a test."""

    def __init__(self, d: dk.Dnsmasq):
        self.d = d

    def stop(self):
        self.d.close()


# =========================================================================== passive health

def test_dead_endpoint_ejected_without_a_failed_get(env, dns):
    """One of two apps dies: bodiless GETs all succeed (a failed connect is retried on the
    other endpoint), the dead endpoint is ejected (/endpoints, gauges, ejection counter),
    and while ejected it gets nothing even once it listens again."""
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    dead, alive = http_apps(env, ips, port)
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http")
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    ctx = client_ctx(env)
    assert gets(lport, ctx, 10) == [200] * 10
    dead.stop()
    n = 30
    assert gets(lport, ctx, n) == [200] * n, "a GET failed that could have been retried"
    v = wait_view(sc, "api", lambda v: states(v).get(ep(ips[0], port)) == "ejected",
                  what="showed the dead endpoint ejected")
    by = {e["address"]: e for e in v["endpoints"]}
    assert by[ep(ips[1], port)]["state"] == "healthy", v
    assert by[ep(ips[1], port)]["ejected_until"] is None, v
    assert RFC3339.fullmatch(by[ep(ips[0], port)]["ejected_until"] or ""), v
    # a first ejection lasts at most about health.ejection_base_ms
    assert wall(by[ep(ips[0], port)]["ejected_until"]) <= time.time() + EJECT_MS / 1000 + 1, v
    m = hk.scrape(sc)
    assert m.get(EJECTIONS, listener="api") >= 1, m.lines(EJECTIONS)
    assert m.get(ENDPOINTS, listener="api", state="ejected") == 1, m.lines(ENDPOINTS)
    assert m.get(ENDPOINTS, listener="api", state="healthy") == 1, m.lines(ENDPOINTS)
    # skipped while a healthy endpoint exists, even though it answers again
    back = http_apps(env, [ips[0]], port)[0]
    before = alive.nreq()
    assert gets(lport, ctx, 10) == [200] * 10
    assert back.nreq() == 0 and alive.nreq() == before + 10


def test_http2_client_gets_retried_past_a_dead_endpoint(env, dns):
    """The same for HTTP/2 clients: bodiless GETs from curl (prior-knowledge h2c) through
    an outbound listener whose name has a dead upstream all succeed, and the dead one is
    ejected."""
    port = h.free_port()
    dns.set_hosts({"mesh.test": ["127.0.0.2", "127.0.0.3"]})
    good = http_apps(env, ["127.0.0.3"], port,
                     tls_ctx=hk.tls_server_context(env.pki, "payments-api"))[0]
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[
        h.outbound_listener("payments", lport, f"mesh.test:{port}", EXPECT,
                            protocol="http")]))
    dead_ep = ep("127.0.0.2", port)
    wait_addrs(sc, "payments", {dead_ep, ep("127.0.0.3", port)})
    n = 12
    for i in range(n):   # one curl each (curl 7.88 breaks reusing a prior-knowledge connection)
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                            "-w", "%{http_version} %{http_code}",
                            f"http://127.0.0.1:{lport}/echo?i={i}"],
                           capture_output=True, text=True, timeout=h.T(60))
        assert r.stdout == "2 200", (i, r.stdout, r.stderr)
    assert good.nreq() == n
    assert states(view(sc, "payments"))[dead_ep] == "ejected"


def test_all_ejected_endpoints_are_still_tried(env, dns):
    """With every endpoint ejected there is no healthy one to prefer: the ejected ones are
    tried again, so a GET succeeds as soon as one of them listens."""
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http")
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    ctx = client_ctx(env)
    assert gets(lport, ctx, 1) == [503]
    wait_view(sc, "api", lambda v: set(states(v).values()) == {"ejected"},
              what="showed both endpoints ejected")
    app = http_apps(env, [ips[0]], port)[0]
    assert gets(lport, ctx, 3) == [200] * 3
    assert app.nreq() == 3


def test_ejection_backoff_is_capped(env, dns):
    """Consecutive failures lengthen an ejection, never past health.ejection_max_ms: two
    dead endpoints fail again and again (with none healthy they are still tried: 4 GETs
    make several failures in a row each, uncapped 4x the base and more), and neither is
    ejected for longer than the cap."""
    base_ms, max_ms = 30000, 40000
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http",
                                health={"ejection_base_ms": base_ms, "ejection_max_ms": max_ms})
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    assert gets(lport, client_ctx(env), 4) == [503] * 4
    m = hk.scrape(sc)
    assert m.get(EJECTIONS, listener="api") >= 2, m.lines(EJECTIONS)
    v = view(sc, "api")
    now = time.time()
    for e in v["endpoints"]:
        assert e["state"] == "ejected", v
        assert wall(e["ejected_until"]) <= now + max_ms / 1000 + 1, (now, v)


def _reset_after_request(ctx: ssl.SSLContext):
    """A TLS upstream (handler for AppServer) that completes the handshake, reads the
    request, and resets the connection without any response (SO_LINGER 0, close)."""
    def handler(sock: socket.socket, rec) -> None:
        sock.settimeout(h.T(h.PROMPT_S))
        t = ctx.wrap_socket(sock, server_side=True)
        try:
            t.recv(65536)
        finally:
            t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.close()
    return handler


@pytest.mark.parametrize("bad", ["handshake", "reset"])
def test_failed_handshake_or_early_reset_ejects(env, dns, bad):
    """Outbound HTTP to a name whose 127.0.0.2 upstream fails the TLS handshake (a
    certificate from another CA) or, after the handshake, resets every new connection
    before any response (the request read, nothing answered): that
    endpoint is ejected after its first failure, and from then on every request goes to
    the good one (127.0.0.3)."""
    port = h.free_port()
    if bad == "handshake":
        http_apps(env, ["127.0.0.2"], port,
                  tls_ctx=hk.tls_server_context(env.pki, "bad-other-ca"))
    else:
        env.apps.append(h.AppServer(
            "handler", host="127.0.0.2", port=port,
            handler=_reset_after_request(hk.tls_server_context(env.pki, "payments-api"))))
    good = http_apps(env, ["127.0.0.3"], port,
                     tls_ctx=hk.tls_server_context(env.pki, "payments-api"))[0]
    dns.set_hosts({"mesh.test": ["127.0.0.2", "127.0.0.3"]})
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[
        h.outbound_listener("payments", lport, f"mesh.test:{port}", EXPECT,
                            protocol="http")]))
    bad_ep, good_ep = ep("127.0.0.2", port), ep("127.0.0.3", port)
    wait_addrs(sc, "payments", {bad_ep, good_ep})
    # requests until the bad endpoint has been tried once (each has even odds of it)
    for _ in range(40):
        gets(lport, None, 1)
        if states(view(sc, "payments"))[bad_ep] == "ejected":
            break
    v = view(sc, "payments")
    assert states(v) == {bad_ep: "ejected", good_ep: "healthy"}, v
    assert hk.scrape(sc).get(EJECTIONS, listener="payments") == 1
    n0 = good.nreq()
    assert gets(lport, None, 10) == [200] * 10
    assert good.nreq() == n0 + 10


def test_get_retried_on_at_most_three_endpoints(env, dns):
    """Five dead endpoints: one bodiless GET is tried on another endpoint after each failed
    connect, 3 attempts in all, then answered 503; each failed endpoint is ejected."""
    port = h.free_port()
    ips = [f"127.0.0.{i}" for i in range(2, 7)]
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http")
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    start = len(sc.access_log())
    assert gets(lport, client_ctx(env), 1) == [503]
    v = view(sc, "api")
    assert Counter(states(v).values()) == {"ejected": 3, "healthy": 2}, v
    assert hk.scrape(sc).get(EJECTIONS, listener="api") == 3
    e = request_lines(sc, start, 1)[0]
    assert e["status"] == 503 and e.get("endpoint") is None, e


def test_tcp_connect_failure_tries_another_endpoint(env, dns):
    """upstream = "mesh.test:P" (L4 outbound) with one of two upstreams dead: every
    connection reaches the live one (a failed connect tries another endpoint), the dead
    one is ejected."""
    port = h.free_port()
    dns.set_hosts({"mesh.test": ["127.0.0.2", "127.0.0.3"]})
    up = env.upstream("payments-api", host="127.0.0.3", port=port)
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[
        h.outbound_listener("payments", lport, f"mesh.test:{port}", EXPECT)]))
    wait_addrs(sc, "payments", {ep("127.0.0.2", port), ep("127.0.0.3", port)})
    start = len(sc.access_log())
    n = 10
    for i in range(n):
        s, _ = tcp_echo(lport, None, b"hello-%d\n" % i)
        s.close()
    assert up.count() == n
    wait_view(sc, "payments", lambda v: states(v) == {ep("127.0.0.2", port): "ejected",
                                                      ep("127.0.0.3", port): "healthy"},
              what="showed 127.0.0.2 ejected, 127.0.0.3 healthy")
    assert hk.scrape(sc).get(EJECTIONS, listener="payments") >= 1
    assert h.wait_until(lambda: len(sc.access_log()) - start >= n, h.T(h.PROMPT_S))
    for e in sc.access_log()[start:start + n]:
        h.check_access_entry(e)
        assert e["decision"] == "allow" and e.get("endpoint") == ep("127.0.0.3", port), e


def test_tcp_connect_tried_on_at_most_three_endpoints(env, dns):
    """Five dead endpoints behind an L4 inbound listener: a connection is tried on 3 of
    them, then closed; none was reached (no endpoint in its access-log line)."""
    port = h.free_port()
    ips = [f"127.0.0.{i}" for i in range(2, 7)]
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}")
    wait_addrs(sc, "api", {ep(ip, port) for ip in ips})
    e = closed_and_logged(env, sc, lport, b"anyone?\n")
    assert Counter(states(view(sc, "api")).values()) == {"ejected": 3, "healthy": 2}
    assert hk.scrape(sc).get(EJECTIONS, listener="api") == 3
    h.check_access_entry(e)
    assert e["close"] == "connect_failed" and e.get("endpoint") is None, e


# =========================================================================== DNS failures

def _two_app_sidecar(env, dns):
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    apps = http_apps(env, ips, port)
    dns.set_hosts({"app.test": ips})
    sc, lport = inbound_sidecar(env, dns, f"app.test:{port}", protocol="http")
    want = {ep(ip, port) for ip in ips}
    wait_view(sc, "api", lambda v: addrs(v) == want and v["last_result"] == "ok",
              what="resolved")
    return sc, lport, apps, want


def _serves_last_good_set(env, sc, lport, apps, want, result: str, timeout: float = 10.0) -> int:
    """After a failed resolution: it is counted as result, the set is stale
    (portcullis_dns_stale 1) but still the last good one, and 10 requests succeed. Returns
    the apps' request count from before those 10."""
    hk.wait_metric(sc, RESOLUTIONS, lambda x: x >= 1, timeout=timeout, listener="api",
                   result=result)
    hk.wait_metric(sc, STALE, lambda x: x == 1, listener="api")
    v = view(sc, "api")
    assert v["stale"] is True and v["last_result"] == result and addrs(v) == want, v
    n0 = sum(a.nreq() for a in apps)
    assert gets(lport, client_ctx(env), 10) == [200] * 10
    return n0


def test_dns_server_not_answering_keeps_last_good_set(env, dns):
    """The DNS server stops answering (SIGSTOP: queries time out): resolutions count as
    timeouts, the last good set keeps serving (stale, portcullis_dns_stale 1), requests
    succeed; once it answers again the answer is fresh again."""
    sc, lport, apps, want = _two_app_sidecar(env, dns)
    dns.pause()
    n0 = _serves_last_good_set(env, sc, lport, apps, want, "timeout", timeout=2 * h.WAIT_S)
    assert sum(a.nreq() for a in apps) == n0 + 10
    dns.resume()
    wait_view(sc, "api", lambda v: v["stale"] is False and v["last_result"] == "ok",
              what="fresh again")
    hk.wait_metric(sc, STALE, lambda x: x == 0, listener="api")


def test_dns_server_gone_keeps_last_good_set_then_follows_again(env, dns):
    """The DNS server process is gone (its port closed): the last good set keeps serving
    and is marked stale, the failures are counted; a restarted server's new answer is
    followed and the set is fresh again."""
    sc, lport, apps, want = _two_app_sidecar(env, dns)
    dns.stop()
    hk.wait_metric(sc, STALE, lambda x: x == 1, timeout=2 * h.WAIT_S, listener="api")
    m = hk.scrape(sc)
    failed = sum(m.get(RESOLUTIONS, listener="api", result=r)
                 for r in ("timeout", "servfail", "nxdomain"))
    assert failed >= 1, m.lines(RESOLUTIONS)
    v = view(sc, "api")
    assert v["stale"] is True and v["last_result"] in RESULTS - {"ok"} and addrs(v) == want, v
    assert gets(lport, client_ctx(env), 10) == [200] * 10
    dns.start()
    port = apps[0].port
    dns.set_hosts({"app.test": ["127.0.0.3"]})
    wait_view(sc, "api", lambda v: addrs(v) == {ep("127.0.0.3", port)} and not v["stale"],
              what="followed the restarted server")
    hk.wait_metric(sc, STALE, lambda x: x == 0, listener="api")


def test_nxdomain_after_good_answer_keeps_last_good_set(env, dns):
    """The name disappears (NXDOMAIN) after a good answer: counted as nxdomain, the last
    good set keeps serving, stale."""
    sc, lport, apps, want = _two_app_sidecar(env, dns)
    dns.set_hosts({})
    _serves_last_good_set(env, sc, lport, apps, want, "nxdomain")


def test_servfail_after_good_answer_keeps_last_good_set(env, dns):
    """The server answers SERVFAIL for the name after a good answer: counted as servfail,
    the last good set keeps serving, stale."""
    sc, lport, apps, want = _two_app_sidecar(env, dns)
    dns.set_hosts({}, servfail=["app.test"])
    _serves_last_good_set(env, sc, lport, apps, want, "servfail")


# =========================================================================== never resolved

def _wait_unresolved(sc, listener):
    return wait_view(sc, listener, lambda v: v["last_result"] == "nxdomain",
                     what="answered nxdomain")


def test_name_whose_server_never_answers_times_out_then_503(env, dns):
    """The DNS server never answers (paused before the sidecar starts): the first lookup
    ends as a timeout after dns.timeout_ms, the name has no set and is not stale, and an
    HTTP request gets 503 naming it."""
    dns.set_hosts({"app.test": ["127.0.0.2"]})
    dns.pause()
    sc, lport = inbound_sidecar(env, dns, "app.test:8080", protocol="http")
    v = wait_view(sc, "api", lambda v: v["last_result"] == "timeout", what="timed out")
    assert v["endpoints"] == [] and v["stale"] is False and v["resolved_at"] is None, v
    m = hk.scrape(sc)
    assert m.get(RESOLUTIONS, listener="api", result="timeout") >= 1, m.lines(RESOLUTIONS)
    assert has_sample(m, STALE, listener="api") and m.get(STALE, listener="api") == 0
    with HttpConn.tls(lport, client_ctx(env)) as c:
        r = get(c)
    assert r.status == 503 and b"app.test" in r.body, r


def test_never_resolved_name_tcp_closed_unresolved(env, dns):
    """An L4 listener whose name never resolved closes a connection at once; its
    access-log line says decision "error", close "unresolved", no endpoint."""
    sc, lport = inbound_sidecar(env, dns, "nowhere.test:8080")
    v = _wait_unresolved(sc, "api")
    assert v["endpoints"] == [] and v["stale"] is False, v
    e = closed_and_logged(env, sc, lport, b"hello?\n")
    h.check_access_entry(e)
    assert e["decision"] == "error" and e["close"] == "unresolved", e
    assert e.get("endpoint") is None, e


def test_never_resolved_name_http_503_names_it(env, dns):
    """An HTTP request to a listener whose name never resolved gets 503 whose body names
    the name."""
    sc, lport = inbound_sidecar(env, dns, "nowhere.test:8080", protocol="http")
    _wait_unresolved(sc, "api")
    with HttpConn.tls(lport, client_ctx(env)) as c:
        r = get(c)
    assert r.status == 503, r
    assert b"nowhere.test" in r.body, r.body


def test_never_resolved_name_grpc_unavailable_names_it(env, dns):
    """gRPC through an outbound listener whose upstream name never resolved: status 14
    UNAVAILABLE, the name in grpc-message."""
    lport = h.free_port()
    sc = env.sidecar(config(env, dns, identity="web-frontend", outbound=[
        h.outbound_listener("api", lport, "nowhere.test:8443", EXPECT, protocol="http")]))
    _wait_unresolved(sc, "api")
    ch = grpc.insecure_channel(f"127.0.0.1:{lport}")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary("/mesh.Echo/Unary")(b"hi", timeout=h.T(h.PROMPT_S))
    finally:
        ch.close()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    assert "nowhere.test" in (ei.value.details() or ""), ei.value.details()


def test_check_warns_about_unresolvable_name_and_passes(env, dns, tmp_path):
    """--check resolves every name: one that does not resolve is a warning naming the
    listener and the name, and the exit status stays 0."""
    dns.set_hosts({"app.test": ["127.0.0.2"]})
    cfg = config(env, dns, inbound=[
        h.inbound_listener("good", h.free_port(), "app.test:8080", ALLOW),
        h.inbound_listener("ghost", h.free_port(), "nowhere.test:8080", ALLOW)])
    p = tmp_path / "check.conf"
    p.write_text(h.render_config(cfg)[0])
    r = h.run_binary("--check", "-c", str(p))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any("ghost" in ln and "nowhere.test" in ln for ln in lines), r.stderr
    assert not any("app.test" in ln and "warn" in ln.lower() for ln in lines), r.stderr


def test_check_rejects_a_malformed_dns_server(env, dns, tmp_path):
    """dns.servers entries are IP:PORT: anything else is a config error naming the
    setting (exit 1)."""
    cfg = config(env, dns, inbound=[
        h.inbound_listener("api", h.free_port(), "app.test:8080", ALLOW)])
    cfg["dns"]["servers"] = ["not an address"]
    p = tmp_path / "bad-dns.conf"
    p.write_text(h.render_config(cfg)[0])
    r = h.run_binary("--check", "-c", str(p))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "dns.servers" in r.stderr, r.stderr


def _own_resolv_conf(path: Path) -> list[str]:
    """A command prefix that runs the sidecar in a mount namespace of its own where path
    is bind-mounted over /etc/resolv.conf (the machine's file stays as it is); skips the
    test where namespaces are not allowed."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=h.T(10))
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here (unshare -m: {probe.stderr.decode().strip()})")
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(path)]


def test_resolv_conf_search_list_and_ndots(env, dns, tmp_path):
    """Names are looked up the way the pod's resolver would: /etc/resolv.conf's search
    list and ndots apply (dns.servers replaces only the servers). With Kubernetes'
    ndots:5, "app" is found as app.ns.svc.test and "other.ns" as other.ns.svc.test."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.1\nsearch ns.svc.test svc.test\noptions ndots:5\n")
    prefix = _own_resolv_conf(conf)
    dns.set_hosts({"app.ns.svc.test": ["127.0.0.2"], "other.ns.svc.test": ["127.0.0.3"]})
    p1, p2 = h.free_port(), h.free_port()
    sc = env.sidecar(config(env, dns, inbound=[
        h.inbound_listener("short", p1, "app:8080", ALLOW),
        h.inbound_listener("dotted", p2, "other.ns:8080", ALLOW)]), cmd_prefix=prefix)
    v = wait_addrs(sc, "short", {"127.0.0.2:8080"})
    assert v["target"] == "app:8080" and v["last_result"] == "ok", v
    wait_addrs(sc, "dotted", {"127.0.0.3:8080"})


# =========================================================================== IPv6

def test_ipv6_and_dual_stack_names(env, dns):
    """A name with only an AAAA record (::1) is served over IPv6 ("[::1]:P" in
    /endpoints and the access log); a name with A and AAAA puts both in its set and
    requests reach both."""
    port = h.free_port()
    v4, v6 = http_apps(env, ["127.0.0.2", "::1"], port)
    dns.set_hosts({"v6.test": ["::1"], "dual.test": ["127.0.0.2", "::1"]})
    p6, pd = h.free_port(), h.free_port()
    sc = env.sidecar(config(env, dns, inbound=[
        h.inbound_listener("v6", p6, f"v6.test:{port}", ALLOW, protocol="http"),
        h.inbound_listener("dual", pd, f"dual.test:{port}", ALLOW, protocol="http")]))
    wait_addrs(sc, "v6", {f"[::1]:{port}"})
    wait_addrs(sc, "dual", {f"[::1]:{port}", f"127.0.0.2:{port}"})
    ctx = client_ctx(env)
    start = len(sc.access_log())
    assert gets(p6, ctx, 3) == [200] * 3
    assert (v4.nreq(), v6.nreq()) == (0, 3)
    assert {e.get("endpoint") for e in request_lines(sc, start, 3)} == {f"[::1]:{port}"}
    n = 30
    assert gets(pd, ctx, n) == [200] * n
    assert v4.nreq() >= 4 and v6.nreq() - 3 >= 4, (v4.nreq(), v6.nreq() - 3)


# =========================================================================== observable

def test_endpoints_document_and_metrics(env, dns):
    """/endpoints: every listener with its target, whether it is a name, the last result,
    staleness, when and with which TTL it was resolved, and per endpoint its state and
    requests in flight; an IP literal is a static single endpoint. The metrics carry the
    same, and the TTL drives re-resolution."""
    port = h.free_port()
    ips = ["127.0.0.2", "127.0.0.3"]
    apps = http_apps(env, ips, port)
    dns.set_hosts({"app.test": ips})
    static_app = env.app("echo")
    pn, ps, po, p6 = h.free_port(), h.free_port(), h.free_port(), h.free_port()
    sc = env.sidecar(config(env, dns, dns_extra={"max_ttl_ms": 30000}, inbound=[
        h.inbound_listener("named", pn, f"app.test:{port}", ALLOW, protocol="http"),
        h.inbound_listener("static", ps, static_app.addr, ALLOW),
        h.inbound_listener("static6", p6, "[::1]:9", ALLOW)], outbound=[
        h.outbound_listener("out", po, "mesh.test:8443", EXPECT)]))
    want = {ep(ip, port) for ip in ips}
    wait_addrs(sc, "named", want)
    doc = endpoints_doc(sc)
    assert {x["name"] for x in doc["listeners"]} == {"named", "static", "static6", "out"}, doc
    for x in doc["listeners"]:
        for k in ("name", "direction", "target", "dns", "last_result", "stale",
                  "resolved_at", "ttl_ms", "endpoints"):
            assert k in x, f"/endpoints listener lacks {k!r}: {x}"
        for e in x["endpoints"]:
            for k in ("address", "state", "ejected_until", "in_flight"):
                assert k in e, f"/endpoints endpoint lacks {k!r}: {e}"
    named = view(sc, "named")
    assert named["direction"] == "inbound" and named["target"] == f"app.test:{port}", named
    assert named["dns"] is True and named["last_result"] == "ok", named
    assert named["stale"] is False, named
    assert RFC3339.fullmatch(named["resolved_at"] or ""), named
    assert isinstance(named["ttl_ms"], int) and 200 <= named["ttl_ms"] <= 1000, named
    for e in named["endpoints"]:
        assert e["state"] == "healthy" and e["ejected_until"] is None, e
        assert e["in_flight"] == 0, e
    static = view(sc, "static")
    assert static["dns"] is False and static["last_result"] == "static", static
    assert static["target"] == static_app.addr and static["stale"] is False, static
    assert [(e["address"], e["state"]) for e in static["endpoints"]] == \
        [(static_app.addr, "healthy")], static
    static6 = view(sc, "static6")
    assert static6["dns"] is False and static6["last_result"] == "static", static6
    assert [e["address"] for e in static6["endpoints"]] == ["[::1]:9"], static6
    out = view(sc, "out")
    assert out["direction"] == "outbound" and out["dns"] is True, out
    assert out["target"] == "mesh.test:8443" and out["last_result"] == "nxdomain", out

    m = hk.scrape(sc)
    assert m.get(ENDPOINTS, listener="named", state="healthy") == 2, m.lines(ENDPOINTS)
    assert m.get(ENDPOINTS, listener="named", state="ejected") == 0, m.lines(ENDPOINTS)
    assert m.get(ENDPOINTS, listener="static", state="healthy") == 1, m.lines(ENDPOINTS)
    assert has_sample(m, STALE, listener="named") and m.get(STALE, listener="named") == 0
    for name, lab in ((RESOLUTIONS, "result"), (ENDPOINTS, "state")):
        for (n, labels, _) in m.samples:
            if n == name:
                assert labels.get(lab) in (RESULTS if lab == "result"
                                           else {"healthy", "ejected"}), (n, labels)
    assert m.get(RESOLUTIONS, listener="out", result="nxdomain") >= 1, m.lines(RESOLUTIONS)
    # a one-second TTL drives re-resolution: more good answers come
    ok = m.get(RESOLUTIONS, listener="named", result="ok")
    assert ok >= 1, m.lines(RESOLUTIONS)
    hk.wait_metric(sc, RESOLUTIONS, lambda x: x >= ok + 2, timeout=h.WAIT_S,
                   listener="named", result="ok")

    # a request the app holds is in flight on the endpoint that has it, until answered
    c = HttpConn.tls(pn, client_ctx(env))
    try:
        c.send(req("GET", "/gate?key=hold&n=1000000"))
        assert h.wait_until(lambda: sum(a.nreq() for a in apps) == 1, h.T(h.PROMPT_S))
        holder = ep(ips[0], port) if apps[0].nreq() else ep(ips[1], port)
        v = wait_view(sc, "named", lambda v: sum(e["in_flight"] for e in v["endpoints"]) == 1,
                      what="showed one request in flight")
        assert {e["address"]: e["in_flight"] for e in v["endpoints"]}[holder] == 1, v
        for a in apps:
            a.open_gate("hold")
        assert c.read_response(timeout=h.PROMPT_S).status == 200
    finally:
        c.close()
    wait_view(sc, "named", lambda v: sum(e["in_flight"] for e in v["endpoints"]) == 0,
              what="showed no request in flight once it was answered")

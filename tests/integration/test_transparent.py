"""Transparent listeners (issue 16, item 1): the sidecar's side of interception, end to end.

Two network namespaces from netkit.py's Net: pod A (10.231.0.2, fd00:231::2; the client
app and its sidecar, identity web/frontend) and pod B (10.231.0.1, fd00:231::1, plus
10.232.0.1 on its loopback; the server apps and their sidecar, identity payments/api).
scripts/portcullis-init runs inside both. Both sidecars run inside their namespace as uid 1337
(the --proxy-uid), the client app as uid 1000.

  A: app --(iptables REDIRECT)--> egress [::]:15001, transparent, routes:
       10.231.0.1/32:8080        tcp, mTLS, expect payments/api
       10.231.0.0/24:8081        http, mTLS, expect payments/api
       10.232.0.1:9090           passthrough (plain TCP)
       b.test:8082               tcp, mTLS (b.test resolved by a dnsmasq inside A)
       [fd00:231::/64]:8080      tcp, mTLS
     ingress [::]:15006, transparent inbound HTTP, allow payments on /hello -> 127.0.0.1:<port>
     (an HTTP app on 127.0.0.1:8090), called from B by curl with B's certificate
  B: ingress [::]:15006, transparent inbound (every redirected port) -> 127.0.0.1:<port>
     api-http 0.0.0.0:8081 (port skipped by portcullis-init), HTTP, allow web on /ok only
     plain servers on 9090 and 7070 (ports skipped: reached directly)

Needs root, ip netns, iptables, setpriv, curl and dnsmasq: without them these tests skip,
loudly; with CI=true they fail instead (as test_init.py's do).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import harness as h
import httpkit as hk
import netkit as nk
from netkit import APP_UID, IN_PORT, OTHER, OUT_PORT, POD, PROXY_UID, REMOTE, as_uid
DNS_PORT = 5353
A_ID = h.spiffe("web", "frontend")
B_ID = h.spiffe("payments", "api")
EXPECT_B = [{"namespace": "payments", "service_account": "api"}]

# netkit's serve() with echo: servers print one JSON line per accepted connection on stdout
# (so a test can tell that nothing connected) and answer it with the same line; the http mode
# answers every request with {"server", "path"}; the client prints {"reply": LINE} or
# {"error": "reset" | ...}.
TOOL = nk.SERVE + r'''
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def http(name, host, port):
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"server": name, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer((host, int(port)), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.buffer.read()

def connect(host, port, timeout):
    try:
        data = recv_line(host, port, timeout)
    except ConnectionResetError:
        print(json.dumps({"error": "reset"}))
        return
    except OSError as e:
        print(json.dumps({"error": str(e)}))
        return
    print(json.dumps({"reply": json.loads(data) if data else None}))

if sys.argv[1] == "serve":
    serve(sys.argv[2], sys.argv[3:], echo=True)
elif sys.argv[1] == "http":
    http(sys.argv[2], sys.argv[3], sys.argv[4])
else:
    connect(sys.argv[2], sys.argv[3], sys.argv[4])
'''


def _tools_problem() -> str | None:
    for tool in ("curl", "dnsmasq"):
        if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            return f"{tool} not found"
    return None


@pytest.fixture(scope="module")
def tools_ok():
    nk.require("transparent-listener tests", _tools_problem())


class Proc:
    """A long-running helper inside a namespace that says "ready" (or, for dnsmasq, logs
    "started") before it is used; accepted-connection lines are read from its stdout."""

    def __init__(self, ns: str, argv: list[str], ready: str, stream: str = "stdout"):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[dict] = []
        src = self.proc.stdout if stream == "stdout" else self.proc.stderr
        seen = b""
        while ready.encode() not in seen:
            r, _, _ = select.select([src], [], [], h.T(h.WAIT_S))
            chunk = src.readline() if r else b""
            if not chunk:
                self.stop()
                raise AssertionError(f"{argv[:3]} in {ns} did not start: {seen!r}")
            seen += chunk

    def accepted(self) -> list[dict]:
        """Lines printed so far (without waiting for more)."""
        while select.select([self.proc.stdout], [], [], 0)[0]:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(json.loads(line))
        return self.lines

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=h.T(5))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=h.T(10))


class World:
    def __init__(self, pki: h.PKI):
        self.procs: list[Proc] = []
        self.sidecars: list[h.Sidecar] = []
        self.net = nk.Net()
        # The sidecars run as PROXY_UID: their config and credentials must be readable by it
        # (pytest's own temporary directories are not).
        self.dir = Path(tempfile.mkdtemp(prefix="pc-transparent-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        for stem in ("web-frontend", "payments-api"):
            for ext in ("crt", "key"):
                shutil.copy(pki.dir / f"{stem}.{ext}", self.dir / f"{stem}.{ext}")
        shutil.copy(pki.dir / "ca.crt", self.dir / "ca.crt")
        for f in self.dir.iterdir():
            os.chmod(f, 0o644)
        self.pki = h.PKI(self.dir)

    def run(self, ns: str, argv: list[str], ready: str = "ready", stream: str = "stdout"):
        p = Proc(ns, argv, ready, stream)
        self.procs.append(p)
        return p

    def sidecar(self, ns: str, name: str, cfg: dict) -> h.Sidecar:
        s = h.Sidecar(self.dir, cfg, name=name, ready="event",
                      cmd_prefix=["ip", "netns", "exec", ns, *as_uid(PROXY_UID)])
        self.sidecars.append(s)
        return s

    def close(self) -> list[str]:
        """Stops everything; returns what went wrong stopping the sidecars (a non-zero exit,
        e.g. a sanitizer's report at exit), for the fixture to fail on."""
        problems = []
        for s in self.sidecars:
            try:
                s.stop()
            except Exception as e:  # still clean up the rest
                problems.append(f"{s.name}: {e}")
                s.kill()
        for p in self.procs:
            p.stop()
        self.net.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems


def _admin(ns: str, port: int, path: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", str(h.T(10)),
                        f"http://127.0.0.1:{port}{path}"],
                       capture_output=True, text=True, timeout=h.T(30))
    assert r.returncode == 0, f"GET {path} in {ns}: {r.stderr}"
    return r.stdout


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(f"portcullis_{name}{{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def world(netns_ok, tools_ok, pki):
    w = World(pki)
    try:
        net = w.net
        # B: the apps behind its sidecar (loopback only: reachable through the sidecar alone),
        # and plain servers on ports portcullis-init leaves alone.
        py = ["/usr/bin/python3", "-c", TOOL]
        w.b_app = w.run(net.remote, [*py, "serve", "b-app", "127.0.0.1,8080", "127.0.0.1,8082"])
        w.b_plain = w.run(net.remote, [*py, "serve", "b-plain", "0.0.0.0,9090"])
        w.b_7070 = w.run(net.remote, [*py, "serve", "b-7070", "0.0.0.0,7070"])
        w.run(net.remote, [*py, "http", "b-http", "127.0.0.1", "18081"])
        w.run(net.pod, [*py, "http", "a-http", "127.0.0.1", "8090"])
        # A: a DNS server for the NAME:PORT route.
        w.run(net.pod, ["dnsmasq", "--keep-in-foreground", "--log-facility=-", "--no-resolv",
                        "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                        f"--port={DNS_PORT}", "--user=root", "--pid-file=", "--local=/test/",
                        "--host-record=b.test,10.231.0.1"], ready="started", stream="stderr")

        w.a_admin, w.b_admin = h.free_port(), h.free_port()
        b_cfg = h.base_config(w.pki, "payments-api", workers=2, admin_port=w.b_admin, inbound=[
            {"name": "ingress", "listen": f"[::]:{IN_PORT}", "transparent": True,
             "allow": [{"namespace": "web"}]},
            {"name": "api-http", "listen": "0.0.0.0:8081", "forward": "127.0.0.1:18081",
             "protocol": "http", "allow": [{"namespace": "web", "paths": ["/ok"]}]},
        ])
        a_cfg = h.base_config(w.pki, "web-frontend", workers=2, admin_port=w.a_admin, outbound=[
            {"name": "egress", "listen": f"[::]:{OUT_PORT}", "transparent": True, "routes": [
                {"destination": f"{REMOTE[4]}/32:8080", "server_name": "api.payments.svc",
                 "expect": EXPECT_B},
                {"destination": "10.231.0.0/24:8081", "protocol": "http",
                 "server_name": "api.payments.svc", "expect": EXPECT_B},
                {"destination": f"{OTHER[4]}:9090", "passthrough": True},
                {"destination": "b.test:8082", "server_name": "api.payments.svc",
                 "expect": EXPECT_B},
                {"destination": "[fd00:231::/64]:8080", "server_name": "api.payments.svc",
                 "expect": EXPECT_B},
            ]}],
            inbound=[{"name": "ingress", "listen": f"[::]:{IN_PORT}", "transparent": True,
                      "protocol": "http",
                      "allow": [{"namespace": "payments", "paths": ["/hello"]}]}],
            extra={"dns": {"servers": [f"127.0.0.1:{DNS_PORT}"]}})
        net.init(*nk.BASE_ARGS, "--skip-inbound-ports", f"8081,9090,7070,{w.b_admin}")
        subprocess.run(["ip", "netns", "exec", net.remote, str(nk.INIT), *nk.BASE_ARGS,
                        "--skip-inbound-ports", f"8081,9090,7070,{w.b_admin}"],
                       check=True, capture_output=True, timeout=h.T(60))
        w.b = w.sidecar(net.remote, "b", b_cfg)
        w.a = w.sidecar(net.pod, "a", a_cfg)
        w.a_cfg = a_cfg
        yield w
    finally:
        problems = w.close()
    assert not problems, "\n".join(problems)


def app_connect(w: World, host: str, port: int) -> dict:
    """The client app in pod A (uid APP_UID) connects to host:port."""
    r = subprocess.run(["ip", "netns", "exec", w.net.pod, *as_uid(APP_UID), "/usr/bin/python3",
                        "-c", TOOL, "connect", host, str(port), str(h.T(10))],
                       capture_output=True, text=True, timeout=h.T(30), cwd="/")
    assert r.returncode == 0 and r.stdout.strip(), f"client: {r.stdout} {r.stderr}"
    return json.loads(r.stdout)


def app_http(w: World, url: str) -> tuple[int, str]:
    r = subprocess.run(["ip", "netns", "exec", w.net.pod, *as_uid(APP_UID), "curl", "-sS",
                        "--max-time", str(h.T(10)), "-o", "-", "-w", "\n%{http_code}", url],
                       capture_output=True, text=True, timeout=h.T(30), cwd="/")
    assert r.returncode == 0, f"curl {url}: {r.stderr}"
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def out_line(w: World, endpoint: str, **more) -> dict:
    e = w.a.wait_for_log(lambda e: e.get("listener") == "egress"
                         and e.get("endpoint") == endpoint
                         and all(e.get(k) == v for k, v in more.items()))
    assert e is not None, f"no egress access-log line for {endpoint} {more}: {w.a.log[-5:]}"
    return e


def in_line(w: World, listener: str, pred) -> dict:
    e = w.b.wait_for_log(lambda e: e.get("listener") == listener and pred(e))
    assert e is not None, f"no {listener} access-log line in B: {w.b.log[-5:]}"
    return e


# --------------------------------------------------------------------------- TCP, mTLS

def reaches_b_app(w: World, host: str, port: int, endpoint: str) -> tuple[dict, dict]:
    """The client app's connection to host:port reached B's app on 127.0.0.1:port, and A's
    egress logged it as allowed, to B's identity: returns (B's app's reply, A's log line)."""
    got = app_connect(w, host, port)
    reply = got.get("reply")
    assert reply and reply["server"] == "b-app" and reply["local"] == ["127.0.0.1", port], got
    a = out_line(w, endpoint, decision="allow")
    assert a["peer_id"] == B_ID, a
    return reply, a


def test_tcp_route_reaches_the_app_behind_the_peer_sidecar(world):
    w = world
    # B's app saw a connection from B's sidecar on loopback: it went A sidecar -> mTLS -> B's
    # transparent inbound listener -> 127.0.0.1:<original port>.
    reply, a = reaches_b_app(w, REMOTE[4], 8080, f"{REMOTE[4]}:8080")
    assert reply["peer"][0] == "127.0.0.1", reply
    assert a["tls_version"] and a["app"].startswith(POD[4] + ":"), a
    b = in_line(w, "ingress", lambda e: e.get("endpoint") == "127.0.0.1:8080"
                and e.get("peer", "").startswith(POD[4] + ":"))
    assert b["decision"] == "allow" and b["peer_id"] == A_ID and b["app"] == "127.0.0.1:8080", b


def test_ipv6_destination_on_the_dual_stack_listener(world):
    w = world
    _, a = reaches_b_app(w, REMOTE[6], 8080, f"[{REMOTE[6]}]:8080")
    assert a["app"].startswith(f"[{POD[6]}]:"), a
    b = in_line(w, "ingress", lambda e: e.get("peer", "").startswith(f"[{POD[6]}]:"))
    assert b["decision"] == "allow" and b["peer_id"] == A_ID and b["endpoint"] == "127.0.0.1:8080"


def test_name_route_matches_the_names_addresses(world):
    w = world
    reaches_b_app(w, REMOTE[4], 8082, f"{REMOTE[4]}:8082")
    eps = json.loads(_admin(w.net.pod, w.a_admin, "/endpoints"))
    egress = next(l for l in eps["listeners"] if l["name"] == "egress")
    route = next(r for r in egress["routes"] if r["target"] == "b.test:8082")
    assert route["dns"] and [e["address"] for e in route["endpoints"]] == [f"{REMOTE[4]}:8082"]
    # the CIDR route keeps an endpoint per original destination it served
    cidr = next(r for r in egress["routes"] if r["target"] == f"{REMOTE[4]}/32:8080")
    assert f"{REMOTE[4]}:8080" in [e["address"] for e in cidr["endpoints"]], cidr
    # the route's name has its DNS and endpoint series, labelled with the route
    m = hk.Metrics(_admin(w.net.pod, w.a_admin, "/metrics"))
    name = {"listener": "egress", "route": "b.test:8082"}
    assert m.get("portcullis_dns_resolutions_total", result="ok", **name) >= 1, m.text
    assert m.get("portcullis_dns_resolutions_total", result="nxdomain", **name) == 0
    assert any(n == "portcullis_dns_stale" and lab == name and v == 0
               for n, lab, v in m.samples), m.lines("portcullis_dns_stale")
    assert m.get("portcullis_upstream_endpoints", state="healthy", **name) == 1
    assert m.get("portcullis_upstream_endpoints", state="healthy", listener="egress",
                 route=f"{REMOTE[4]}/32:8080") >= 1
    # an IP-literal route has no DNS series
    assert not any(n.startswith("portcullis_dns_") and lab.get("route") == f"{REMOTE[4]}/32:8080"
                   for n, lab, _ in m.samples)


# --------------------------------------------------------------------------- HTTP

def test_http_route_logs_each_request_and_the_peer_policy_applies(world):
    w = world
    code, body = app_http(w, f"http://{REMOTE[4]}:8081/ok")
    assert code == 200 and json.loads(body) == {"server": "b-http", "path": "/ok"}, body
    code, body = app_http(w, f"http://{REMOTE[4]}:8081/secret")
    assert code == 403, (code, body)
    ok = out_line(w, f"{REMOTE[4]}:8081", path="/ok")
    assert ok["status"] == 200 and ok["peer_id"] == B_ID and ok["decision"] == "allow", ok
    no = out_line(w, f"{REMOTE[4]}:8081", path="/secret")
    assert no["status"] == 403, no
    refused = in_line(w, "api-http", lambda e: e.get("path") == "/secret")
    assert refused["decision"] == "deny" and refused["reason"] == "not_allowed", refused
    assert refused["peer_id"] == A_ID


# --------------------------------------------------------------------------- refusals

def test_unrouted_destination_is_refused_and_never_reached(world):
    w = world
    before = _metric(_admin(w.net.pod, w.a_admin, "/metrics"), "connections_total",
                     listener="egress", decision="deny", reason="not_allowed")
    got = app_connect(w, REMOTE[4], 7070)
    assert got == {"error": "reset"}, got
    line = out_line(w, f"{REMOTE[4]}:7070")
    assert line["decision"] == "deny" and line["reason"] == "not_allowed", line
    assert line["close"] == "refused" and line["tls_version"] is None, line
    after = _metric(_admin(w.net.pod, w.a_admin, "/metrics"), "connections_total",
                    listener="egress", decision="deny", reason="not_allowed")
    assert after == before + 1, (before, after)
    assert w.b_7070.accepted() == [], "the refused destination was contacted"
    # control: the server does count what reaches it (the proxy's uid is not captured)
    r = subprocess.run(["ip", "netns", "exec", w.net.pod, *as_uid(PROXY_UID), "/usr/bin/python3",
                        "-c", TOOL, "connect", REMOTE[4], "7070", str(h.T(10))],
                       capture_output=True, text=True, timeout=h.T(30), cwd="/")
    assert json.loads(r.stdout).get("reply", {}).get("server") == "b-7070", r.stdout
    assert h.wait_until(lambda: len(w.b_7070.accepted()) == 1, h.T(h.WAIT_S))


def test_connection_to_the_listener_itself_is_refused(world):
    w = world
    got = app_connect(w, "127.0.0.1", OUT_PORT)
    assert got == {"error": "reset"}, got
    line = out_line(w, f"127.0.0.1:{OUT_PORT}")
    assert line["decision"] == "deny" and line["reason"] == "not_allowed", line
    assert w.a.wait_for_event(lambda e: "transparent listener itself" in e.get("msg", ""))


# --------------------------------------------------------------------------- passthrough

def test_passthrough_route_relays_plain_tcp(world):
    w = world
    got = app_connect(w, OTHER[4], 9090)
    reply = got.get("reply")
    # the plain server was reached from pod A's address: by A's sidecar, without TLS (the
    # server's JSON line came back to the app byte for byte)
    assert reply and reply["server"] == "b-plain" and reply["peer"][0] == POD[4], got
    line = out_line(w, f"{OTHER[4]}:9090")
    assert line["decision"] == "allow" and line["tls_version"] is None, line
    assert line["peer_id"] is None and line["bytes_from_peer"] > 0, line


# --------------------------------------------------------------------------- config errors

def _route(**kw) -> dict:
    r = {"destination": "10.77.0.0/24:8080", "server_name": "api.payments.svc",
         "expect": EXPECT_B}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def _egress(**kw) -> dict:
    l = {"name": "egress", "listen": "[::]:15001", "transparent": True, "routes": [_route()]}
    l.update(kw)
    return {k: v for k, v in l.items() if v is not None}


@pytest.mark.parametrize("outbound,inbound,setting,words", [
    ([_egress(upstream="10.0.0.1:8443")], [], "outbound[0].upstream", "from its routes"),
    ([_egress(server_name="x")], [], "outbound[0].server_name", "from its routes"),
    ([_egress(expect=EXPECT_B)], [], "outbound[0].expect", "from its routes"),
    ([_egress(routes=None)], [], "outbound[0].routes", "required"),
    ([_egress(routes=[])], [], "outbound[0].routes", "at least one route"),
    ([_egress(routes=[_route(expect=None)])], [], "outbound[0].routes[0].expect", "required"),
    ([_egress(routes=[_route(server_name=None)])], [], "outbound[0].routes[0].server_name",
     "required"),
    ([_egress(routes=[_route(destination="10.77.0.0/33:8080")])], [],
     "outbound[0].routes[0].destination", "/33"),
    ([_egress(routes=[_route(destination="10.77.0.1/24:8080")])], [],
     "outbound[0].routes[0].destination", "bits set past"),
    ([_egress(routes=[_route(destination="10.77.0.0/24")])], [],
     "outbound[0].routes[0].destination", "CIDR:PORT"),
    ([_egress(routes=[_route(destination="[fd77::/64:8080")])], [],
     "outbound[0].routes[0].destination", "CIDR:PORT"),
    ([_egress(routes=[_route(destination="db.test:*")])], [],
     "outbound[0].routes[0].destination", "needs a port"),
    ([_egress(routes=[{"destination": "10.0.0.5:5432", "passthrough": True,
                       "expect": EXPECT_B}])], [],
     "outbound[0].routes[0].expect", "plain TCP"),
    ([_egress(routes=[_route(bogus=1)])], [], "outbound[0].routes[0].bogus", "unknown"),
    ([{"name": "out", "listen": "127.0.0.1:15001", "upstream": "10.0.0.1:8443",
       "server_name": "x", "expect": EXPECT_B, "routes": [_route()]}], [],
     "outbound[0].routes", "transparent = true"),
    ([], [{"name": "in", "listen": "[::]:15006", "transparent": True,
           "forward": "127.0.0.1:8080", "allow": [{"namespace": "web"}]}],
     "inbound[0].forward", "original port"),
], ids=["upstream", "server_name", "expect", "no-routes", "empty-routes", "route-no-expect",
        "route-no-server-name", "prefix-too-long", "host-bits", "no-port", "bad-v6",
        "name-any-port", "passthrough-expect", "unknown-key", "routes-not-transparent",
        "inbound-forward"])
def test_check_names_the_setting(tmp_path, pki, outbound, inbound, setting, words):
    cfg = h.base_config(pki, "web-frontend", outbound=outbound, inbound=inbound)
    text, _ = h.render_config(cfg)
    p = tmp_path / "bad.conf"
    p.write_text(text)
    r = h.run_binary("--check", "-c", str(p))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f": {setting}: " in r.stderr and words in r.stderr, r.stderr


def test_check_accepts_every_destination_form(tmp_path, pki):
    routes = [_route(destination=d) for d in
              ("10.77.0.0/24:8080", "10.77.0.5:8080", "10.77.0.0/16:*", "[fd77::/64]:8080",
               "[fd77::5]:8080", "[::/0]:*", "0.0.0.0/0:443")]
    routes.append({"destination": "10.0.0.5:5432", "passthrough": True})
    routes.append(_route(destination="10.78.0.0/24:80", protocol="http",
                         upstream_protocol="h2"))
    cfg = h.base_config(pki, "web-frontend", outbound=[_egress(routes=routes)], inbound=[
        {"name": "in", "listen": "[::]:15006", "transparent": True, "protocol": "http",
         "allow": [{"namespace": "web"}]}])
    text, _ = h.render_config(cfg)
    p = tmp_path / "good.conf"
    p.write_text(text)
    r = h.run_binary("--check", "-c", str(p))
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- inbound HTTP

@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_inbound_transparent_http_goes_to_the_original_port(world, http2):
    """A client in B with B's identity calls A's pod IP on 8090: redirected to A's transparent
    inbound HTTP listener, which sends each request to 127.0.0.1:8090."""
    w = world

    def get(path: str) -> tuple[int, str]:
        r = subprocess.run(["ip", "netns", "exec", w.net.remote, *as_uid(PROXY_UID), "curl",
                            "-sS", "-k", "--http2" if http2 else "--http1.1",
                            "--cert", w.pki.crt("payments-api"), "--key",
                            w.pki.key("payments-api"), "--max-time", str(h.T(10)),
                            "-o", "-", "-w", "\n%{http_code}",
                            f"https://{POD[4]}:8090{path}"],
                           capture_output=True, text=True, timeout=h.T(30), cwd="/")
        assert r.returncode == 0, f"curl {path}: {r.stderr}"
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body

    code, body = get("/hello")
    assert code == 200 and json.loads(body) == {"server": "a-http", "path": "/hello"}, body
    code, _ = get("/nope")
    assert code == 403
    ok = w.a.wait_for_log(lambda e: e.get("listener") == "ingress" and e.get("path") == "/hello"
                          and e.get("status") == 200)
    assert ok is not None, w.a.log[-5:]
    assert ok["endpoint"] == "127.0.0.1:8090" and ok["peer_id"] == B_ID, ok
    no = w.a.wait_for_log(lambda e: e.get("listener") == "ingress" and e.get("path") == "/nope")
    assert no is not None and no["decision"] == "deny" and no["reason"] == "not_allowed", no


# --------------------------------------------------------------------------- reload

KEEPALIVE = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[3]))
for line in sys.stdin:
    c.request("GET", line.strip())
    r = c.getresponse()
    r.read()
    print(r.status, flush=True)
"""


def test_reload_applies_to_routes_by_place_and_destination(world):
    """A reload that changes the HTTP route's expect decides the next request of a kept-alive
    app connection by the new route; one that drops the NAME:PORT route refuses its
    destination from then on."""
    w = world
    import copy
    import test_reload as tr
    client = subprocess.Popen(["ip", "netns", "exec", w.net.pod, *as_uid(APP_UID),
                               "/usr/bin/python3", "-c", KEEPALIVE, REMOTE[4], "8081",
                               str(h.T(10))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/")

    def ask(path: str) -> int:
        client.stdin.write(path + "\n")
        client.stdin.flush()
        r, _, _ = select.select([client.stdout], [], [], h.T(h.WAIT_S))
        line = client.stdout.readline() if r else ""
        assert line.strip().isdigit(), f"no status for {path}: {line!r} {client.poll()}"
        return int(line)

    try:
        assert ask("/ok") == 200
        new = copy.deepcopy(w.a_cfg)
        routes = new["outbound"][0]["routes"]
        routes[1]["expect"] = [{"namespace": "billing"}]
        del routes[3]  # b.test:8082
        w.a.write_config(new)
        ev = w.a.event_count()
        w.a.sighup()
        tr.wait_reload(w.a, "config", True, ev)
        # the same app connection: its next request meets the new expect, which B fails
        assert ask("/ok") == 502
        line = out_line(w, f"{REMOTE[4]}:8081", status=502)
        assert line["decision"] == "deny", line
        assert app_connect(w, REMOTE[4], 8082) == {"error": "reset"}
        refused = out_line(w, f"{REMOTE[4]}:8082", decision="deny")
        assert refused["reason"] == "not_allowed", refused
    finally:
        client.stdin.close()
        client.wait(timeout=h.T(10))
        w.a.write_config(w.a_cfg)
        ev = w.a.event_count()
        w.a.sighup()
        tr.wait_reload(w.a, "config", True, ev)
    assert app_connect(w, REMOTE[4], 8082).get("reply", {}).get("server") == "b-app"

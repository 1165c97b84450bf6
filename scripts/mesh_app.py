#!/usr/bin/python3
"""The app of one mesh pod (scripts/mesh.sh), run inside the pod's network namespace.

  mesh_app.py serve POD            HTTP on :8080 (HTTP/1.1 and prior-knowledge h2c, so the
                                   inbound sidecar can use app_protocol = "h2c" for every
                                   port) and gRPC on :9090 (service mesh.Api, method Get);
                                   prints "ready" once both listen, stops on SIGTERM
  mesh_app.py call PLAN.json       the caller loop: calls its peers by service name until the
                                   plan's duration or per-path call budget runs out, then
                                   prints one JSON object: per path ok / denied / unexpected
                                   and the latencies of the calls that succeeded
  mesh_app.py probe                reads admin paths (e.g. /certs) on stdin, one a line, and
                                   answers each with one line of JSON {"status", "body"} from
                                   the sidecar's admin listener at 127.0.0.1:15000

Only the Python standard library, python3-h2 and python3-grpcio (Debian packages)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import socketserver
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GRPC_SERVICE = "mesh.Api"
ADMIN = ("127.0.0.1", 15000)


# ============================================================================ serve

def answer(pod: str, path: str, xfcc: str | None) -> bytes:
    return json.dumps({"pod": pod, "path": path, "xfcc": xfcc}).encode()


class H1(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    pod = "?"

    def do_GET(self):
        body = answer(self.pod, self.path, self.headers.get("x-forwarded-client-cert"))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def serve_h2(sock: socket.socket, pod: str) -> None:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    heads: dict[int, dict] = {}
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                heads[ev.stream_id] = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                hd = heads.pop(ev.stream_id, {})
                body = answer(pod, hd.get(":path", "?"), hd.get("x-forwarded-client-cert"))
                conn.send_headers(ev.stream_id, [(":status", "200"),
                                                 ("content-type", "application/json"),
                                                 ("content-length", str(len(body)))])
                conn.send_data(ev.stream_id, body, end_stream=True)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                return
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


class Dual(socketserver.BaseRequestHandler):
    """HTTP/1.1 or h2c with prior knowledge, told apart by the connection preface."""

    def handle(self):
        sock = self.request
        sock.settimeout(60)
        head = b""
        while len(head) < len(PREFACE) and PREFACE.startswith(head):
            head = sock.recv(len(PREFACE), socket.MSG_PEEK)
            if not head:
                return
            if len(head) < len(PREFACE) and PREFACE.startswith(head):
                time.sleep(0.005)
        if head == PREFACE:        # h2 reads the preface itself
            try:
                serve_h2(sock, self.server.pod)
            except OSError:
                pass
        else:
            H1(sock, self.client_address, self.server)


class DualServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(pod: str) -> None:
    import grpc

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    H1.pod = pod
    httpd = DualServer(("::", 8080), Dual)
    httpd.pod = pod
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def get(request: bytes, ctx) -> bytes:
        md = dict(ctx.invocation_metadata())
        return answer(pod, "/mesh.Api/Get", md.get("x-forwarded-client-cert"))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        GRPC_SERVICE, {"Get": grpc.unary_unary_rpc_method_handler(get),
                       "Admin": grpc.unary_unary_rpc_method_handler(get)}),))
    server.add_insecure_port("[::]:9090")
    server.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})   # until the orchestrator stops us
    server.stop(grace=None)


# ============================================================================= call

# how each kind of refusal looks to the caller: the target sidecar's allow-list refusing a
# request (403 / PERMISSION_DENIED), or the handshake refused (the caller's sidecar answers
# 502 / UNAVAILABLE); with no route the caller's own sidecar closes the connection
# (a source whose handshakes keep failing is throttled by the target's sidecar: then the
# connection is reset at accept and the caller's sidecar answers 503 / UNAVAILABLE)
DENIAL = {"l7": ("403", "PERMISSION_DENIED"), "handshake": ("502", "503", "UNAVAILABLE"),
          "route": ("\0",)}

def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def http_call(target: dict, timeout: float) -> tuple[str, str]:
    """One GET on a fresh connection (as a client without a pool would). Returns
    (outcome, detail): outcome ok | denied | failed."""
    c = http.client.HTTPConnection(target["host"], target["port"], timeout=timeout)
    try:
        c.request("GET", target["path"], headers={"host": target["authority"]})
        r = c.getresponse()
        body = r.read()
    except OSError as e:                      # includes RemoteDisconnected
        return "failed", f"{type(e).__name__}: {e}"
    finally:
        c.close()
    if r.status == 200:
        return "ok", ""
    if r.status in (403, 502, 503):
        try:
            reason = json.loads(body).get("reason")
        except ValueError:
            reason = None
        return "denied", f"{r.status} {reason}"
    return "failed", f"HTTP {r.status}: {body[:200]!r}"


def grpc_call(target: dict, channels: dict, timeout: float) -> tuple[str, str]:
    import grpc

    addr = f"{target['host']}:{target['port']}"
    ch = channels.get(addr)
    if ch is None:
        ch = channels[addr] = grpc.insecure_channel(addr)
    stub = ch.unary_unary(target["path"])
    try:
        stub(b"ping", timeout=timeout)
        return "ok", ""
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE):
            return "denied", f"{code.name} {e.details()}"
        return "failed", f"{code.name}: {e.details()}"


def call(plan_path: str) -> None:
    plan = json.load(open(plan_path))
    targets = plan["targets"]
    stats = {t["id"]: {"ok": 0, "denied": 0, "unexpected": 0, "lat_ms": [], "samples": [],
                       "denied_detail": {}} for t in targets}
    channels: dict = {}
    start = time.monotonic()
    end = start + plan["duration_s"]
    budget = plan["max_calls_per_path"]
    due = {t["id"]: start for t in targets}
    while time.monotonic() < end:
        live = [t for t in targets if sum(stats[t["id"]][k] for k in ("ok", "denied",
                                                                      "unexpected")) < budget]
        if not live:
            break
        for t in live:
            if time.monotonic() < due[t["id"]]:
                continue
            due[t["id"]] = time.monotonic() + t.get("every_s", 0)
            t0 = time.monotonic()
            if t["kind"] == "http":
                outcome, detail = http_call(t, plan["timeout_s"])
            else:
                outcome, detail = grpc_call(t, channels, plan["timeout_s"])
            ms = (time.monotonic() - t0) * 1000
            s = stats[t["id"]]
            want = t["expect"]            # "allow" or "deny"
            if outcome == "ok" and want == "allow":
                s["ok"] += 1
                s["lat_ms"].append(ms)
            elif outcome == "denied" and want == "deny" and detail.startswith(
                    DENIAL[t["deny_by"]]):
                s["denied"] += 1
                s["denied_detail"][detail] = s["denied_detail"].get(detail, 0) + 1
            elif outcome == "failed" and want == "deny" and t.get("deny_by") == "route":
                # no route: the caller's own sidecar closes the connection
                s["denied"] += 1
                s["denied_detail"]["connection closed"] = \
                    s["denied_detail"].get("connection closed", 0) + 1
            else:
                s["unexpected"] += 1
                if len(s["samples"]) < 5:
                    s["samples"].append({"t": round(time.monotonic() - start, 3),
                                         "outcome": outcome, "detail": detail})
        time.sleep(plan["pause_s"])
    out = {}
    for tid, s in stats.items():
        lat = s.pop("lat_ms")
        s["p50_ms"] = percentile(lat, 0.50)
        s["p99_ms"] = percentile(lat, 0.99)
        s["max_ms"] = max(lat) if lat else None
        out[tid] = s
    print(json.dumps({"elapsed_s": round(time.monotonic() - start, 3), "paths": out}),
          flush=True)
    for ch in channels.values():
        ch.close()


# ============================================================================ probe

def probe() -> None:
    for line in sys.stdin:
        path = line.strip()
        try:
            c = http.client.HTTPConnection(*ADMIN, timeout=5)
            c.request("GET", path)
            r = c.getresponse()
            res = {"status": r.status, "body": r.read().decode(errors="replace")}
            c.close()
        except OSError as e:
            res = {"status": 0, "body": f"{type(e).__name__}: {e}"}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "call":
        call(sys.argv[2])
    elif sys.argv[1] == "probe":
        probe()
    else:
        sys.exit(f"usage: {sys.argv[0]} serve POD | call PLAN.json | probe")

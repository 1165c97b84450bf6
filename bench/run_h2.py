#!/usr/bin/python3
"""HTTP/2 and gRPC-shaped requests through a sidecar PAIR, portcullis against HAProxy and nginx.

    h2load --h2c--> client-side proxy --HTTP/2 over mTLS--> server-side proxy
           --HTTP/1.1--> pc-backend

Driven by bench/run_h2.sh (packages, release build, descriptor limit); described in
bench/README.md, section "HTTP/2 and gRPC-shaped requests". Everything runs on 127.0.0.1,
every run is bounded in time, every process started here is stopped by its own pid/group.
Results go to bench/results/h2/ (results.md, results.json).

The process, PKI, CPU/memory and quiet-machine helpers come from bench/run.py (imported).

Environment knobs (defaults in brackets):
  BENCH_ROWS=a,b          only these rows [portcullis-h2,haproxy-h2,nginx-h2]
  BENCH_WORKLOADS=a,b     only these: get, grpc, fixedrate, memory [all]
  BENCH_REPS              repetitions of every workload [3]
  BENCH_FR_REPS           repetitions of the fixed-rate workload (its p99 varies most) [5]
  BENCH_DURATION          seconds per h2load run, warm-up included [8]
  BENCH_WARMUP            seconds of each run not counted (h2load --warm-up-time) [1]
  BENCH_H2_CONNS          h2load connections (-c) [16]
  BENCH_H2_STREAMS        concurrent streams per connection (-m) [32]
  BENCH_H2_THREADS        h2load threads (-t) [2]
  BENCH_RATE              fixed rate, req/s [half the slowest row's closed-loop GET rate]
  BENCH_H2_IDLE           idle HTTP/2 connections held in the memory workload [1000]
  BENCH_WORKERS           worker threads/processes of every proxy and of the backend [2]
  BENCH_BUILD_DIR         where portcullis and pc-backend were built [build-release]
  BENCH_SOURCE_NOTE       what the build is (e.g. a commit), when BENCH_BUILD_DIR was
                          configured from a source tree other than this checkout
  BENCH_RESULTS           output directory [bench/results/h2]
  BENCH_PERF=1            perf record the portcullis pair during the first GET run
  BENCH_MAX_MINUTES       wall-time bound: later workloads are skipped past it [15]
  BENCH_QUIET_MAX         CPUs other processes may use during a run [0.25]
  BENCH_QUIET_BUDGET      total seconds to wait for a quiet machine [150]
  BENCH_RETRIES           total repetitions that may be redone because disturbed [6]
  BENCH_KEEP=1            keep the scratch directory (configs, logs, h2load logs)

`run_h2.py --report` re-renders results.md from results.json.
"""

import json
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# run.py reads its knobs when imported: give the shared ones this runner's defaults first
# (a 15-minute run cannot wait 900 s for a quiet machine).
os.environ.setdefault("BENCH_QUIET_BUDGET", "150")
os.environ.setdefault("BENCH_RETRIES", "6")
sys.path.insert(0, HERE)
import run as b1  # noqa: E402  bench/run.py (its main() only runs as a script)

RESULTS = os.path.abspath(os.environ.get("BENCH_RESULTS", os.path.join(HERE, "results", "h2")))
BUILD = b1.BUILD
PORTCULLIS = b1.PORTCULLIS
BACKEND = b1.BACKEND
H2LOAD = shutil.which("h2load") or "h2load"

ROWS = [
    ("portcullis-h2", "portcullis",
     'two portcullis: outbound protocol = "http" (upstream_protocol "auto" -> ALPN h2) '
     '-> inbound protocol = "http" (app_protocol "http1")'),
    ("haproxy-h2", "peer",
     "two HAProxy 2.6: bind proto h2 -> server ssl crt alpn h2 -> bind ssl verify required "
     "alpn h2 -> server (HTTP/1.1 keep-alive)"),
    ("nginx-h2", "peer",
     "two nginx 1.22: listen http2 (h2c) -> grpc_pass grpcs:// (HTTP/2 over mTLS, one stream "
     "per upstream connection, keepalive pool) -> listen ssl http2 -> proxy_pass "
     "(HTTP/1.1 keepalive pool)"),
]
ROW_NAMES = [r[0] for r in ROWS]
PEERS = [r[0] for r in ROWS if r[1] == "peer"]
WORKLOADS = ("get", "grpc", "fixedrate", "memory")

num = b1.env_num
CFG = {
    "reps": num("BENCH_REPS", 3, int),
    "fr_reps": num("BENCH_FR_REPS", 5, int),
    "duration_s": num("BENCH_DURATION", 8.0),
    "warmup_s": num("BENCH_WARMUP", 1.0),
    "conns": num("BENCH_H2_CONNS", 16, int),
    "streams": num("BENCH_H2_STREAMS", 32, int),
    "h2load_threads": num("BENCH_H2_THREADS", 2, int),
    "rate_requested": num("BENCH_RATE", 0.0),
    "idle_conns": num("BENCH_H2_IDLE", 1000, int),
    "workers": b1.CFG["workers"],
    "perf": os.environ.get("BENCH_PERF", "") not in ("", "0"),
    "max_minutes": num("BENCH_MAX_MINUTES", 15.0),
    "quiet_max": b1.CFG["quiet_max"],
    "quiet_budget_s": b1.CFG["quiet_budget_s"],
    "retry_budget": b1.CFG["retry_budget"],
    "workloads": [x.strip() for x in os.environ.get("BENCH_WORKLOADS", ",".join(WORKLOADS))
                  .split(",") if x.strip()],
    "grpc_path": "/bench.Echo/Unary",
    "grpc_body_bytes": 100,
    # Same deadline philosophy as run.py: idle connections must never be cut by a timeout.
    "idle_timeout_s": 900,
}
T0 = time.time()
SERVER_NAME = "api.payments.svc"  # DNS SAN of the dev PKI's payments-api certificate


def log(msg):
    el = time.time() - T0
    print(f"[h2bench {int(el) // 60:02d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def over_time():
    return time.time() - T0 > CFG["max_minutes"] * 60


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ------------------------------------------------------------------- configs


class Env(b1.Env):
    def __init__(self, work, pki, nofile):
        super().__init__(work, pki, nofile)
        self.client_pem = os.path.join(work, "web-frontend.pem")  # cert + key for haproxy
        with open(self.client_pem, "w") as out:
            for p in (self.client_crt, self.client_key):
                with open(p) as f:
                    out.write(f.read())
        os.chmod(self.client_pem, 0o644)


def portcullis_pair(env, ports):
    """The client sidecar (web-frontend, outbound) and the server sidecar (payments-api,
    inbound). Both: the run.py settings (workers, suites, groups, 900 s idle timeout, no
    access log), plus pool_max_idle = 256, the size of nginx's keepalive pool here."""
    w = CFG["workers"]
    common = f"""\
trust_domain = "cluster.local";
workers = {w};
tls = {{ min_version = "1.2"; ciphers = "{b1.TLS12_CIPHERS}"; curves = "X25519:P-256"; }};
log = {{ level = "warn"; access = false; }};
limits = {{ max_connections = {env.max_conns}; idle_timeout_ms = {CFG['idle_timeout_s'] * 1000}; drain_timeout_ms = 1000; }};
http = {{ pool_max_idle = 256; }};
"""
    server = b1.write(os.path.join(env.work, "portcullis-server.conf"), common + f"""\
identity = {{ cert = "{env.server_crt}"; key = "{env.server_key}"; ca = "{env.ca}"; watch = false; }};
admin = {{ listen = "127.0.0.1:{ports['server_admin']}"; }};
inbound = (
  {{ name = "api"; listen = "127.0.0.1:{ports['server']}"; forward = "127.0.0.1:{ports['backend']}";
     protocol = "http"; allow = ( {{ namespace = "web"; service_account = "frontend"; }} ); }}
);
""")
    client = b1.write(os.path.join(env.work, "portcullis-client.conf"), common + f"""\
identity = {{ cert = "{env.client_crt}"; key = "{env.client_key}"; ca = "{env.ca}"; watch = false; }};
admin = {{ listen = "127.0.0.1:{ports['client_admin']}"; }};
outbound = (
  {{ name = "api"; listen = "127.0.0.1:{ports['client']}"; upstream = "127.0.0.1:{ports['server']}";
     server_name = "{SERVER_NAME}"; expect = ( {{ namespace = "payments"; service_account = "api"; }} );
     protocol = "http"; }}
);
""")
    return client, server


def haproxy_global(env):
    return f"""\
global
  nbthread {CFG['workers']}
  maxconn {env.max_conns}
  ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
  ssl-default-bind-ciphers {b1.TLS12_CIPHERS}
  ssl-default-bind-ciphersuites {b1.TLS13_SUITES}
  ssl-default-server-options ssl-min-ver TLSv1.2 no-tls-tickets
  ssl-default-server-ciphers {b1.TLS12_CIPHERS}
  ssl-default-server-ciphersuites {b1.TLS13_SUITES}
  tune.ssl.cachesize 0
defaults
  mode http
  timeout connect 5s
  timeout client {CFG['idle_timeout_s']}s
  timeout server {CFG['idle_timeout_s']}s
  timeout http-keep-alive {CFG['idle_timeout_s']}s
"""


def haproxy_pair(env, ports):
    # verify required + sni: the client side checks the chain and that the certificate
    # names api.payments.svc (HAProxy implies verifyhost from sni); it cannot check a SPIFFE
    # URI SAN the way portcullis's expect does.
    client = b1.write(os.path.join(env.work, "haproxy-client.cfg"), haproxy_global(env) + f"""\
frontend fe
  bind 127.0.0.1:{ports['client']} proto h2
  default_backend be
backend be
  server up 127.0.0.1:{ports['server']} ssl crt {env.client_pem} ca-file {env.ca} verify required sni str({SERVER_NAME}) alpn h2
""")
    server = b1.write(os.path.join(env.work, "haproxy-server.cfg"), haproxy_global(env) + f"""\
frontend fe
  bind 127.0.0.1:{ports['server']} ssl crt {env.server_pem} ca-file {env.ca} verify required alpn h2 curves X25519:P-256
  default_backend be
backend be
  server app 127.0.0.1:{ports['backend']}
""")
    return client, server


def nginx_conf(env, name, body):
    d = os.path.join(env.work, name)
    os.makedirs(d, exist_ok=True)
    t = CFG["idle_timeout_s"]
    return b1.write(os.path.join(d, "nginx.conf"), f"""\
daemon off;
master_process on;
user root;
worker_processes {CFG['workers']};
worker_rlimit_nofile {env.nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {max(1024, env.nofile - 200)}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout {t}s;
  client_header_timeout {t}s;
  client_body_timeout {t}s;
{body}
}}
""")


def nginx_pair(env, ports):
    t = CFG["idle_timeout_s"]
    pool = f"keepalive 256; keepalive_requests 100000000; keepalive_timeout {t}s;"
    # grpc_pass is nginx's only way to speak HTTP/2 to an upstream (proxy_pass is HTTP/1.x);
    # it forwards any request, not only gRPC ones. It uses one stream per upstream connection.
    client = nginx_conf(env, "nginx-client", f"""\
  upstream up {{ server 127.0.0.1:{ports['server']}; {pool} }}
  server {{
    listen 127.0.0.1:{ports['client']} http2 reuseport backlog=4096;
    location / {{
      grpc_pass grpcs://up;
      grpc_ssl_certificate {env.client_crt};
      grpc_ssl_certificate_key {env.client_key};
      grpc_ssl_trusted_certificate {env.ca};
      grpc_ssl_verify on;
      grpc_ssl_name {SERVER_NAME};
      grpc_ssl_server_name on;
      grpc_ssl_protocols TLSv1.2 TLSv1.3;
      grpc_ssl_ciphers {b1.TLS12_CIPHERS};
      grpc_ssl_conf_command Ciphersuites {b1.TLS13_SUITES};
      grpc_ssl_session_reuse off;
      grpc_read_timeout {t}s;
      grpc_send_timeout {t}s;
    }}
  }}""")
    server = nginx_conf(env, "nginx-server", f"""\
  upstream app {{ server 127.0.0.1:{ports['backend']}; {pool} }}
  server {{
    listen 127.0.0.1:{ports['server']} ssl http2 reuseport backlog=4096;
    ssl_certificate {env.server_crt};
    ssl_certificate_key {env.server_key};
    ssl_client_certificate {env.ca};
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {b1.TLS12_CIPHERS};
    ssl_conf_command Ciphersuites {b1.TLS13_SUITES};
    ssl_prefer_server_ciphers on;
    ssl_ecdh_curve X25519:prime256v1;
    ssl_session_tickets off;
    ssl_session_cache off;
    client_max_body_size 0;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}""")
    return client, server


class Pair:
    """One row brought up: backend, server-side proxy, client-side proxy."""

    def __init__(self, env, row):
        self.env, self.row = env, row
        self.backend = self.server = self.client = None
        self.error = ""
        self.configs = {}

    def start(self):
        env, row = self.env, self.row
        self.ports = p = {k: b1.free_port() for k in
                          ("backend", "server", "client", "server_admin", "client_admin")}
        logs = os.path.join(env.work, "logs")
        self.backend = b1.Proc("backend", [
            BACKEND, "--listen", f"127.0.0.1:{p['backend']}",
            "--threads", str(CFG["workers"])], os.path.join(logs, "backend.log"))
        if not b1.wait_port(p["backend"]):
            self.error = "backend did not start"
            return False
        if row == "portcullis-h2":
            ccfg, scfg = portcullis_pair(env, p)
            cmd = lambda c: [PORTCULLIS, "-c", c]  # noqa: E731
            sig = signal.SIGINT
        elif row == "haproxy-h2":
            ccfg, scfg = haproxy_pair(env, p)
            cmd = lambda c: ["haproxy", "-db", "-f", c]  # noqa: E731
            sig = signal.SIGTERM
        else:
            ccfg, scfg = nginx_pair(env, p)
            cmd = lambda c: ["nginx", "-p", os.path.dirname(c), "-c", c]  # noqa: E731
            sig = signal.SIGTERM
        for side, c in (("client", ccfg), ("server", scfg)):
            with open(c) as f:
                self.configs[side] = f.read()
        self.server = b1.Proc(f"{row}-server", cmd(scfg),
                              os.path.join(logs, f"{row}-server.log"), sig)
        if not b1.wait_port(p["server"]):
            self.error = f"{row} server side did not start (see {logs})"
            return False
        self.client = b1.Proc(f"{row}-client", cmd(ccfg),
                              os.path.join(logs, f"{row}-client.log"), sig)
        if not b1.wait_port(p["client"]):
            self.error = f"{row} client side did not start (see {logs})"
            return False
        time.sleep(0.3)
        return True

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.ports['client']}{path}"

    def proxies_alive(self):
        return all(x and x.alive() for x in (self.client, self.server))

    def stop(self):
        for x in (self.client, self.server, self.backend):
            if x:
                x.stop()


def established(port):
    """Established TCP connections whose destination is 127.0.0.1:port."""
    out = b1.sh(["ss", "-Htn", "state", "established", f"( dport = :{port} )"])
    return len([ln for ln in out.splitlines() if ln.strip()])


# ------------------------------------------------------------------- h2load


def h2load_args(pair, kind, extra=()):
    a = [H2LOAD, "-c", str(CFG["conns"]), "-m", str(CFG["streams"]),
         "-t", str(CFG["h2load_threads"])]
    if kind == "grpc":
        a += ["-d", pair.env.grpc_body, "-H", "content-type: application/grpc",
              "-H", "te: trailers", *extra, pair.url(CFG["grpc_path"])]
    else:
        a += [*extra, pair.url("/")]
    return a


def parse_h2load(text):
    r = {}
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
    if m:
        r["finished_s"], r["rps"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        for k, v in zip(("total", "started", "done", "succeeded", "failed", "errored",
                         "timeout"), m.groups()):
            r[k] = int(v)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        r["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(x) for x in m.groups())))
    m = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data", text)
    if m:
        r["bytes_total"], r["bytes_headers"], r["bytes_data"] = (int(x) for x in m.groups())
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if m:
        r["time_for_request_min_max_mean"] = list(m.groups())
    m = re.search(r"Application protocol: (\S+)", text)
    if m:
        r["app_protocol"] = m.group(1)
    return r


def failures(r):
    """Why an h2load result does not count (empty: it does)."""
    if "error" in r:
        return r["error"]
    if "succeeded" not in r:
        return "no h2load summary"
    why = []
    bad = r["failed"] + r["errored"] + r["timeout"]
    if bad:
        why.append(f"{r['failed']} failed, {r['errored']} errored, {r['timeout']} timeout")
    st = r.get("status", {})
    non2xx = st.get("3xx", 0) + st.get("4xx", 0) + st.get("5xx", 0)
    if non2xx:
        why.append(f"{non2xx} non-2xx responses ({st})")
    if r["succeeded"] == 0:
        why.append("no request succeeded")
    # Every backend response carries a 100-byte body; a sidecar's own answer (e.g. a
    # trailers-only gRPC refusal, which has status 200) carries none.
    elif r.get("bytes_data", 0) < 100 * r["succeeded"]:
        why.append(f"only {r.get('bytes_data')} body bytes for {r['succeeded']} responses")
    if r.get("app_protocol") not in (None, "h2c"):
        why.append(f"h2load spoke {r['app_protocol']}")
    return "; ".join(why)


def run_h2load(pair, args, timeout, sample_at=None):
    """Runs h2load with CPU accounting of both proxies and the backend, the machine's
    foreign CPU and load average; samples the connection counts between the hops once."""
    procs = {"client": pair.client.pids(), "server": pair.server.pids(),
             "backend": pair.backend.pids()}
    c0 = {k: b1.cpu_seconds(v) for k, v in procs.items()}
    out = {"loadavg_before": loadavg(), "cmd": " ".join(args)}
    f0, t0 = b1.foreign_cpu_seconds(), time.time()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    perf = None
    try:
        sc = None
        if sample_at is not None:
            time.sleep(sample_at)
            if getattr(pair.env, "syscall_window", None):
                sc = start_syscall_count(pair, pair.env.syscall_window[1])
            out["conns_client_to_server"] = established(pair.ports["server"])
            out["conns_server_to_backend"] = established(pair.ports["backend"])
            if pair.env.perf_now:
                perf = start_perf(pair, max(1.0, CFG["duration_s"] - sample_at - 1.0))
        text, _ = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        if sc:
            out["syscalls_window"] = finish_syscall_count(sc)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        text, _ = p.communicate()
        out["error"] = "h2load timed out"
    wall = time.time() - t0
    if perf:
        finish_perf(perf)
    out.update(parse_h2load(text))
    out["h2load_tail"] = text.strip().splitlines()[-9:]
    if p.returncode and "error" not in out:
        out["error"] = f"h2load exit {p.returncode}"
    out["cpu_s"] = {k: b1.cpu_seconds(v) - c0[k] for k, v in procs.items()}
    out["foreign_cpus"] = round((b1.foreign_cpu_seconds() - f0) / wall, 3)
    out["proxies_alive"] = pair.proxies_alive()
    if not out["proxies_alive"]:
        out["error"] = (out.get("error", "") + "; a proxy process died").lstrip("; ")
    if out.get("syscalls_window") and out.get("rps"):
        secs = pair.env.syscall_window[1]
        out["syscalls"] = {side: {k: v / (out["rps"] * secs) for k, v in counts.items()}
                           for side, counts in out.pop("syscalls_window").items()}
    why = failures(out)
    if why:
        out["failing"] = why
    elif out.get("done"):
        out["cpu_ms_per_1k_req"] = {k: v / out["done"] * 1e6 for k, v in out["cpu_s"].items()}
    return out


def w_closed(pair, kind):
    d, w = CFG["duration_s"], CFG["warmup_s"]
    args = h2load_args(pair, kind, ["-D", f"{d - w:g}", "--warm-up-time", f"{w:g}"])
    return run_h2load(pair, args, d + 60, sample_at=w + 1.5)


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def w_fixedrate(pair, rate, rep):
    d, w = CFG["duration_s"], CFG["warmup_s"]
    logf = os.path.join(pair.env.work, "logs", f"rate-{pair.row}-{rep}.log")
    per_client = rate / CFG["conns"]
    args = h2load_args(pair, "get", ["-D", f"{d - w:g}", "--warm-up-time", f"{w:g}",
                                     "--rps", f"{per_client:g}", "--log-file", logf])
    r = run_h2load(pair, args, d + 60)
    lat, bad = [], 0
    try:
        with open(logf) as f:
            for ln in f:
                parts = ln.split()
                if len(parts) >= 3:
                    if not parts[1].startswith("2"):
                        bad += 1
                    lat.append(int(parts[2]))
    except OSError as e:
        r.setdefault("failing", f"no request log: {e}")
    lat.sort()
    r["logged_requests"] = len(lat)
    r["logged_non_2xx"] = bad
    r["rate_target"] = rate
    r["rate_achieved"] = len(lat) / (d - w) if d > w else None
    if lat:
        r["latency_us"] = {"p50": percentile(lat, 0.50), "p90": percentile(lat, 0.90),
                           "p99": percentile(lat, 0.99), "p999": percentile(lat, 0.999),
                           "max": lat[-1], "mean": statistics.fmean(lat)}
    if r["rate_achieved"] is not None and r["rate_achieved"] > 1.05 * rate:
        r["catch_up"] = True  # h2load sent a backlog: the row fell behind at some point
    if r["rate_achieved"] is not None and r["rate_achieved"] < 0.95 * rate:
        r["failing"] = (r.get("failing", "") + f"; sustained only {r['rate_achieved']:,.0f} "
                        f"of {rate:,.0f} req/s").lstrip("; ")
    try:
        os.remove(logf)  # up to a few hundred thousand lines each; the figures are kept
    except OSError:
        pass
    return r


SYSCALLS = ("read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "clock_gettime")


def start_syscall_count(pair, seconds):
    """perf stat of the syscalls each side makes for `seconds` (during an unmeasured run)."""
    ev = ",".join(f"syscalls:sys_enter_{x}" for x in SYSCALLS)
    procs = {}
    for side, proc in (("client", pair.client), ("server", pair.server)):
        pids = ",".join(str(x) for x in proc.pids())
        procs[side] = subprocess.Popen(["perf", "stat", "-x,", "-e", ev, "-p", pids, "--",
                                        "sleep", f"{seconds:g}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
    return procs


def finish_syscall_count(procs):
    out = {}
    for side, p in procs.items():
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            continue
        counts = {}
        for ln in err.splitlines():
            f = ln.split(",")
            if len(f) > 2 and f[0].strip().isdigit():
                counts[f[2].replace("syscalls:sys_enter_", "")] = int(f[0])
        if counts:
            out[side] = {"total": sum(counts.values()), **{k: v for k, v in counts.items() if v}}
    return out


def start_perf(pair, seconds):
    if not shutil.which("perf"):
        return None
    pids = ",".join(str(x) for x in pair.client.pids() + pair.server.pids())
    out = os.path.join(pair.env.work, f"perf-{pair.row}.data")
    p = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", out, "-p", pids, "--",
                          "sleep", f"{seconds:g}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (p, out, pair.row)


def finish_perf(perf):
    p, data, row = perf
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return
    base = ["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none"]
    parts = [("time per process and shared object", base + ["--sort", "comm,dso"]),
             ("top symbols", base + ["--sort", "dso,symbol", "--percent-limit", "0.7"])]
    with open(os.path.join(RESULTS, f"perf-{row}.txt"), "w") as f:
        f.write(f"# perf record -F 499 -p <both {row} processes> during the first GET run\n")
        for title, cmd in parts:
            body = [ln for ln in b1.sh(cmd).splitlines() if ln.strip() and not ln.startswith("#")]
            f.write(f"\n## {title}\n\n" + "\n".join(body[:50]) + "\n")


# ------------------------------------------------- idle HTTP/2 connections

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream) + payload


class IdleConn:
    __slots__ = ("sock", "buf", "out", "got_settings", "done", "body", "dead", "why")

    def __init__(self, sock):
        self.sock, self.buf, self.out = sock, b"", b""
        self.got_settings = self.done = self.dead = False
        self.body, self.why = 0, ""


def idle_pump(sel, conns, until, deadline):
    """Runs the little HTTP/2 client until until(conns) holds or the deadline passes:
    answers SETTINGS and PING, counts the body of stream 1, notices closes."""
    while not until() and time.time() < deadline:
        for key, ev in sel.select(timeout=0.2):
            c = key.data
            if ev & selectors.EVENT_WRITE and c.out:
                try:
                    n = c.sock.send(c.out)
                    c.out = c.out[n:]
                except BlockingIOError:
                    pass
                except OSError as e:
                    c.dead, c.why = True, str(e)
            if ev & selectors.EVENT_READ:
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    data = None
                except OSError as e:
                    data, c.why = b"", str(e)
                if data == b"":
                    c.dead = True
                    c.why = c.why or "closed by the proxy"
                    sel.unregister(c.sock)
                    continue
                if data:
                    c.buf += data
                    while len(c.buf) >= 9:
                        ln = int.from_bytes(c.buf[:3], "big")
                        if len(c.buf) < 9 + ln:
                            break
                        ftype, flags = c.buf[3], c.buf[4]
                        sid = int.from_bytes(c.buf[5:9], "big") & 0x7FFFFFFF
                        payload, c.buf = c.buf[9:9 + ln], c.buf[9 + ln:]
                        if ftype == 4 and not flags & 1:  # SETTINGS -> ACK
                            c.got_settings = True
                            c.out += frame(4, 1, 0)
                        elif ftype == 6 and not flags & 1:  # PING -> ACK
                            c.out += frame(6, 1, 0, payload)
                        elif sid == 1 and ftype == 0:  # DATA
                            pad = payload[0] + 1 if flags & 8 else 0
                            c.body += ln - pad
                            if flags & 1:
                                c.done = True
                        elif sid == 1 and ftype == 1 and flags & 1:  # HEADERS, END_STREAM
                            c.done = True
                        elif (sid == 1 and ftype == 3) or ftype == 7:  # RST_STREAM, GOAWAY
                            c.dead, c.why = True, f"frame type {ftype}"
            if not c.dead:
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
                if key.events != want:
                    sel.modify(c.sock, want, c)


def request_block(port):
    """HPACK: GET (static 2), http (6), / (4), :authority as a literal (name index 1)."""
    auth = f"127.0.0.1:{port}".encode()
    return bytes([0x82, 0x86, 0x84, 0x01, len(auth)]) + auth


def w_memory(env, row, rep):
    """Fresh pair; RSS/PSS of both proxies idle, then with N h2c connections that sent only
    the preface and SETTINGS, then after one GET on each (which makes every proxy hold
    whatever upstream state it keeps per client connection)."""
    n = CFG["idle_conns"]
    pair = Pair(env, row)
    sel = selectors.DefaultSelector()
    conns = []
    out = {"requested": n, "loadavg_before": loadavg()}
    try:
        if not pair.start():
            return {"error": pair.error}
        time.sleep(0.5)

        def mem():
            cm, sm = b1.memory_kib(pair.client.pids()), b1.memory_kib(pair.server.pids())
            return {"client": cm, "server": sm,
                    "rss_kib": cm["rss_kib"] + sm["rss_kib"],
                    "pss_kib": cm["pss_kib"] + sm["pss_kib"],
                    "conns_client_to_server": established(pair.ports["server"]),
                    "conns_server_to_backend": established(pair.ports["backend"])}

        out["baseline"] = mem()
        deadline = time.time() + 120
        opened = 0
        while opened < n and time.time() < deadline:
            # at most 64 connections being set up at once, like pc-loadgen's idle mode
            pending = [c for c in conns if not c.got_settings and not c.dead]
            if len(pending) >= 64:
                idle_pump(sel, conns, lambda: sum(1 for c in conns if not c.got_settings
                                                  and not c.dead) < 32, deadline)
                continue
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", pair.ports["client"]))
            except BlockingIOError:
                pass
            c = IdleConn(s)
            c.out = PREFACE + frame(4, 0, 0)  # preface + empty SETTINGS
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            conns.append(c)
            opened += 1
        idle_pump(sel, conns, lambda: all(c.got_settings or c.dead for c in conns), deadline)
        idle_pump(sel, conns, lambda: False, time.time() + 0.3)  # flush the SETTINGS ACKs
        time.sleep(1.0)
        out["preface_only"] = mem()
        out["preface_only"]["open"] = sum(1 for c in conns if c.got_settings and not c.dead)
        blk = request_block(pair.ports["client"])
        for c in conns:
            if not c.dead:
                c.out += frame(1, 0x5, 1, blk)  # HEADERS, END_STREAM | END_HEADERS
                sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        idle_pump(sel, conns, lambda: all(c.done or c.dead for c in conns), deadline)
        time.sleep(1.0)
        idle_pump(sel, conns, lambda: False, time.time() + 0.2)  # notice early closes
        out["after_request"] = mem()
        ok = [c for c in conns if c.done and not c.dead and c.body == 100]
        out["after_request"]["open"] = len(ok)
        out["requests_ok"] = len(ok)
        whys = {}
        for c in conns:
            if c.dead:
                whys[c.why] = whys.get(c.why, 0) + 1
        out["closed_early"] = whys
        for phase in ("preface_only", "after_request"):
            k = out[phase]["open"]
            if k:
                for m in ("rss", "pss"):
                    out[phase][f"bytes_per_conn_{m}"] = (
                        (out[phase][f"{m}_kib"] - out["baseline"][f"{m}_kib"]) * 1024 / k)
        if len(ok) < n:
            out["failing"] = (f"{n - len(ok)} of {n} connections failed or closed early: "
                              f"{whys}")
        out["proxies_alive"] = pair.proxies_alive()
        return out
    finally:
        for c in conns:
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
        sel.close()
        pair.stop()


# ------------------------------------------------------------------- report


def med(v):
    v = [x for x in v if isinstance(x, (int, float))]
    return statistics.median(v) if v else None


def summarize(rowdata):
    runs = rowdata["runs"]
    s = {"failing": {}}

    def pick(name, fn):
        rs = [r for r in runs.get(name, []) if not r.get("superseded")]
        bad = [r for r in rs if r.get("failing") or r.get("error")]
        if bad:
            s["failing"][name] = bad[0].get("failing") or bad[0].get("error")
            return None
        return med([fn(r) for r in rs])

    s["get_rps"] = pick("get", lambda r: r.get("rps"))
    s["grpc_rps"] = pick("grpc", lambda r: r.get("rps"))
    s["get_cpu_ms_per_1k"] = pick("get", lambda r: sum(
        r["cpu_ms_per_1k_req"][k] for k in ("client", "server")))
    s["grpc_cpu_ms_per_1k"] = pick("grpc", lambda r: sum(
        r["cpu_ms_per_1k_req"][k] for k in ("client", "server")))
    s["get_mean_ms"] = pick("get", lambda r: parse_dur(r["time_for_request_min_max_mean"][2]))
    s["fr_p50_us"] = pick("fixedrate", lambda r: r["latency_us"]["p50"])
    s["fr_p99_us"] = pick("fixedrate", lambda r: r["latency_us"]["p99"])
    s["fr_p999_us"] = pick("fixedrate", lambda r: r["latency_us"]["p999"])
    s["mem_pre_b"] = pick("memory", lambda r: r["preface_only"]["bytes_per_conn_rss"])
    s["mem_req_b"] = pick("memory", lambda r: r["after_request"]["bytes_per_conn_rss"])
    s["mem_req_pss_b"] = pick("memory", lambda r: r["after_request"]["bytes_per_conn_pss"])
    s["mem_req_client_b"] = pick("memory", lambda r: (
        r["after_request"]["client"]["rss_kib"] - r["baseline"]["client"]["rss_kib"])
        * 1024 / r["after_request"]["open"])
    s["mem_req_server_b"] = pick("memory", lambda r: (
        r["after_request"]["server"]["rss_kib"] - r["baseline"]["server"]["rss_kib"])
        * 1024 / r["after_request"]["open"])
    s["rss_idle_kib"] = pick("memory", lambda r: r["baseline"]["rss_kib"])
    s["hop_conns_get"] = pick("get", lambda r: r.get("conns_client_to_server"))
    s["backend_conns_get"] = pick("get", lambda r: r.get("conns_server_to_backend"))
    s["hop_conns_idle"] = pick("memory", lambda r: r["after_request"]["conns_client_to_server"])
    for wl in ("get", "grpc"):
        sc = (rowdata.get("priming", {}).get(wl) or {}).get("syscalls") or {}
        for side in ("client", "server"):
            if side in sc:
                s[f"syscalls_{wl}_{side}"] = sc[side]["total"]
    return s


def parse_dur(txt):
    m = re.match(r"([\d.]+)(us|ms|s)$", txt)
    if not m:
        return None
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


COLUMNS = [
    # key, header, higher is better, formatter, target (None: no target)
    ("get_rps", "GET req/s", True, lambda v: f"{v:,.0f}", 1.25),
    ("grpc_rps", "gRPC-shaped POST req/s", True, lambda v: f"{v:,.0f}", 1.25),
    ("fr_p50_us", "fixed-rate p50 ms", False, lambda v: f"{v / 1000:,.2f}", None),
    ("fr_p99_us", "fixed-rate p99 ms", False, lambda v: f"{v / 1000:,.2f}", 1.0),
    ("fr_p999_us", "fixed-rate p99.9 ms", False, lambda v: f"{v / 1000:,.2f}", None),
    ("mem_req_b", "KiB per idle h2 conn (pair, after 1 request)", False,
     lambda v: f"{v / 1024:,.1f}", 0.5),
    ("mem_pre_b", "KiB per idle h2 conn (pair, preface only)", False,
     lambda v: f"{v / 1024:,.1f}", None),
    ("get_cpu_ms_per_1k", "pair CPU ms per 1k GET", False, lambda v: f"{v:,.0f}", None),
    ("grpc_cpu_ms_per_1k", "pair CPU ms per 1k gRPC-shaped", False, lambda v: f"{v:,.0f}", None),
]
FIG_WORKLOAD = {"get_rps": "get", "grpc_rps": "grpc", "fr_p50_us": "fixedrate",
                "fr_p99_us": "fixedrate", "fr_p999_us": "fixedrate", "mem_req_b": "memory",
                "mem_pre_b": "memory", "get_cpu_ms_per_1k": "get", "grpc_cpu_ms_per_1k": "grpc"}


def best_peer(summaries, key, higher):
    return b1.best_peer(summaries, key, higher, PEERS)


def cell(summaries, row, key, higher, fmt):
    s = summaries.get(row)
    if s is None or s.get("na"):
        return "n/a"
    wl = FIG_WORKLOAD[key]
    if wl in s["failing"]:
        return "**FAILING**"
    v = s.get(key)
    if v is None:
        return "–"
    b = best_peer(summaries, key, higher)
    return fmt(v) + (f" ({v / b:.2f}×)" if b else "")


def write_markdown(data, summaries, path):
    m, c = data["machine"], data["config"]
    rows = data["rows_run"]
    L = ["# portcullis vs HAProxy and nginx — HTTP/2 and gRPC-shaped requests through a "
         "sidecar pair", "",
         f"- **Date:** {m['date']}  ",
         f"- **Machine:** {m['cpu_model']}, {m['nproc']} CPUs, {m['mem_total']}, kernel "
         f"{m['kernel']}, {m['os']}  ",
         f"- **Versions:** portcullis {m['portcullis_commit']} ({m['portcullis_version']}; "
         f"built from {m['portcullis_source']}); {m['haproxy']}; {m['nginx']}; {m['h2load']}; "
         f"BoringSSL {m['boringssl']} (portcullis); {m['openssl']} (peers)  ",
         f"- **Run:** {c['reps']} repetitions per workload ({c['fr_reps']} at fixed rate), "
         f"median shown; h2load "
         f"`-c {c['conns']} -m {c['streams']} -t {c['h2load_threads']}`, "
         f"{c['duration_s']:g} s runs of which {c['warmup_s']:g} s warm-up; fixed rate "
         f"{c.get('rate', 0):,.0f} req/s; {c['idle_conns']:,} idle connections; "
         f"{c['workers']} workers per proxy process; wall time {data.get('wall_s', 0) / 60:.1f} "
         f"min.", "",
         "Topology of every row: `h2load --h2c--> client-side proxy --HTTP/2, mTLS (TLS 1.3, "
         "client certificate)--> server-side proxy --HTTP/1.1 keep-alive--> pc-backend`. "
         "Each cell: the median, then its ratio to the best **peer** row (haproxy-h2, "
         "nginx-h2) for that figure. **FAILING**: at least one repetition had failed, errored "
         "or timed-out requests, non-2xx answers, missing response bodies, or could not "
         "keep the fixed rate; such a row is not a number (details in the notes and "
         "results.json). Memory and CPU are the sum over both proxies of the pair.", ""]
    L.append("| row | " + " | ".join(h for _, h, _, _, _ in COLUMNS) + " |")
    L.append("|---|" + "---:|" * len(COLUMNS))
    for r in rows:
        na = data["rows"][r].get("na")
        L.append(f"| {r}{' — ' + na if na else ''} | " + " | ".join(
            cell(summaries, r, k, hb, f) for k, _, hb, f, _ in COLUMNS) + " |")
    L.append("")
    if "portcullis-h2" in summaries and not summaries["portcullis-h2"].get("na"):
        s = summaries["portcullis-h2"]
        L += ["### Targets (issue 13, item 9)", "",
              "| figure | goal | portcullis-h2 / best peer | |", "|---|---|---:|---|"]
        for key, head, higher, _, goal in COLUMNS:
            if goal is None:
                continue
            b = best_peer(summaries, key, higher)
            v = s.get(key)
            if FIG_WORKLOAD[key] in s["failing"]:
                L.append(f"| {head} | {'≥' if higher else '≤'} {goal:g}× | FAILING | **short** |")
            elif v is None or not b:
                L.append(f"| {head} | {'≥' if higher else '≤'} {goal:g}× | – | not measured |")
            else:
                ratio = v / b
                met = ratio >= goal if higher else ratio <= goal
                L.append(f"| {head} | {'≥' if higher else '≤'} {goal:g}× | {ratio:.2f}× | "
                         f"{'met' if met else '**short**'} |")
        L.append("")
    L += ["### Per-side detail (medians)", "",
          "| row | inter-proxy conns under GET load | server→backend conns under GET load | "
          "inter-proxy conns with idle set | KiB/idle conn client side | "
          "KiB/idle conn server side | PSS KiB/idle conn (pair) | RSS of the idle pair MiB | "
          "syscalls per GET, client / server side | syscalls per gRPC-shaped, client / server "
          "side |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = summaries.get(r, {})
        if s.get("na"):
            continue

        def g(k, f):
            v = s.get(k)
            return f(v) if v is not None else "–"
        L.append(f"| {r} | {g('hop_conns_get', lambda v: f'{v:,.0f}')} | "
                 f"{g('backend_conns_get', lambda v: f'{v:,.0f}')} | "
                 f"{g('hop_conns_idle', lambda v: f'{v:,.0f}')} | "
                 f"{g('mem_req_client_b', lambda v: f'{v / 1024:,.1f}')} | "
                 f"{g('mem_req_server_b', lambda v: f'{v / 1024:,.1f}')} | "
                 f"{g('mem_req_pss_b', lambda v: f'{v / 1024:,.1f}')} | "
                 f"{g('rss_idle_kib', lambda v: f'{v / 1024:,.1f}')} | "
                 f"{g('syscalls_get_client', lambda v: f'{v:.2f}')} / "
                 f"{g('syscalls_get_server', lambda v: f'{v:.2f}')} | "
                 f"{g('syscalls_grpc_client', lambda v: f'{v:.2f}')} / "
                 f"{g('syscalls_grpc_server', lambda v: f'{v:.2f}')} |")
    L += ["", "### Notes", ""]
    for n in data["notes"]:
        L.append(f"- {n}")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def machine_info():
    b1.PORTCULLIS = PORTCULLIS
    info = b1.machine_info()
    src = ""
    try:
        with open(os.path.join(BUILD, "CMakeCache.txt")) as f:
            for ln in f:
                if ln.startswith("CMAKE_HOME_DIRECTORY:"):
                    src = ln.split("=", 1)[1].strip()
    except OSError:
        pass
    info["portcullis_source"] = src or "?"
    if src and os.path.realpath(src) != os.path.realpath(ROOT):
        # run.py's commit field describes this checkout, not what was built
        info["portcullis_commit"] = (os.environ.get("BENCH_SOURCE_NOTE")
                                     or f"unknown commit (built from {src})")
    info["h2load"] = b1.sh([H2LOAD, "--version"]) or "?"
    return info


def main():
    for b in (BACKEND, PORTCULLIS):
        if not os.access(b, os.X_OK):
            sys.exit(f"h2bench: {b} missing: run bench/run_h2.sh (it builds them)")
    if not shutil.which(H2LOAD):
        sys.exit("h2bench: h2load missing (Debian: nghttp2-client)")
    nofile = b1.raise_nofile()
    rows = b1.chosen_rows("h2bench", ROW_NAMES, CFG["workloads"], WORKLOADS)
    notes = []
    # two descriptors per proxied connection in each proxy, some headroom
    cap = (nofile - 400) // 2
    if CFG["idle_conns"] > cap:
        notes.append(f"Idle set capped from {CFG['idle_conns']:,} to {cap:,} connections "
                     f"(RLIMIT_NOFILE {nofile:,}).")
        CFG["idle_conns"] = cap

    os.makedirs(RESULTS, exist_ok=True)
    for f in os.listdir(RESULTS):
        if f.startswith(("results.", "perf-")):
            os.remove(os.path.join(RESULTS, f))
    work = tempfile.mkdtemp(prefix="pc-h2bench.")
    os.makedirs(os.path.join(work, "logs"))
    pki = os.path.join(work, "pki")
    subprocess.run(["bash", os.path.join(ROOT, "certs", "gen-dev-pki.sh"), pki], check=True,
                   stdout=subprocess.DEVNULL)
    env = Env(work, pki, nofile)
    env.perf_now = False
    env.syscall_window = None
    # a gRPC message frame: flag 0, 4-byte length, 95 bytes of message = 100 bytes
    env.grpc_body = os.path.join(work, "grpc-body.bin")
    msg = bytes((i * 7) & 0xFF for i in range(CFG["grpc_body_bytes"] - 5))
    with open(env.grpc_body, "wb") as f:
        f.write(b"\x00" + struct.pack(">I", len(msg)) + msg)
    log(f"scratch {work}; rows {', '.join(rows)}; build {BUILD}; nofile {nofile}")

    data = {"machine": machine_info(), "config": dict(CFG), "rows_run": rows, "notes": notes,
            "rows": {}}
    data["config"]["max_connections"] = env.max_conns
    active = []
    for r in rows:
        data["rows"][r] = {"description": dict((x[0], x[2]) for x in ROWS)[r], "runs": {}}
        tool = {"portcullis-h2": PORTCULLIS, "haproxy-h2": "haproxy", "nginx-h2": "nginx"}[r]
        if not shutil.which(tool):
            data["rows"][r]["na"] = "n/a (not installed)"
            continue
        active.append(r)

    def record(r, name, res):
        rd = data["rows"][r]["runs"].setdefault(name, [])
        res["rep"] = len([x for x in rd if not x.get("superseded")])
        rd.append(res)

    def interleaved(name, fn, reps):
        """All pairs up at once (fresh for this workload); repetition i runs every row, in
        an order rotated by i, so that a disturbance is spread over the rows."""
        if name not in CFG["workloads"] or over_time():
            if name in CFG["workloads"]:
                notes.append(f"Workload {name} skipped: past BENCH_MAX_MINUTES.")
            return
        pairs = {}
        try:
            for r in active:
                p = Pair(env, r)
                if not p.start():
                    log(f"{name} {r}: {p.error}")
                    record(r, name, {"error": p.error})
                    p.stop()
                    continue
                pairs[r] = p
                data["rows"][r].setdefault("config", p.configs)
            # Unmeasured priming run per pair, same shape as the workload: inter-proxy
            # connections and pools are established before anything is timed.
            for r, pair in pairs.items():
                kind = "grpc" if name == "grpc" else "get"
                count = name in ("get", "grpc") and shutil.which("perf")
                if count:
                    pair.env.syscall_window = (1.0, 1.5)
                res = run_h2load(pair, h2load_args(pair, kind, ["-D", "3" if count else "2"]),
                                 60, sample_at=1.0 if count else None)
                pair.env.syscall_window = None
                data["rows"][r].setdefault("priming", {})[name] = {
                    k: res.get(k) for k in ("rps", "succeeded", "failed", "errored", "timeout",
                                            "status", "failing", "error", "syscalls")}
                log(f"{name:9s} {r:14s} priming: {res.get('rps', 0):,.0f} req/s"
                    + (f" FAILING: {res.get('failing')}" if res.get("failing") else ""))
            order = list(pairs)
            for i in range(reps):
                rot = order[i % len(order):] + order[:i % len(order)] if order else []
                for r in rot:
                    pair = pairs[r]
                    if not pair.proxies_alive():
                        continue
                    while True:
                        b1.wait_quiet(f"{name} {r}")
                        env.perf_now = (CFG["perf"] and name == "get" and i == 0
                                        and r == "portcullis-h2")
                        res = fn(pair, i)
                        env.perf_now = False
                        res["disturbed"] = res.get("foreign_cpus", 0) > CFG["quiet_max"]
                        record(r, name, res)
                        log(f"{name:9s} {r:14s} rep {i + 1}/{reps}: {brief(res)}")
                        # a failing repetition stays: failures are reported, not retried away
                        if (not res["disturbed"] or res.get("failing") or res.get("error")
                                or b1.QUIET["retries"] >= CFG["retry_budget"]):
                            break
                        res["superseded"] = True
                        b1.QUIET["retries"] += 1
        finally:
            for p in pairs.values():
                p.stop()

    try:
        interleaved("get", lambda p, i: w_closed(p, "get"), CFG["reps"])
        rate = CFG["rate_requested"]
        if not rate:
            kas = [med([x.get("rps") for x in data["rows"][r]["runs"].get("get", [])
                        if not x.get("failing") and not x.get("error")]) for r in active]
            kas = [k for k in kas if k]
            rate = max(100.0, (min(kas) / 2) // 100 * 100) if kas else 2000.0
            notes.append(f"Fixed rate {rate:,.0f} req/s: half the slowest row's median "
                         f"closed-loop GET rate, rounded down to 100.")
        data["config"]["rate"] = rate
        interleaved("grpc", lambda p, i: w_closed(p, "grpc"), CFG["reps"])
        interleaved("fixedrate", lambda p, i: w_fixedrate(p, rate, i), CFG["fr_reps"])
        if "memory" in CFG["workloads"]:
            for i in range(CFG["reps"]):
                if over_time():
                    notes.append("Memory workload cut short: past BENCH_MAX_MINUTES.")
                    break
                for r in active[i % len(active):] + active[:i % len(active)]:
                    b1.wait_quiet(f"memory {r}")
                    res = w_memory(env, r, i)
                    record(r, "memory", res)
                    log(f"{'memory':9s} {r:14s} rep {i + 1}/{CFG['reps']}: {brief(res)}")
    except KeyboardInterrupt:
        notes.append("Interrupted: results are partial.")
        data["interrupted"] = True

    data["notes_run"] = list(notes)
    data["quiet"] = dict(b1.QUIET)
    data["active"] = active
    data["wall_s"] = time.time() - T0
    render(data)
    if os.environ.get("BENCH_KEEP", "") in ("", "0"):
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work}")
    log(f"done in {data['wall_s'] / 60:.1f} min: {RESULTS}/results.md")
    with open(os.path.join(RESULTS, "results.md")) as f:
        print(f.read())
    return 1 if data.get("interrupted") else 0


def render(data):
    """Summaries, notes, results.json and results.md from the recorded runs."""
    rows, active = data["rows_run"], data["active"]
    summaries = {}
    for r in rows:
        if data["rows"][r].get("na"):
            summaries[r] = {"na": True, "failing": {}}
        else:
            summaries[r] = data["rows"][r]["summary"] = summarize(data["rows"][r])
    b1.QUIET.update(data.get("quiet", {}))
    data["notes"] = list(data["notes_run"]) + checks(summaries, active, data)
    with open(os.path.join(RESULTS, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    write_markdown(data, summaries, os.path.join(RESULTS, "results.md"))


def report_only():
    """--report: re-render results.md (and the summaries in results.json) from results.json."""
    with open(os.path.join(RESULTS, "results.json")) as f:
        data = json.load(f)
    for k in ("reps", "fr_reps", "conns", "streams", "quiet_max"):
        CFG[k] = data["config"].get(k, CFG[k])
    data.setdefault("active", [r for r in data["rows_run"] if not data["rows"][r].get("na")])
    data.setdefault("notes_run", [n for n in data.get("notes", []) if n.startswith(
        ("Fixed rate ", "Idle set", "Workload ", "Memory workload", "Interrupted"))])
    render(data)
    return 0


def checks(summaries, active, data):
    notes = []
    for r in active:
        for wl, why in summaries[r]["failing"].items():
            notes.append(f"**{r} FAILING in {wl}:** {why}")
    runs = [x for r in active for rs in data["rows"][r]["runs"].values() for x in rs]
    loads = [x["loadavg_before"][0] for x in runs if "loadavg_before" in x]
    if loads:
        notes.append(f"1-minute load average before the measurements: {min(loads):.2f} to "
                     f"{max(loads):.2f} (it includes the benchmark's own previous runs; every "
                     f"value is in results.json, `loadavg_before`). What decides whether a run "
                     f"was disturbed is the CPU other processes used during it "
                     f"(`foreign_cpus`).")
    cu = [f"{r} rep {x['rep'] + 1}" for r in active for x in data["rows"][r]["runs"].get(
        "fixedrate", []) if x.get("catch_up")]
    if cu:
        notes.append("Fixed rate: h2load sent more than 1.05× the target rate in " + ", ".join(cu)
                     + " (it catches up with requests it could not send on time, i.e. the row "
                       "fell behind for a while); those latencies stay in the medians.")
    spread = []
    for r in active:
        v = [x["latency_us"]["p99"] for x in data["rows"][r]["runs"].get("fixedrate", [])
             if not x.get("superseded") and "latency_us" in x]
        if v:
            spread.append(f"{r} {min(v) / 1000:.2f}–{max(v) / 1000:.2f}")
    if spread:
        notes.append("Fixed-rate p99 per repetition, lowest to highest (ms): " + ", ".join(spread)
                     + ". Where these ranges overlap, a median ratio near 1 is a tie.")
    sc = [r for r in active if summaries[r].get("syscalls_get_client") is not None]
    if sc:
        notes.append("Syscalls per request (per-side table): counted with `perf stat` on the "
                     "syscalls:sys_enter_* tracepoints of each proxy's processes for 1.5 s of the "
                     "unmeasured priming run, divided by requests in that window (h2load's rate "
                     "× 1.5 s); reads, writes, sends, receives, epoll, futex and clock_gettime.")
    dist = [x for x in runs if x.get("disturbed")]
    if dist or b1.QUIET["waited_s"]:
        kept = [x for x in dist if not x.get("superseded")]
        notes.append(f"Shared machine: the suite waited {b1.QUIET['waited_s']:.0f} s for other "
                     f"processes to leave the CPUs and redid {b1.QUIET['retries']} "
                     f"repetition(s) during which they used more than {CFG['quiet_max']} CPUs; "
                     f"{len(kept)} disturbed repetition(s) remain in the medians"
                     + (" (retry budget spent)" if kept else "") +
                     "; the CPU others used during every run is in results.json "
                     "(`foreign_cpus`, `disturbed`).")
    notes.append("nginx cannot proxy HTTP/2 with proxy_pass; its row uses grpc_pass (HTTP/2 to "
                 "the upstream for any request, not only gRPC) over mTLS, which sends one "
                 "stream per upstream connection and keeps those connections in a keepalive "
                 "pool: same protocols on every hop, no multiplexing on the inter-proxy hop.")
    hop = {}
    for r in active:
        v = [x.get("conns_client_to_server") for x in data["rows"][r]["runs"].get("get", [])
             if not x.get("superseded") and x.get("conns_client_to_server") is not None]
        if v:
            hop[r] = f"{min(v):,}" if min(v) == max(v) else f"{min(v):,}–{max(v):,}"
    if hop:
        notes.append("Inter-proxy connections, sampled once per GET run 1.5 s into its timed "
                     f"part ({CFG['conns']} client connections × {CFG['streams']} streams = "
                     f"{CFG['conns'] * CFG['streams']} concurrent requests): " + ", ".join(
                         f"{r} {v}" for r, v in hop.items()) +
                     ". portcullis multiplexes up to the server's SETTINGS_MAX_CONCURRENT_STREAMS "
                     "(100) per connection; nginx's grpc_pass carries one stream per connection; "
                     "HAProxy (`http-reuse safe`, its default) opens up to one per concurrent "
                     "stream and multiplexes streams over them to a varying degree.")
    notes.append("The upstream identity check differs: portcullis checks the server's SPIFFE ID "
                 "(`expect`), HAProxy and nginx the chain and the DNS name api.payments.svc. The "
                 "server side checks the client chain in all rows (portcullis also its SPIFFE "
                 "ID against `allow`).")
    notes.append("h2load measures latency from when a request is actually sent; in --rps mode "
                 "a request that waits for a free stream slot is not charged for the wait "
                 "(with -m 32 and a rate of half the slowest closed-loop rate the slots are "
                 "mostly free).")
    notes.append(f"All processes (h2load, both proxies, backend) share the "
                 f"{data['machine']['nproc']} CPUs.")
    return notes


def brief(r):
    if "error" in r and "rps" not in r:
        return "ERROR " + r["error"]
    if "requested" in r:
        if "after_request" not in r:
            return "ERROR " + str(r.get("error") or r.get("failing"))
        a, p = r["after_request"], r["preface_only"]
        return (f"preface-only {p.get('bytes_per_conn_rss', 0) / 1024:.1f} KiB/conn, "
                f"after request {a.get('bytes_per_conn_rss', 0) / 1024:.1f} KiB/conn "
                f"(client {(a['client']['rss_kib'] - r['baseline']['client']['rss_kib']) / 1024:.1f} MiB, "
                f"server {(a['server']['rss_kib'] - r['baseline']['server']['rss_kib']) / 1024:.1f} MiB), "
                f"ok {r.get('requests_ok')}/{r['requested']}, hop conns "
                f"{a['conns_client_to_server']}"
                + (f" FAILING {r['failing']}" if r.get("failing") else ""))
    txt = (f"{r.get('rps', 0):,.0f} req/s, {r.get('succeeded')} ok, failed "
           f"{r.get('failed')}/{r.get('errored')}/{r.get('timeout')}")
    if "latency_us" in r:
        lat = r["latency_us"]
        txt += (f", p50 {lat['p50'] / 1000:.2f} ms p99 {lat['p99'] / 1000:.2f} ms "
                f"(rate {r['rate_achieved']:,.0f}/{r['rate_target']:,.0f})")
    if "conns_client_to_server" in r:
        txt += f", hop conns {r['conns_client_to_server']}"
    txt += (f", cpu c/s/b {r['cpu_s']['client']:.1f}/{r['cpu_s']['server']:.1f}/"
            f"{r['cpu_s']['backend']:.1f} s, load {r['loadavg_before'][0]:.2f}")
    if r.get("failing"):
        txt += f" FAILING: {r['failing']}"
    if r.get("disturbed"):
        txt += f" DISTURBED (others used {r['foreign_cpus']:.2f} CPUs)"
    return txt


if __name__ == "__main__":
    sys.exit(report_only() if sys.argv[1:] == ["--report"] else main())

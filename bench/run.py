#!/usr/bin/python3
"""Side-by-side benchmark of portcullis against HAProxy, nginx and hitch.

Driven by bench/run.sh (which installs packages, builds in release mode and
raises the descriptor limit); see bench/README.md. Everything runs on
127.0.0.1; every run is bounded in time. Results go to bench/results/.

Environment knobs (defaults in brackets):
  BENCH_QUICK=1           smoke run: short runs, 1 repetition, 1,000 idle only
  BENCH_ROWS=a,b          only these rows [all]
  BENCH_REPS              repetitions per workload [3]
  BENCH_FR_REPS           repetitions of the fixed-rate workload [5]
  BENCH_DURATION          seconds per keep-alive / fixed-rate / handshake run [8]
  BENCH_WARMUP            seconds of each run not counted [1]
  BENCH_CONNS             keep-alive and fixed-rate connections [64]
  BENCH_RATE              fixed rate, req/s; capped at half the slowest row's keep-alive rate [5000]
  BENCH_HS_CONC           concurrent connections in the handshake workload [32]
  BENCH_BULK_BYTES        bytes per bulk transfer [1073741824]
  BENCH_IDLE              idle connection counts [1000,10000]
  BENCH_WORKERS           worker threads/processes of every proxy and the backend [2]
  BENCH_LOADGEN_THREADS   load generator threads [2]
  BENCH_PERF=1            perf record the portcullis rows (keep-alive, handshakes) into results/
  BENCH_BUILD_DIR         where run.sh built portcullis, pc-loadgen, pc-backend [build-release]
  BENCH_KEEP=1            keep the scratch directory (configs, logs) under /tmp
  BENCH_RESULTS           where results go [bench/results]
  BENCH_QUIET_MAX         CPUs other processes may use during a run before it is repeated [0.25]
  BENCH_QUIET_BUDGET      total seconds the suite may wait for a quiet machine [900]
  BENCH_RETRIES           total repetitions the suite may redo because they were disturbed [20]
  BENCH_WORKLOADS=a,b     only these workloads: keepalive, fixedrate, connrate, bulk_down,
                          bulk_up, memory [all]
"""

import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RESULTS = os.path.abspath(os.environ.get("BENCH_RESULTS", os.path.join(BENCH, "results")))
BUILD = os.path.abspath(os.environ.get("BENCH_BUILD_DIR", os.path.join(ROOT, "build-release")))
LOADGEN = os.path.join(BUILD, "bench", "pc-loadgen")
BACKEND = os.path.join(BUILD, "bench", "pc-backend")
PORTCULLIS = os.path.join(BUILD, "portcullis")

TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305")
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# name, kind, layer, description
ROWS = [
    ("direct", "baseline", "-", "no proxy: plaintext HTTP straight to the backend"),
    ("backend-tls", "baseline", "-", "no proxy: the backend itself serves mTLS (BoringSSL)"),
    ("portcullis-tcp", "portcullis", "L4", 'portcullis inbound, protocol = "tcp"'),
    ("portcullis-http", "portcullis", "L7", 'portcullis inbound, protocol = "http"'),
    ("haproxy-tcp", "peer", "L4", "HAProxy mode tcp"),
    ("haproxy-http", "peer", "L7", "HAProxy mode http, server-side keep-alive (http-reuse safe)"),
    ("nginx-stream", "peer", "L4", "nginx stream module, proxy_pass"),
    ("nginx-http", "peer", "L7", "nginx http, proxy_pass to a keepalive upstream pool"),
    ("hitch", "peer", "L4", "hitch TLS terminator (plain TCP to the backend)"),
]
ROW_NAMES = [r[0] for r in ROWS]
PEERS = [r[0] for r in ROWS if r[1] == "peer"]


def env_num(name, default, cast=float):
    v = os.environ.get(name)
    return cast(v) if v not in (None, "") else default


QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
WORKLOADS = ("keepalive", "fixedrate", "connrate", "bulk_down", "bulk_up", "memory")
CFG = {
    "quick": QUICK,
    "reps": env_num("BENCH_REPS", 1 if QUICK else 3, int),
    # p99 at a fixed rate moves most from run to run on a shared 2-core machine: more
    # repetitions, so that its median means something
    "fr_reps": env_num("BENCH_FR_REPS", 1 if QUICK else 5, int),
    "duration_s": env_num("BENCH_DURATION", 2.0 if QUICK else 8.0),
    "warmup_s": env_num("BENCH_WARMUP", 0.5 if QUICK else 1.0),
    "conns": env_num("BENCH_CONNS", 64, int),
    "rate_max": env_num("BENCH_RATE", 5000.0),
    "hs_concurrency": env_num("BENCH_HS_CONC", 32, int),
    "bulk_bytes": env_num("BENCH_BULK_BYTES", (256 << 20) if QUICK else (1 << 30), int),
    "idle_requested": [int(x) for x in os.environ.get(
        "BENCH_IDLE", "1000" if QUICK else "1000,10000").split(",") if x.strip()],
    "workers": env_num("BENCH_WORKERS", 2, int),
    "loadgen_threads": env_num("BENCH_LOADGEN_THREADS", 2, int),
    "perf": os.environ.get("BENCH_PERF", "") not in ("", "0"),
    # CPUs other processes may use during a run before it counts as disturbed and is repeated
    "quiet_max": env_num("BENCH_QUIET_MAX", 0.25),
    "quiet_budget_s": env_num("BENCH_QUIET_BUDGET", 900.0),
    "retry_budget": env_num("BENCH_RETRIES", 20, int),
    "workloads": [x.strip() for x in os.environ.get("BENCH_WORKLOADS", ",".join(WORKLOADS))
                  .split(",") if x.strip()],
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
T_START = time.time()


def log(msg):
    el = time.time() - T_START
    print(f"[bench {int(el) // 60:02d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    """Output of a command (stdout+stderr), or '' if it cannot run."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, **kw)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


sys.path.insert(0, os.path.join(ROOT, "scripts"))
import portalloc  # noqa: E402


def free_port():
    """A free port on 127.0.0.1 that nothing else can take before the process under test
    binds it: outside the kernel's ephemeral range (no port-0 bind or outgoing connection --
    the load generator's thousands of them included -- gets it), never handed out twice in
    this run (scripts/portalloc.py)."""
    return portalloc.take_port()


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# ---------------------------------------------------------------- processes


def proc_tree(pid):
    """pid and all its descendants (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def memory_kib(pids):
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return {"rss_kib": rss, "pss_kib": pss, "processes": len(pids)}


def foreign_cpu_seconds():
    """CPU time used so far by user processes that are not this runner or its descendants
    (reaped children included through cutime/cstime). Kernel threads are left out: ksoftirqd
    mostly carries our own loopback traffic."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        procs[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), [os.getpid()]
    while todo:
        p = todo.pop()
        ours.add(p)
        todo.extend(children.get(p, []))
    return sum(t for pid, (ppid, t) in procs.items()
               if pid not in ours and pid != 2 and ppid != 2) / CLK_TCK


QUIET = {"waited_s": 0.0, "retries": 0}


def wait_quiet(what):
    """Waits (within BENCH_QUIET_BUDGET seconds over the whole run) until processes other than
    ours leave the CPUs alone: this machine may be shared (other test runs, fuzzers)."""
    waited, said = 0.0, False
    while True:
        b0 = foreign_cpu_seconds()
        time.sleep(0.5)
        busy = (foreign_cpu_seconds() - b0) / 0.5
        if busy < CFG["quiet_max"] or QUIET["waited_s"] >= CFG["quiet_budget_s"]:
            if said:
                log(f"  ... quiet after {waited:.0f} s")
            return
        if not said:
            log(f"  other processes use {busy:.1f} CPUs; waiting before {what}")
            said = True
        time.sleep(2.0)
        waited += 2.5
        QUIET["waited_s"] += 2.5


class Proc:
    """A process (group) this runner started; only ever signalled by its own pid/group."""

    def __init__(self, name, cmd, logpath, stop_sig=signal.SIGTERM):
        self.name, self.cmd, self.stop_sig = name, cmd, stop_sig
        self.logf = open(logpath, "ab")
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.logf,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self):
        return proc_tree(self.p.pid) if self.p.poll() is None else []

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.p.poll() is None:
            try:
                self.p.send_signal(self.stop_sig)
                self.p.wait(timeout=8)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)  # the group we created
                except OSError:
                    pass
                self.p.wait(timeout=5)
        # Children (nginx/hitch workers) leave with their master; make sure.
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except OSError:
            pass
        self.logf.close()


# ------------------------------------------------------------------ the rows


class Env:
    def __init__(self, work, pki, nofile):
        self.work, self.pki, self.nofile = work, pki, nofile
        self.server_crt = os.path.join(pki, "payments-api.crt")
        self.server_key = os.path.join(pki, "payments-api.key")
        self.ca = os.path.join(pki, "ca.crt")
        self.client_crt = os.path.join(pki, "web-frontend.crt")
        self.client_key = os.path.join(pki, "web-frontend.key")
        self.server_pem = os.path.join(work, "payments-api.pem")  # cert + key for haproxy/hitch
        with open(self.server_pem, "w") as out:
            for p in (self.server_crt, self.server_key):
                with open(p) as f:
                    out.write(f.read())
        os.chmod(self.server_pem, 0o644)
        # Two descriptors per proxied connection, plus headroom.
        self.max_conns = max(1000, min(30000, (nofile - 300) // 2))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def portcullis_conf(env, name, proto, port, admin, backend):
    return write(os.path.join(env.work, f"{name}.conf"), f"""\
trust_domain = "cluster.local";
workers = {CFG['workers']};
identity = {{ cert = "{env.server_crt}"; key = "{env.server_key}"; ca = "{env.ca}"; watch = false; }};
tls = {{ min_version = "1.2"; ciphers = "{TLS12_CIPHERS}"; curves = "X25519:P-256";
        resumption = false; }};
admin = {{ listen = "127.0.0.1:{admin}"; }};
log = {{ level = "warn"; access = false; }};
limits = {{ max_connections = {env.max_conns}; idle_timeout_ms = 900000; drain_timeout_ms = 1000; }};
inbound = (
  {{ name = "bench"; listen = "127.0.0.1:{port}"; forward = "127.0.0.1:{backend}";
     protocol = "{proto}"; allow = ( {{ namespace = "web"; }} ); }}
);
""")


def haproxy_conf(env, name, mode, port, backend):
    return write(os.path.join(env.work, f"{name}.cfg"), f"""\
global
  nbthread {CFG['workers']}
  maxconn {env.max_conns}
  ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
  ssl-default-bind-ciphers {TLS12_CIPHERS}
  ssl-default-bind-ciphersuites {TLS13_SUITES}
  tune.ssl.cachesize 0
defaults
  mode {mode}
  timeout connect 5s
  timeout client 900s
  timeout server 900s
frontend fe
  bind 127.0.0.1:{port} ssl crt {env.server_pem} ca-file {env.ca} verify required curves X25519:P-256
  default_backend be
backend be
  server app 127.0.0.1:{backend}
""")


def nginx_conf(env, name, kind, port, backend):
    d = os.path.join(env.work, name)
    os.makedirs(d, exist_ok=True)
    ssl = f"""
    ssl_certificate {env.server_crt};
    ssl_certificate_key {env.server_key};
    ssl_client_certificate {env.ca};
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {TLS12_CIPHERS};
    ssl_conf_command Ciphersuites {TLS13_SUITES};
    ssl_prefer_server_ciphers on;
    ssl_ecdh_curve X25519:prime256v1;
    ssl_session_tickets off;
    ssl_session_cache off;"""
    if kind == "stream":
        block = f"""stream {{
  server {{
    listen 127.0.0.1:{port} ssl reuseport backlog=4096;{ssl}
    proxy_pass 127.0.0.1:{backend};
    proxy_timeout 900s;
  }}
}}"""
    else:
        block = f"""http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream app {{
    server 127.0.0.1:{backend};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 900s;
  }}
  server {{
    listen 127.0.0.1:{port} ssl reuseport backlog=4096;{ssl}
    keepalive_requests 100000000;
    keepalive_timeout 900s;
    client_max_body_size 0;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
    }}
  }}
}}"""
    return write(os.path.join(d, "nginx.conf"), f"""\
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
user root;
worker_processes {CFG['workers']};
worker_rlimit_nofile {env.nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {max(1024, env.nofile - 200)}; }}
{block}
""")


def hitch_conf(env, name, port, backend):
    ocsp = os.path.join(env.work, "hitch-ocsp")
    os.makedirs(ocsp, exist_ok=True)
    return write(os.path.join(env.work, f"{name}.conf"), f"""\
frontend = "[127.0.0.1]:{port}"
backend = "[127.0.0.1]:{backend}"
pem-file = "{env.server_pem}"
workers = {CFG['workers']}
backlog = 4096
daemon = off
user = "_hitch"
tls-protos = TLSv1.2 TLSv1.3
ciphers = "{TLS12_CIPHERS}"
ciphersuites = "{TLS13_SUITES}"
prefer-server-ciphers = on
ecdh-curve = "X25519:prime256v1"
client-verify = required
client-verify-ca = "{env.ca}"
log-level = 1
ocsp-dir = "{ocsp}"
""")


class Setup:
    """One row brought up: the backend, and the proxy in front of it (if any)."""

    def __init__(self, env, row):
        self.env, self.row = env, row
        self.backend = self.proxy = self.config_path = None
        self.ok, self.error = False, ""

    def start(self):
        env, row = self.env, self.row
        bport, btls, port, admin = free_port(), free_port(), free_port(), free_port()
        logs = os.path.join(env.work, "logs")
        self.backend = Proc("backend", [
            BACKEND, "--listen", f"127.0.0.1:{bport}", "--tls-listen", f"127.0.0.1:{btls}",
            "--cert", env.server_crt, "--key", env.server_key, "--ca", env.ca,
            "--threads", str(CFG["workers"]), "--ciphers", TLS12_CIPHERS],
            os.path.join(logs, "backend.log"))
        if not (wait_port(bport) and wait_port(btls)):
            self.error = "backend did not start"
            return False
        self.tls = row != "direct"
        if row == "direct":
            self.port, self.measured = bport, self.backend
        elif row == "backend-tls":
            self.port, self.measured = btls, self.backend
        else:
            self.port = port
            if row.startswith("portcullis"):
                cfg = portcullis_conf(env, row, row.split("-")[1], port, admin, bport)
                cmd, sig = [PORTCULLIS, "-c", cfg], signal.SIGINT
            elif row.startswith("haproxy"):
                cfg = haproxy_conf(env, row, row.split("-")[1], port, bport)
                cmd, sig = ["haproxy", "-db", "-f", cfg], signal.SIGTERM
            elif row.startswith("nginx"):
                cfg = nginx_conf(env, row, row.split("-")[1], port, bport)
                cmd = ["nginx", "-p", os.path.dirname(cfg), "-c", cfg]
                sig = signal.SIGTERM
            else:
                cfg = hitch_conf(env, row, port, bport)
                cmd, sig = ["hitch", f"--config={cfg}"], signal.SIGTERM
            self.config_path = cfg
            self.proxy = Proc(row, cmd, os.path.join(logs, f"{row}.log"), sig)
            self.measured = self.proxy
            if not wait_port(port):
                self.error = f"{row} did not start (see {logs}/{row}.log)"
                return False
        time.sleep(0.3)
        self.ok = True
        return True

    def pids(self):
        return self.measured.pids()

    def stop(self):
        for p in (self.proxy, self.backend):
            if p:
                p.stop()


def check_portcullis_http(env):
    """(available, message): does this build accept protocol = "http"?"""
    cfg = portcullis_conf(env, "check-http", "http", 1, 2, 3)
    r = subprocess.run([PORTCULLIS, "--check", "-c", cfg], capture_output=True, text=True,
                       timeout=20)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


# ---------------------------------------------------------------- workloads


def loadgen_args(setup, mode, extra):
    a = [LOADGEN, "--mode", mode, "--target", f"127.0.0.1:{setup.port}",
         "--threads", str(CFG["loadgen_threads"]), "--label", setup.row]
    if setup.tls:
        a += ["--tls", "--ca", setup.env.ca, "--cert", setup.env.client_crt,
              "--key", setup.env.client_key]
    return a + [str(x) for x in extra]


def run_loadgen(args, timeout):
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "loadgen timed out"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": f"loadgen exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    out = json.loads(lines[-1])
    if r.stderr.strip():
        out["stderr"] = r.stderr.strip()[-300:]
    return out


class Perf:
    """perf record of the measured processes during one run (BENCH_PERF=1)."""

    def __init__(self, setup, tag, seconds):
        self.row, self.tag = setup.row, tag
        self.p, self.out = None, os.path.join(setup.env.work, f"perf-{setup.row}-{tag}.data")
        self.report = os.path.join(RESULTS, f"perf-{setup.row}-{tag}.txt")
        if not (CFG["perf"] and setup.row.startswith("portcullis") and shutil.which("perf")):
            return
        pids = ",".join(str(p) for p in setup.pids())
        self.p = subprocess.Popen(["perf", "record", "-F", "499", "-o", self.out, "-p", pids,
                                   "--", "sleep", str(max(1, seconds))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self):
        if not self.p:
            return
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return
        base = ["perf", "report", "-i", self.out, "--stdio", "--no-children", "-g", "none"]
        user = "--dsos=portcullis,libssl.so.0,libcrypto.so.0,libc.so.6,libuv.so.1.0.0"
        parts = [
            ("time per shared object", base + ["--sort", "dso"]),
            ("top symbols (kernel included)", base + ["--sort", "dso,symbol",
                                                      "--percent-limit", "0.8"]),
            ("top user-space symbols (percent of all samples)",
             base + ["--sort", "dso,symbol", user, "--percent-limit", "0.15"]),
        ]
        with open(self.report, "w") as f:
            f.write(f"# perf record -F 499 -p <{self.row} processes> during {self.tag}\n")
            for title, cmd in parts:
                txt = sh(cmd)
                body = [ln for ln in txt.splitlines() if ln.strip() and not ln.startswith("#")]
                f.write(f"\n## {title}\n\n" + "\n".join(body[:45]) + "\n")


def measured(setup, args, timeout):
    """Runs the load generator, adding the CPU the proxy (and the backend) used meanwhile
    and the CPU other processes on the machine took ("foreign")."""
    pids = setup.pids()
    bpids = setup.backend.pids() if setup.proxy else []
    c0, b0, m0, t0 = cpu_seconds(pids), cpu_seconds(bpids), foreign_cpu_seconds(), time.time()
    r = run_loadgen(args, timeout)
    wall = time.time() - t0
    r["proxy_cpu_s"] = cpu_seconds(pids) - c0
    r["backend_cpu_s"] = cpu_seconds(bpids) - b0
    r["foreign_cpus"] = round((foreign_cpu_seconds() - m0) / wall, 3)
    return r


def w_keepalive(setup, rep):
    d, w = CFG["duration_s"], CFG["warmup_s"]
    perf = Perf(setup, "keepalive", d - w - 0.5) if rep == 0 else None
    r = measured(setup, loadgen_args(setup, "closed", ["--conns", CFG["conns"], "--duration", d,
                                                       "--warmup", w]), d + 90)
    if perf:
        perf.finish()
    if r.get("requests_total"):
        r["cpu_s_per_1k_req"] = r["proxy_cpu_s"] / r["requests_total"] * 1000
    return r


def w_fixedrate(setup, rep, rate):
    d, w = CFG["duration_s"], CFG["warmup_s"]
    return measured(setup, loadgen_args(setup, "open", ["--conns", CFG["conns"], "--rate", rate,
                                                        "--duration", d, "--warmup", w]), d + 90)


def w_connrate(setup, rep):
    d, w = CFG["duration_s"], CFG["warmup_s"]
    perf = Perf(setup, "handshake", d - w - 0.5) if rep == 0 else None
    r = measured(setup, loadgen_args(setup, "connrate", ["--conns", CFG["hs_concurrency"],
                                                         "--duration", d, "--warmup", w]), d + 90)
    if perf:
        perf.finish()
    if r.get("connections_total"):
        r["cpu_ms_per_conn"] = r["proxy_cpu_s"] / r["connections_total"] * 1000
    return r


def w_bulk(setup, rep, upload):
    extra = ["--bytes", CFG["bulk_bytes"], "--duration", 120]
    if upload:
        extra.append("--upload")
    r = measured(setup, loadgen_args(setup, "bulk", extra), 200)
    if r.get("complete"):
        r["cpu_s_per_gb"] = r["proxy_cpu_s"] / (r["bytes_requested"] / 1e9)
    return r


def idle_hold(setup, k):
    """Opens k idle connections, measures the proxy, releases them."""
    args = loadgen_args(setup, "idle", ["--conns", k, "--inflight", 64, "--duration", 180])
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out = {"requested": k}
    try:
        line = p.stdout.readline()  # "ready ..." (the loadgen's watchdog bounds the wait)
        if not line.startswith("ready"):
            raise RuntimeError(f"loadgen idle: {line.strip()} {p.stderr.read()[-300:]}")
        time.sleep(1.0)  # let lazy allocations and deferred work settle
        out.update(memory_kib(setup.pids()))
        p.stdin.write("\n")
        p.stdin.flush()
        o, e = p.communicate(timeout=90)
        lines = [ln for ln in o.splitlines() if ln.startswith("{")]
        out["loadgen"] = json.loads(lines[-1]) if lines else {"error": e[-300:]}
    except Exception as ex:  # noqa: BLE001 - recorded, the suite goes on
        out["error"] = str(ex)
        if p.poll() is None:
            p.kill()
            p.wait()
    return out


def w_memory(env, row, rep, idle_counts):
    s = Setup(env, row)
    try:
        if not s.start():
            return {"error": s.error}
        time.sleep(0.5)
        r = {"idle": memory_kib(s.pids()), "held": []}
        for k in idle_counts:
            h = idle_hold(s, k)
            lg = h.get("loadgen", {})
            est = lg.get("established", 0)
            if est and "rss_kib" in h:
                h["bytes_per_conn_rss"] = (h["rss_kib"] - r["idle"]["rss_kib"]) * 1024 / est
                h["bytes_per_conn_pss"] = (h["pss_kib"] - r["idle"]["pss_kib"]) * 1024 / est
            r["held"].append(h)
            time.sleep(1.0)
        return r
    finally:
        s.stop()


# ------------------------------------------------------------------ summary


def med(values):
    v = [x for x in values if isinstance(x, (int, float))]
    return statistics.median(v) if v else None


def summarize(rowdata, direct_fr_p99):
    runs = rowdata["runs"]

    def pick(name, fn):
        ok = [r for r in runs.get(name, []) if "error" not in r]
        calm = [r for r in ok if not r.get("disturbed")]
        return med([fn(r) for r in (calm or ok)])

    s = {
        "ka_rps": pick("keepalive", lambda r: r.get("rps")),
        "ka_p50_us": pick("keepalive", lambda r: r["latency_us"]["p50"]),
        "ka_p99_us": pick("keepalive", lambda r: r["latency_us"]["p99"]),
        "ka_p999_us": pick("keepalive", lambda r: r["latency_us"]["p999"]),
        "cpu_s_per_1k_req": pick("keepalive", lambda r: r.get("cpu_s_per_1k_req")),
        "fr_rps": pick("fixedrate", lambda r: r.get("rps")),
        "fr_p50_us": pick("fixedrate", lambda r: r["latency_us"]["p50"]),
        "fr_p99_us": pick("fixedrate", lambda r: r["latency_us"]["p99"]),
        "fr_p999_us": pick("fixedrate", lambda r: r["latency_us"]["p999"]),
        "hs_per_s": pick("connrate", lambda r: r.get("conns_per_s")),
        "hs_p99_us": pick("connrate", lambda r: r["latency_us"]["p99"]),
        "cpu_ms_per_conn": pick("connrate", lambda r: r.get("cpu_ms_per_conn")),
        "bulk_down_mbps": pick("bulk_down", lambda r: r.get("mb_per_s") if r.get("complete") else None),
        "bulk_up_mbps": pick("bulk_up", lambda r: r.get("mb_per_s") if r.get("complete") else None),
        "cpu_s_per_gb_down": pick("bulk_down", lambda r: r.get("cpu_s_per_gb")),
        "cpu_s_per_gb_up": pick("bulk_up", lambda r: r.get("cpu_s_per_gb")),
        "rss_idle_kib": pick("memory", lambda r: r["idle"]["rss_kib"]),
        "pss_idle_kib": pick("memory", lambda r: r["idle"]["pss_kib"]),
    }
    if s["fr_p99_us"] is not None and direct_fr_p99 is not None:
        s["fr_added_p99_us"] = s["fr_p99_us"] - direct_fr_p99
    else:
        s["fr_added_p99_us"] = None
    held = {}
    for r in runs.get("memory", []):
        for h in r.get("held", []):
            held.setdefault(h["requested"], []).append(h)
    for k, hs in held.items():
        s[f"rss_{k}_kib"] = med([h.get("rss_kib") for h in hs if "error" not in h])
        s[f"bytes_per_conn_{k}"] = med([h.get("bytes_per_conn_rss") for h in hs])
        s[f"bytes_per_conn_pss_{k}"] = med([h.get("bytes_per_conn_pss") for h in hs])
        s[f"established_{k}"] = med([h.get("loadgen", {}).get("established") for h in hs])
    for name in ("keepalive", "connrate"):
        for r in runs.get(name, []):
            if r.get("tls_session"):
                s["tls_session"] = r["tls_session"]
                break
    errs = sum(r.get("errors", 0) for rs in runs.values() for r in rs if isinstance(r, dict))
    s["loadgen_errors"] = errs
    return s


# Column spec: key, header, higher_is_better, formatter
def f_int(v):
    return f"{v:,.0f}"


def f_ms(v):
    return f"{v / 1000:,.2f}"


def f_mib(v):
    return f"{v / 1024:,.1f}"


def f_kib_bytes(v):
    return f"{v / 1024:,.1f}"


def f_3(v):
    return f"{v:.3f}"


def f_2(v):
    return f"{v:.2f}"


def tables(idle_counts):
    kb, ks = idle_counts[0], idle_counts[-1]
    t = [
        ("Throughput (higher is better)", [
            ("ka_rps", f"keep-alive req/s ({CFG['conns']} conns)", True, f_int),
            ("hs_per_s", "new mTLS conns/s (handshake + 1 req)", True, f_int),
            ("bulk_down_mbps", "bulk download MB/s", True, f_int),
            ("bulk_up_mbps", "bulk upload MB/s", True, f_int),
        ]),
        ("Latency in ms (lower is better)", [
            ("ka_p50_us", "keep-alive p50", False, f_ms),
            ("ka_p99_us", "keep-alive p99", False, f_ms),
            ("fr_p50_us", "fixed-rate p50", False, f_ms),
            ("fr_p99_us", "fixed-rate p99", False, f_ms),
            ("fr_p999_us", "fixed-rate p99.9", False, f_ms),
            ("fr_added_p99_us", "fixed-rate p99 added over direct", False, f_ms),
        ]),
        ("Resources (lower is better)", [
            ("rss_idle_kib", "RSS idle MiB", False, f_mib),
            ("pss_idle_kib", "PSS idle MiB", False, f_mib),
            (f"bytes_per_conn_{kb}", f"KiB per idle conn @{kb:,}", False, f_kib_bytes),
        ] + ([(f"bytes_per_conn_{ks}", f"KiB per idle conn @{ks:,}", False, f_kib_bytes)]
             if ks != kb else []) + [
            ("cpu_s_per_gb_down", "CPU s per GB down", False, f_2),
            ("cpu_s_per_gb_up", "CPU s per GB up", False, f_2),
            ("cpu_s_per_1k_req", "CPU s per 1k req", False, f_3),
            ("cpu_ms_per_conn", "CPU ms per new conn", False, f_2),
        ]),
    ]
    return t


def best_peer(summaries, key, higher, peers=None):
    """The best value of key among the peer rows (PEERS, or peers): the highest if higher,
    else the lowest; zero does not count (except for an added latency)."""
    vals = [summaries[p][key] for p in (peers or PEERS)
            if p in summaries and summaries[p].get(key) is not None]
    vals = [v for v in vals if v > 0] if key != "fr_added_p99_us" else vals
    if not vals:
        return None
    return max(vals) if higher else min(vals)


def cell(summaries, row, key, higher, fmt):
    s = summaries.get(row)
    if s is None or s.get("na"):
        return "n/a"
    v = s.get(key)
    if v is None:
        return "–"
    text = fmt(v)
    b = best_peer(summaries, key, higher)
    if key != "fr_added_p99_us" and b is not None and b > 0 and v >= 0:
        text += f" ({v / b:.2f}×)"
    return text


def target_lines(summaries, idle_counts):
    """Issue 6's targets, per portcullis row: met or short, with the ratio."""
    goals = [("ka_rps", "keep-alive req/s", True, 1.0),
             ("hs_per_s", "new mTLS conns/s", True, 1.0),
             ("bulk_down_mbps", "bulk download MB/s", True, 1.0),
             ("bulk_up_mbps", "bulk upload MB/s", True, 1.0),
             ("fr_p99_us", "fixed-rate p99", False, 1.0)]
    goals += [(f"bytes_per_conn_{k}", f"memory per idle conn @{k:,}", False, 0.5)
              for k in idle_counts]
    ours = [r for r in ("portcullis-tcp", "portcullis-http")
            if r in summaries and not summaries[r].get("na")]
    if not ours:
        return []
    out = ["### Targets", "",
           "At or above the best peer on throughput (ratio ≥ 1), at or below it on fixed-rate "
           "p99 (≤ 1), at most half its memory per idle connection (≤ 0.5).", "",
           "| figure | goal | " + " | ".join(ours) + " |", "|---|---|" + "---|" * len(ours)]
    for key, label, higher, limit in goals:
        b = best_peer(summaries, key, higher)
        cells = []
        for r in ours:
            v = summaries[r].get(key)
            if v is None or not b:
                cells.append("–")
                continue
            ratio = v / b
            met = ratio >= limit if higher else ratio <= limit
            cells.append(f"{ratio:.2f}× {'met' if met else '**short**'}")
        goal = f"{'≥' if higher else '≤'} {limit:g}×"
        out.append(f"| {label} | {goal} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def write_markdown(data, summaries, idle_counts, path):
    m = data["machine"]
    c = data["config"]
    lines = [
        "# portcullis vs HAProxy, nginx, hitch — benchmark results",
        "",
        f"- **Date:** {m['date']}  ",
        f"- **Machine:** {m['cpu_model']}, {m['nproc']} CPUs, {m['mem_total']}, "
        f"kernel {m['kernel']}, {m['os']}  ",
        f"- **Versions:** portcullis {m['portcullis_commit']} ({m['portcullis_version']}); "
        f"{m['haproxy']}; {m['nginx']}; {m['hitch']}; BoringSSL {m['boringssl']} "
        f"(portcullis, backend, loadgen); {m['openssl']} (peers)  ",
        f"- **Run:** {'QUICK smoke run, ' if c['quick'] else ''}{c['reps']} repetition(s) per "
        f"workload ({c.get('fr_reps', c['reps'])} for fixed rate), median shown; {c['duration_s']:g} s runs ({c['warmup_s']:g} s warm-up not "
        f"counted); {c['workers']} worker threads/processes per proxy; load generator "
        f"{c['loadgen_threads']} threads; fixed rate {c['rate']:,.0f} req/s over {c['conns']} "
        f"connections; handshakes with {c['hs_concurrency']} concurrent connections; bulk "
        f"{c['bulk_bytes'] / 2**20:,.0f} MiB each way; idle sets of "
        f"{', '.join(f'{k:,}' for k in idle_counts)} connections; wall time "
        f"{data.get('wall_s', 0) / 60:.1f} min.",
        "",
        "Each cell: the median, then in parentheses its ratio to the best **peer** "
        "(best of haproxy-tcp, haproxy-http, nginx-stream, nginx-http, hitch) for that figure. "
        "For throughput a ratio above 1 is better than every peer; for latency, memory and CPU "
        "a ratio below 1 is. `n/a`: row not available; `–`: not measured or failed (see "
        "results.json). The column *added over direct* is a difference and carries no ratio. "
        "The baselines are not proxies: for them, memory and CPU are the backend's own "
        "(plaintext for direct, mTLS for backend-tls).",
        "",
    ]
    for title, cols in tables(idle_counts):
        lines.append(f"### {title}")
        lines.append("")
        lines.append("| row | " + " | ".join(h for _, h, _, _ in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for row in data["rows_run"]:
            na = data["rows"][row].get("na")
            label = f"{row} — {na.split(':')[0]}" if na else row
            lines.append(f"| {label} | " + " | ".join(
                cell(summaries, row, k, hb, f) for k, hb, f in
                ((k, hb, f) for k, _, hb, f in cols)) + " |")
        lines.append("")
    lines.extend(target_lines(summaries, idle_counts))
    lines.append("### Notes")
    lines.append("")
    for n in data["notes"]:
        lines.append(f"- {n}")
    lines.append("")
    lines.append("Negotiated TLS per row (from the load generator): " + "; ".join(
        f"{r}: {summaries[r].get('tls_session', '?')}" for r in data["rows_run"]
        if r in summaries and not summaries[r].get("na")) + ".")
    lines.append("")
    lines.append("Charts: " + ", ".join(f"`{os.path.basename(p)}`" for p in data["charts"]))
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def charts(summaries, rows, idle_counts):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no charts")
        return []
    out = []

    def color(r):
        if r.startswith("portcullis"):
            return "#c0392b"
        if r in PEERS:
            return "#2c7fb8"
        return "#999999"

    def bars(fname, title, ylabel, series, log_scale=False):
        """series: list of (label, key, scale)."""
        rs = [r for r in rows if r in summaries and not summaries[r].get("na")]
        if not rs:
            return
        fig, ax = plt.subplots(figsize=(10, 4.8))
        n = len(series)
        width = 0.8 / n
        for i, (label, key, scale) in enumerate(series):
            vals = [(summaries[r].get(key) or 0) * scale for r in rs]
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(rs))]
            b = ax.bar(xs, vals, width, label=label if n > 1 else None,
                       color=[color(r) for r in rs] if n == 1 else None,
                       alpha=1.0 if n == 1 else 0.6 + 0.4 * i / max(1, n - 1))
            ax.bar_label(b, labels=[f"{v:,.0f}" if v >= 10 else f"{v:,.2f}" for v in vals],
                         fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(rs, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log_scale:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        if n > 1:
            ax.legend()
        fig.tight_layout()
        p = os.path.join(RESULTS, fname)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)

    bars("rps.png", f"Keep-alive requests/s, {CFG['conns']} connections (higher is better)",
         "requests/s", [("req/s", "ka_rps", 1)])
    bars("fixed_rate_latency.png", "Latency at a fixed request rate (lower is better)", "ms",
         [("p50", "fr_p50_us", 1e-3), ("p99", "fr_p99_us", 1e-3), ("p99.9", "fr_p999_us", 1e-3)])
    bars("handshakes.png", "New mTLS connections/s: full handshake + 1 request (higher is better)",
         "connections/s", [("conns/s", "hs_per_s", 1)])
    bars("bulk.png", "Bulk transfer through one connection (higher is better)", "MB/s",
         [("download", "bulk_down_mbps", 1), ("upload", "bulk_up_mbps", 1)])
    bars("idle_memory.png", "Memory per idle established mTLS connection (lower is better)",
         "KiB per connection (RSS delta)",
         [(f"{k:,} conns", f"bytes_per_conn_{k}", 1 / 1024) for k in idle_counts])
    bars("cpu.png", "Proxy CPU cost (lower is better)", "CPU seconds",
         [("per GB down", "cpu_s_per_gb_down", 1), ("per GB up", "cpu_s_per_gb_up", 1),
          ("per 1k requests", "cpu_s_per_1k_req", 1)])
    return out


# --------------------------------------------------------------------- main


def machine_info():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    commit = sh(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"]) or "?"
    dirty = sh(["git", "-C", ROOT, "status", "--porcelain", "--", "proxy", "CMakeLists.txt"])
    osrel = "?"
    try:
        with open("/etc/os-release") as f:
            osrel = re.search(r'PRETTY_NAME="([^"]*)"', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": sh(["nproc"]),
        "cpu_model": cpu,
        "mem_total": mem,
        "kernel": platform.release(),
        "os": osrel,
        "portcullis_commit": commit + (" + uncommitted changes in proxy/" if dirty else ""),
        "portcullis_version": sh([PORTCULLIS, "--version"]),
        "haproxy": " ".join(sh(["haproxy", "-v"]).split()[:3]).replace(" version", "") or "?",
        "nginx": sh(["nginx", "-v"]).replace("nginx version: ", ""),
        "hitch": sh(["hitch", "--version"]),
        "boringssl": sh(["dpkg-query", "-W", "-f=${Version}", "android-libboringssl-dev"]),
        "openssl": sh(["openssl", "version"]).split(" (")[0],
        "libuv": sh(["dpkg-query", "-W", "-f=${Version}", "libuv1-dev"]),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


def raise_nofile():
    """Raises the soft descriptor limit to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def chosen_rows(prog, row_names, workloads, known_workloads):
    """The rows BENCH_ROWS asks for (all by default), in table order; exits on an unknown
    row or workload."""
    wanted = [r.strip() for r in os.environ.get("BENCH_ROWS", "").split(",") if r.strip()]
    unknown = [r for r in wanted if r not in row_names]
    if unknown:
        sys.exit(f"{prog}: unknown rows {unknown}; rows are {', '.join(row_names)}")
    bad = [w for w in workloads if w not in known_workloads]
    if bad:
        sys.exit(f"{prog}: unknown workloads {bad}; workloads are {', '.join(known_workloads)}")
    return [r for r in row_names if not wanted or r in wanted]


def main():
    for b in (LOADGEN, BACKEND, PORTCULLIS):
        if not os.access(b, os.X_OK):
            sys.exit(f"bench: {b} missing: run bench/run.sh (it builds everything)")
    nofile = raise_nofile()
    rows = chosen_rows("bench", ROW_NAMES, CFG["workloads"], WORKLOADS)

    notes = []
    # Every proxied idle connection costs the proxy two descriptors.
    cap = ((nofile - 400) // 2) // 500 * 500
    idle_counts = []
    for k in CFG["idle_requested"]:
        if k > cap:
            notes.append(
                f"Idle set of {k:,} connections capped to {cap:,}: the hard RLIMIT_NOFILE here is "
                f"{nofile:,} and could not be raised (no CAP_SYS_RESOURCE), and a proxy needs two "
                f"descriptors per connection. On a host that allows `ulimit -n 65536` the full "
                f"{k:,} are used.")
            k = cap
        if k not in idle_counts:
            idle_counts.append(k)

    # Only the latest run's files stay.
    os.makedirs(RESULTS, exist_ok=True)
    for f in os.listdir(RESULTS):
        if f.startswith(("results.", "perf-")) or f.endswith(".png"):
            os.remove(os.path.join(RESULTS, f))
    work = tempfile.mkdtemp(prefix="pc-bench.")
    os.makedirs(os.path.join(work, "logs"))
    pki = os.path.join(work, "pki")
    subprocess.run(["bash", os.path.join(ROOT, "certs", "gen-dev-pki.sh"), pki], check=True,
                   stdout=subprocess.DEVNULL)
    env = Env(work, pki, nofile)
    log(f"scratch dir {work}; rows: {', '.join(rows)}; nofile {nofile}")

    data = {"machine": machine_info(), "config": dict(CFG), "rows_run": rows, "notes": notes,
            "rows": {}, "charts": []}
    data["config"]["idle_counts"] = idle_counts
    data["config"]["max_connections"] = env.max_conns

    # Which rows can run at all.
    active = []
    for r in rows:
        data["rows"][r] = {"description": dict((x[0], x[3]) for x in ROWS)[r],
                           "layer": dict((x[0], x[2]) for x in ROWS)[r], "runs": {}}
        if r == "portcullis-http":
            ok, msg = check_portcullis_http(env)
            if not ok:
                data["rows"][r]["na"] = f"n/a (not available in this build): {msg}"
                notes.append(f"portcullis-http: n/a (not available in this build): `{msg}`")
                log(f"portcullis-http not available: {msg}")
                continue
        if r.startswith(("haproxy", "nginx", "hitch")) and not shutil.which(r.split("-")[0]):
            data["rows"][r]["na"] = "n/a (not installed)"
            continue
        active.append(r)

    def phase(name, fn, reps):
        if name not in CFG["workloads"]:
            return
        for r in active:
            s = Setup(env, r)
            try:
                if not s.start():
                    log(f"{name} {r}: {s.error}")
                    data["rows"][r]["runs"].setdefault(name, []).append({"error": s.error})
                    continue
                rd = data["rows"][r]
                if s.config_path and "config" not in rd:
                    with open(s.config_path) as f:
                        rd["config"] = f.read()
                for i in range(reps):
                    while True:
                        wait_quiet(f"{name} {r}")
                        res = fn(s, i)
                        res["rep"] = i
                        disturbed = res.get("foreign_cpus", 0) > CFG["quiet_max"]
                        res["disturbed"] = disturbed
                        rd["runs"].setdefault(name, []).append(res)
                        log(f"{name:10s} {r:16s} rep {i + 1}/{reps}: {brief(res)}"
                            + (f" DISTURBED (others used {res['foreign_cpus']:.2f} CPUs)"
                               if disturbed else ""))
                        if not disturbed or QUIET["retries"] >= CFG["retry_budget"]:
                            break
                        QUIET["retries"] += 1
                    if not s.measured.alive():
                        log(f"{r} died; see {work}/logs")
                        break
            finally:
                s.stop()

    reps = CFG["reps"]
    try:
        phase("keepalive", w_keepalive, reps)
        kas = [med([x.get("rps") for x in data["rows"][r]["runs"].get("keepalive", [])])
               for r in active]
        kas = [k for k in kas if k]
        rate = CFG["rate_max"]
        if kas and min(kas) / 2 < rate:
            rate = max(100.0, (min(kas) / 2) // 100 * 100)
            notes.append(f"Fixed rate lowered from {CFG['rate_max']:,.0f} to {rate:,.0f} req/s: "
                         f"half the slowest row's keep-alive throughput.")
        data["config"]["rate"] = rate
        phase("fixedrate", lambda s, i: w_fixedrate(s, i, rate), CFG["fr_reps"])
        phase("connrate", w_connrate, reps)
        phase("bulk_down", lambda s, i: w_bulk(s, i, False), reps)
        phase("bulk_up", lambda s, i: w_bulk(s, i, True), reps)
        for r in active if "memory" in CFG["workloads"] else []:
            for i in range(reps):
                wait_quiet(f"memory {r}")
                res = w_memory(env, r, i, idle_counts)
                data["rows"][r]["runs"].setdefault("memory", []).append(res)
                log(f"{'memory':10s} {r:16s} rep {i + 1}/{reps}: {brief(res)}")
    except KeyboardInterrupt:
        notes.append("Interrupted: results are partial.")
        data["interrupted"] = True
    data.setdefault("config", {}).setdefault("rate", CFG["rate_max"])

    # Summaries, checks, outputs.
    summaries = summarize_all(data)
    notes.extend(checks(summaries, active, data))
    data["wall_s"] = time.time() - T_START

    data["charts"] = charts(summaries, rows, idle_counts)
    with open(os.path.join(RESULTS, "results.json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    write_markdown(data, summaries, idle_counts, os.path.join(RESULTS, "results.md"))
    if os.environ.get("BENCH_KEEP", "") in ("", "0"):
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work}")
    log(f"done in {data['wall_s'] / 60:.1f} min: {RESULTS}/results.md")
    with open(os.path.join(RESULTS, "results.md")) as f:
        print(f.read())
    failed = [r for r in active if "keepalive" in CFG["workloads"]
              and summaries[r].get("ka_rps") is None]
    return 1 if failed or data.get("interrupted") else 0


def checks(summaries, active, data):
    notes = []
    d = summaries.get("direct", {}).get("ka_rps")
    proxied = [(summaries[r].get("ka_rps") or 0, r) for r in active
               if r not in ("direct", "backend-tls")]
    if d and proxied:
        best, who = max(proxied)
        if best and d < 1.5 * best:
            notes.append(f"**Generator limit warning:** direct keep-alive ({d:,.0f} req/s) is less "
                         f"than 1.5× the fastest proxy row ({who}, {best:,.0f} req/s): the load "
                         f"generator or the shared CPUs may cap the fastest rows.")
        else:
            notes.append(f"Generator check: direct keep-alive reaches {d:,.0f} req/s, "
                         f"{d / best:.1f}× the fastest proxy row ({who}), so the generator is not "
                         f"what limits the proxy rows (it still shares the CPUs with them).")
    runs = [x for r in active for rs in data["rows"][r]["runs"].values() for x in rs
            if isinstance(x, dict)]
    dist = [x for x in runs if x.get("disturbed")]
    if dist or QUIET["waited_s"]:
        notes.append(f"Shared machine: the suite waited {QUIET['waited_s']:.0f} s for other "
                     f"processes to leave the CPUs and redid {QUIET['retries']} repetition(s) "
                     f"during which others used more than {CFG['quiet_max']} CPUs; "
                     f"{len(dist)} disturbed repetition(s) are kept in results.json "
                     f"(`\"disturbed\": true`) and left out of the medians when an undisturbed "
                     f"one exists.")
    for r in active:
        s = summaries[r]
        if s.get("loadgen_errors"):
            notes.append(f"{r}: the load generator counted {s['loadgen_errors']} errors "
                         f"(see results.json).")
    notes.append("hitch 1.7.2 (Debian) supports client certificates: it runs with "
                 "`client-verify = required` and `client-verify-ca` (checked: a client without a "
                 "certificate, or with one from another CA, is refused).")
    notes.append("portcullis also authorises the peer's SPIFFE ID against the allow-list in "
                 "its verify callback; the peers only verify the chain (none has a SPIFFE "
                 "policy), so portcullis does slightly more work per handshake.")
    notes.append("Peers run OpenSSL 3.0 (Debian), portcullis and the baselines BoringSSL; "
                 "handshake-heavy figures reflect the TLS library as much as the proxy.")
    notes.append(f"All processes (load generator, backend, proxy) share the machine's "
                 f"{data['machine']['nproc']} CPUs: figures are for the whole system under "
                 f"contention, not for a proxy on dedicated cores.")
    return notes


def brief(r):
    if not isinstance(r, dict):
        return str(r)
    if "error" in r:
        return "ERROR " + r["error"]
    if "rps" in r:
        lat = r.get("latency_us", {})
        return (f"{r['rps']:,.0f} req/s p50 {lat.get('p50', 0) / 1000:.2f} ms p99 "
                f"{lat.get('p99', 0) / 1000:.2f} ms p99.9 {lat.get('p999', 0) / 1000:.2f} ms "
                f"errors {r.get('errors')} cpu {r.get('proxy_cpu_s', 0):.2f}s")
    if "conns_per_s" in r:
        return (f"{r['conns_per_s']:,.0f} conns/s p99 {r['latency_us']['p99'] / 1000:.1f} ms "
                f"errors {r.get('errors')} cpu {r.get('proxy_cpu_s', 0):.2f}s")
    if "mb_per_s" in r:
        return (f"{r['direction']} {r['mb_per_s']:,.0f} MB/s complete={r['complete']} "
                f"cpu {r.get('proxy_cpu_s', 0):.2f}s")
    if "idle" in r:
        parts = [f"idle RSS {r['idle']['rss_kib'] / 1024:.1f} MiB"]
        for h in r.get("held", []):
            if "error" in h:
                parts.append(f"{h['requested']}: ERROR {h['error']}")
            else:
                parts.append(f"{h['requested']}: RSS {h.get('rss_kib', 0) / 1024:.1f} MiB, "
                             f"{(h.get('bytes_per_conn_rss') or 0) / 1024:.1f} KiB/conn, "
                             f"established {h.get('loadgen', {}).get('established')}")
        return "; ".join(parts)
    return json.dumps(r)[:200]


def summarize_all(data):
    rows = data["rows_run"]
    direct_fr = None
    if "direct" in rows and not data["rows"]["direct"].get("na"):
        direct_fr = summarize(data["rows"]["direct"], None).get("fr_p99_us")
    summaries = {}
    for r in rows:
        if data["rows"][r].get("na"):
            summaries[r] = {"na": True}
        else:
            summaries[r] = summarize(data["rows"][r], direct_fr)
            data["rows"][r]["summary"] = summaries[r]
    return summaries


def report_only():
    """--report: re-render results.md and the charts from results.json."""
    path = os.path.join(RESULTS, "results.json")
    with open(path) as f:
        data = json.load(f)
    CFG.update({k: v for k, v in data["config"].items() if k in CFG})
    summaries = summarize_all(data)
    for f in os.listdir(RESULTS):
        if f.endswith(".png"):
            os.remove(os.path.join(RESULTS, f))
    data["charts"] = charts(summaries, data["rows_run"], data["config"]["idle_counts"])
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    write_markdown(data, summaries, data["config"]["idle_counts"],
                   os.path.join(RESULTS, "results.md"))
    return 0


if __name__ == "__main__":
    sys.exit(report_only() if sys.argv[1:] == ["--report"] else main())

#!/usr/bin/python3
"""Mesh in a box: the orchestrator behind scripts/mesh.sh (run that, not this).

Builds a small service mesh out of network namespaces on this machine, runs traffic through
it while every certificate rotates and the CA rolls, and prints one summary. See the README,
"Mesh in a box", and `scripts/mesh.sh --help`.

Layout (all of it inside namespaces this script creates; the host's own network is never
touched, only /etc/netns/<name>/resolv.conf files for the pods, removed again at teardown):

  <prefix>-node      the "node": bridge br0 10.77.0.1/24 fd77::1/64, dnsmasq answering *.mesh
  <prefix>-<pod>     one per pod, a veth eth0 on br0; runs the app (uid 1000), the sidecar
                     (uid 1337) and portcullis-init's rules (transparent mode)

Pods: api.control, config.control, scheduler.tenant-a, webserver.tenant-a,
scheduler.tenant-b, webserver.tenant-b; each app serves HTTP on :8080 and gRPC on :9090 and
calls its peers by service name (NAME.NS.mesh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "scripts" / "portcullis-init"
APP_SRC = REPO / "scripts" / "mesh_app.py"
PROXY_UID = 1337
APP_UID = 1000
TD = "cluster.local"
NET4, NET6 = "10.77.0", "fd77:"
NODE4, NODE6 = "10.77.0.1", "fd77::1"


class Pod:
    def __init__(self, app: str, ns: str, short: str, host: int):
        self.app, self.ns, self.short, self.host = app, ns, short, host
        self.key = f"{app}.{ns}"
        self.dns = f"{app}.{ns}.mesh"
        self.ip4 = f"{NET4}.{host}"
        self.ip6 = f"fd77::{host}"
        self.spiffe = f"spiffe://{TD}/ns/{ns}/sa/{app}"
        self.netns = ""            # set by Mesh
        self.procs: dict[str, subprocess.Popen] = {}
        self.serial = ""


PODS = [Pod("api", "control", "api", 11), Pod("config", "control", "config", 12),
        Pod("scheduler", "tenant-a", "a-sched", 21), Pod("webserver", "tenant-a", "a-web", 22),
        Pod("scheduler", "tenant-b", "b-sched", 31), Pod("webserver", "tenant-b", "b-web", 32)]
BY_KEY = {p.key: p for p in PODS}

# Inbound policy: who may call each pod (one allow-list for all of the pod's ports).
ALLOW = {
    "api.control": [{"namespace": "tenant-a", "paths": ["/v1/", "/mesh.Api/Get"]},
                    {"namespace": "tenant-b", "paths": ["/v1/", "/mesh.Api/Get"]}],
    "config.control": [{"namespace": "control", "service_account": "api"}],
    "scheduler.tenant-a": [{"namespace": "tenant-a", "service_account": "webserver",
                            "paths": ["/healthz"]}],
    "webserver.tenant-a": [{"namespace": "tenant-a", "service_account": "scheduler"}],
    "scheduler.tenant-b": [{"namespace": "tenant-b", "service_account": "webserver",
                            "paths": ["/healthz"]}],
    "webserver.tenant-b": [{"namespace": "tenant-b", "service_account": "scheduler"}],
}

# The calls the apps make: (caller, target, kind, request path, expected, refused by).
# "l7": the target's sidecar admits the peer in the handshake but its allow entry does not
# list the path (403 / PERMISSION_DENIED); "handshake": the target's sidecar refuses the peer
# (the caller's sidecar answers 502 / UNAVAILABLE); "route": the caller's own sidecar has no
# route to that destination and closes the connection (transparent mode only).
PATHS = [
    ("scheduler.tenant-a", "api.control", "http", "/v1/jobs", "allow", None),
    ("scheduler.tenant-a", "api.control", "grpc", "/mesh.Api/Get", "allow", None),
    ("scheduler.tenant-b", "api.control", "http", "/v1/jobs", "allow", None),
    ("scheduler.tenant-b", "api.control", "grpc", "/mesh.Api/Get", "allow", None),
    ("webserver.tenant-a", "api.control", "http", "/v1/pages", "allow", None),
    ("webserver.tenant-b", "api.control", "http", "/v1/pages", "allow", None),
    ("api.control", "config.control", "http", "/v1/config", "allow", None),
    ("api.control", "config.control", "grpc", "/mesh.Api/Get", "allow", None),
    ("scheduler.tenant-a", "webserver.tenant-a", "http", "/v1/deploy", "allow", None),
    ("scheduler.tenant-a", "webserver.tenant-a", "grpc", "/mesh.Api/Get", "allow", None),
    ("scheduler.tenant-b", "webserver.tenant-b", "http", "/v1/deploy", "allow", None),
    ("scheduler.tenant-b", "webserver.tenant-b", "grpc", "/mesh.Api/Get", "allow", None),
    ("scheduler.tenant-b", "api.control", "grpc", "/mesh.Api/Admin", "deny", "l7"),
    ("webserver.tenant-a", "scheduler.tenant-a", "http", "/v1/tasks", "deny", "l7"),
    ("webserver.tenant-a", "scheduler.tenant-a", "grpc", "/mesh.Api/Get", "deny", "l7"),
    ("scheduler.tenant-a", "webserver.tenant-b", "http", "/v1/deploy", "deny", "handshake"),
    ("scheduler.tenant-b", "webserver.tenant-a", "grpc", "/mesh.Api/Get", "deny", "handshake"),
    ("scheduler.tenant-a", "config.control", "http", "/v1/config", "deny", "handshake"),
    ("webserver.tenant-b", "config.control", "http", "/v1/config", "deny", "route"),
]
PORT = {"http": 8080, "grpc": 9090}


def path_id(p) -> str:
    caller, target, kind, req, _, _ = p
    return f"{caller} -> {target} {kind} {req}"


def log(msg: str) -> None:
    print(f"mesh: {msg}", file=sys.stderr, flush=True)


def run(*cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): "
                           f"{r.stderr.strip() or r.stdout.strip()}")
    return r


# ================================================================================ PKI

class Issuer:
    """A small CA: P-256 roots and leaves with the openssl CLI (one command per certificate,
    random serial), SPIFFE URI SAN, both EKUs."""

    def __init__(self, d: Path):
        self.d = d
        d.mkdir(parents=True, exist_ok=True)
        self.cas: list[Path] = []
        self.n = 0

    def new_ca(self) -> Path:
        i = len(self.cas) + 1
        stem = self.d / f"ca{i}"
        run("openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-noenc", "-keyout", f"{stem}.key", "-out",
            f"{stem}.crt", "-subj", f"/O=mesh in a box/CN=mesh root CA {i}", "-days", "60",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.cas.append(stem)
        return stem

    def start_leaf(self, pod: Pod, ca: Path) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        stem = self.d / f"{pod.short}.{self.n}"
        cnf = Path(f"{stem}.cnf")
        cnf.write_text(
            "[req]\ndistinguished_name=dn\n[dn]\n[ext]\n"
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName=URI:{pod.spiffe},DNS:{pod.app}.{pod.ns}.svc\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        p = subprocess.Popen(
            ["openssl", "req", "-x509", "-new", "-config", str(cnf), "-extensions", "ext",
             "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
             "-keyout", f"{stem}.key", "-out", f"{stem}.crt",
             "-subj", f"/O=mesh in a box/CN={pod.app}.{pod.ns}.svc",
             "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-days", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return p, stem

    def leaves(self, pods: list[Pod], ca: Path) -> dict[str, Path]:
        started = [(pod, *self.start_leaf(pod, ca)) for pod in pods]
        out = {}
        for pod, p, stem in started:
            _, err = p.communicate(timeout=60)
            if p.returncode != 0:
                raise RuntimeError(f"minting {pod.key}'s certificate failed: {err}")
            out[pod.key] = stem
        return out


def serial_of(crt: Path) -> str:
    r = run("openssl", "x509", "-in", crt, "-noout", "-serial")
    return norm_serial(r.stdout.strip().split("=", 1)[1])


def norm_serial(s: str) -> str:
    return s.replace(":", "").upper().lstrip("0") or "0"


class SecretVolume:
    """Kubernetes' secret volume layout (kubelet AtomicWriter): files in a timestamped
    directory, `..data` pointing at it, tls.crt -> ..data/tls.crt etc.; a swap writes a new
    directory and renames a new `..data` symlink over the old one (atomic)."""

    NAMES = ("tls.crt", "tls.key", "ca.crt")

    def __init__(self, root: Path, uid: int):
        self.root, self.uid, self.n = root, uid, 0
        root.mkdir(parents=True)
        os.chown(root, uid, uid)
        os.chmod(root, 0o700)

    def _write(self, files: dict[str, bytes]) -> str:
        self.n += 1
        ts = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        d = self.root / f"..{ts}.{self.n:09d}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
            os.chmod(d / name, 0o600 if name.endswith(".key") else 0o644)
            os.chown(d / name, self.uid, self.uid)
        os.chown(d, self.uid, self.uid)
        return d.name

    def install(self, files: dict[str, bytes]) -> None:
        name = self._write(files)
        if not (self.root / "..data").is_symlink():
            os.symlink(name, self.root / "..data")
            for f in self.NAMES:
                os.symlink(f"..data/{f}", self.root / f)
            return
        old = os.readlink(self.root / "..data")
        tmp = self.root / "..data_tmp"
        os.symlink(name, tmp)
        os.rename(tmp, self.root / "..data")
        shutil.rmtree(self.root / old)


# ============================================================================ configs

def lc_str(s: str) -> str:
    return json.dumps(s)


def lc_allow(entries: list[dict]) -> str:
    out = []
    for e in entries:
        parts = [f"namespace = {lc_str(e['namespace'])};"]
        if "service_account" in e:
            parts.append(f"service_account = {lc_str(e['service_account'])};")
        if "paths" in e:
            parts.append("paths = ( " + ", ".join(map(lc_str, e["paths"])) + " );")
        out.append("{ " + " ".join(parts) + " }")
    return "( " + ", ".join(out) + " )"


def lc_expect(t: Pod) -> str:
    return (f'( {{ namespace = {lc_str(t.ns)}; service_account = {lc_str(t.app)}; }} )')


def sidecar_config(pod: Pod, secret: Path, mode: str, routes: list[tuple[Pod, str]],
                   explicit_ports: dict, fault: str | None = None) -> str:
    head = f"""# {pod.key}: generated by scripts/mesh.py ({mode} mode)
trust_domain = "{TD}";
workers = 1;
identity = {{ cert = "{secret}/tls.crt"; key = "{secret}/tls.key"; ca = "{secret}/ca.crt";
             watch = true; }};
admin = {{ listen = "127.0.0.1:15000"; }};
log = {{ level = "info"; access = true; }};
limits = {{ drain_timeout_ms = 3000; throttle_ipv6_prefix = 128; }};
dns = {{ servers = [ "{NODE4}:53" ]; }};
"""
    entries = ALLOW[pod.key]
    if fault == "drop-tenant-b" and pod.key == "api.control":
        entries = [e for e in entries if e["namespace"] != "tenant-b"]
    allow = lc_allow(entries)
    if mode == "transparent":
        rs = []
        for t, kind in routes:
            rs.append(f'{{ destination = "{t.dns}:{PORT[kind]}"; protocol = "http"; '
                      f'upstream_protocol = "h2"; server_name = "{t.app}.{t.ns}.svc"; '
                      f'expect = {lc_expect(t)}; }}')
        # (a pod that calls no one has no egress listener: what its app might still send
        # out is captured and finds nothing on 15001, i.e. it is refused)
        egress = "" if not rs else f"""outbound = ( {{ name = "egress"; listen = "[::]:15001"; transparent = true;
               routes = ( {(", " + chr(10) + "                 ").join(rs)} ); }} );
"""
        return head + f"""
inbound = ( {{ name = "ingress"; listen = "[::]:15006"; transparent = true; protocol = "http";
              app_protocol = "h2c"; allow = {allow}; }} );
""" + egress
    # explicit (stepping stone, no interception): one inbound listener per app port, one
    # outbound listener per destination on 127.0.0.1; the app calls those
    outs = []
    for t, kind in routes:
        port = explicit_ports[(t.key, kind)]
        outs.append(f'{{ name = "to-{t.short}-{kind}"; listen = "127.0.0.1:{port}"; '
                    f'upstream = "{t.dns}:{15443 if kind == "http" else 15444}"; '
                    f'protocol = "http"; upstream_protocol = "h2"; '
                    f'server_name = "{t.app}.{t.ns}.svc"; '
                    f'expect = {lc_expect(t)}; }}')
    return head + f"""
inbound = ( {{ name = "http"; listen = "[::]:15443"; forward = "127.0.0.1:8080";
              protocol = "http"; app_protocol = "h2c"; allow = {allow}; }},
            {{ name = "grpc"; listen = "[::]:15444"; forward = "127.0.0.1:9090";
              protocol = "http"; app_protocol = "h2c"; allow = {allow}; }} );
outbound = ( {(", " + chr(10) + "             ").join(outs)} );
"""


# ============================================================================== mesh

class Probe:
    """A process in a pod that fetches admin paths from the pod's sidecar (127.0.0.1:15000)."""

    def __init__(self, netns: str, app: Path):
        self.p = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/python3", str(app),
                                   "probe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        self.lock = threading.Lock()

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        with self.lock:
            self.p.stdin.write(path + "\n")
            self.p.stdin.flush()
            r, _, _ = select.select([self.p.stdout], [], [], timeout)
            if not r:
                return 0, "probe timed out"
            line = self.p.stdout.readline()
            if not line:
                return 0, "probe exited"
            d = json.loads(line)
            return d["status"], d["body"]

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=5)
        except Exception:
            self.p.kill()


class Mesh:
    def __init__(self, a):
        self.a = a
        self.prefix = a.prefix or f"pcm{os.getpid()}"
        self.node = f"{self.prefix}-node"
        for p in PODS:
            p.netns = f"{self.prefix}-{p.short}"
        self.dir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="mesh-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.procs: list[subprocess.Popen] = []
        self.probes: dict[str, Probe] = {}
        self.made_ns: list[str] = []
        self.made_etc: list[Path] = []
        self.rotations: list[dict] = []
        self.ca_roll = {"done": False, "steps": []}
        self.errors: list[str] = []

    # ---------------------------------------------------------------- network
    def build_net(self):
        log(f"building the network (namespaces {self.prefix}-*)")
        ipn = lambda ns, *a: run("ip", "-n", ns, *a)   # noqa: E731
        for ns in [self.node] + [p.netns for p in PODS]:
            run("ip", "netns", "add", ns)
            self.made_ns.append(ns)
            ipn(ns, "link", "set", "lo", "up")
        ipn(self.node, "link", "add", "br0", "type", "bridge")
        ipn(self.node, "addr", "add", f"{NODE4}/24", "dev", "br0")
        ipn(self.node, "addr", "add", f"{NODE6}/64", "dev", "br0", "nodad")
        ipn(self.node, "link", "set", "br0", "up")
        for p in PODS:
            v = f"v-{p.short}"
            ipn(self.node, "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns",
                p.netns)
            ipn(self.node, "link", "set", v, "master", "br0")
            ipn(self.node, "link", "set", v, "up")
            ipn(p.netns, "addr", "add", f"{p.ip4}/24", "dev", "eth0")
            ipn(p.netns, "addr", "add", f"{p.ip6}/64", "dev", "eth0", "nodad")
            ipn(p.netns, "link", "set", "eth0", "up")
            etc = Path("/etc/netns") / p.netns
            etc.mkdir(parents=True, exist_ok=True)
            self.made_etc.append(etc)
            (etc / "resolv.conf").write_text(f"nameserver {NODE4}\noptions timeout:1\n")

    def start_dns(self):
        hosts = self.dir / "mesh.hosts"
        hosts.write_text("".join(f"{p.ip4} {p.dns}\n{p.ip6} {p.dns}\n" for p in PODS))
        self.spawn(self.node, ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                               "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                               f"--listen-address={NODE4}", f"--listen-address={NODE6}",
                               "--bind-interfaces", "--local=/mesh/", "--local-ttl=5",
                               f"--pid-file={self.dir}/dnsmasq.pid",
                               f"--log-facility={self.dir}/dnsmasq.log"],
                   "dnsmasq")
        self.wait(lambda: run("ip", "netns", "exec", PODS[0].netns, "getent", "ahosts",
                              PODS[1].dns, check=False).returncode == 0,
                  "dnsmasq answering for *.mesh")

    # -------------------------------------------------------------- processes
    def spawn(self, ns: str, cmd: list, name: str, uid: int | None = None,
              stdin=subprocess.DEVNULL, stdout=None) -> subprocess.Popen:
        full = ["ip", "netns", "exec", ns]
        if uid is not None:
            full += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        full += [str(c) for c in cmd]
        out = stdout if stdout is not None else open(self.dir / f"{name}.out", "wb")
        err = open(self.dir / f"{name}.err", "wb")
        p = subprocess.Popen(full, stdin=stdin, stdout=out, stderr=err,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def wait(self, cond, what: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    # ------------------------------------------------------------------- run
    def setup(self):
        a = self.a
        self.build_net()
        self.start_dns()
        # files the unprivileged app and sidecar read
        shutil.copy(APP_SRC, self.dir / "mesh_app.py")
        self.bin = self.dir / "portcullis"
        shutil.copy(a.bin, self.bin)
        os.chmod(self.bin, 0o755)
        # PKI: CA 1, a first leaf for everyone
        self.issuer = Issuer(self.dir / "pki")
        self.ca_old = self.issuer.new_ca()
        self.ca_new = None
        self.vols = {p.key: SecretVolume(self.dir / "secrets" / p.short, PROXY_UID)
                     for p in PODS}
        self.bundle = [self.ca_old]
        self.leaf_ca = self.ca_old
        self.issue_all(first=True)
        # routes: every (target, kind) a pod calls, except the ones that test "no route"
        self.explicit_ports = {}
        routes: dict[str, list] = {p.key: [] for p in PODS}
        for caller, target, kind, _, _, by in self.paths():
            if by == "route":
                continue
            key = (BY_KEY[target], kind)
            if key not in routes[caller]:
                routes[caller].append(key)
                self.explicit_ports.setdefault((target, kind), 16000 + len(self.explicit_ports))
        for p in PODS:
            conf = self.dir / f"{p.short}.conf"
            conf.write_text(sidecar_config(p, self.vols[p.key].root, a.mode, routes[p.key],
                                           self.explicit_ports, a.fault))
            r = run("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
                    "--clear-groups", self.bin, "--check", "-c", conf, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{conf} does not pass --check:\n{r.stderr}")
        # apps
        log("starting apps, interception rules and sidecars")
        for p in PODS:
            proc = self.spawn(p.netns, ["/usr/bin/python3", self.dir / "mesh_app.py", "serve",
                                        p.key], f"{p.short}.app", uid=APP_UID,
                              stdout=subprocess.PIPE)
            p.procs["app"] = proc
        for p in PODS:
            r, _, _ = select.select([p.procs["app"].stdout], [], [], 60)
            line = p.procs["app"].stdout.readline() if r else b""
            if line.strip() != b"ready":
                raise RuntimeError(f"the app of {p.key} did not start: "
                                   f"{(self.dir / (p.short + '.app.err')).read_text()}")
        if a.mode == "transparent":
            for p in PODS:
                run("ip", "netns", "exec", p.netns, "bash", INIT, "--proxy-uid", PROXY_UID,
                    "--outbound-port", "15001", "--inbound-port", "15006",
                    "--inbound-ports", "8080,9090", "--skip-outbound-ports", "53")
        for p in PODS:
            p.procs["sidecar"] = self.spawn(p.netns, [self.bin, "-c", self.dir /
                                                      f"{p.short}.conf"],
                                            f"{p.short}.sidecar", uid=PROXY_UID)
            self.probes[p.key] = Probe(p.netns, self.dir / "mesh_app.py")
        for p in PODS:
            def ready(p=p):
                if p.procs["sidecar"].poll() is not None:
                    raise RuntimeError(f"the sidecar of {p.key} exited: "
                                       f"{(self.dir / (p.short + '.sidecar.err')).read_text()}")
                return self.probes[p.key].get("/ready")[0] == 200
            self.wait(ready, f"the sidecar of {p.key} to be ready")

    def paths(self):
        return [p for p in PATHS if not (p[5] == "route" and self.a.mode != "transparent")]

    def issue_all(self, first=False) -> dict:
        stems = self.issuer.leaves(PODS, self.leaf_ca)
        bundle = b"".join(Path(f"{c}.crt").read_bytes() for c in self.bundle)
        for p in PODS:
            p.serial = serial_of(Path(f"{stems[p.key]}.crt"))
        swapped = {}
        for p in PODS:
            stem = stems[p.key]
            self.vols[p.key].install({"tls.crt": Path(f"{stem}.crt").read_bytes(),
                                      "tls.key": Path(f"{stem}.key").read_bytes(),
                                      "ca.crt": bundle})
            swapped[p.key] = time.monotonic()
        return swapped

    def certs_show(self, p: Pod, want_bundle: set[str]) -> bool:
        status, body = self.probes[p.key].get("/certs", timeout=2)
        if status != 200:
            return False
        d = json.loads(body)
        leaf = norm_serial(d["identity"][0]["serial"])
        bundle = {norm_serial(c["serial"]) for c in d["bundle"]}
        return leaf == p.serial and bundle == want_bundle

    def rotate(self, n: int, stage: str) -> dict:
        """Re-signs every pod's certificate (a `..data` swap each), then polls every sidecar's
        /certs until it shows the new leaf serial and the new bundle; the lag is measured from
        that pod's swap."""
        want_bundle = {serial_of(Path(f"{c}.crt")) for c in self.bundle}
        swapped = self.issue_all()
        lags, pending = {}, {p.key for p in PODS}
        end = time.monotonic() + 5
        while pending and time.monotonic() < end:
            for key in sorted(pending):
                if self.certs_show(BY_KEY[key], want_bundle):
                    lags[key] = time.monotonic() - swapped[key]
                    pending.discard(key)
            if pending:
                time.sleep(0.02)
        rec = {"n": n, "stage": stage, "confirmed": len(lags), "pods": len(PODS),
               "max_lag_s": round(max(lags.values()), 3) if lags else None,
               "lags_s": {k: round(v, 3) for k, v in lags.items()},
               "missing": sorted(pending)}
        self.rotations.append(rec)
        log(f"rotation {n} ({stage}): {len(lags)}/{len(PODS)} sidecars show the new serial, "
            f"max lag {rec['max_lag_s']} s" + (f", MISSING {sorted(pending)}" if pending else ""))
        return rec

    def traffic_and_rotation(self):
        a = self.a
        # callers
        callers = {}
        for p in PODS:
            targets = []
            for path in self.paths():
                caller, target, kind, req, expect, by = path
                if caller != p.key:
                    continue
                t = BY_KEY[target]
                if a.mode == "transparent":
                    host, port = t.dns, PORT[kind]
                else:
                    host, port = "127.0.0.1", self.explicit_ports[(target, kind)]
                targets.append({"id": path_id(path), "kind": kind, "host": host, "port": port,
                                "authority": f"{t.dns}:{PORT[kind]}", "path": req,
                                "expect": expect, "deny_by": by,
                                "every_s": a.handshake_deny_every if by == "handshake" else 0})
            if not targets:
                continue
            plan = self.dir / f"{p.short}.plan.json"
            plan.write_text(json.dumps({"targets": targets, "duration_s": a.duration,
                                        "max_calls_per_path": a.max_calls,
                                        "timeout_s": 10, "pause_s": a.pause}))
            callers[p.key] = self.spawn(p.netns, ["/usr/bin/python3", self.dir / "mesh_app.py",
                                                  "call", plan], f"{p.short}.caller",
                                        uid=APP_UID)
        log(f"traffic for {a.duration} s; rotating every {a.rotate_every} s, "
            f"CA roll from rotation {a.ca_roll_at}")
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 + a.rotate_every <= a.duration - 1:
            next_at = t0 + (n + 1) * a.rotate_every
            time.sleep(max(0, next_at - time.monotonic()))
            if all(c.poll() is not None for c in callers.values()):
                break
            n += 1
            step = n - a.ca_roll_at          # 0, 1, 2: the three steps of the CA roll
            if step == 0:
                self.ca_new = self.issuer.new_ca()
                self.bundle = [self.ca_old, self.ca_new]
                stage = "CA roll 1/3: bundle = old + new CA"
            elif step == 1:
                self.leaf_ca = self.ca_new
                stage = "CA roll 2/3: leaves signed by the new CA"
            elif step == 2:
                self.bundle = [self.ca_new]
                stage = "CA roll 3/3: bundle = new CA only"
            else:
                stage = "re-sign" + (" (new CA)" if step > 2 else "")
            rec = self.rotate(n, stage)
            if 0 <= step <= 2:
                self.ca_roll["steps"].append({"step": step + 1, "ok": not rec["missing"]})
        self.ca_roll["done"] = (len(self.ca_roll["steps"]) == 3 and
                                all(s["ok"] for s in self.ca_roll["steps"]))
        results = {}
        for key, c in callers.items():
            try:
                c.wait(timeout=a.duration + 120)
            except subprocess.TimeoutExpired:
                self.errors.append(f"the caller in {key} did not finish")
                continue
            out = (self.dir / f"{BY_KEY[key].short}.caller.out").read_text().strip()
            try:
                results.update(json.loads(out.splitlines()[-1])["paths"])
            except (ValueError, IndexError):
                err = (self.dir / f"{BY_KEY[key].short}.caller.err").read_text()
                self.errors.append(f"the caller in {key} gave no result: {err[-2000:]}")
        return results

    # -------------------------------------------------------------- evidence
    def metrics(self) -> dict:
        """Refusal counters from every sidecar's /metrics, and deny lines in its access log."""
        out = {}
        pat = re.compile(r'^portcullis_(connections_total|http_requests_total)\{(.*)\} (\S+)$')
        for p in PODS:
            status, body = self.probes[p.key].get("/metrics")
            rows = []
            for line in body.splitlines() if status == 200 else []:
                m = pat.match(line)
                if not m:
                    continue
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                if labels.get("decision") != "deny":
                    continue
                rows.append({"metric": m.group(1), **labels, "value": float(m.group(3))})
            denies: dict[str, int] = {}
            access = self.dir / f"{p.short}.sidecar.out"
            for line in access.read_text(errors="replace").splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if d.get("decision") == "deny":
                    k = f"{d.get('direction')} {d.get('peer_id')} {d.get('reason')}"
                    denies[k] = denies.get(k, 0) + 1
            out[p.key] = {"metrics": rows, "access_log_denies": denies}
        return out

    def evidence_ok(self, ev: dict) -> list[str]:
        """Every refused path shows up in the right sidecar's metrics and access log."""
        problems = []

        def val(pod, metric, **want):
            return sum(r["value"] for r in ev[pod]["metrics"] if r["metric"] == metric and
                       all(r.get(k) == v for k, v in want.items()))

        for caller, target, kind, req, expect, by in self.paths():
            if expect != "deny":
                continue
            pid = path_id((caller, target, kind, req, expect, by))
            if by == "l7":
                # (a gRPC refusal is a trailers-only answer: status 200, class 2xx)
                if val(target, "http_requests_total", direction="inbound", decision="deny",
                       reason="not_allowed") <= 0:
                    problems.append(f"{pid}: no request deny not_allowed in {target}'s metrics")
                who, pod = BY_KEY[caller].spiffe, target
            elif by == "handshake":
                if val(target, "connections_total", direction="inbound", decision="deny",
                       reason="not_allowed") <= 0:
                    problems.append(f"{pid}: no connection deny not_allowed in {target}'s "
                                    f"metrics")
                who, pod = BY_KEY[caller].spiffe, target
            else:
                if val(caller, "connections_total", direction="outbound", decision="deny",
                       reason="not_allowed") <= 0:
                    problems.append(f"{pid}: no outbound deny not_allowed in {caller}'s "
                                    f"metrics")
                who, pod = None, caller
            if who and not any(k.startswith(f"inbound {who} not_allowed")
                               for k in ev[pod]["access_log_denies"]):
                problems.append(f"{pid}: no deny line for {who} in {pod}'s access log")
            if not who and not any(k.startswith("outbound") and k.endswith("not_allowed")
                                   for k in ev[pod]["access_log_denies"]):
                problems.append(f"{pid}: no outbound deny line in {pod}'s access log")
        return problems

    def stop_sidecars(self) -> list[str]:
        """SIGTERM every sidecar (it drains and exits 0); a sidecar that crashed, exited
        non-zero or printed a sanitizer report is a problem."""
        problems = []
        for p in PODS:
            sc = p.procs.get("sidecar")
            if sc is None:
                continue
            if sc.poll() is not None:
                problems.append(f"the sidecar of {p.key} exited early ({sc.returncode})")
                continue
            os.killpg(sc.pid, signal.SIGTERM)
        for p in PODS:
            sc = p.procs.get("sidecar")
            if sc is None:
                continue
            try:
                rc = sc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(f"the sidecar of {p.key} did not exit within 30 s of SIGTERM")
                continue
            if rc != 0:
                problems.append(f"the sidecar of {p.key} exited with {rc}")
            err = (self.dir / f"{p.short}.sidecar.err").read_text(errors="replace")
            for mark in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
                if mark in err:
                    problems.append(f"the sidecar of {p.key} reported '{mark}' "
                                    f"(see {self.dir}/{p.short}.sidecar.err)")
        return problems

    # --------------------------------------------------------------- teardown
    def teardown(self):
        for pr in self.probes.values():
            pr.close()
        for pr in reversed(self.procs):
            if pr.poll() is None:
                try:
                    os.killpg(pr.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 10
        for pr in self.procs:
            try:
                pr.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(pr.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pr.wait()
        teardown_ns(self.prefix)


def teardown_ns(prefix: str | None) -> None:
    """Removes every namespace and /etc/netns entry of this prefix (no prefix: of every mesh
    run, pcm<N>-*), and kills what still runs in them (ip netns pids)."""
    r = run("ip", "netns", "list", check=False)
    pat = re.compile(re.escape(prefix) + "-" if prefix else r"pcm\d+-")
    for line in r.stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not pat.match(ns):
            continue
        pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run("ip", "netns", "del", ns, check=False)
        etc = Path("/etc/netns") / ns
        if etc.is_dir():
            shutil.rmtree(etc, ignore_errors=True)


# ============================================================================ summary

def summarize(m: Mesh, results: dict, ev: dict, problems: list[str], elapsed: float) -> dict:
    paths = []
    unexpected = 0
    for path in m.paths():
        pid = path_id(path)
        caller, target, kind, req, expect, by = path
        r = results.get(pid, {"ok": 0, "denied": 0, "unexpected": 0, "p50_ms": None,
                              "p99_ms": None, "samples": ["no result"], "denied_detail": {}})
        if expect == "allow" and r["ok"] == 0:
            problems.append(f"{pid}: no successful call")
        if expect == "deny" and r["denied"] == 0:
            problems.append(f"{pid}: never denied")
        unexpected += r["unexpected"]
        paths.append({"id": pid, "caller": caller, "target": target, "kind": kind,
                      "path": req, "expect": expect, "refused_by": by, "ok": r["ok"],
                      "denied": r["denied"], "unexpected": r["unexpected"],
                      "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                      "denied_detail": r.get("denied_detail", {}),
                      "unexpected_samples": r.get("samples", [])})
    lags = [r["max_lag_s"] for r in m.rotations if r["max_lag_s"] is not None]
    missing = [r for r in m.rotations if r["missing"]]
    max_lag = max(lags) if lags else None
    if len(m.rotations) < m.a.min_rotations:
        problems.append(f"only {len(m.rotations)} rotations (want >= {m.a.min_rotations})")
    if missing:
        problems.append(f"{len(missing)} rotation(s) not seen by every sidecar within 5 s")
    if max_lag is not None and max_lag > 1.0:
        problems.append(f"a sidecar took {max_lag} s (> 1 s) to show its new certificate")
    if not m.ca_roll["done"]:
        problems.append("the CA roll was not completed")
    problems.extend(m.errors)
    s = {"mode": m.a.mode, "duration_s": m.a.duration, "elapsed_s": round(elapsed, 1),
         "paths": paths, "unexpected_total": unexpected,
         "rotations": len(m.rotations), "rotation_max_lag_s": max_lag,
         "rotation_detail": m.rotations, "ca_roll": m.ca_roll["done"],
         "ca_roll_steps": m.ca_roll["steps"], "sidecars": ev, "problems": problems,
         "ok": unexpected == 0 and not problems}
    return s


def print_summary(s: dict) -> None:
    w = sys.stdout.write
    w("\n=== mesh in a box: summary ===\n")
    w(f"mode: {s['mode']}  (traffic {s['duration_s']} s, whole run {s['elapsed_s']} s)\n\n")
    w(f"{'path':<62} {'expect':<15} {'ok':>5} {'denied':>6} {'unexp':>5} {'p50ms':>6} "
      f"{'p99ms':>6}\n")
    for p in s["paths"]:
        exp = "allow" if p["expect"] == "allow" else f"deny ({p['refused_by']})"
        f = lambda x: "-" if x is None else f"{x:.1f}"   # noqa: E731
        w(f"{p['id']:<62} {exp:<15} {p['ok']:>5} {p['denied']:>6} {p['unexpected']:>5} "
          f"{f(p['p50_ms']):>6} {f(p['p99_ms']):>6}\n")
        for smp in p["unexpected_samples"]:
            w(f"    unexpected: {smp}\n")
    w(f"\nunexpected failures: {s['unexpected_total']}\n")
    w(f"rotations: {s['rotations']} (every pod re-signed each time), max lag swap -> /certs "
      f"{s['rotation_max_lag_s']} s\n")
    w(f"CA roll (old+new bundle, leaves by new CA, new CA only): "
      f"{'done' if s['ca_roll'] else 'NOT done'}\n")
    w("\nrefusals as each sidecar counted them (/metrics, decision=\"deny\"):\n")
    for pod, ev in s["sidecars"].items():
        rows = [r for r in ev["metrics"] if r["value"] > 0]
        for r in rows:
            extra = f" class={r['class']}" if "class" in r else ""
            w(f"  {pod:<20} {r['metric']}{{{r['listener']} {r['direction']}{extra} "
              f"reason={r['reason']}}} {int(r['value'])}\n")
    w("\nrefusals in each sidecar's access log (direction, peer_id, reason: lines):\n")
    for pod, ev in s["sidecars"].items():
        for k, n in sorted(ev["access_log_denies"].items()):
            w(f"  {pod:<20} {k}: {n}\n")
    if s["problems"]:
        w("\nPROBLEMS:\n" + "".join(f"  - {p}\n" for p in s["problems"]))
    w(f"\nconfigs, access logs (*.sidecar.out), server logs (*.sidecar.err), certificates: "
      f"{s.get('workdir')}\n")
    w(f"\nresult: {'OK' if s['ok'] else 'FAILED'}\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--rotate-every", type=float, default=3)
    ap.add_argument("--ca-roll-at", type=int, default=2)
    ap.add_argument("--min-rotations", type=int, default=3)
    ap.add_argument("--max-calls", type=int, default=100000)
    ap.add_argument("--pause", type=float, default=0.05)
    # paths refused in the handshake are called at most every 3 s: the target's sidecar
    # throttles a source (here one pod: throttle_ipv6_prefix = 128) after 20 failed
    # handshakes in 10 s, and a refused caller that calls on keeps failing by design
    ap.add_argument("--handshake-deny-every", type=float, default=3.0)
    ap.add_argument("--mode", choices=("transparent", "explicit"), default="transparent")
    ap.add_argument("--prefix")
    ap.add_argument("--workdir")
    ap.add_argument("--summary-json")
    ap.add_argument("--keep", action="store_true")
    # for the test that a failure is caught: api.control's sidecar "forgets" tenant-b, so
    # tenant-b's allowed calls to it fail and the run must say so and exit 1
    ap.add_argument("--fault", choices=("drop-tenant-b",))
    ap.add_argument("--down", action="store_true")
    a = ap.parse_args()
    if a.down:
        teardown_ns(a.prefix)
        return 0
    m = Mesh(a)
    t0 = time.monotonic()
    rc = 1

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)     # also when started in the background
    try:
        log(f"work dir {m.dir}")
        m.setup()
        results = m.traffic_and_rotation()
        ev = m.metrics()
        problems = m.evidence_ok(ev)
        if not a.keep:
            problems += m.stop_sidecars()
        s = summarize(m, results, ev, problems, time.monotonic() - t0)
        s["workdir"] = str(m.dir)
        s["binary"] = str(a.bin)
        s["prefix"] = m.prefix
        print_summary(s)
        if a.summary_json:
            Path(a.summary_json).write_text(json.dumps(s, indent=1))
        rc = 0 if s["ok"] else 1
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except Exception as e:       # noqa: BLE001  (report, then tear down)
        log(f"FAILED: {e}")
        if a.summary_json:
            Path(a.summary_json).write_text(json.dumps({"ok": False, "error": str(e)}))
        rc = 1
    finally:
        if a.keep and rc != 130:
            log(f"--keep: the mesh keeps running (namespaces {m.prefix}-*, files in {m.dir}); "
                f"explore with e.g. `ip netns exec {m.prefix}-a-sched curl "
                f"http://api.control.mesh:8080/v1/jobs`, stop it with "
                f"`scripts/mesh.sh --down --prefix {m.prefix}`")
        else:
            m.teardown()
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Network namespaces for the interception tests (test_init.py, test_transparent.py,
test_mesh.py): what they need to run (root, `ip netns`, iptables...) and the skip-or-fail rule
when they cannot, the pod/remote pair of namespaces joined by a veth pair (Net), and the small
TCP servers and client run inside them (the TOOL script).

Net: a "pod" network namespace and a "remote" one, joined by a veth pair (10.231.0.0/24 and
fd00:231::/64, plus 10.232.0.1 and fd00:232::1 on the remote side's loopback as a second
network). Its servers answer each connection with one JSON line: who they are, the address the
connection reached, and the original destination read with SO_ORIGINAL_DST. Clients run as
any uid (setpriv).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import warnings

import pytest

import harness as h

INIT = h.REPO / "scripts" / "portcullis-init"
PROXY_UID = 1337
APP_UID = 1000
OUT_PORT = 15001
IN_PORT = 15006
ADMIN_PORT = 15000
POD = {4: "10.231.0.2", 6: "fd00:231::2"}
REMOTE = {4: "10.231.0.1", 6: "fd00:231::1"}
OTHER = {4: "10.232.0.1", 6: "fd00:232::1"}  # the remote side's second network
ANY = {4: "0.0.0.0", 6: "::"}
LOOP = {4: "127.0.0.1", 6: "::1"}
BASE_ARGS = ["--proxy-uid", str(PROXY_UID), "--outbound-port", str(OUT_PORT),
             "--inbound-port", str(IN_PORT)]


def require(what: str, problem: str | None) -> None:
    """With a problem, `what` cannot run: skip, loudly; with CI=true, fail instead."""
    if problem is None:
        return
    msg = f"{what} cannot run: {problem}"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (CI=true: failing instead of skipping)", pytrace=False)
    print(f"\n*** SKIPPED: {msg} ***", file=sys.stderr)
    warnings.warn(msg)
    pytest.skip(msg)


def missing_tool(tools) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not found (scripts/install-deps.sh test installs it)"
    return None


def netns_problem(probe: str, ipv6: bool) -> str | None:
    """Whether a network namespace (named probe, removed again) can be made and has a working
    iptables nat table (and, with ipv6, IPv6)."""
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-S"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"iptables' nat table does not work in a network namespace: {r.stderr.strip()}"
        if ipv6 and subprocess.run(["ip", "netns", "exec", probe, "test", "-e",
                                    "/proc/net/if_inet6"], timeout=30).returncode != 0:
            return "no IPv6 in a new network namespace (the IPv6 tests need it)"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _problem_or_none() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    problem = missing_tool(("ip", "iptables", "ip6tables", "iptables-save", "ip6tables-save",
                            "setpriv"))
    return problem or netns_problem(f"pcinit-probe-{os.getpid()}", ipv6=True)


def require_netns() -> None:
    """Net can be used (root, ip netns, iptables, setpriv, IPv6), or the calling test skips
    (CI=true: fails). conftest.py's netns_ok fixture calls it once a session."""
    require("portcullis-init tests", _problem_or_none())


def as_uid(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


# The start of a script run with `python3 -c` inside a namespace (and, for a client, as another
# uid: no file of the repository needs to be readable by it). serve() listens on every
# "HOST,PORT" of specs, says "ready", and answers each connection with one JSON line (with orig:
# plus its original destination; with echo: also printed on stdout, and a failed send ignored)
# until its stdin is closed. recv_line() connects and returns what the server sent up to the
# first newline.
SERVE = r'''
import json, select, socket, struct, sys

def orig_dst(c, fam):
    try:
        if fam == socket.AF_INET:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)          # SO_ORIGINAL_DST
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)        # IP6T_SO_ORIGINAL_DST
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
    except OSError:
        return None

def serve(name, specs, orig=False, echo=False):
    socks = []
    for spec in specs:
        host, port = spec.rsplit(",", 1)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, int(port)))
        s.listen(64)
        socks.append(s)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(socks + [sys.stdin], [], [])
        for s in ready:
            if s is sys.stdin:          # the test closed our stdin: done
                if not sys.stdin.buffer.read1(1):
                    return
                continue
            c, peer = s.accept()
            local = c.getsockname()
            info = {"server": name, "local": [local[0], local[1]], "peer": [peer[0], peer[1]]}
            if orig:
                info["orig"] = orig_dst(c, s.family)
            line = json.dumps(info)
            if echo:
                print(line, flush=True)
                try:
                    c.sendall(line.encode() + b"\n")
                except OSError:
                    pass
            else:
                c.sendall(line.encode() + b"\n")
            c.close()

def recv_line(host, port, timeout):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(float(timeout))
    c.connect((host, int(port)))
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
'''

# Net's servers (with the original destination) and its client (prints the server's line).
TOOL = SERVE + r'''
if sys.argv[1] == "serve":
    serve(sys.argv[2], sys.argv[3:], orig=True)
else:
    sys.stdout.write(recv_line(sys.argv[2], sys.argv[3], sys.argv[4]).decode())
'''

_names = itertools.count()


class Server:
    def __init__(self, ns: str, name: str, specs: list[str]):
        self.name = name
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", TOOL, "serve", name, *specs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # event, not time: the server says "ready" once every socket listens
        r, _, _ = select.select([self.proc.stdout], [], [], h.T(h.WAIT_S))
        line = self.proc.stdout.readline() if r else b""
        if line.strip() != b"ready":
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace")
            raise AssertionError(f"server {name} in {ns} did not start: {line!r} {err}")

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=h.T(10))
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait(timeout=h.T(10))


class Net:
    """A pod namespace and a remote one joined by a veth pair; removed in close()."""

    def __init__(self):
        n = next(_names)
        self.pod = f"pcinit-{os.getpid()}-{n}-pod"
        self.remote = f"pcinit-{os.getpid()}-{n}-remote"
        self.servers: list[Server] = []
        self.made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        for ns in (self.pod, self.remote):
            self._ip("netns", "add", ns)
            self.made.append(ns)
        P, R = ("-n", self.pod), ("-n", self.remote)
        for args in ([*P, "link", "set", "lo", "up"], [*R, "link", "set", "lo", "up"],
                     [*P, "link", "add", "pc0", "type", "veth", "peer", "name", "pc1", "netns",
                      self.remote],
                     [*P, "addr", "add", f"{POD[4]}/24", "dev", "pc0"],
                     [*P, "addr", "add", f"{POD[6]}/64", "dev", "pc0", "nodad"],
                     [*R, "addr", "add", f"{REMOTE[4]}/24", "dev", "pc1"],
                     [*R, "addr", "add", f"{REMOTE[6]}/64", "dev", "pc1", "nodad"],
                     [*R, "addr", "add", f"{OTHER[4]}/32", "dev", "lo"],
                     [*R, "addr", "add", f"{OTHER[6]}/128", "dev", "lo", "nodad"],
                     [*P, "link", "set", "pc0", "up"], [*R, "link", "set", "pc1", "up"],
                     [*P, "route", "add", "default", "via", REMOTE[4]],
                     [*P, "-6", "route", "add", "default", "via", REMOTE[6]]):
            self._ip(*args)

    @staticmethod
    def _ip(*args):
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=h.T(30))
        assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"

    def serve(self, ns: str, name: str, specs: list[str]) -> Server:
        s = Server(ns, name, specs)
        self.servers.append(s)
        return s

    def start_servers(self):
        """remote: 8080 and 9090; pod: capture (outbound port), inbound, app ports 8080, 8081
        and the admin port 15000 -- each on IPv4 and IPv6."""
        def specs(ports):
            return [f"{ANY[f]},{p}" for p in ports for f in (4, 6)]
        self.serve(self.remote, "remote", specs([8080, 9090]))
        self.serve(self.pod, "capture", specs([OUT_PORT]))
        self.serve(self.pod, "inbound", specs([IN_PORT]))
        self.serve(self.pod, "app", specs([8080, 8081, ADMIN_PORT]))

    def init(self, *args: str, expect_rc: int = 0, env: dict | None = None):
        r = subprocess.run(["ip", "netns", "exec", self.pod, str(INIT), *args],
                           capture_output=True, text=True, timeout=h.T(60),
                           env=None if env is None else {**os.environ, **env})
        assert r.returncode == expect_rc, \
            f"portcullis-init {' '.join(args)}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def connect(self, ns: str, host: str, port: int, uid: int | None = None) -> dict:
        """Connects from ns (as uid) and returns the answering server's JSON line."""
        cmd = ["ip", "netns", "exec", ns]
        if uid is not None:
            cmd += as_uid(uid)
        cmd += ["/usr/bin/python3", "-c", TOOL, "connect", host, str(port), str(h.T(10))]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=h.T(30), cwd="/")
        assert r.returncode == 0 and r.stdout.strip(), \
            f"connect from {ns} as uid {uid} to {host}:{port} failed: {r.stdout} {r.stderr}"
        return json.loads(r.stdout)

    def app(self, host: str, port: int) -> dict:
        return self.connect(self.pod, host, port, uid=APP_UID)

    def proxy(self, host: str, port: int) -> dict:
        return self.connect(self.pod, host, port, uid=PROXY_UID)

    def from_remote(self, host: str, port: int) -> dict:
        return self.connect(self.remote, host, port)

    def close(self):
        for s in self.servers:
            try:
                s.stop()
            except Exception:
                pass
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=h.T(30))

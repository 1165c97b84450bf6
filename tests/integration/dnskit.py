"""A real DNS server for the service-name tests (issue 15): dnsmasq (Debian dnsmasq-base) on
a loopback port, answering from a hosts file the test rewrites, plus a minimal DNS client
(struct, UDP) to see what it answers.

* Dnsmasq(workdir, ttl=1)   -- starts dnsmasq on 127.0.0.1:<port from the harness allocator>
                               (UDP and TCP), names under the local domain only
    .set_hosts({"app.test": ["127.0.0.2", "::1"], ...}, servfail=["bad.test"])
                            -- rewrites the hosts file, SIGHUPs dnsmasq and waits (bounded)
                               until it answers exactly that: every name's A and AAAA sets,
                               SERVFAIL for the servfail names (dnsmasq forwards them to a
                               stub server that answers only SERVFAIL, and relays that), and
                               NXDOMAIN for every name it answered before and no longer has
    .stop() / .start()      -- kill it (its port closed: queries are refused) / start it again
                               on the same port with the current hosts file
    .pause() / .resume()    -- SIGSTOP / SIGCONT: the port stays bound, nothing is answered
                               (queries time out)
    .server                 -- "127.0.0.1:PORT", for the sidecar's dns.servers
* query(port, name, qtype)  -- one UDP query; returns Answer(rcode, addresses, ttls) or None
                               when nothing came back in time

What dnsmasq answers here (--local=/test/, --no-resolv, --no-hosts): a name in the hosts
file: its A / AAAA records with TTL = ttl (NOERROR without records for a family it lacks);
any other name under .test: NXDOMAIN; names outside .test: REFUSED (no upstream servers).
The servers file (--servers-file, re-read on SIGHUP like the hosts file) forwards the
servfail names to ServfailStub.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness as h

DNSMASQ = "/usr/sbin/dnsmasq"
DOMAIN = "test"          # every name the tests use lies under .test (RFC 2606)

A, AAAA = 1, 28
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5


def available() -> bool:
    return os.access(DNSMASQ, os.X_OK)


# --------------------------------------------------------------------------- client

@dataclass
class Answer:
    rcode: int
    addresses: list[str] = field(default_factory=list)
    ttls: list[int] = field(default_factory=list)


def _encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        b = label.encode("ascii")
        out += bytes([len(b)]) + b
    return bytes(out + b"\0")


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def parse_response(msg: bytes, qid: int) -> Answer | None:
    """The rcode and the A/AAAA addresses of a response to query qid (None: not that)."""
    if len(msg) < 12:
        return None
    rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", msg[:12])
    if rid != qid or not flags & 0x8000:
        return None
    ans = Answer(rcode=flags & 0xF)
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        rdata = msg[off:off + rdlen]
        off += rdlen
        if rtype == A and rdlen == 4:
            ans.addresses.append(socket.inet_ntop(socket.AF_INET, rdata))
            ans.ttls.append(ttl)
        elif rtype == AAAA and rdlen == 16:
            ans.addresses.append(socket.inet_ntop(socket.AF_INET6, rdata))
            ans.ttls.append(ttl)
    return ans


def query(port: int, name: str, qtype: int = A, timeout: float = 1.0,
          host: str = h.HOST) -> Answer | None:
    """One recursive-desired UDP query to host:port. None when no answer came in time."""
    qid = random.randrange(1 << 16)
    msg = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + _encode_name(name) \
        + struct.pack("!HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(msg, (host, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(4096)
            except (socket.timeout, TimeoutError):
                return None
            except ConnectionRefusedError:   # ICMP port unreachable: nobody listens
                return None
            ans = parse_response(data, qid)
            if ans is not None:
                return ans
        return None
    finally:
        s.close()


def resolve(port: int, name: str, timeout: float = 1.0) -> tuple[int | None, set[str]]:
    """(rcode of the A query or None, the union of A and AAAA addresses)."""
    a = query(port, name, A, timeout)
    aaaa = query(port, name, AAAA, timeout)
    if a is None or aaaa is None:
        return None, set()
    return a.rcode, set(a.addresses) | set(aaaa.addresses)


# --------------------------------------------------------------------------- server

class ServfailStub:
    """A UDP DNS server on 127.0.0.1 that answers every query SERVFAIL."""

    def __init__(self):
        self.sock = None
        for _ in range(20):
            p = h.free_port()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind((h.HOST, p))
            except OSError:
                s.close()
                continue
            self.sock, self.port = s, p
            break
        if self.sock is None:
            raise RuntimeError("no UDP port for the SERVFAIL stub")
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="servfail-stub")
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                d, peer = self.sock.recvfrom(4096)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if len(d) < 12:
                continue
            qid, flags = struct.unpack("!HH", d[:4])
            # QR, the query's RD, RA, rcode 2; the question section echoed
            resp = struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x0100) | 0x0080 | SERVFAIL,
                               struct.unpack("!H", d[4:6])[0], 0, 0, 0) + d[12:]
            try:
                self.sock.sendto(resp, peer)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()


def _udp_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((h.HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Dnsmasq:
    """dnsmasq as a child process, answering names under .test from a hosts file."""

    def __init__(self, workdir: Path, *, ttl: int = 1, name: str = "dnsmasq"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self.name = name
        self.hosts_path = (self.workdir / f"{name}.hosts").resolve()
        self.servers_path = (self.workdir / f"{name}.servers").resolve()
        self.log_path = self.workdir / f"{name}.log"
        self.hosts: dict[str, list[str]] = {}
        self.servfail: list[str] = []
        self.known: set[str] = set()      # every name ever served (removal -> NXDOMAIN)
        self.stub: ServfailStub | None = None
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._log = None
        self._write_hosts()
        self.port = 0
        for _ in range(20):               # a port free for TCP (allocator) and UDP too
            p = h.free_port()
            if _udp_free(p):
                self.port = p
                break
        if not self.port:
            raise RuntimeError("no port free for both TCP and UDP")
        self.start()

    @property
    def server(self) -> str:
        return h.addr(self.port)

    def _write_hosts(self) -> None:
        lines = [f"{ip} {n}" for n, ips in self.hosts.items() for ip in ips]
        tmp = self.hosts_path.with_name(self.hosts_path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, self.hosts_path)
        if self.servfail and self.stub is None:
            self.stub = ServfailStub()
        lines = [f"server=/{n}/{h.HOST}#{self.stub.port}" for n in self.servfail]
        tmp = self.servers_path.with_name(self.servers_path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, self.servers_path)

    def _cmd(self) -> list[str]:
        cmd = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file",
               "--no-resolv", "--no-hosts", "--no-poll", f"--addn-hosts={self.hosts_path}",
               f"--servers-file={self.servers_path}",
               f"--port={self.port}", f"--listen-address={h.HOST}", "--bind-interfaces",
               f"--local=/{DOMAIN}/", f"--local-ttl={self.ttl}", "--cache-size=0",
               "--log-facility=-", "--log-queries"]
        if os.geteuid() == 0:
            # dnsmasq would drop to "nobody", who cannot read a hosts file under pytest's
            # private (0700) temporary directory
            cmd.append("--user=root")
        return cmd

    def start(self) -> None:
        """Start (again) on self.port with the current hosts file; returns once it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log = open(self.log_path, "a", buffering=1)
        self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.paused = False
        # answering anything (NXDOMAIN for a probe name) means it is up
        probe = f"probe-{random.randrange(1 << 30)}.{DOMAIN}"
        ok = h.wait_until(lambda: self.proc.poll() is not None
                          or query(self.port, probe, A, 0.5) is not None, h.T(h.WAIT_S))
        if self.proc.poll() is not None or not ok:
            rc = self.proc.poll()
            self.kill()
            raise RuntimeError(f"dnsmasq did not come up on {self.server} (rc={rc}):\n"
                               + self.log_tail())
        self._wait_serving()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def _serving(self) -> bool:
        for n in self.known:
            want = set(self.hosts.get(n, []))
            rcode, got = resolve(self.port, n, 0.5)
            if n in self.servfail:
                if rcode != SERVFAIL:
                    return False
            elif n in self.hosts:
                if rcode != NOERROR or got != {_norm(ip) for ip in want}:
                    return False
            elif rcode != NXDOMAIN:
                return False
        return True

    def _wait_serving(self) -> None:
        if not h.wait_until(self._serving, h.T(h.WAIT_S), interval=0.05):
            raise RuntimeError(f"dnsmasq on {self.server} does not answer {self.hosts} "
                               f"after {h.T(h.WAIT_S):.0f}s:\n" + self.log_tail())

    def set_hosts(self, hosts: dict[str, list[str]], servfail: "list[str] | tuple" = ()
                  ) -> None:
        """Serve exactly these names, answer SERVFAIL for the servfail ones (a name left out
        answers NXDOMAIN from now on); returns once dnsmasq answers that (bounded)."""
        assert self.alive() and not self.paused, "set_hosts needs a running dnsmasq"
        self.hosts = {n: list(ips) for n, ips in hosts.items() if n not in servfail}
        self.servfail = list(servfail)
        self.known |= set(self.hosts) | set(self.servfail)
        self._write_hosts()
        self.proc.send_signal(signal.SIGHUP)
        self._wait_serving()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the port stays bound but nothing is answered (queries time out)."""
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Kill it: its port is closed, a query gets ICMP port unreachable."""
        self.kill()
        if not h.wait_until(lambda: _udp_free(self.port), h.T(h.WAIT_S)):
            raise RuntimeError(f"port {self.port} still bound after dnsmasq exited")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()           # SIGKILL works on a stopped process too
            try:
                self.proc.wait(h.T(10))
            except subprocess.TimeoutExpired:
                pass
        self.paused = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """kill() and stop the SERVFAIL stub too (teardown)."""
        self.kill()
        if self.stub is not None:
            self.stub.stop()
            self.stub = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def _norm(ip: str) -> str:
    """The text form inet_ntop gives (what query() returns)."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_ntop(fam, socket.inet_pton(fam, ip))

"""TCP ports for the test suite and the benchmark that nothing else can take first.

The usual trick -- bind port 0, read the port, close, hand the number to a config -- races:
until the sidecar binds the number, the kernel may give the same port to anything else that
binds port 0 or connects out (a test's own upstream, a client socket). Every such port comes
from the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), so this module
hands out ports only from OUTSIDE that range, where the kernel never picks one by itself.

Each process starts at its own pseudo-random offset and walks forward, never handing the
same number out twice; a candidate is probed by binding it without SO_REUSEADDR, so a port
that another process (a demo, a second suite) holds or that still has TIME_WAIT sockets is
skipped. Two suites running at once could still probe the same free number before either
binds it, so every port handed out is also claimed across processes: a file named after it
in a claims directory (PORTCULLIS_PORT_CLAIMS, default /tmp/portcullis-port-claims),
created exclusively and holding the claimant's pid. A claim whose process has ended is
taken over.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

LOWEST = 20000          # stay clear of well-known and commonly configured service ports
RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
CLAIM_DIR = os.environ.get("PORTCULLIS_PORT_CLAIMS", "/tmp/portcullis-port-claims")
# A claim file still empty this long after its creation was left by a process that died
# between creating and writing it.
EMPTY_CLAIM_S = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(port: int, owner: int, claim_dir: str = CLAIM_DIR) -> bool:
    """Claims port for process owner across processes; False if a live process holds it."""
    os.makedirs(claim_dir, exist_ok=True)
    path = os.path.join(claim_dir, str(port))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    text = f.read().strip()
                age = time.time() - os.stat(path).st_mtime
            except (OSError, ValueError):
                continue  # it went away meanwhile: try again
            if not text:
                if age < EMPTY_CLAIM_S:
                    return False  # being written
            elif int(text) == owner or _alive(int(text)):
                return int(text) == owner
            try:
                os.unlink(path)  # its claimant has ended
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(owner))
        return True
    return False


def ephemeral_range(path: str = RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive); Linux's default when unreadable."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def candidate_ports(lowest: int = LOWEST) -> list[int]:
    """Every port from `lowest` up to 65535 that lies outside the ephemeral range."""
    lo, hi = ephemeral_range()
    ports = [p for p in range(lowest, 65536) if p < lo or p > hi]
    if len(ports) < 1000:
        raise RuntimeError(
            f"the ephemeral port range {lo}-{hi} leaves only {len(ports)} ports from {lowest} "
            f"to 65535: narrow it (sysctl net.ipv4.ip_local_port_range) so that tests can "
            f"allocate ports the kernel never hands out by itself")
    return ports


def _bindable(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))   # no SO_REUSEADDR: a TIME_WAIT leftover counts as taken
        return True
    except OSError:
        return False
    finally:
        s.close()


class PortAllocator:
    """Hands out distinct, currently bindable ports from outside the ephemeral range."""

    def __init__(self, host: str = "127.0.0.1", seed: int | None = None,
                 owner: int | None = None):
        self.host = host
        self.owner = os.getpid() if owner is None else owner
        self._ports = candidate_ports()
        rnd = random.Random(os.getpid() if seed is None else seed)
        self._next = rnd.randrange(len(self._ports))
        self._handed = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            while self._handed < len(self._ports):
                port = self._ports[self._next]
                self._next = (self._next + 1) % len(self._ports)
                self._handed += 1
                if _bindable(self.host, port) and _claim(port, self.owner):
                    return port
        raise RuntimeError(f"no bindable port left outside the ephemeral range on {self.host}")


_default: PortAllocator | None = None
_default_lock = threading.Lock()


def take_port(owner: int | None = None) -> int:
    """A port on 127.0.0.1, free now, outside the ephemeral range, never handed out before
    by this process, and claimed for owner (default: this process) against other ones."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PortAllocator(owner=owner)
    return _default.take()


if __name__ == "__main__":   # for shell scripts: print N ports, one a line
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    for _ in range(n):
        # claimed for the calling script (PORTALLOC_OWNER: its pid, when a subshell runs
        # this), which outlives this process
        print(take_port(owner=int(os.environ.get("PORTALLOC_OWNER") or os.getppid())))

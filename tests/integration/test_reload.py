"""Issue 3: hot reload of certificates and policy, against the real binary with real TLS
clients (see /tmp/pc/SPEC3.md for the contract).

  1. Kubernetes secret volume (..data symlink swap) rotated every second for 20 s under
     load: no failed handshake, long streams intact, every new serial served within ~2 s.
  2. In-place rewrite (cert, then key 300 ms later): never a mismatched pair served.
  3. Invalid rotations keep the last good generation serving.
  4. CA roll with an overlapping bundle; dropping the old CA revokes its peers.
  5. Policy reload on SIGHUP: a removed namespace is refused and its open connection
     revoked after revoke_grace_ms; an allowed stream keeps flowing.
  6. SIGHUP with a broken config keeps the old config entirely.
  7. Listeners added / removed on SIGHUP.
  8. Encrypted PKCS#8 key with key_passphrase_file; the passphrase is never printed.
  9. A peer certificate that expires mid-connection is revoked at not_after + grace.
 10. Own-certificate expiry warning (at start and on reload).
 11. More reload paths: poll-only (watch = false), rotation to an intermediate-issued
     chain, a not-yet-valid rotation picked up once valid, SIGHUP switching identity paths
     (the watch follows), TLS settings / forward address on SIGHUP, outbound `expect`
     change revoking an upstream, a handshake straddling a policy reload.

Every loop is bounded in count and time. RELOAD_DEBUG=1 (with -s) prints each sidecar's
server events after every test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness as h

GRACE_MS = 1000


# ===================================================================== certificate minting

def gtime(epoch: float) -> str:
    """GeneralizedTime string as `openssl ca -startdate/-enddate` takes it."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(int(epoch)))


def _run(cmd: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"command failed rc={r.returncode}: {' '.join(cmd)}\n"
                           f"{r.stdout}\n{r.stderr}")
    return r


class Minter:
    """Issues SPIFFE leaf certificates signed by one CA (ca.crt/ca.key of a dev PKI dir)
    with `certs/gen-dev-pki.sh --leaf` (random serial, P-256 key, the script's extensions)."""

    def __init__(self, workdir: Path, ca_crt: str, ca_key: str):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_crt, self.ca_key = ca_crt, ca_key
        self.n = 0

    def leaf(self, stem: str, ns: str, sa: str, *, td: str = h.TRUST_DOMAIN,
             start: float | None = None, end: float | None = None) -> tuple[str, str]:
        """Returns (crt path, key path). Default validity: now - 1 h .. now + 30 days."""
        now = time.time()
        start = now - 3600 if start is None else start
        end = now + 30 * 86400 if end is None else end
        self.n += 1
        _run(["bash", str(h.PKI_SCRIPT), "--leaf", str(self.dir), self.ca_crt, self.ca_key,
              stem, ns, sa, td, gtime(start), gtime(end)])
        return str(self.dir / f"{stem}.crt"), str(self.dir / f"{stem}.key")


# ===================================================================== serials

def _tlv(b: bytes, i: int) -> tuple[int, int, int]:
    """(tag, value offset, value length) of the DER TLV at i."""
    tag = b[i]
    ln = b[i + 1]
    i += 2
    if ln & 0x80:
        n = ln & 0x7F
        ln = int.from_bytes(b[i:i + n], "big")
        i += n
    return tag, i, ln


def der_serial(der: bytes) -> str:
    """Serial number of a DER certificate, uppercase hex as `openssl x509 -serial` prints."""
    tag, i, _ = _tlv(der, 0)
    assert tag == 0x30, "not a DER certificate"
    tag, i, _ = _tlv(der, i)          # tbsCertificate
    assert tag == 0x30
    tag, j, ln = _tlv(der, i)
    if tag == 0xA0:                    # [0] version
        tag, j, ln = _tlv(der, j + ln)
    assert tag == 0x02, "serial is not an INTEGER"
    content = der[j:j + ln].lstrip(b"\x00") or b"\x00"
    return content.hex().upper()       # byte-wise, like i2a_ASN1_INTEGER / BN_bn2hex


def pem_serial(path_or_pem) -> str:
    """Serial of the first certificate in a PEM file (or PEM text)."""
    text = path_or_pem
    if not isinstance(text, str) or "-----BEGIN" not in text:
        text = Path(path_or_pem).read_text()
    first = text[:text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return der_serial(ssl.PEM_cert_to_DER_cert(first))


def openssl_serial(pem_path: str) -> str:
    r = _run(["openssl", "x509", "-in", pem_path, "-noout", "-serial"])
    return r.stdout.strip().split("=", 1)[1].upper()


def event_serial(e: dict) -> int | None:
    """The serial=HEX of a 'reload ok: kind=certs' event, as an integer."""
    m = re.search(r"serial=([0-9A-Fa-f:]+)", str(e.get("msg", "")))
    return int(m.group(1).replace(":", ""), 16) if m else None


def cert_not_after(pem_path: str) -> float:
    d = ssl._ssl._test_decode_cert(pem_path)  # noqa: SLF001 (stdlib test helper)
    return ssl.cert_time_to_seconds(d["notAfter"])


# ===================================================================== secret volume

class SecretVolume:
    """A Kubernetes-style secret volume (kubelet AtomicWriter layout):

        root/..2026_01_02_03_04_05.000000001/{tls.crt,tls.key,ca.crt}
        root/..data -> ..2026_01_02_03_04_05.000000001
        root/tls.crt -> ..data/tls.crt   (etc.)

    swap() writes a new timestamped dir, points ..data_tmp at it, renames ..data_tmp over
    ..data (atomic) and removes the old dir, as kubelet does."""

    NAMES = ("tls.crt", "tls.key", "ca.crt")

    def __init__(self, root: Path, files: dict[str, bytes]):
        self.root = Path(root)
        self.root.mkdir(parents=True)
        self.n = 0
        d = self._write_dir(files)
        os.symlink(d.name, self.root / "..data")
        for name in files:
            os.symlink(f"..data/{name}", self.root / name)

    def _write_dir(self, files: dict[str, bytes]) -> Path:
        self.n += 1
        ts = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        d = self.root / f"..{ts}.{self.n:09d}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
            os.chmod(d / name, 0o600 if name.endswith(".key") else 0o644)
        return d

    def swap(self, files: dict[str, bytes]) -> None:
        old = os.readlink(self.root / "..data")
        d = self._write_dir(files)
        tmp = self.root / "..data_tmp"
        os.symlink(d.name, tmp)
        os.rename(tmp, self.root / "..data")
        shutil.rmtree(self.root / old)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def identity(self, **extra) -> dict:
        ident = {"cert": self.path("tls.crt"), "key": self.path("tls.key"),
                 "ca": self.path("ca.crt"), "watch": True}
        ident.update(extra)
        return ident


def files_for(crt: str, key: str, ca: "str | list[str]") -> dict[str, bytes]:
    cas = [ca] if isinstance(ca, str) else ca
    return {"tls.crt": Path(crt).read_bytes(), "tls.key": Path(key).read_bytes(),
            "ca.crt": b"".join(Path(c).read_bytes() for c in cas)}


# ===================================================================== TLS clients

def ctx_from(crt: str | None, key: str | None, cafile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if crt:
        ctx.load_cert_chain(crt, key)
    return ctx


def echo_once(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping\n",
              timeout: float = 5.0) -> str:
    """New TLS connection + one echo round trip. Returns the served leaf's serial.
    Raises on any failure."""
    s = h.tls_connect(port, ctx, timeout=timeout)
    try:
        serial = der_serial(s.getpeercert(binary_form=True))
        s.sendall(payload)
        got = h.recv_exact(s, len(payload), timeout=timeout)
        if got != payload:
            raise AssertionError(f"echo mismatch: {got!r} != {payload!r}")
        return serial
    finally:
        s.close()


def clean_close(s: ssl.SSLSocket) -> None:
    """close_notify, then close (a bare TCP FIN is logged as close "reset")."""
    try:
        s.unwrap()
    except (ssl.SSLError, OSError):
        pass
    s.close()


def served_serial(port: int, ctx: ssl.SSLContext) -> str:
    return echo_once(port, ctx)


def wait_serial(port: int, ctx: ssl.SSLContext, want: str, timeout: float) -> tuple[bool, str]:
    """Poll with new connections until the served serial is `want`. (ok, last serial)."""
    deadline = time.monotonic() + h.T(timeout)
    last = ""
    for _ in range(2000):
        last = served_serial(port, ctx)
        if last == want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return last == want, last


def expect_refused(sc: h.Sidecar, port: int, ctx: ssl.SSLContext, reason: str,
                   start: int = 0) -> dict:
    """A new connection is refused (never served) with access-log reason `reason`."""
    r = h.attempt_tls(port, ctx)
    if isinstance(r, ssl.SSLSocket):
        r.close()
        raise AssertionError(f"connection was served; expected a refusal ({reason})")
    e = sc.log_for_peer_port(r.local_port, timeout=5, start=start)
    assert e is not None, f"no access-log line for refused client port {r.local_port}"
    assert e["decision"] == "deny" and e["reason"] == reason, e
    return e


def expect_served(port: int, ctx: ssl.SSLContext) -> None:
    r = h.attempt_tls(port, ctx)
    if not isinstance(r, ssl.SSLSocket):
        raise AssertionError(f"expected the connection to be served, got {r}")
    r.close()


# ===================================================================== load generators

@dataclass
class ConnRecord:
    t0: float
    t1: float
    serial: str | None
    error: str | None


class Connector(threading.Thread):
    """Keeps opening new TLS connections (one echo round trip each) until stopped.
    Alternates TLS 1.3 / TLS 1.2 when `alternate` is set."""

    def __init__(self, port: int, ctx13: ssl.SSLContext, ctx12: ssl.SSLContext | None = None,
                 pause: float = 0.02, max_conns: int = 3000, max_time: float = 60.0):
        super().__init__(daemon=True, name=f"connector-{port}")
        self.port, self.ctx13, self.ctx12 = port, ctx13, ctx12
        self.pause, self.max_conns, self.max_time = pause, max_conns, h.T(max_time)
        self.records: list[ConnRecord] = []
        self.stop_ev = threading.Event()

    def run(self):
        end = time.monotonic() + self.max_time
        for i in range(self.max_conns):
            if self.stop_ev.is_set() or time.monotonic() > end:
                return
            ctx = self.ctx12 if (self.ctx12 is not None and i % 2) else self.ctx13
            t0 = time.monotonic()
            try:
                serial = echo_once(self.port, ctx, b"conn-%06d\n" % i)
                self.records.append(ConnRecord(t0, time.monotonic(), serial, None))
            except Exception as e:  # recorded and asserted on
                self.records.append(ConnRecord(t0, time.monotonic(), None,
                                               f"{type(e).__name__}: {e}"))
            self.stop_ev.wait(self.pause)

    def failures(self) -> list[ConnRecord]:
        return [r for r in self.records if r.error]

    def finish(self):
        self.stop_ev.set()
        self.join(h.T(15))
        assert not self.is_alive(), "connector thread did not stop"


class Stream(threading.Thread):
    """One long-lived TLS connection through an echo app, ping-ponging checksummed chunks."""

    CHUNK = 16 * 1024

    def __init__(self, port: int, ctx: ssl.SSLContext, seed: int, pause: float = 0.02,
                 max_rounds: int = 20000, max_time: float = 60.0):
        super().__init__(daemon=True, name=f"stream-{seed}")
        self.sock = h.tls_connect(port, ctx, timeout=10)
        self.local_port = self.sock.getsockname()[1]
        self.seed, self.pause = seed, pause
        self.max_rounds, self.max_time = max_rounds, h.T(max_time)
        self.base = h.pattern_bytes(self.CHUNK, seed=seed)
        self.sent = 0
        self.received = 0
        self.sent_hash = hashlib.sha256()
        self.recv_hash = hashlib.sha256()
        self.rounds = 0
        self.error: str | None = None
        self.last_ok = time.monotonic()
        self.stop_ev = threading.Event()

    def run(self):
        end = time.monotonic() + self.max_time
        try:
            for i in range(self.max_rounds):
                if self.stop_ev.is_set() or time.monotonic() > end:
                    break
                chunk = (b"%d:%08d:" % (self.seed, i)) + self.base
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                self.sent_hash.update(chunk)
                got = h.recv_exact(self.sock, len(chunk), timeout=10)
                self.received += len(got)
                self.recv_hash.update(got)
                if got != chunk:
                    raise AssertionError(f"stream {self.seed}: round {i} echoed data differs")
                self.rounds += 1
                self.last_ok = time.monotonic()
                self.stop_ev.wait(self.pause)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def finish(self) -> None:
        self.stop_ev.set()
        self.join(h.T(20))
        assert not self.is_alive(), f"stream {self.seed} did not stop"
        try:
            self.sock.close()
        except OSError:
            pass


def start_streams(port: int, ctx: ssl.SSLContext, n: int, seed0: int = 100) -> list[Stream]:
    streams = [Stream(port, ctx, seed0 + i) for i in range(n)]
    for s in streams:
        s.start()
    return streams


def check_streams(streams: list[Stream], app: h.AppServer, min_rounds: int) -> None:
    for s in streams:
        s.finish()
    problems = [f"stream {s.seed}: {s.error}" for s in streams if s.error]
    assert not problems, "long streams broke:\n" + "\n".join(problems)
    for s in streams:
        assert s.rounds >= min_rounds, f"stream {s.seed} only did {s.rounds} round trips"
        assert s.received == s.sent and s.recv_hash.digest() == s.sent_hash.digest()
    # the app saw exactly what each stream sent (and EOF after the client closed)
    by_hash = {}
    deadline = time.monotonic() + h.T(10)
    want = {s.sent_hash.hexdigest(): s for s in streams}
    while time.monotonic() < deadline and len(by_hash) < len(streams):
        for c in list(app.conns):
            if c.sha256_in in want and c.eof:
                by_hash[c.sha256_in] = c
        time.sleep(0.05)
    for hx, s in want.items():
        assert hx in by_hash, (f"stream {s.seed}: the app never saw the complete "
                               f"{s.sent}-byte stream followed by EOF")
        assert by_hash[hx].bytes_in == s.sent


# ===================================================================== fixtures

POOL_SIZE = 25


@pytest.fixture(scope="module")
def minter(pki, tmp_path_factory) -> Minter:
    return Minter(tmp_path_factory.mktemp("mint"), pki.ca, str(pki.dir / "ca.key"))


@pytest.fixture(scope="module")
def leaf_pool(minter) -> list[tuple[str, str, str]]:
    """POOL_SIZE fresh payments/api leaves, all chained to the session PKI's CA:
    [(crt, key, serial), ...]."""
    pool = []
    for i in range(POOL_SIZE):
        crt, key = minter.leaf(f"pool-payments-api-{i}", "payments", "api")
        pool.append((crt, key, pem_serial(crt)))
    # the DER parser agrees with openssl
    assert pool[0][2] == openssl_serial(pool[0][0])
    assert len({p[2] for p in pool}) == POOL_SIZE, "serials are not unique"
    return pool


@pytest.fixture(scope="module")
def pki2(tmp_path_factory) -> h.PKI:
    """A second, independent dev PKI (its ca.crt is a different root)."""
    out = tmp_path_factory.mktemp("pki2")
    r = subprocess.run(["bash", str(h.PKI_SCRIPT), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return h.PKI(out)


def inbound_cfg(pki, port: int, app_addr: str, *, identity: dict | None = None,
                allow=None, limits: dict | None = None, extra_listeners=()) -> dict:
    lim = {"revoke_grace_ms": GRACE_MS}
    lim.update(limits or {})
    cfg = h.base_config(pki, "payments-api", limits=lim, inbound=[
        h.inbound_listener("api", port, app_addr, allow or [{"namespace": "web"}]),
        *extra_listeners])
    if identity is not None:
        cfg["identity"] = identity
    return cfg


@pytest.fixture(autouse=True)
def _dbg_dump(env):
    yield
    if os.environ.get("RELOAD_DEBUG"):
        for sc in env.sidecars:
            print(f"==== {sc.name}")
            for l in sc.stderr_lines:
                print("  ", l[:300])


def reload_events(sc: h.Sidecar, kind: str, ok: bool, start: int = 0) -> list[dict]:
    return sc.events_matching(f"reload {'ok' if ok else 'failed'}: kind={kind}", start)


def wait_reload(sc: h.Sidecar, kind: str, ok: bool, start: int, timeout: float = 5.0) -> dict:
    e = sc.wait_for_event(f"reload {'ok' if ok else 'failed'}: kind={kind}", timeout, start)
    if e is None:
        tail = "\n".join(sc.stderr_lines[-15:])
        raise AssertionError(f"no 'reload {'ok' if ok else 'failed'}: kind={kind}' event within "
                             f"{timeout}s; stderr tail:\n{tail}")
    return e


# ===================================================================== 1. secret volume

def test_secret_volume_rotation_under_load(env, pki, leaf_pool):
    swaps_n = 20
    assert len(leaf_pool) > swaps_n
    vol = SecretVolume(env.tmp / "secret", files_for(*leaf_pool[0][:2], pki.ca))
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr,
                                 identity=vol.identity(poll_interval_ms=60000)),
                     name="secretvol")
    ctx = h.client_context(pki, "web-frontend")
    assert served_serial(port, ctx) == leaf_pool[0][2]

    streams = start_streams(port, ctx, 3)
    conn = Connector(port, ctx, pause=0.02, max_time=60)
    conn.start()
    ev0 = sc.event_count()
    swaps: list[tuple[float, str]] = []   # (monotonic time of the rename, new serial)
    t_start = time.monotonic()
    for i in range(1, swaps_n + 1):
        # one swap per second, on a fixed schedule
        time.sleep(max(0.0, t_start + i * 1.0 - time.monotonic()))
        crt, key, serial = leaf_pool[i]
        vol.swap(files_for(crt, key, pki.ca))
        swaps.append((time.monotonic(), serial))
    time.sleep(2.5)
    conn.finish()
    check_streams(streams, app, min_rounds=50)
    sc.assert_alive()

    recs = conn.records
    fails = conn.failures()
    assert not fails, (f"{len(fails)} of {len(recs)} new connections failed during rotation, "
                       f"first: {fails[0].error}")
    assert len(recs) >= 200, f"only {len(recs)} connections in {swaps_n} s"

    order = {leaf_pool[0][2]: 0, **{s: i + 1 for i, (_, s) in enumerate(swaps)}}
    unknown = {r.serial for r in recs} - set(order)
    assert not unknown, f"served serials that were never installed: {unknown}"
    # the connector is sequential: a later connection never sees an older generation
    idx = [order[r.serial] for r in recs]
    back = [(k, idx[k - 1], idx[k]) for k in range(1, len(idx)) if idx[k] < idx[k - 1]]
    assert not back, f"a newer connection saw an older certificate: (conn, before, after) {back[:5]}"
    # each new serial is served within ~2 s of its swap
    late = []
    for i, (t_swap, serial) in enumerate(swaps):
        seen = [r for r in recs if r.t0 >= t_swap and r.serial == serial]
        first = min((r.t0 for r in seen), default=None)
        if first is None or first - t_swap > 2.0:
            late.append((i + 1, serial, None if first is None else round(first - t_swap, 2)))
    if os.environ.get("RELOAD_DEBUG"):
        delays = []
        for t_swap, serial in swaps:
            first = min((r.t0 for r in recs if r.t0 >= t_swap and r.serial == serial), default=None)
            delays.append(None if first is None else round(first - t_swap, 3))
        print(f"\nconnections={len(recs)} stream rounds={[st.rounds for st in streams]} "
              f"first-seen delays={delays}")
    assert not late, f"swaps whose serial was not served within 2 s: (swap, serial, delay) {late}"

    fails_ev = reload_events(sc, "certs", False, ev0)
    assert not fails_ev, f"reload failures during a valid rotation: {fails_ev[:3]}"
    oks = reload_events(sc, "certs", True, ev0)
    assert oks, "no 'reload ok: kind=certs' event"
    last = swaps[-1][1]
    assert event_serial(oks[-1]) == int(last, 16), (f"last reload event does not name the "
                                                    f"last serial {last}: {oks[-1]}")
    # nobody was revoked or reset
    bad = [e for e in sc.access_log() if e.get("close") == "revoked" or e["decision"] != "allow"]
    assert not bad, f"connections denied/revoked during a valid rotation: {bad[:3]}"


# ===================================================================== 2. in-place rewrite

def _rewrite_in_place(path: Path, data: bytes, split: bool = False) -> None:
    """open(O_TRUNC) + write, same inode (no rename); optionally in two halves."""
    with open(path, "r+b") as f:
        f.truncate(0)
        if split:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(0.02)
            f.write(data[len(data) // 2:])
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_in_place_rewrite_never_serves_mismatched_pair(env, pki, leaf_pool):
    d = env.tmp / "plain"
    d.mkdir()
    crt0, key0, ser0 = leaf_pool[0]
    shutil.copy(crt0, d / "cert.pem")
    shutil.copy(key0, d / "key.pem")
    shutil.copy(pki.ca, d / "ca.pem")
    ident = {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": str(d / "ca.pem"),
             "watch": True, "poll_interval_ms": 60000}
    ino = os.stat(d / "cert.pem").st_ino
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr, identity=ident), name="inplace")
    ctx13 = h.client_context(pki, "web-frontend")
    ctx12 = h.client_context(pki, "web-frontend", max_version=ssl.TLSVersion.TLSv1_2)
    assert served_serial(port, ctx13) == ser0

    conn = Connector(port, ctx13, ctx12, pause=0.01, max_time=40)
    conn.start()
    ev0 = sc.event_count()
    current = ser0
    timeline = []
    try:
        for rnd, k in enumerate((21, 22, 23)):
            crt, key, ser = leaf_pool[k]
            _rewrite_in_place(d / "cert.pem", Path(crt).read_bytes(), split=True)
            time.sleep(0.3)
            _rewrite_in_place(d / "key.pem", Path(key).read_bytes())
            t_key = time.monotonic()
            ok, last = wait_serial(port, ctx13, ser, timeout=4)
            assert ok, (f"round {rnd}: new serial {ser} not served 4 s after the key was "
                        f"rewritten (still {last})")
            timeline.append((t_key, ser))
            current = ser
            time.sleep(0.3)
    finally:
        conn.finish()
    assert os.stat(d / "cert.pem").st_ino == ino, "test bug: the file was replaced, not rewritten"
    fails = conn.failures()
    assert not fails, (f"{len(fails)} of {len(conn.records)} handshakes failed during in-place "
                       f"rewrites (a mismatched cert/key pair was served?), first: "
                       f"{fails[0].error}")
    allowed = {ser0} | {s for _, s in timeline}
    assert {r.serial for r in conn.records} <= allowed
    assert len(conn.records) >= 50
    assert current == leaf_pool[23][2]
    # a failure while half-written is tolerated only as retry/failed events, never as a crash
    sc.assert_alive()
    oks = reload_events(sc, "certs", True, ev0)
    assert len(oks) >= 3, f"expected a 'reload ok: kind=certs' per rewrite, got {len(oks)}"


# ===================================================================== 3. invalid rotations

def test_invalid_rotations_keep_serving_old_cert(env, pki, leaf_pool):
    d = env.tmp / "plain"
    d.mkdir()
    crt0, key0, ser0 = leaf_pool[1]
    shutil.copy(crt0, d / "cert.pem")
    shutil.copy(key0, d / "key.pem")
    shutil.copy(pki.ca, d / "ca.pem")
    ident = {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": str(d / "ca.pem"),
             "watch": True, "poll_interval_ms": 60000}
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr, identity=ident), name="invalid")
    ctx = h.client_context(pki, "web-frontend")
    assert served_serial(port, ctx) == ser0
    held = h.tls_connect(port, ctx)   # an established connection across all the attempts

    def put(cert: bytes, key: bytes | None):
        # write the key first (if any), then the cert, each atomically (rename)
        for name, data in (("key.pem", key), ("cert.pem", cert)):
            if data is None:
                continue
            tmp = d / (name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, d / name)

    garbage = (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n"
               b"-----END CERTIFICATE-----\n")
    rb = lambda p: Path(p).read_bytes()  # noqa: E731
    cases = [
        ("garbage-pem", garbage, None, 5),
        ("expired", rb(pki.crt("bad-expired")), rb(pki.key("bad-expired")), 5),
        ("not-yet-valid", rb(pki.crt("bad-not-yet-valid")), rb(pki.key("bad-not-yet-valid")), 5),
        # a new cert whose key never arrives: retried for ~2 s, then given up
        ("mismatched-key", rb(leaf_pool[24][0]), rb(key0), 6),
        ("wrong-trust-domain", rb(pki.crt("bad-wrong-td")), rb(pki.key("bad-wrong-td")), 5),
        ("other-ca", rb(pki.crt("bad-other-ca")), rb(pki.key("bad-other-ca")), 5),
    ]
    results = {}
    for name, cert, key, wait_s in cases:
        ev = sc.event_count()
        t0 = time.monotonic()
        put(cert, key)
        e = sc.wait_for_event("reload failed: kind=certs", wait_s, ev)
        elapsed = time.monotonic() - t0
        results[name] = (e, elapsed)
        assert e is not None, (f"{name}: no 'reload failed: kind=certs' event within {wait_s}s; "
                               f"stderr tail:\n" + "\n".join(sc.stderr_lines[-10:]))
        assert e.get("level") == "error", e
        assert "keeping generation" in e["msg"], e
        oks = reload_events(sc, "certs", True, ev)
        assert not oks, f"{name}: an invalid set was published: {oks}"
        if name == "mismatched-key":
            retries = sc.events_matching("reload retry: kind=certs", ev)
            assert retries, "mismatched key: no 'reload retry' event before giving up"
            assert 1.5 <= elapsed <= 5.0, (f"mismatched key: gave up after {elapsed:.2f}s, "
                                           f"expected the ~2 s retry window")
        # the old certificate keeps serving, handshakes keep working
        for _ in range(3):
            assert served_serial(port, ctx) == ser0, f"{name}: served serial changed"
        sc.assert_alive()
    # the held connection was never disturbed
    held.sendall(b"still-here\n")
    assert h.recv_exact(held, 11) == b"still-here\n"
    held.close()
    # and a valid rotation afterwards is still picked up (the watch survived the failures)
    ev = sc.event_count()
    crt, key, ser = leaf_pool[2]
    put(rb(crt), rb(key))
    wait_reload(sc, "certs", True, ev, timeout=5)
    ok, last = wait_serial(port, ctx, ser, timeout=3)
    assert ok, f"valid rotation after failures not served (still {last})"


# ===================================================================== 4. CA roll

def test_ca_roll_with_overlap(env, pki, pki2):
    A, B = pki, pki2
    both = env.tmp / "both-cas.pem"
    both.write_bytes(Path(A.ca).read_bytes() + Path(B.ca).read_bytes())
    # clients trust both roots for the server side during the whole roll
    ctx_a = ctx_from(A.crt("web-frontend"), A.key("web-frontend"), str(both))
    ctx_b = ctx_from(B.crt("web-frontend"), B.key("web-frontend"), str(both))

    vol = SecretVolume(env.tmp / "secret",
                       files_for(A.crt("payments-api"), A.key("payments-api"), A.ca))
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(A, port, app.addr, identity=vol.identity()), name="caroll")
    ser_a = pem_serial(A.crt("payments-api"))
    ser_b = pem_serial(B.crt("payments-api"))
    assert served_serial(port, ctx_a) == ser_a
    expect_refused(sc, port, ctx_b, "bad_chain")

    # step 1: bundle = old + new CA, own cert unchanged (still valid under the bundle)
    ev = sc.event_count()
    vol.swap(files_for(A.crt("payments-api"), A.key("payments-api"), [A.ca, B.ca]))
    wait_reload(sc, "certs", True, ev)
    time.sleep(0.2)
    expect_served(port, ctx_a)
    expect_served(port, ctx_b)
    held_a = h.tls_connect(port, ctx_a)
    held_b = h.tls_connect(port, ctx_b)
    for s in (held_a, held_b):
        s.sendall(b"hello\n")
        assert h.recv_exact(s, 6) == b"hello\n"
    port_a = held_a.getsockname()[1]

    # step 1.5 (invalid): bundle = new CA only while our own cert is from the old CA: our
    # own chain does not verify against the new bundle -> rejected, old generation serves
    ev = sc.event_count()
    vol.swap(files_for(A.crt("payments-api"), A.key("payments-api"), B.ca))
    wait_reload(sc, "certs", False, ev)
    time.sleep((GRACE_MS + 400) / 1000)
    expect_served(port, ctx_a)
    assert served_serial(port, ctx_a) == ser_a
    held_a.sendall(b"still\n")
    assert h.recv_exact(held_a, 6) == b"still\n", "old-CA peer disturbed by a failed reload"

    # step 2: bundle = new CA only, own cert from the new CA, in one atomic step
    ev = sc.event_count()
    log0 = len(sc.access_log())
    t_swap = time.monotonic()
    vol.swap(files_for(B.crt("payments-api"), B.key("payments-api"), B.ca))
    e = wait_reload(sc, "certs", True, ev)
    assert event_serial(e) == int(ser_b, 16), e
    time.sleep(0.2)
    assert served_serial(port, ctx_b) == ser_b
    expect_refused(sc, port, ctx_a, "bad_chain", start=log0)
    expect_served(port, ctx_b)

    # the established old-CA connection is revoked after the grace; the new-CA one stays
    held_a.settimeout(h.T(GRACE_MS / 1000 + 5))
    t_closed = None
    try:
        for _ in range(100):
            b = held_a.recv(4096)
            if not b:
                break
    except (ssl.SSLError, OSError):
        pass
    t_closed = time.monotonic() - t_swap
    held_a.close()
    rev = sc.log_for_peer_port(port_a, timeout=3)
    assert rev is not None, "no access-log line for the revoked old-CA connection"
    assert (rev["decision"], rev["close"], rev["reason"]) == ("deny", "revoked", "bad_chain"), rev
    assert t_closed >= GRACE_MS / 1000 - 0.15, f"revoked after {t_closed:.2f}s, before the grace"
    assert t_closed <= GRACE_MS / 1000 + 4, f"revoked only after {t_closed:.2f}s"
    held_b.sendall(b"after\n")
    assert h.recv_exact(held_b, 6) == b"after\n", "new-CA peer's connection was disturbed"
    held_b.close()


# ===================================================================== 5. policy reload

def test_sighup_policy_removes_namespace(env, pki):
    app = env.app("echo")
    port = h.free_port()
    allow_both = [{"namespace": "web"}, {"namespace": "jobs"}]
    cfg = inbound_cfg(pki, port, app.addr, allow=allow_both)
    sc = env.sidecar(cfg, name="policy")
    web = h.client_context(pki, "web-frontend")
    jobs = h.client_context(pki, "jobs-scheduler")
    expect_served(port, jobs)

    held_jobs = h.tls_connect(port, jobs)
    held_jobs.sendall(b"jobs\n")
    assert h.recv_exact(held_jobs, 5) == b"jobs\n"
    jobs_port = held_jobs.getsockname()[1]
    streams = start_streams(port, web, 1, seed0=500)
    time.sleep(0.3)

    new = inbound_cfg(pki, port, app.addr, allow=[{"namespace": "web"}])
    sc.write_config(new)
    ev = sc.event_count()
    log0 = len(sc.access_log())
    t_hup = time.monotonic()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    # inside the grace the revoked connection still works
    if time.monotonic() - t_hup < GRACE_MS / 1000 * 0.5:
        held_jobs.sendall(b"grace\n")
        assert h.recv_exact(held_jobs, 6) == b"grace\n", "closed before revoke_grace_ms"
    expect_refused(sc, port, jobs, "not_allowed", start=log0)
    expect_served(port, web)

    held_jobs.settimeout(h.T(GRACE_MS / 1000 + 5))
    try:
        for _ in range(100):
            if not held_jobs.recv(4096):
                break
    except (ssl.SSLError, OSError):
        pass
    t_closed = time.monotonic() - t_hup
    held_jobs.close()
    e = sc.log_for_peer_port(jobs_port, timeout=3)
    assert e is not None, "no access-log line for the revoked jobs connection"
    assert (e["decision"], e["close"], e["reason"]) == ("deny", "revoked", "not_allowed"), e
    assert e["peer_id"] == h.spiffe("jobs", "scheduler"), e
    h.check_access_entry(e)
    assert GRACE_MS / 1000 - 0.15 <= t_closed <= GRACE_MS / 1000 + 4, \
        f"jobs connection closed {t_closed:.2f}s after SIGHUP (grace {GRACE_MS} ms)"
    # the web stream kept flowing through all of it
    before = streams[0].rounds
    time.sleep(0.5)
    assert streams[0].rounds > before, "web stream stalled after the policy reload"
    check_streams(streams, app, min_rounds=20)
    assert not sc.wait_for_log(
        lambda x: x.get("peer_id") == h.spiffe("web", "frontend") and x.get("close") == "revoked",
        timeout=0.1), "a web connection was revoked"


# ===================================================================== 6. broken SIGHUP

def test_sighup_broken_config_keeps_old(env, pki, tmp_path):
    app = env.app("echo")
    port = h.free_port()
    cfg = inbound_cfg(pki, port, app.addr, allow=[{"namespace": "web"}])
    sc = env.sidecar(cfg, name="broken")
    web = h.client_context(pki, "web-frontend")
    jobs = h.client_context(pki, "jobs-scheduler")
    expect_served(port, web)
    expect_refused(sc, port, jobs, "not_allowed")

    # every broken variant would also let jobs in, so a partial apply would show
    permissive = inbound_cfg(pki, port, app.addr,
                             allow=[{"namespace": "web"}, {"namespace": "jobs"}])
    text_ok, _ = h.render_config(permissive)
    unknown = inbound_cfg(pki, port, app.addr, allow=[{"namespace": "web"}, {"namespace": "jobs"}])
    unknown["bogus_setting"] = 1
    badpath = inbound_cfg(pki, port, app.addr, allow=[{"namespace": "web"}, {"namespace": "jobs"}])
    badpath["identity"]["cert"] = str(tmp_path / "does-not-exist.crt")
    busy = socket.socket()
    busy.bind((h.HOST, 0))
    busy.listen(1)
    cant_bind = inbound_cfg(pki, port, app.addr,
                            allow=[{"namespace": "web"}, {"namespace": "jobs"}],
                            extra_listeners=[h.inbound_listener("extra", busy.getsockname()[1],
                                                                app.addr,
                                                                [{"namespace": "jobs"}])])
    variants = [
        ("syntax", text_ok.replace("workers = 2;", "workers = = 2 {;"), "config", None),
        ("unknown-key", unknown, "config", "bogus_setting"),
        ("bad-cert-path", badpath, "config", "identity.cert"),
        ("cannot-bind", cant_bind, None, None),
    ]
    try:
        for name, new, kind, setting in variants:
            sc.write_config(new)
            ev = sc.event_count()
            log0 = len(sc.access_log())
            sc.sighup()
            want = f"reload failed: kind={kind}" if kind else "reload failed"
            e = sc.wait_for_event(want, 5, ev)
            assert e is not None, (f"{name}: no '{want}' event; stderr tail:\n"
                                   + "\n".join(sc.stderr_lines[-10:]))
            assert e.get("level") == "error", e
            assert "keeping generation" in e["msg"], e
            if setting:
                assert setting in e["msg"], f"{name}: event does not name {setting}: {e}"
            assert not reload_events(sc, "config", True, ev), f"{name}: reported ok"
            time.sleep(0.2)
            sc.assert_alive()
            expect_served(port, web)
            expect_refused(sc, port, jobs, "not_allowed", start=log0)
    finally:
        busy.close()
    # a good SIGHUP afterwards applies
    sc.write_config(permissive)
    ev = sc.event_count()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    expect_served(port, jobs)
    # unchanged behaviour on SIGTERM: drain and exit 0
    assert sc.stop() == 0


# ===================================================================== 7. listeners

def test_sighup_adds_and_removes_listeners(env, pki):
    app = env.app("echo")
    pa, pb, pc = h.free_port(), h.free_port(), h.free_port()
    web = h.client_context(pki, "web-frontend")
    allow = [{"namespace": "web"}]
    la = h.inbound_listener("a", pa, app.addr, allow)
    lb = h.inbound_listener("b", pb, app.addr, allow)
    lc = h.inbound_listener("c", pc, app.addr, allow)
    cfg = h.base_config(pki, "payments-api", limits={"revoke_grace_ms": 300}, inbound=[la, lb])
    sc = env.sidecar(cfg, name="listeners")
    expect_served(pa, web)
    expect_served(pb, web)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((h.HOST, pc), timeout=2).close()

    held_a = h.tls_connect(pa, web)
    held_b = h.tls_connect(pb, web)
    b_port = held_b.getsockname()[1]
    for s in (held_a, held_b):
        s.sendall(b"x\n")
        assert h.recv_exact(s, 2) == b"x\n"
    conn = Connector(pa, web, pause=0.01, max_time=30)
    conn.start()
    time.sleep(0.3)

    sc.write_config(h.base_config(pki, "payments-api", limits={"revoke_grace_ms": 300},
                                  inbound=[la, lc]))
    ev = sc.event_count()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    # c accepts (several times: every worker's socket)
    for _ in range(10):
        expect_served(pc, web)
    # b stops accepting
    def b_refused():
        try:
            socket.create_connection((h.HOST, pb), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True
    assert h.wait_until(b_refused, h.T(3)), "removed listener still accepts"
    for i in range(10):
        assert b_refused(), f"removed listener accepted connection {i}"
    time.sleep(0.5)
    conn.finish()
    fails = conn.failures()
    assert not fails, f"unchanged listener disturbed: {len(fails)} failures, first {fails[0].error}"
    assert len(conn.records) >= 20
    # open connections on a (unchanged) and b (removed) keep working past the revoke grace
    time.sleep(0.5)
    for s in (held_a, held_b):
        s.sendall(b"after\n")
        assert h.recv_exact(s, 6) == b"after\n"
    for s in (held_a, held_b):
        clean_close(s)
    e = sc.log_for_peer_port(b_port, timeout=5)
    assert e is not None, "no access-log line for the connection on the removed listener"
    assert e["listener"] == "b" and e["decision"] == "allow" and e["close"] == "eof", e


# ===================================================================== 8. encrypted key

def test_encrypted_key_with_passphrase_file(env, pki, tmp_path):
    secret = "pc-Passphrase-" + os.urandom(6).hex()
    wrong = "pc-WrongPass-" + os.urandom(6).hex()
    enc = h.encrypt_key(pki.key("payments-api"), tmp_path / "payments-api.enc.key", secret)
    assert "BEGIN ENCRYPTED PRIVATE KEY" in enc.read_text()
    good_pass = tmp_path / "pass"
    good_pass.write_text(secret + "\r\n")           # trailing CR/LF is stripped
    bad_pass = tmp_path / "wrong-pass"
    bad_pass.write_text(wrong + "\n")

    def cfg_with(passfile: Path | None, port: int) -> dict:
        c = inbound_cfg(pki, port, "127.0.0.1:9")
        c["identity"]["key"] = str(enc)
        if passfile is not None:
            c["identity"]["key_passphrase_file"] = str(passfile)
        return c

    def no_secret(text: str, what: str):
        for s in (secret, wrong):
            assert s not in text, f"{what}: a passphrase appears in the output"

    # --check: good passphrase ok; wrong or missing passphrase -> exit 1 naming identity.key
    outs = []
    for label, pf, want_rc in (("good", good_pass, 0), ("wrong", bad_pass, 1), ("none", None, 1)):
        p = tmp_path / f"check-{label}.conf"
        p.write_text(h.render_config(cfg_with(pf, h.free_port()))[0])
        r = h.run_binary("--check", "-c", str(p))
        no_secret(r.stdout + r.stderr, f"--check ({label})")
        assert r.returncode == want_rc, f"--check {label}: rc={r.returncode}\n{r.stderr}"
        if want_rc:
            assert "identity.key" in r.stderr, f"--check {label}: {r.stderr}"
        outs.append(r)

    # run with the wrong passphrase: startup fails (exit 1), names identity.key
    p = tmp_path / "run-wrong.conf"
    p.write_text(h.render_config(cfg_with(bad_pass, h.free_port()))[0])
    proc = subprocess.Popen([str(h.BIN), "-c", str(p)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=h.T(10))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
        raise AssertionError("sidecar with a wrong key passphrase did not exit")
    no_secret(out + err, "startup with wrong passphrase")
    assert proc.returncode == 1, f"rc={proc.returncode}\n{err}"
    assert "identity.key" in err, err

    # run with the right one: starts and serves with the payments-api certificate
    app = env.app("echo")
    port = h.free_port()
    c = cfg_with(good_pass, port)
    c["inbound"][0]["forward"] = app.addr
    sc = env.sidecar(c, name="enckey")
    web = h.client_context(pki, "web-frontend")
    assert served_serial(port, web) == pem_serial(pki.crt("payments-api"))
    # SIGHUP re-reads the key with the passphrase
    ev = sc.event_count()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    assert served_serial(port, web) == pem_serial(pki.crt("payments-api"))
    # the passphrase file now holds a wrong passphrase: the reload fails, old key serves
    good_pass.write_text(wrong + "\n")
    ev = sc.event_count()
    sc.sighup()
    e = sc.wait_for_event("reload failed", 5, ev)
    assert e is not None and "identity.key" in e["msg"], e
    assert served_serial(port, web) == pem_serial(pki.crt("payments-api"))
    sc.stop()
    no_secret(sc.all_output(), "running sidecar")


# ===================================================================== 9. peer expiry

def test_peer_cert_expiring_mid_connection_is_revoked(env, pki, minter):
    app = env.app("echo")
    port = h.free_port()
    cfg = inbound_cfg(pki, port, app.addr)
    cfg["workers"] = 1  # one verified-chain cache, so the second connection hits it
    sc = env.sidecar(cfg, name="expiry")
    crt, key = minter.leaf("short-web-frontend", "web", "frontend", end=time.time() + 5)
    not_after = cert_not_after(crt)
    left = not_after - time.time()
    # Minting takes well under a second; a slow mint must fail loudly, not skip.
    assert left >= 2, f"minting took too long ({left:.1f}s left on the cert)"
    ctx = ctx_from(crt, key, pki.ca)
    # The second connection presents the same chain: its verdict, expiry
    # included, comes from the verified-chain cache and must hold just as well.
    socks = [h.tls_connect(port, ctx) for _ in range(2)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.sendall(b"early\n")
        assert h.recv_exact(s, 6) == b"early\n"
    # still served just before not_after + grace
    time.sleep(max(0.0, not_after + GRACE_MS / 1000 - 0.5 - time.time()))
    for s in socks:
        s.sendall(b"late!\n")
        assert h.recv_exact(s, 6) == b"late!\n", "closed before not_after + revoke_grace_ms"
    for s, local_port in zip(socks, ports):
        s.settimeout(h.T(6))
        try:
            for _ in range(100):
                if not s.recv(4096):
                    break
        except (ssl.SSLError, OSError):
            pass
        closed_at = time.time()
        s.close()
        e = sc.log_for_peer_port(local_port, timeout=3)
        assert e is not None, "no access-log line for the expired peer's connection"
        assert (e["decision"], e["close"], e["reason"]) == ("deny", "revoked", "expired"), e
        h.check_access_entry(e)
        delay = closed_at - not_after
        assert GRACE_MS / 1000 - 0.2 <= delay <= GRACE_MS / 1000 + 3.5, \
            f"closed {delay:.2f}s after not_after (grace {GRACE_MS} ms)"


# ===================================================================== 10. own expiry warning

def test_own_cert_expiry_warning(env, pki, minter):
    crt, key = minter.leaf("soon-payments-api", "payments", "api", end=time.time() + 2 * 86400)
    app = env.app("echo")
    warned = {}
    for hours in (72, 24):
        port = h.free_port()
        c = inbound_cfg(pki, port, app.addr)
        c["identity"].update({"cert": crt, "key": key, "expiry_warning_hours": hours})
        sc = env.sidecar(c, name=f"warn{hours}")
        warned[hours] = sc.wait_for_event("certificate expires soon", 1.0 if hours == 72 else 0.5)
        sc.stop()
    assert warned[72] is not None, "no 'certificate expires soon' warning (expires in 48 h, " \
                                   "expiry_warning_hours = 72)"
    assert warned[72].get("level") == "warn", warned[72]
    assert warned[24] is None, f"warned although 48 h > 24 h: {warned[24]}"
    # checked again on every reload: rotating to the short-lived cert warns
    vol = SecretVolume(env.tmp / "warnvol",
                       files_for(pki.crt("payments-api"), pki.key("payments-api"), pki.ca))
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr,
                                 identity=vol.identity(expiry_warning_hours=72)),
                     name="warnreload")
    assert not sc.events_matching("certificate expires soon")
    ev = sc.event_count()
    vol.swap(files_for(crt, key, pki.ca))
    wait_reload(sc, "certs", True, ev)
    assert sc.wait_for_event("certificate expires soon", 1.0, ev), \
        "no expiry warning after rotating to a certificate that expires within the window"


# ===================================================================== 11. more reload paths

def test_poll_only_reload_without_watch(env, pki, leaf_pool):
    """identity.watch = false: the periodic re-check (poll_interval_ms) still rotates."""
    vol = SecretVolume(env.tmp / "secret", files_for(*leaf_pool[3][:2], pki.ca))
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr,
                                 identity=vol.identity(watch=False, poll_interval_ms=1000)),
                     name="pollonly")
    ctx = h.client_context(pki, "web-frontend")
    assert served_serial(port, ctx) == leaf_pool[3][2]
    ev = sc.event_count()
    vol.swap(files_for(*leaf_pool[4][:2], pki.ca))
    wait_reload(sc, "certs", True, ev, timeout=3)
    ok, last = wait_serial(port, ctx, leaf_pool[4][2], timeout=1)
    assert ok, f"poll-only rotation not served (still {last})"


def test_rotation_to_intermediate_issued_chain(env, pki, leaf_pool, tmp_path_factory):
    """Rotating to a leaf issued by an intermediate (file = leaf + intermediate): the
    sidecar validates it against the root bundle and serves the whole chain."""
    im = Minter(tmp_path_factory.mktemp("mint-int"), str(pki.dir / "int-ca.crt"),
                str(pki.dir / "int-ca.key"))
    crt, key = im.leaf("int-payments-api", "payments", "api")
    chain = Path(crt).read_bytes() + (pki.dir / "int-ca.crt").read_bytes()
    vol = SecretVolume(env.tmp / "secret", files_for(*leaf_pool[5][:2], pki.ca))
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr, identity=vol.identity()), name="intchain")
    ctx = h.client_context(pki, "web-frontend")      # trusts the root only
    ev = sc.event_count()
    vol.swap({"tls.crt": chain, "tls.key": Path(key).read_bytes(),
              "ca.crt": Path(pki.ca).read_bytes()})
    wait_reload(sc, "certs", True, ev)
    ok, last = wait_serial(port, ctx, pem_serial(crt), timeout=2)
    assert ok, f"intermediate-issued leaf not served (still {last})"


def test_not_yet_valid_rotation_is_picked_up_once_valid(env, pki, minter, leaf_pool):
    """A rotated cert whose not_before is a few seconds in the future (issuer clock ahead of
    ours) is refused at first, but the periodic re-check must load it once it is valid:
    otherwise the sidecar keeps serving the old cert until that one expires."""
    vol = SecretVolume(env.tmp / "secret", files_for(*leaf_pool[6][:2], pki.ca))
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr,
                                 identity=vol.identity(poll_interval_ms=1000)), name="skew")
    ctx = h.client_context(pki, "web-frontend")
    now = time.time()
    crt, key = minter.leaf("future-payments-api", "payments", "api", start=now + 3,
                           end=now + 30 * 86400)
    not_before = int(now + 3)
    ev = sc.event_count()
    vol.swap(files_for(crt, key, pki.ca))
    wait_reload(sc, "certs", False, ev, timeout=3)
    assert served_serial(port, ctx) == leaf_pool[6][2]
    # valid from not_before; poll every 1 s -> served by not_before + ~2.5 s
    time.sleep(max(0.0, not_before - time.time()))
    e = sc.wait_for_event("reload ok: kind=certs", 3.5, ev)
    assert e is not None, ("a rotated certificate that was not yet valid is never loaded once it "
                           "becomes valid (poll_interval_ms = 1000); stderr tail:\n"
                           + "\n".join(sc.stderr_lines[-5:]))
    ok, last = wait_serial(port, ctx, pem_serial(crt), timeout=1)
    assert ok, f"now-valid certificate not served (still {last})"


def test_sighup_switches_identity_paths_and_watch_follows(env, pki, leaf_pool):
    vol1 = SecretVolume(env.tmp / "secret1", files_for(*leaf_pool[7][:2], pki.ca))
    vol2 = SecretVolume(env.tmp / "secret2", files_for(*leaf_pool[8][:2], pki.ca))
    app = env.app("echo")
    port = h.free_port()
    cfg = inbound_cfg(pki, port, app.addr, identity=vol1.identity())
    sc = env.sidecar(cfg, name="paths")
    ctx = h.client_context(pki, "web-frontend")
    assert served_serial(port, ctx) == leaf_pool[7][2]
    cfg2 = inbound_cfg(pki, port, app.addr, identity=vol2.identity())
    sc.write_config(cfg2)
    ev = sc.event_count()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    assert served_serial(port, ctx) == leaf_pool[8][2]
    # the watch now follows the new directory
    ev = sc.event_count()
    vol2.swap(files_for(*leaf_pool[9][:2], pki.ca))
    wait_reload(sc, "certs", True, ev, timeout=3)
    ok, last = wait_serial(port, ctx, leaf_pool[9][2], timeout=1)
    assert ok, f"rotation in the new identity directory not served (still {last})"
    # and the old directory no longer matters
    ev = sc.event_count()
    vol1.swap(files_for(*leaf_pool[10][:2], pki.ca))
    time.sleep(0.6)
    assert not sc.events_matching("reload", ev), sc.events_matching("reload", ev)
    assert served_serial(port, ctx) == leaf_pool[9][2]


def test_sighup_tls_settings_and_forward_apply_to_new_connections(env, pki):
    app1, app2 = env.app("echo"), env.app("echo")
    port = h.free_port()
    cfg = inbound_cfg(pki, port, app1.addr)
    sc = env.sidecar(cfg, name="tlsfwd")
    web = h.client_context(pki, "web-frontend")
    web12 = h.client_context(pki, "web-frontend", max_version=ssl.TLSVersion.TLSv1_2)
    held = h.tls_connect(port, web12)         # a TLS 1.2 connection to app1, kept open
    held.sendall(b"one\n")
    assert h.recv_exact(held, 4) == b"one\n"
    assert app1.count() == 1

    cfg2 = inbound_cfg(pki, port, app2.addr)
    cfg2["tls"] = {"min_version": "1.3"}
    sc.write_config(cfg2)
    ev = sc.event_count()
    log0 = len(sc.access_log())
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    expect_served(port, web)
    assert app2.wait_conns(1), "new connection did not go to the new forward address"
    assert app1.count() == 1, "new connection still went to the old forward address"
    expect_refused(sc, port, web12, "protocol", start=log0)
    # the TLS 1.2 connection from before keeps working, still to app1
    held.sendall(b"two\n")
    assert h.recv_exact(held, 4) == b"two\n"
    clean_close(held)


def test_sighup_outbound_expect_change_revokes_upstream(env, pki):
    up = env.upstream("payments-api")
    out_port = h.free_port()

    def cfg_expect(sa):
        return h.base_config(pki, "web-frontend", limits={"revoke_grace_ms": GRACE_MS},
                             outbound=[h.outbound_listener(
                                 "payments", out_port, up.addr,
                                 [{"namespace": "payments", "service_account": sa}])])

    sc = env.sidecar(cfg_expect("api"), name="outrevoke")
    c = socket.create_connection((h.HOST, out_port), timeout=h.T(5))
    c.sendall(b"hello\n")
    assert h.recv_exact(c, 6) == b"hello\n"
    app_port = c.getsockname()[1]
    sc.write_config(cfg_expect("ledger"))
    ev = sc.event_count()
    t_hup = time.monotonic()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    c.settimeout(h.T(GRACE_MS / 1000 + 5))
    try:
        for _ in range(100):
            if not c.recv(4096):
                break
    except OSError:
        pass
    t_closed = time.monotonic() - t_hup
    c.close()
    e = sc.log_for_app_port(app_port, timeout=3)
    assert e is not None, "no access-log line for the revoked outbound connection"
    assert (e["decision"], e["close"], e["reason"]) == ("deny", "revoked", "not_allowed"), e
    assert GRACE_MS / 1000 - 0.15 <= t_closed <= GRACE_MS / 1000 + 4, t_closed


def test_sighup_revokes_connection_whose_handshake_straddles_the_reload(env, pki):
    """A jobs connection that is mid-handshake when SIGHUP removes jobs from the allow list
    must not outlive the grace: either the handshake is refused or the connection is
    revoked after revoke_grace_ms, like every other connection the new policy refuses."""
    app = env.app("echo")
    port = h.free_port()
    sc = env.sidecar(inbound_cfg(pki, port, app.addr,
                                 allow=[{"namespace": "web"}, {"namespace": "jobs"}]),
                     name="straddle")
    ctx = h.client_context(pki, "jobs-scheduler", min_version=ssl.TLSVersion.TLSv1_3)
    sock = socket.create_connection((h.HOST, port), timeout=h.T(5))
    local_port = sock.getsockname()[1]
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="api.payments.svc")
    # ClientHello -> server flight; the client computes its Certificate/Finished flight
    # but we hold it back until the reload has been published
    done = False
    for _ in range(50):
        try:
            obj.do_handshake()
            done = True
            break
        except ssl.SSLWantReadError:
            data = out.read()
            if data:
                sock.sendall(data)
            b = sock.recv(65536)
            if not b:
                raise AssertionError("server closed during the handshake")
            inc.write(b)
    assert done, "handshake did not progress"
    held_flight = out.read()
    assert held_flight, "no client flight to hold back"

    sc.write_config(inbound_cfg(pki, port, app.addr, allow=[{"namespace": "web"}]))
    ev = sc.event_count()
    sc.sighup()
    wait_reload(sc, "config", True, ev)
    t_pub = time.monotonic()
    sock.sendall(held_flight)

    def tls_send(data: bytes):
        obj.write(data)
        sock.sendall(out.read())

    outcome = "open"
    echoed = bytearray()
    sock.settimeout(0.2)
    deadline = t_pub + h.T(GRACE_MS / 1000 + 3)
    try:
        tls_send(b"ping\n")
        while time.monotonic() < deadline:
            try:
                b = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            if not b:
                outcome = "closed"
                break
            inc.write(b)
            try:
                for _ in range(100):
                    r = obj.read(65536)
                    if not r:
                        break
                    echoed += r
            except ssl.SSLWantReadError:
                pass
    except (ssl.SSLError, OSError) as e:
        outcome = f"closed ({type(e).__name__})"
    sock.close()
    assert outcome != "open", (f"a jobs connection whose handshake straddled the policy reload "
                               f"was still open {GRACE_MS / 1000 + 3:.1f}s after the reload "
                               f"(revoke_grace_ms = {GRACE_MS}); the app echoed {bytes(echoed)!r}")
    e = sc.log_for_peer_port(local_port, timeout=3)
    assert e is not None and e["decision"] == "deny" and e["reason"] == "not_allowed", e
    # The handshake finished under the new policy, so the refusal happens before the
    # app is contacted: nothing is echoed and the app never sees a connection.
    assert e["close"] == "refused", e
    assert bytes(echoed) == b"", bytes(echoed)
    assert app.count() == 0, f"the app was contacted ({app.count()} connections)"

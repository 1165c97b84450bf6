"""CLI and config validation: --version, --check, and precise config errors
(`portcullis: FILE:LINE: SETTING: message`, exit 1). Configs are generated here so the
expected line numbers are known exactly."""

from __future__ import annotations

import copy
import subprocess
import re
from pathlib import Path

import pytest

import harness as h


def good_config(pki: h.PKI) -> dict:
    return {
        "trust_domain": "cluster.local",
        "workers": 2,
        "identity": {"cert": pki.crt("payments-api"), "key": pki.key("payments-api"),
                     "ca": pki.ca},
        "tls": {"min_version": "1.2",
                "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
                "curves": "X25519:P-256"},
        "admin": {"listen": "127.0.0.1:25000"},
        "log": {"level": "info", "access": True},
        "limits": {"max_connections": 100, "handshake_timeout_ms": 10000,
                   "connect_timeout_ms": 5000, "idle_timeout_ms": 300000,
                   "drain_timeout_ms": 2000},
        "inbound": [
            {"name": "api", "listen": "127.0.0.1:25443", "forward": "127.0.0.1:28080",
             "protocol": "tcp",
             "allow": [{"namespace": "web"},
                       {"namespace": "jobs", "service_account": "scheduler"}]},
            {"name": "grpc", "listen": "127.0.0.1:25444", "forward": "127.0.0.1:28081",
             "protocol": "tcp", "allow": [{"namespace": "web"}]},
        ],
        "outbound": [
            {"name": "payments", "listen": "127.0.0.1:25001",
             "upstream": "127.0.0.1:35443", "server_name": "api.payments.svc",
             "expect": [{"namespace": "payments", "service_account": "api"}],
             "protocol": "tcp"},
        ],
    }


def free_ports(cfg: dict) -> dict:
    """cfg with every address the binary would bind (listeners, admin) on a free port: for
    the tests that start the binary, so that a run that wrongly got as far as binding
    collides with nothing (the fixed 25xxx ports of good_config() lie in the range the
    harness allocates from, see scripts/portalloc.py)."""
    for lst in cfg.get("inbound", []) + cfg.get("outbound", []):
        lst["listen"] = h.addr(h.free_port())
    if "admin" in cfg:
        cfg["admin"]["listen"] = h.addr(h.free_port())
    return cfg


def write(tmp_path: Path, cfg: dict, name: str = "test.conf") -> tuple[Path, dict]:
    text, lines = h.render_config(cfg)
    p = tmp_path / name
    p.write_text(text)
    return p, lines


def check(path: Path) -> "subprocess.CompletedProcess":
    return h.run_binary("--check", "-c", str(path))


# ------------------------------------------------------------------ good

def test_version(portcullis_bin):
    r = h.run_binary("--version")
    assert r.returncode == 0, f"expected exit 0, got {r.returncode}: {r.stderr}"
    first = r.stdout.strip().splitlines()[0]
    assert re.match(r"^portcullis \d+\.\d+\.\d+ \(.*BoringSSL.*libuv \d+\.\d+\.\d+.*\)", first), \
        f"expected 'portcullis X.Y.Z (... BoringSSL ... libuv X.Y.Z ...)', got {first!r}"


def test_check_good_config(tmp_path, pki, portcullis_bin):
    p, _ = write(tmp_path, good_config(pki))
    r = check(p)
    assert r.returncode == 0, f"expected exit 0, got {r.returncode}: {r.stderr}"


@pytest.mark.parametrize("variant", ["tls13-only", "empty-allow", "workers0", "minimal",
                                     "admission", "small-cap"])
def test_check_good_variants(tmp_path, pki, portcullis_bin, variant):
    cfg = good_config(pki)
    if variant == "tls13-only":
        cfg["tls"]["min_version"] = "1.3"
    elif variant == "empty-allow":
        cfg["inbound"][0]["allow"] = []          # allowed: deny all
    elif variant == "workers0":
        cfg["workers"] = 0
    elif variant == "admission":   # every admission key at its bound
        cfg["limits"].update({"max_pending_handshakes": 100, "handshake_failures_per_source": 1,
                              "throttle_window_ms": 1, "throttle_cooldown_ms": 86400000,
                              "throttle_ipv6_prefix": 48})
    elif variant == "small-cap":   # the 1024 default budget shrinks to fit max_connections
        cfg["limits"]["max_connections"] = 10
    elif variant == "minimal":
        for k in ("tls", "admin", "log", "limits", "workers"):
            del cfg[k]
        del cfg["inbound"][1]
        del cfg["inbound"][0]["protocol"]
    p, _ = write(tmp_path, cfg)
    r = check(p)
    assert r.returncode == 0, f"{variant}: expected exit 0, got {r.returncode}: {r.stderr}"


def test_check_does_not_bind_or_run(tmp_path, pki, portcullis_bin):
    """--check must exit (rather than serve) even though every listen port could be bound;
    the timeout is only a hang bound: a binary that started serving would never exit."""
    cfg = free_ports(good_config(pki))
    p, _ = write(tmp_path, cfg)
    try:
        r = h.run_binary("--check", "-c", str(p), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("expected --check to exit with 0, it kept running (serving?)")
    assert r.returncode == 0, f"expected exit 0, got {r.returncode}: {r.stderr}"


# ------------------------------------------------------------------ bad

def _set(path: str, value):
    """Mutation that sets a dotted path like 'inbound[0].allow[0].namespace'."""
    def mut(cfg, tmp, pki):
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
        obj = cfg
        for part in parts[:-1]:
            obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
        last = parts[-1]
        v = value(tmp, pki) if callable(value) else value
        if last.startswith("["):
            obj[int(last[1:-1])] = v
        else:
            obj[last] = v
    return mut


def _dup_inbound(**changes):
    def mut(cfg, tmp, pki):
        extra = copy.deepcopy(cfg["inbound"][0])
        extra.update(changes)
        cfg["inbound"][1] = extra
    return mut


def _keydir(tmp, pki):
    d = tmp / "key-is-a-directory"
    d.mkdir(exist_ok=True)
    return str(d)


def _garbage_key(tmp, pki):
    p = tmp / "garbage.key"
    p.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all!!\n-----END PRIVATE KEY-----\n")
    return str(p)


# (id, mutation, setting named in the error, alternative settings accepted)
BAD = [
    ("unknown-top-key", _set("bogus", 1), "bogus", ()),
    ("unknown-nested-key", _set("inbound[0].colour", "red"), "inbound[0].colour", ()),
    ("unknown-tls-key-typo", _set("tls.cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"),
     "tls.cipher", ()),
    ("unknown-allow-key", _set("inbound[0].allow[1].serviceaccount", "x"),
     "inbound[0].allow[1].serviceaccount", ()),
    ("wrong-type-workers", _set("workers", "two"), "workers", ()),
    ("wrong-type-limit", _set("limits.max_connections", "many"), "limits.max_connections", ()),
    ("wrong-type-listen", _set("inbound[0].listen", 25443), "inbound[0].listen", ()),
    ("wrong-type-bool", _set("log.access", "yes"), "log.access", ()),
    ("wrong-type-group", _set("identity", "/etc/cert.pem"), "identity", ()),
    ("weak-cipher-cbc-rsa", _set("tls.ciphers", "AES128-SHA"), "tls.ciphers", ()),
    ("weak-cipher-cbc-ecdhe", _set("tls.ciphers", "ECDHE-ECDSA-AES128-SHA"), "tls.ciphers", ()),
    ("weak-cipher-no-ecdhe", _set("tls.ciphers", "AES128-GCM-SHA256"), "tls.ciphers", ()),
    ("weak-cipher-mixed", _set("tls.ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-SHA"),
     "tls.ciphers", ()),
    ("cipher-typo", _set("tls.ciphers", "ECDHE-ECDSA-AES128-GCM-SHA999"), "tls.ciphers", ()),
    ("min-version-1.1", _set("tls.min_version", "1.1"), "tls.min_version", ()),
    ("min-version-1.0", _set("tls.min_version", "1.0"), "tls.min_version", ()),
    ("curve-p521", _set("tls.curves", "P-521"), "tls.curves", ()),
    ("curve-unknown", _set("tls.curves", "X25519:bogus"), "tls.curves", ()),
    ("listen-no-port", _set("inbound[0].listen", "1.2.3.4"), "inbound[0].listen", ()),
    ("listen-bad-host", _set("inbound[0].listen", "x:80"), "inbound[0].listen", ()),
    ("listen-port-range", _set("inbound[0].listen", "127.0.0.1:99999"), "inbound[0].listen", ()),
    ("forward-bad", _set("inbound[0].forward", "not a name:80"), "inbound[0].forward", ()),
    ("upstream-bad", _set("outbound[0].upstream", "127.0.0.1:99999"), "outbound[0].upstream", ()),
    ("outbound-listen-bad", _set("outbound[0].listen", "1.2.3.4"), "outbound[0].listen", ()),
    ("admin-listen-bad", _set("admin.listen", "x:80"), "admin.listen", ()),
    ("duplicate-listener-name", _dup_inbound(listen="127.0.0.1:25445"), "inbound[1].name", ()),
    ("duplicate-listener-name-across", _set("outbound[0].name", "api"), "outbound[0].name", ()),
    ("duplicate-port-inbound", _dup_inbound(name="other"), "inbound[1].listen", ()),
    ("duplicate-port-outbound", _set("outbound[0].listen", "127.0.0.1:25443"),
     "outbound[0].listen", ()),
    ("missing-cert-file", _set("identity.cert", lambda t, p: str(t / "nope.crt")),
     "identity.cert", ()),
    ("missing-ca-file", _set("identity.ca", lambda t, p: str(t / "nope-ca.crt")),
     "identity.ca", ()),
    ("missing-key-file", _set("identity.key", lambda t, p: str(t / "nope.key")),
     "identity.key", ()),
    ("unreadable-key-dir", _set("identity.key", _keydir), "identity.key", ()),
    ("garbage-key", _set("identity.key", _garbage_key), "identity.key", ()),
    ("key-not-matching-cert", _set("identity.key", lambda t, p: p.key("web-frontend")),
     "identity.key", ("identity.cert",)),
    ("namespace-slash", _set("inbound[0].allow[0].namespace", "we/b"),
     "inbound[0].allow[0].namespace", ()),
    ("namespace-dotdot", _set("inbound[0].allow[0].namespace", ".."),
     "inbound[0].allow[0].namespace", ()),
    ("namespace-empty", _set("inbound[0].allow[0].namespace", ""),
     "inbound[0].allow[0].namespace", ()),
    ("service-account-space", _set("inbound[0].allow[1].service_account", "sched uler"),
     "inbound[0].allow[1].service_account", ()),
    ("expect-namespace-bad", _set("outbound[0].expect[0].namespace", "pay%2Fments"),
     "outbound[0].expect[0].namespace", ()),
    ("protocol-unknown", _set("inbound[0].protocol", "udp"), "inbound[0].protocol", ()),
    ("min-version-number", _set("tls.min_version", 1.2), "tls.min_version", ()),
    ("negative-limit", _set("limits.handshake_timeout_ms", -5), "limits.handshake_timeout_ms", ()),
    # issue 14: admission before authentication (good_config's max_connections is 100)
    ("pending-handshakes-zero", _set("limits.max_pending_handshakes", 0),
     "limits.max_pending_handshakes", ()),
    ("pending-handshakes-over-cap", _set("limits.max_pending_handshakes", 101),
     "limits.max_pending_handshakes", ()),
    ("pending-handshakes-type", _set("limits.max_pending_handshakes", "many"),
     "limits.max_pending_handshakes", ()),
    ("failures-per-source-zero", _set("limits.handshake_failures_per_source", 0),
     "limits.handshake_failures_per_source", ()),
    ("throttle-window-zero", _set("limits.throttle_window_ms", 0), "limits.throttle_window_ms",
     ()),
    ("throttle-cooldown-negative", _set("limits.throttle_cooldown_ms", -1),
     "limits.throttle_cooldown_ms", ()),
    ("throttle-cooldown-type", _set("limits.throttle_cooldown_ms", 1.5),
     "limits.throttle_cooldown_ms", ()),
    ("ipv6-prefix-47", _set("limits.throttle_ipv6_prefix", 47), "limits.throttle_ipv6_prefix",
     ()),
    ("ipv6-prefix-129", _set("limits.throttle_ipv6_prefix", 129), "limits.throttle_ipv6_prefix",
     ()),
    ("body-timeout-0", _set("http", {"body_timeout_ms": 0}), "http.body_timeout_ms", ()),
    ("admin-max-connections-0", _set("admin.max_connections", 0), "admin.max_connections", ()),
    ("admin-write-timeout-0", _set("admin.write_timeout_ms", 0), "admin.write_timeout_ms", ()),
    ("admin-write-timeout-type", _set("admin.write_timeout_ms", "10s"),
     "admin.write_timeout_ms", ()),
]


@pytest.mark.parametrize("mutate,setting,alts", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_rejects(tmp_path, pki, portcullis_bin, mutate, setting, alts):
    cfg = good_config(pki)
    mutate(cfg, tmp_path, pki)
    p, lines = write(tmp_path, cfg)
    r = check(p)
    assert r.returncode == 1, \
        f"expected exit 1, got {r.returncode}, stderr: {r.stderr}\nconfig:\n{p.read_text()}"
    names = (setting, *alts)
    pat = re.compile(r"^portcullis: " + re.escape(str(p)) + r":(\d+): ("
                     + "|".join(re.escape(n) for n in names) + r"): \S.*$", re.M)
    m = pat.search(r.stderr)
    assert m, (f"stderr does not match 'portcullis: {p}:LINE: {setting}: msg':\n{r.stderr}"
               f"\nconfig:\n{p.read_text()}")
    named = m.group(2)
    if named in lines:   # the setting is in the file: its line must be reported
        assert int(m.group(1)) == lines[named], \
            f"{named}: reported line {m.group(1)}, it is on line {lines[named]}\n{r.stderr}"


@pytest.mark.parametrize("key,setting", [
    ("trust_domain", "trust_domain"),
    ("identity.key", "identity.key"),
    ("inbound[0].forward", "inbound[0].forward"),
    ("outbound[0].server_name", "outbound[0].server_name"),
    ("outbound[0].expect", "outbound[0].expect"),
])
def test_check_rejects_missing_required(tmp_path, pki, portcullis_bin, key, setting):
    cfg = good_config(pki)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", key)
    obj = cfg
    for part in parts[:-1]:
        obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
    del obj[parts[-1]]
    p, _ = write(tmp_path, cfg)
    r = check(p)
    assert r.returncode == 1, f"expected exit 1, got {r.returncode}: {r.stderr}"
    assert re.search(r"^portcullis: " + re.escape(str(p)) + r":\d+: " + re.escape(setting)
                     + r": \S", r.stderr, re.M), \
        f"expected 'portcullis: {p}:LINE: {setting}: msg', stderr is:\n{r.stderr}"


def test_syntax_error_names_line(tmp_path, pki, portcullis_bin):
    text, lines = h.render_config(good_config(pki))
    rows = text.splitlines()
    bad_line = lines["limits.idle_timeout_ms"]
    rows[bad_line - 1] = "  idle_timeout_ms = 300000"        # missing ';'
    rows.insert(bad_line, "  drain_timeout_ms = = 5;")      # and then garbage
    p = tmp_path / "syntax.conf"
    p.write_text("\n".join(rows) + "\n")
    r = check(p)
    assert r.returncode == 1, f"expected exit 1, got {r.returncode}: {r.stderr}"
    m = re.search(r"^portcullis: " + re.escape(str(p)) + r":(\d+): ", r.stderr, re.M)
    assert m, f"expected 'portcullis: {p}:LINE: ...', stderr is:\n{r.stderr}"
    assert int(m.group(1)) in (bad_line, bad_line + 1), \
        f"expected line {bad_line} or {bad_line + 1}, stderr is:\n{r.stderr}"


def test_missing_config_file(tmp_path, portcullis_bin):
    p = tmp_path / "does-not-exist.conf"
    r = check(p)
    assert r.returncode == 1, f"expected exit 1, got {r.returncode}: {r.stderr}"
    assert str(p) in r.stderr, f"expected the error to name {p}, stderr is:\n{r.stderr}"


def test_run_mode_rejects_bad_config_too(tmp_path, pki, portcullis_bin):
    cfg = free_ports(good_config(pki))
    cfg["tls"]["min_version"] = "1.1"
    p, lines = write(tmp_path, cfg)
    try:
        r = h.run_binary("-c", str(p), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("expected the binary to refuse the bad config with exit 1, it kept running")
    assert r.returncode == 1, f"expected exit 1, got {r.returncode}: {r.stderr}"
    want = f"{p}:{lines['tls.min_version']}: tls.min_version:"
    assert want in r.stderr, f"expected {want!r} in stderr:\n{r.stderr}"

"""Inbound listener: mTLS termination, identity checks, allow-lists, TLS pinning,
no TLS 1.2 session resumption. Real binary, real TLS clients (Python ssl, openssl s_client)."""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
from types import SimpleNamespace

import pytest

import harness as h
import httpkit as hk

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
# Alerts a client may see for "you are not allowed" (DESIGN.md: access_denied or
# certificate_unknown), as OpenSSL spells them in its error strings.
NOT_ALLOWED_ALERTS = ("access denied", "certificate unknown")


@pytest.fixture(scope="module")
def inb(module_env):
    """One sidecar (identity payments-api) with two inbound listeners:
       api    -> echo app, allow namespace web + jobs/scheduler
       selfns -> echo app2, allow namespace payments (its own namespace, listed)"""
    pki = module_env.pki
    app = module_env.app("echo")
    app_self = module_env.app("echo")
    p_api, p_self = h.free_port(), h.free_port()
    cfg = h.base_config(pki, "payments-api", inbound=[
        h.inbound_listener("api", p_api, app.addr,
                           [{"namespace": "web"},
                            {"namespace": "jobs", "service_account": "scheduler"}]),
        h.inbound_listener("selfns", p_self, app_self.addr, [{"namespace": "payments"}]),
    ])
    sc = module_env.sidecar(cfg, name="inbound")
    return SimpleNamespace(sc=sc, app=app, app_self=app_self, port=p_api, port_self=p_self,
                           pki=pki)


def _served_roundtrip(s: ssl.SSLSocket, payload: bytes = b"hello portcullis\n") -> None:
    s.sendall(payload)
    assert h.recv_exact(s, len(payload), timeout=h.PROMPT_S) == payload


def _assert_refused(inb, stem, reason, *, max_version=None, alerts=None, port=None,
                    app=None):
    """Connect with pki/<stem> (None = no cert); assert a TLS-level refusal, the access-log
    reason, and that the app behind the listener saw no connection."""
    port = port or inb.port
    app = app or inb.app
    before = app.count()
    ctx = h.client_context(inb.pki, stem, max_version=max_version)
    r = h.attempt_tls(port, ctx)
    if not isinstance(r, h.Refusal):
        r.close()
        pytest.fail(f"{stem}: connection was SERVED (echo came back), expected refusal {reason}")
    assert r.kind == "ssl", f"{stem}: expected a TLS alert / handshake failure, got {r}"
    assert r.got_data == b""
    if alerts:
        assert any(a in r.error for a in alerts), f"{stem}: alert {r.error!r} not in {alerts}"
    e = inb.sc.log_for_peer_port(r.local_port, timeout=h.PROMPT_S)
    assert e is not None, (f"{stem}: no access-log line for peer port {r.local_port}; "
                           f"log tail {inb.sc.access_log()[-3:]}")
    h.check_access_entry(e)
    assert e["decision"] == "deny", e
    assert e["reason"] == reason, e
    assert e["direction"] == "inbound", e
    time.sleep(0.2 * h.SCALE)  # give a (buggy) forward connect a chance to show up
    assert app.count() == before, f"{stem}: the app was contacted ({app.count() - before} conns)"
    return r, e


# ------------------------------------------------------------------ allowed traffic

def test_allowed_peer_64mib_echo_both_ways(inb):
    n = 64 << 20
    data = h.pattern_bytes(n, seed=1)
    want = h.sha256(data)
    before = inb.app.count()
    ctx = h.client_context(inb.pki, "web-frontend")
    s = h.tls_connect(inb.port, ctx)
    local_port = s.getsockname()[1]
    try:
        assert s.version() == "TLSv1.3"
        got, digest = h.duplex(s, data, n, timeout=90)
        # close_notify first: a bare FIN is a truncation, which resets the app (README)
        s.unwrap()
    finally:
        s.close()
    assert got == n
    assert digest == want, "echoed data differs from what was sent"
    assert inb.app.wait_conns(before + 1)
    rec = inb.app.conns[before]
    assert rec.done.wait(h.T(10)), "app connection not closed after client closed"
    assert rec.bytes_in == n and rec.sha256_in == want, "app received different bytes"
    assert rec.eof, "app did not see EOF after the client closed"
    e = inb.sc.log_for_peer_port(local_port, timeout=h.PROMPT_S)
    assert e is not None
    h.check_access_entry(e)
    assert e["decision"] == "allow" and e["reason"] is None, e
    assert e["listener"] == "api" and e["direction"] == "inbound", e
    assert e["peer_id"] == h.spiffe("web", "frontend"), e
    assert e["app"] == inb.app.addr, e
    assert e["bytes_from_peer"] == n and e["bytes_to_peer"] == n, e
    assert "1.3" in str(e["tls_version"]), e


@pytest.mark.parametrize("stem,ns,sa", [
    ("web-frontend", "web", "frontend"),
    ("web-admin", "web", "admin"),            # namespace-only entry: any SA in web
    ("jobs-scheduler", "jobs", "scheduler"),  # namespace + SA entry
    ("web-viaint", "web", "frontend"),        # leaf + intermediate in the client's chain
])
@pytest.mark.parametrize("maxv", [TLS13, TLS12], ids=["tls13", "tls12"])
def test_allowed_identities(inb, stem, ns, sa, maxv):
    ctx = h.client_context(inb.pki, stem, max_version=maxv)
    s = h.tls_connect(inb.port, ctx)
    port = s.getsockname()[1]
    try:
        _served_roundtrip(s)
        assert s.version() == ("TLSv1.3" if maxv == TLS13 else "TLSv1.2")
        if maxv == TLS12:
            assert s.cipher()[0].startswith("ECDHE-") and ("GCM" in s.cipher()[0]
                                                          or "CHACHA20" in s.cipher()[0])
    finally:
        s.close()
    e = inb.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None and e["decision"] == "allow", e
    assert e["peer_id"] == h.spiffe(ns, sa), e


# ------------------------------------------------------------------ refused certificates

BAD_CERTS = [
    (None, "no_cert"),
    ("bad-other-ca", "bad_chain"),
    ("bad-self-signed", "bad_chain"),
    ("bad-server-only", "bad_chain"),
    ("bad-ca-leaf", "bad_chain"),
    ("deep-chain", "bad_chain"),
    ("bad-expired", "expired"),
    ("bad-not-yet-valid", "expired"),
    ("bad-two-uris", "no_spiffe_id"),
    ("bad-no-uri", "no_spiffe_id"),
    ("bad-malformed-id", "no_spiffe_id"),
    ("bad-not-spiffe", "no_spiffe_id"),
    ("bad-wrong-td", "wrong_trust_domain"),
]


@pytest.mark.parametrize("stem,reason", BAD_CERTS, ids=[str(s) for s, _ in BAD_CERTS])
def test_bad_client_cert_refused_tls13(inb, stem, reason):
    _assert_refused(inb, stem, reason, max_version=TLS13)


def test_client_only_eku_leaf_refused(inb):
    """SPIFFE X509-SVID (LIBRARY-FACTS.md): if a leaf has an EKU it must hold BOTH serverAuth
    and clientAuth. bad-client-only (clientAuth only) is refused as an upstream (bad_chain,
    test_outbound.py); the same SVID rule applies to a client."""
    _assert_refused(inb, "bad-client-only", "bad_chain", max_version=TLS13)


def test_missing_intermediate_refused(inb, tmp_path):
    """web-viaint leaf WITHOUT its intermediate does not chain to the trust bundle."""
    pem = open(inb.pki.crt("web-viaint")).read()
    leaf_only = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    crt = tmp_path / "leaf-only.crt"
    crt.write_text(leaf_only + "\n")
    ctx = h.client_context(inb.pki, None)
    ctx.load_cert_chain(str(crt), inb.pki.key("web-viaint"))
    before = inb.app.count()
    r = h.attempt_tls(inb.port, ctx)
    assert isinstance(r, h.Refusal) and r.kind == "ssl", r
    e = inb.sc.log_for_peer_port(r.local_port, timeout=h.PROMPT_S)
    assert e is not None and e["decision"] == "deny" and e["reason"] == "bad_chain", e
    assert inb.app.count() == before


def _unparsable_copy(pem: str) -> str:
    """pem's first certificate with its version field set to 4 (INTEGER 3): OpenSSL still
    loads and sends it, BoringSSL's X509 parser refuses it (only v1-v3 exist)."""
    body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    der = bytearray(base64.b64decode("".join(body.split())))
    at = der.find(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))  # tbs [0] EXPLICIT { INTEGER 2 }
    assert 0 < at < 16, "version field not found where a v3 certificate has it"
    der[at + 4] = 0x03
    return ssl.DER_cert_to_PEM_cert(bytes(der))


def test_unparsable_chain_cert_refused(inb, tmp_path):
    """A certificate in the client's chain that does not parse refuses the peer as bad_chain,
    even when the rest of the chain verifies without it: BoringSSL (buffers only) hands the
    verify callback the DER, and nothing is skipped. Log, metric, and nothing at the app."""
    pem = open(inb.pki.crt("web-viaint")).read()  # leaf + int-ca: verifies on its own
    crt = tmp_path / "viaint-plus-broken.crt"
    crt.write_text(pem + _unparsable_copy(open(inb.pki.crt("int-ca")).read()))
    ctx = h.client_context(inb.pki, None, max_version=TLS13)
    ctx.load_cert_chain(str(crt), inb.pki.key("web-viaint"))
    lab = {"listener": "api", "direction": "inbound", "decision": "deny", "reason": "bad_chain"}
    before, app_before = hk.scrape(inb.sc).get("portcullis_connections_total", **lab), \
        inb.app.count()
    r = h.attempt_tls(inb.port, ctx)
    if not isinstance(r, h.Refusal):
        r.close()
        pytest.fail("a chain with an unparsable certificate was served")
    assert r.kind == "ssl" and r.got_data == b"", r
    e = inb.sc.log_for_peer_port(r.local_port, timeout=h.PROMPT_S)
    assert e is not None and e["decision"] == "deny" and e["reason"] == "bad_chain", e
    hk.wait_metric(inb.sc, "portcullis_connections_total", lambda v: v == before + 1,
                   timeout=h.PROMPT_S, **lab)
    time.sleep(0.2 * h.SCALE)  # give a (buggy) forward connect a chance to show up
    assert inb.app.count() == app_before, "the app was contacted"


@pytest.mark.parametrize("stem,reason", [
    (None, "no_cert"), ("bad-other-ca", "bad_chain"), ("bad-expired", "expired"),
    ("bad-ca-leaf", "bad_chain"), ("bad-two-uris", "no_spiffe_id"),
    ("bad-wrong-td", "wrong_trust_domain"),
], ids=lambda v: str(v))
def test_bad_client_cert_refused_tls12(inb, stem, reason):
    r, _ = _assert_refused(inb, stem, reason, max_version=TLS12)
    assert r.stage == "handshake", f"TLS 1.2 refusal should fail the handshake itself: {r}"


@pytest.mark.parametrize("maxv", [TLS13, TLS12], ids=["tls13", "tls12"])
@pytest.mark.parametrize("stem,peer_id", [
    ("evil-intruder", h.spiffe("evil", "intruder")),   # namespace not listed
    ("jobs-worker", h.spiffe("jobs", "worker")),       # jobs listed only for sa scheduler
    ("payments-api", h.spiffe("payments", "api")),     # the sidecar's own ns, not listed
])
def test_not_allowed(inb, stem, peer_id, maxv):
    _, e = _assert_refused(inb, stem, "not_allowed", max_version=maxv,
                           alerts=NOT_ALLOWED_ALERTS)
    assert e["peer_id"] == peer_id, e


def test_own_namespace_allowed_only_when_listed(inb):
    # Refused on "api" (tested above); served on "selfns" which lists payments.
    ctx = h.client_context(inb.pki, "payments-api")
    s = h.tls_connect(inb.port_self, ctx)
    port = s.getsockname()[1]
    try:
        _served_roundtrip(s)
    finally:
        s.close()
    e = inb.sc.log_for_peer_port(port, timeout=h.PROMPT_S)
    assert e is not None and e["decision"] == "allow" and e["listener"] == "selfns", e
    # ... and web, allowed on "api", is not allowed on "selfns"
    _assert_refused(inb, "web-frontend", "not_allowed", port=inb.port_self, app=inb.app_self)


# ------------------------------------------------------------------ protocol / cipher pinning

def _s_client_refused(inb, args, reason):
    start = len(inb.sc.access_log())
    before = inb.app.count()
    pki = inb.pki
    # stdin stays open until s_client gives up on the refused handshake (or, refusal
    # missing, the ping comes back)
    r = h.openssl_s_client(inb.port, "-cert", pki.crt("web-frontend"), "-key",
                       pki.key("web-frontend"), "-CAfile", pki.ca, *args,
                       stdin_data=b"ping\n", until=lambda out: "ping" in out)
    out = r.stdout + r.stderr
    assert "no protocols available" not in out, "the client never sent a ClientHello:\n" + out
    e = inb.sc.wait_for_log(lambda x: x.get("reason") == reason, timeout=h.PROMPT_S, start=start)
    assert e is not None, (f"no access-log line with reason {reason}; new lines: "
                           f"{inb.sc.access_log()[start:]}\ns_client:\n{out}")
    h.check_access_entry(e)
    assert e["decision"] == "deny", e
    assert r.returncode != 0 or "Cipher is (NONE)" in out, out
    assert "ping" not in r.stdout.split("---")[-1], "app data came back"
    assert inb.app.count() == before


LOWSEC = "DEFAULT:@SECLEVEL=0"


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_old_tls_versions_refused(inb, flag):
    _s_client_refused(inb, [flag, "-cipher", LOWSEC], "protocol")


@pytest.mark.parametrize("cipher", ["AES128-GCM-SHA256",        # no ECDHE
                                    "ECDHE-ECDSA-AES128-SHA"])  # not AEAD
def test_weak_tls12_ciphers_refused(inb, cipher):
    _s_client_refused(inb, ["-tls1_2", "-cipher", cipher + ":@SECLEVEL=0"], "cipher")


def test_s_client_strong_tls12_cipher_served(inb):
    """Positive control for the s_client invocations above."""
    pki = inb.pki
    r = h.openssl_s_client(inb.port, "-cert", pki.crt("web-frontend"), "-key",
                       pki.key("web-frontend"), "-CAfile", pki.ca, "-tls1_2",
                       "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256",
                       stdin_data=b"strong-cipher-ping\n",
                       until=lambda out: "strong-cipher-ping" in out)
    assert "strong-cipher-ping" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ no TLS 1.2 session resumption
# TLS 1.3 resumes (tls.resumption, on by default) and is re-judged: test_resumption.py.

@pytest.mark.parametrize("flag", ["-tls1_2"])
def test_s_client_session_not_resumed(inb, tmp_path, flag):
    pki = inb.pki
    sess = tmp_path / "sess.pem"
    common = ["-cert", pki.crt("web-frontend"), "-key", pki.key("web-frontend"),
              "-CAfile", pki.ca, flag]
    # stdin stays open until the echo is back: a ticket the sidecar sent would precede it
    r1 = h.openssl_s_client(inb.port, *common, "-sess_out", str(sess),
                        stdin_data=b"sess-one-echo\n", until=lambda out: "sess-one-echo" in out)
    assert "sess-one-echo" in r1.stdout, "no echo on the first connection:\n" + r1.stdout \
        + r1.stderr
    assert "New, TLSv1." in r1.stdout, r1.stdout + r1.stderr
    assert "Verify return code: 0" in r1.stdout, r1.stdout
    assert "TLS session ticket" not in r1.stdout, "server issued a session ticket:\n" + r1.stdout
    if flag == "-tls1_2":
        m = re.search(r"Session-ID: *([0-9A-F]*)", r1.stdout)
        assert m and m.group(1) == "", "server assigned a resumable TLS 1.2 session ID"
    if not sess.exists():
        # s_client writes -sess_out only when it holds a resumable session (a TLS 1.3
        # ticket, or a TLS 1.2 session ID / ticket). No file == nothing to resume.
        return
    r2 = h.openssl_s_client(inb.port, *common, "-sess_in", str(sess),
                        stdin_data=b"sess-two-echo\n", until=lambda out: "sess-two-echo" in out)
    out = r2.stdout
    assert "Reused, TLSv1." not in out, "session was RESUMED:\n" + out
    assert "New, TLSv1." in out, out + r2.stderr


@pytest.mark.parametrize("maxv", [TLS12], ids=["tls12"])
def test_python_session_not_resumed(inb, maxv):
    ctx = h.client_context(inb.pki, "web-frontend", max_version=maxv)
    s1 = h.tls_connect(inb.port, ctx)
    try:
        # a TLS 1.3 ticket (if any) precedes the echo on the wire: after the first round
        # trip the client has processed it (the second one is for good measure)
        _served_roundtrip(s1)
        _served_roundtrip(s1)
        sess = s1.session
        p1 = s1.getsockname()[1]
    finally:
        s1.close()
    s2 = h.tls_connect(inb.port, ctx, session=sess)
    try:
        p2 = s2.getsockname()[1]
        assert s2.session_reused is False, "server resumed a saved session"
        _served_roundtrip(s2)
    finally:
        s2.close()
    for p in (p1, p2):
        e = inb.sc.log_for_peer_port(p, timeout=h.PROMPT_S)
        assert e is not None and e["decision"] == "allow", e
        assert e["peer_id"] == h.spiffe("web", "frontend"), e


# ------------------------------------------------------------------ log hygiene (runs last)

def test_zz_access_log_well_formed(inb):
    log = inb.sc.access_log()
    assert len(log) >= 20, f"expected many access-log lines, got {len(log)}"
    for e in log:
        h.check_access_entry(e)
    assert not inb.sc.bad_stdout, inb.sc.bad_stdout[:5]
    # server events on stderr are JSON lines with time/level/msg
    assert inb.sc.events, "no JSON events on stderr"
    for line in inb.sc.stderr_lines:
        ev = json.loads(line)
        assert {"time", "level", "msg"} <= set(ev), ev
        assert ev["level"] in ("debug", "info", "warn", "error"), ev
    ready = [ev for ev in inb.sc.events if ev["msg"] == "ready"]
    assert len(ready) == 1, ready
    inb.sc.assert_alive()

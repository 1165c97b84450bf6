"""Credentials bind every request, pooled connections included (issue 14, item 2).

An outbound HTTP listener keeps connections to its upstream (HTTP/1.1 keep-alive pool, or
shared HTTP/2 connections). Once the upstream's certificate has expired for longer than
limits.revoke_grace_ms, no new request may ride such a connection: it is closed instead of
reused, counted in portcullis_http_upstream_expired_total, and the next request makes a new
handshake, which refuses the expired upstream ("expired", 502, decision deny).

The upstream is a real portcullis inbound sidecar whose identity is a freshly minted
payments/api certificate that expires a few seconds after the pair is up. The one wait on
the wall clock is the test condition itself: the certificate's notAfter plus the grace.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import pytest

import harness as h
import httpkit as hk
from httpkit import HttpConn, req

GRACE_MS = int(round(h.T(1.0) * 1000))


def _pair(env, pki, upstream_protocol: str, crt: str, key: str, tag: str):
    """app <- inbound sidecar (identity crt/key) <- outbound sidecar (pooled, expects
    payments/api) <- plain HTTP client."""
    app = hk.HttpApp(name=f"credapp-{tag}")
    env.apps.append(app)
    p_in, p_out = h.free_port(), h.free_port()
    cfg_in = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", p_in, app.addr, [{"namespace": "web"}], protocol="http")])
    cfg_in["identity"] = {"cert": crt, "key": key, "ca": pki.ca}
    up = env.sidecar(cfg_in, name=f"cred-up-{tag}")
    out = h.outbound_listener("pay", p_out, h.addr(p_in),
                              [{"namespace": "payments", "service_account": "api"}],
                              protocol="http")
    out["upstream_protocol"] = upstream_protocol
    cfg_out = h.base_config(pki, "web-frontend", workers=1, outbound=[out],
                            limits={"revoke_grace_ms": GRACE_MS})
    sc = env.sidecar(cfg_out, name=f"cred-out-{tag}")
    return app, up, sc, p_out


def _get(port: int, path: str):
    c = HttpConn.plain(port)
    try:
        c.send(req("GET", path, host="api.payments.svc"))
        return c.read_response()
    finally:
        c.close()


@pytest.mark.parametrize("upstream_protocol", ["http/1.1", "h2"])
def test_no_request_rides_a_pooled_connection_past_the_upstreams_expiry(env, pki,
                                                                        upstream_protocol):
    tag = upstream_protocol.replace("/", "").replace(".", "")
    # The first request must be served while the certificate is still valid: mint it with
    # a few seconds left, and again with more if the pair took long to come up.
    for margin in (h.T(6), h.T(20), h.T(60)):
        crt, key = h.mint_leaf(pki, env.tmp / f"mint-{tag}-{int(margin)}", f"short-api-{tag}",
                               "payments", "api", time.time() + margin)
        not_after = h.not_after(crt)
        app, up, sc, port = _pair(env, pki, upstream_protocol, crt, key, f"{tag}{int(margin)}")
        r = _get(port, "/first")
        if time.time() < not_after - 1:
            break
        up.kill()
        sc.kill()
    assert r.status == 200, (r.status, r.body[:200])
    assert time.time() < not_after - 1, "could not serve a request before the certificate expired"
    m = hk.scrape(sc)
    assert m.get("portcullis_http_upstream_connects_total", listener="pay") == 1
    seen = app.nreq()

    # The test condition: past notAfter + the grace (seconds resolution, plus one).
    time.sleep(max(0.0, not_after + GRACE_MS / 1000 + 1.2 - time.time()))
    r2 = _get(port, "/second")
    assert r2.status == 502, f"expected 502 past the upstream's expiry, got {r2.status}"
    assert r2.json()["reason"] == "expired", r2.json()
    assert app.nreq() == seen, "a request reached the app over an expired upstream's connection"
    hk.wait_metric(sc, "portcullis_http_upstream_expired_total", lambda v: v >= 1, listener="pay")
    line = sc.wait_for_log(lambda e: e.get("path") == "/second")
    assert (line["status"], line["decision"], line["reason"]) == (502, "deny", "expired"), line
    assert sc.wait_for_event("expired") is not None, "no server event about the expiry"


def _short_intermediate(pki: h.PKI, out: Path, end: float) -> tuple[str, str]:
    """An intermediate CA signed by the session root, valid from an hour ago until end
    (openssl ca, the way certs/gen-dev-pki.sh issues its CAs)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "newcerts").mkdir(exist_ok=True)
    (out / "index.txt").write_text("")
    (out / "ca.cnf").write_text(
        "[ ca ]\ndefault_ca = d\n[ d ]\n"
        f"dir = {out}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/newcerts\n"
        "serial = $dir/serial\nunique_subject = no\ndefault_md = sha256\npolicy = p\n"
        "copy_extensions = none\n"
        "[ p ]\ncommonName = supplied\n"
        "[ ext ]\nbasicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n")
    key, csr, crt = out / "int.key", out / "int.csr", out / "int.crt"
    for cmd in (["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-noenc", "-keyout", str(key), "-subj",
                 "/CN=short-lived intermediate", "-out", str(csr)],
                ["openssl", "ca", "-config", str(out / "ca.cnf"), "-batch", "-notext",
                 "-rand_serial", "-cert", pki.ca, "-keyfile", str(pki.dir / "ca.key"),
                 "-startdate", h.gtime(time.time() - 3600), "-enddate", h.gtime(end),
                 "-extfile", str(out / "ca.cnf"), "-extensions", "ext", "-in", str(csr),
                 "-out", str(crt)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (cmd, r.stderr)
    return str(crt), str(key)


def test_trust_bundle_expiry_ends_connections_the_peer_chain_went_through(env, pki):
    """A peer sends only its (long-lived) leaf; the intermediate it chains through sits in
    our trust bundle and expires first. The connection ends at the intermediate's notAfter
    plus the grace, as it would at the leaf's, and the verified-chain cache (a second
    connection with the same chain) honours that date too."""
    for margin in (h.T(6), h.T(20), h.T(60)):
        d = env.tmp / f"int-{int(margin)}"
        int_crt, int_key = _short_intermediate(pki, d, time.time() + margin)
        int_not_after = h.not_after(int_crt)
        r = subprocess.run(["bash", str(h.PKI_SCRIPT), "--leaf", str(d), int_crt, int_key,
                            "viaint", "web", "frontend", h.TRUST_DOMAIN],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert h.not_after(str(d / "viaint.crt")) > int_not_after + 86400, "leaf outlives the CA"
        bundle = d / "bundle.pem"
        bundle.write_bytes(Path(pki.ca).read_bytes() + Path(int_crt).read_bytes())
        app = env.app("echo")
        port = h.free_port()
        cfg = h.base_config(pki, "payments-api", workers=1, limits={"revoke_grace_ms": GRACE_MS},
                            inbound=[h.inbound_listener("api", port, app.addr,
                                                        [{"namespace": "web"}])])
        cfg["identity"]["ca"] = str(bundle)
        sc = env.sidecar(cfg, name=f"bundle-expiry-{int(margin)}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca)
        ctx.load_cert_chain(str(d / "viaint.crt"), str(d / "viaint.key"))  # leaf only
        ctx.check_hostname = False
        socks = []
        for _ in range(2):  # the second one's verdict comes from the verified-chain cache
            s = h.tls_connect(port, ctx)
            s.sendall(b"hello\n")
            assert h.recv_exact(s, 6) == b"hello\n"
            socks.append(s)
        if time.time() < int_not_after - 1:
            break
        for s in socks:
            s.close()
        sc.kill()
    assert time.time() < int_not_after - 1, "could not connect before the intermediate expired"
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        # the connection must end by itself after notAfter + grace (never before); the
        # bound only tells "ended as designed" from "never ended"
        s.settimeout(max(1.0, int_not_after - time.time()) + GRACE_MS / 1000 + h.T(30))
        got = b""
        try:
            got = s.recv(1)
        except TimeoutError:
            pytest.fail("the connection outlived its trust-bundle intermediate's expiry")
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        ended = time.time()
        assert got == b"", "the app wrote something?"
        assert ended >= int_not_after + GRACE_MS / 1000 - 1, \
            f"closed {int_not_after + GRACE_MS / 1000 - ended:.1f}s before notAfter + grace"
        s.close()
    for p in ports:
        line = sc.wait_for_log(lambda e, p=p: e.get("peer", "").endswith(f":{p}"))
        assert line is not None, f"no access-log line for the connection from port {p}"
        assert (line["decision"], line["close"], line["reason"]) == \
            ("deny", "revoked", "expired"), line

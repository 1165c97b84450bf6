"""Outside eyes on the TLS posture: testssl.sh scans a real inbound listener (README "Tests").

One sidecar (payments-api) with an HTTP inbound listener in front of an HTTP app, allow-list
namespace web. testssl.sh, Debian 12's 3.0.8, scans it twice:

* with the harness's web/frontend identity (``-p -E -U -S``): handshakes complete, so the
  checks that need a whole connection (client-initiated renegotiation, BREACH, session
  resumption) run instead of being skipped for client authentication. Asserted from its
  JSON (``--jsonfile-pretty``), never from its text: TLS 1.2 and 1.3 offered and nothing
  older; every offered suite ECDHE (TLS 1.3: an ECDHE group) with an AEAD; every
  vulnerability check present and OK or INFO; no TLS 1.2 session resumption.
* without a certificate (``-H``): testssl itself reports certificate-based client
  authentication.

Python's ssl then shows directly that a client without a certificate is refused.

Testssl 3.0.8 has no ``--mtls`` (3.2 added it). Every TLS handshake it completes is an
``openssl s_client`` run through its ``--openssl`` binary, so the scan gets its client
identity from a wrapper that adds ``-cert``/``-key`` to ``s_client`` and passes everything
else to the system openssl untouched; its own raw-socket probes (protocols, ciphers,
Heartbleed, CCS, ROBOT...) only need the server's first flight and never send a
certificate. The sidecar's access log shows the identity arriving.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import harness as h
import httpkit as hk

TESTSSL = shutil.which("testssl") or "/usr/bin/testssl"
SYSTEM_OPENSSL = "/usr/bin/openssl"
CLIENT = "web-frontend"
CLIENT_ID = h.spiffe("web", "frontend")

# Suites a listener with the default tls.ciphers and the harness's ECDSA P-256 certificate
# may pick, by testssl's hexcode: TLS 1.2 ECDHE-ECDSA with AES-GCM or ChaCha20-Poly1305 (the
# ECDHE-RSA ones need an RSA key), and the three fixed TLS 1.3 AEAD suites.
TLS12_SUITES = {"xc02b", "xc02c", "xcca9"}
TLS13_SUITES = {"x1301", "x1302", "x1303"}
TLS12_IANA = re.compile(
    r"TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_(128|256)_GCM|CHACHA20_POLY1305)_SHA(256|384)")
TLS13_IANA = re.compile(r"TLS_(AES_(128|256)_GCM|CHACHA20_POLY1305)_SHA(256|384)")
AEAD = {"AESGCM", "ChaCha20"}

# Every check -U runs in testssl 3.0.8: the scan must have produced each one.
VULNERABILITY_IDS = {
    "heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego",
    "CRIME_TLS", "BREACH", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN",
    "LOGJAM", "BEAST", "LUCKY13", "RC4",
}
# Vulnerability ids whose severity may be other than OK/INFO because the check does not apply
# to this server (id -> why). Empty: on this listener every check applies and passes.
NOT_APPLICABLE: dict[str, str] = {}

OFFERED = {"TLS1_2", "TLS1_3"}
NOT_OFFERED = {"SSLv2", "SSLv3", "TLS1", "TLS1_1"}


def _openssl_wrapper(path: Path, cert: str | None, key: str | None,
                     extra: tuple[str, ...] = ()) -> Path:
    """An --openssl binary for testssl: s_client gets cert/key (and extra) before testssl's
    own arguments; every other subcommand is the system openssl as it is."""
    args = (("-cert", cert, "-key", key) if cert else ()) + extra
    add = " ".join(f"'{a}'" for a in args)
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = s_client ]; then\n'
                    f'  shift; exec {SYSTEM_OPENSSL} s_client {add} "$@"\n'
                    "fi\n"
                    f'exec {SYSTEM_OPENSSL} "$@"\n')
    path.chmod(0o755)
    return path


def _testssl(workdir: Path, name: str, port: int, openssl: Path, *checks: str) -> SimpleNamespace:
    """Runs testssl on 127.0.0.1:port; returns its exit code, output, and the one scanResult
    of its pretty JSON (raises if it wrote none, or scanned something else)."""
    out = workdir / f"{name}.json"
    # Per connection attempt, not for the scan: bounds for a hang, far above any real
    # handshake.
    per_try = str(int(h.T(30)))
    cmd = [TESTSSL, "--quiet", "--color", "0", "--warnings", "batch", "--nodns", "none",
           "--openssl", str(openssl), "--connect-timeout", per_try, "--openssl-timeout", per_try,
           "--jsonfile-pretty", str(out), *checks, f"{h.HOST}:{port}"]
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=h.T(900))
    (workdir / f"{name}.txt").write_text(p.stdout + p.stderr)
    tail = (p.stdout + p.stderr)[-3000:]
    assert out.exists(), f"testssl wrote no JSON (rc={p.returncode}):\n{tail}"
    doc = json.loads(out.read_text())
    results = doc.get("scanResult") or []
    assert len(results) == 1, f"expected one scan result, got {results!r}\n{tail}"
    res = results[0]
    # A scan that could not start is one finding, id scanProblem, severity FATAL.
    assert res.get("id") != "scanProblem", f"testssl could not scan: {res}\n{tail}"
    assert res.get("ip") == h.HOST and str(res.get("port")) == str(port), res
    # A scan that ran to its end records its duration; an aborted one says so instead.
    assert isinstance(doc.get("scanTime"), int), f"scan did not finish: {doc.get('scanTime')!r}"
    return SimpleNamespace(rc=p.returncode, doc=doc, res=res, text=tail)


def _by_id(res: dict, section: str) -> dict[str, dict]:
    findings = res.get(section)
    assert isinstance(findings, list) and findings, f"no {section!r} findings in {res.keys()}"
    return {f["id"]: f for f in findings}


@pytest.fixture(scope="module")
def scan(module_env, tmp_path_factory):
    """The sidecar, its app, and testssl's full scan of the listener with a client identity.
    Runs once, before any test's hang guard starts (a module fixture): testssl takes a
    minute or more."""
    pki = module_env.pki
    app = hk.HttpApp(name="testssl-app")
    module_env.apps.append(app)
    port = h.free_port()
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", port, app.addr, [{"namespace": "web"}], protocol="http")])
    # A scanner's probes (old protocols, weak suites) are handshakes the sidecar refuses:
    # per-source throttling would rightly shut testssl out after 20 of them (README
    # "Admission before authentication"). The scan is of the TLS posture, not of that.
    cfg["limits"]["handshake_failures_per_source"] = 1000000
    sc = module_env.sidecar(cfg, name="testssl")
    work = tmp_path_factory.mktemp("testssl")
    wrapper = _openssl_wrapper(work / "openssl-mtls", pki.crt(CLIENT), pki.key(CLIENT))
    mark = len(sc.access_log())
    r = _testssl(work, "mtls", port, wrapper, "-p", "-E", "-U", "-S")
    return SimpleNamespace(sc=sc, app=app, port=port, pki=pki, work=work, mark=mark, **vars(r))


def test_scan_went_through_mtls_with_the_client_identity(scan):
    """The scan is of the sidecar, with web/frontend: testssl saw the app's HTTP answers
    through it, and the sidecar logged those requests as allowed for that identity."""
    assert scan.res.get("service") == "HTTP", \
        f"testssl did not get through to the app: service {scan.res.get('service')!r}"
    allowed = [e for e in scan.sc.access_log()[scan.mark:]
               if e.get("peer_id") == CLIENT_ID and e.get("decision") == "allow"
               and e.get("method")]
    assert allowed, f"no allowed request from {CLIENT_ID} in the access log"
    for e in allowed:
        hk.check_http_entry(e)
        assert e["tls_version"] in ("TLSv1.2", "TLSv1.3"), e
    assert scan.app.nreq() >= len(allowed)


def test_only_tls12_and_tls13_offered(scan):
    protocols = _by_id(scan.res, "protocols")
    for pid in OFFERED | NOT_OFFERED:
        assert pid in protocols, f"testssl reported nothing for {pid}: {sorted(protocols)}"
    for pid in OFFERED:
        assert protocols[pid]["finding"].startswith("offered"), protocols[pid]
    for pid in NOT_OFFERED:
        assert protocols[pid]["finding"] == "not offered", protocols[pid]


def test_every_offered_suite_is_ecdhe_with_an_aead(scan):
    """-E lists each suite the server accepts, per protocol, as id cipher-<proto>_<hexcode>;
    its finding holds testssl's columns: protocol, hexcode, OpenSSL name, key exchange,
    encryption, bits, IANA name."""
    offered: dict[str, set[str]] = {}
    for f in scan.res.get("cipherTests", []):
        m = re.fullmatch(r"cipher-(\w+)_(x[0-9a-f]+)", f["id"])
        assert m, f"unexpected cipher id {f['id']!r}"
        proto, code = m.groups()
        offered.setdefault(proto, set()).add(code)
        cols = f["finding"].split()
        assert cols[2] == code, f
        assert cols[4] == "ECDH", f"key exchange is not ECDHE: {f}"
        assert cols[6] in AEAD, f"encryption is not an AEAD: {f}"
        iana = TLS12_IANA if proto == "tls1_2" else TLS13_IANA
        assert iana.fullmatch(cols[-1]), f"{proto} suite outside the pinned set: {f}"
    assert set(offered) == {"tls1_2", "tls1_3"}, f"suites offered per protocol: {offered}"
    assert offered["tls1_2"] == TLS12_SUITES, offered
    assert offered["tls1_3"] == TLS13_SUITES, offered


def test_no_vulnerability_flagged(scan):
    vulns = _by_id(scan.res, "vulnerabilities")
    missing = VULNERABILITY_IDS - set(vulns)
    assert not missing, f"checks missing from the scan: {sorted(missing)}"
    flagged = {i: f for i, f in vulns.items()
               if f["severity"] not in ("OK", "INFO") and i not in NOT_APPLICABLE}
    assert not flagged, f"testssl flags: {json.dumps(flagged, indent=1)}"


def test_no_session_resumption(scan):
    """README "Security model": no TLS 1.2 ticket, no session ID (no resumption without a
    fresh key exchange); testssl 3.0.8 tried both with a whole handshake (with client
    authentication in the way it would have said it could not). Its probe is an s_client
    that quits at stdin's end, before a TLS 1.3 ticket (sent after the handshake) arrives, so
    "not supported" here speaks for TLS 1.2 only: TLS 1.3 resumption, on by default and
    re-judged, is test_resumption.py's."""
    defaults = _by_id(scan.res, "serverDefaults")
    assert defaults["sessionresumption_ticket"]["finding"] == "not supported", \
        defaults["sessionresumption_ticket"]
    assert defaults["sessionresumption_ID"]["finding"] in (
        "not supported", "No Session ID, no resumption"), defaults["sessionresumption_ID"]


def test_testssl_reports_client_certificate_required(scan):
    """Without a certificate testssl sees a server that authenticates clients. It tells from
    a CertificateRequest plus a failed s_client, which it can only see in TLS 1.2 (in TLS
    1.3 the client's side of the handshake is over before the server refuses), so this
    scan's s_client runs with -no_tls1_3; its socket probes still see both versions."""
    work = scan.work
    wrapper = _openssl_wrapper(work / "openssl-nocert", None, None, ("-no_tls1_3",))
    mark = len(scan.sc.access_log())
    r = _testssl(work, "nocert", scan.port, wrapper, "-H")
    service = r.res.get("service", "")
    assert "certificate-based authentication" in service, \
        f"testssl did not report client authentication: service {service!r}\n{r.text}"
    e = scan.sc.wait_for_log(lambda e: e.get("reason") == "no_cert", start=mark)
    assert e is not None and e["decision"] == "deny", "the sidecar logged no no_cert refusal"


@pytest.mark.parametrize("maxv", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls12", "tls13"])
def test_python_client_without_certificate_refused(scan, maxv):
    before = scan.app.count()
    r = h.attempt_tls(scan.port, h.client_context(scan.pki, None, max_version=maxv))
    if not isinstance(r, h.Refusal):
        r.close()
        pytest.fail("a client without a certificate was served")
    assert r.kind == "ssl" and r.got_data == b"", r
    e = scan.sc.log_for_peer_port(r.local_port)
    assert e is not None, f"no access-log line for peer port {r.local_port}"
    h.check_access_entry(e)
    assert (e["decision"], e["reason"]) == ("deny", "no_cert"), e
    assert scan.app.count() == before, "the app was contacted"
    # The same client with the identity is served (the refusal is about the certificate).
    s = h.tls_connect(scan.port, h.client_context(scan.pki, CLIENT, max_version=maxv))
    try:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert h.recv_until_eof(s).startswith(b"HTTP/1.1 200 "), "identity not served"
    finally:
        s.close()

"""Tests for certs/gen-dev-pki.sh (the portcullis dev PKI generator).

Run with:  /usr/bin/python3 -m pytest tests/integration/test_pki.py

Everything is checked through the openssl CLI, the same tool the script uses,
but the assertions are about the *properties* SPEC.md asks for (SANs, validity
windows, EKU, CA flags, chain verification outcome, key/cert match), not about
how the script produced them.
"""

import datetime as dt
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "certs" / "gen-dev-pki.sh"
TD = "cluster.local"
FE_URI = f"spiffe://{TD}/ns/web/sa/frontend"
FE_DNS = "frontend.web.svc"

GOOD = ["payments-api", "web-frontend", "web-admin", "jobs-scheduler",
        "jobs-worker", "evil-intruder"]
BAD = ["bad-other-ca", "bad-self-signed", "bad-expired", "bad-not-yet-valid",
       "bad-two-uris", "bad-no-uri", "bad-wrong-td", "bad-server-only",
       "bad-client-only", "bad-ca-leaf", "bad-malformed-id", "bad-not-spiffe"]
CAS = ["ca", "other-ca", "int-ca"]
CHAINED = ["web-viaint", "deep-chain"]
ALL_STEMS = CAS + GOOD + CHAINED + BAD

SERVER_AUTH = "TLS Web Server Authentication"
CLIENT_AUTH = "TLS Web Client Authentication"

# Hang bounds (not performance thresholds: how fast the generator is belongs in bench/).
OPENSSL_TIMEOUT = 60
GEN_TIMEOUT = 50      # twice in one test: within the per-test hang guard (120 s)


# ----------------------------------------------------------------- helpers --

def run(args, check=True, **kw):
    p = subprocess.run(args, capture_output=True, text=True,
                       timeout=OPENSSL_TIMEOUT, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args!r} failed rc={p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def gen(outdir, *extra):
    return subprocess.run([str(SCRIPT), str(outdir), *extra],
                          capture_output=True, text=True, timeout=GEN_TIMEOUT)


def pem_blocks(path):
    text = Path(path).read_text()
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----\n.*?"
                        r"-----END CERTIFICATE-----\n?", text, re.S)
    return [b if b.endswith("\n") else b + "\n" for b in blocks]


_x509_cache = {}


def x509(path_or_pem, *args):
    """openssl x509 -noout ARGS on a file path, or on PEM text (str with BEGIN).

    Results are cached per (content, args) to keep the suite fast."""
    if isinstance(path_or_pem, str) and "-----BEGIN" in path_or_pem:
        pem = path_or_pem
    else:
        pem = Path(path_or_pem).read_text()
    key = (pem, args)
    if key not in _x509_cache:
        # only the first certificate of a file is examined, as openssl does
        _x509_cache[key] = run(["openssl", "x509", "-noout", *args],
                               input=pem).stdout
    return _x509_cache[key]


EXT_HEADERS = {
    "subjectAltName": "X509v3 Subject Alternative Name",
    "extendedKeyUsage": "X509v3 Extended Key Usage",
    "basicConstraints": "X509v3 Basic Constraints",
    "keyUsage": "X509v3 Key Usage",
}


def ext(cert, name):
    """Return (critical, [value-lines]) for extension `name`, or None."""
    out = x509(cert, "-ext", ",".join(EXT_HEADERS))
    sections, cur = {}, None
    for ln in out.splitlines():
        if not ln.strip():
            continue
        if not ln[0].isspace():            # "X509v3 Key Usage: critical"
            head, _, rest = ln.partition(":")
            cur = sections[head.strip()] = [rest.strip() == "critical", []]
        else:
            assert cur is not None, out
            cur[1].append(ln.strip())
    sec = sections.get(EXT_HEADERS[name])
    return None if sec is None else (sec[0], sec[1])


def sans(cert):
    e = ext(cert, "subjectAltName")
    if e is None:
        return []
    items = []
    for line in e[1]:
        items += [s.strip() for s in line.split(",") if s.strip()]
    return items


def uris(cert):
    return [s[len("URI:"):] for s in sans(cert) if s.startswith("URI:")]


def dnsnames(cert):
    return [s[len("DNS:"):] for s in sans(cert) if s.startswith("DNS:")]


def eku(cert):
    e = ext(cert, "extendedKeyUsage")
    assert e is not None, f"{cert}: no extendedKeyUsage"
    return sorted(s.strip() for s in ",".join(e[1]).split(",") if s.strip())


def basic_constraints(cert):
    e = ext(cert, "basicConstraints")
    assert e is not None, f"{cert}: no basicConstraints"
    return e[0], ",".join(e[1]).replace(" ", "")


def key_usage(cert):
    e = ext(cert, "keyUsage")
    assert e is not None, f"{cert}: no keyUsage"
    return e[0], sorted(s.strip() for s in ",".join(e[1]).split(","))


def _parse_date(s):
    # rfc_822 style as printed by openssl: "Jan  1 00:00:00 2020 GMT"
    return dt.datetime.strptime(" ".join(s.split()), "%b %d %H:%M:%S %Y GMT") \
        .replace(tzinfo=dt.timezone.utc)


def dates(cert):
    out = x509(cert, "-startdate", "-enddate")
    d = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    return _parse_date(d["notBefore"]), _parse_date(d["notAfter"])


def field(cert, opt):
    out = x509(cert, opt).strip()
    return out.split("=", 1)[1].strip()


def verify(pki, stem, *extra, cafile="ca.crt", untrusted=True):
    args = ["openssl", "verify", "-CAfile", str(pki / cafile), *extra]
    if untrusted:
        args += ["-untrusted", str(pki / f"{stem}.crt")]
    args.append(str(pki / f"{stem}.crt"))
    p = run(args, check=False)
    return p.returncode == 0 and p.stdout.strip().endswith(": OK"), \
        p.stdout + p.stderr


def assert_verify_ok(pki, stem, *extra, **kw):
    ok, out = verify(pki, stem, *extra, **kw)
    assert ok, f"{stem}: expected verification to pass, got:\n{out}"


def assert_verify_fails(pki, stem, errno, *extra, **kw):
    ok, out = verify(pki, stem, *extra, **kw)
    assert not ok, f"{stem}: expected verification to fail, got:\n{out}"
    assert re.search(rf"\berror {errno} at\b", out), \
        f"{stem}: expected openssl error {errno}, got:\n{out}"


def pubkey_of_key(path):
    return run(["openssl", "pkey", "-in", str(path), "-pubout"]).stdout


def pubkey_of_cert(path):
    return x509(path, "-pubkey")


def now():
    return dt.datetime.now(dt.timezone.utc)


# ---------------------------------------------------------------- fixtures --

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki") / "out"   # does not exist yet
    p = gen(out)
    assert p.returncode == 0, f"generator failed:\n{p.stdout}\n{p.stderr}"
    lines = p.stdout.splitlines()
    assert len(lines) == 1, f"expected one summary line, got: {p.stdout!r}"
    assert p.stderr == "", f"unexpected stderr: {p.stderr!r}"
    return out


# ------------------------------------------------------------------- tests --

def test_script_is_executable_bash_strict():
    assert os.access(SCRIPT, os.X_OK), f"expected {SCRIPT} to be executable"
    head = SCRIPT.read_text().splitlines()
    assert "bash" in head[0], f"expected a bash shebang, the first line is {head[0]!r}"
    assert any(ln.strip() == "set -euo pipefail" for ln in head), \
        "expected a 'set -euo pipefail' line"


def test_exact_file_set(pki):
    want = {f"{s}.{e}" for s in ALL_STEMS for e in ("crt", "key")}
    have = {p.name for p in pki.iterdir()}
    assert have == want, f"missing {want - have}, unexpected {have - want}"


@pytest.mark.parametrize("stem", ALL_STEMS)
def test_key_format_mode_and_match(pki, stem):
    key = pki / f"{stem}.key"
    text = key.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----"), \
        f"{stem}.key is not unencrypted PKCS#8 PEM"
    assert "ENCRYPTED" not in text, f"expected {stem}.key unencrypted, it is encrypted"
    mode = stat.S_IMODE(key.stat().st_mode)
    assert mode == 0o600, f"expected {stem}.key mode 0600, got {mode:04o}"
    info = run(["openssl", "pkey", "-in", str(key), "-noout", "-text"]).stdout
    assert "prime256v1" in info or "P-256" in info, f"{stem}.key is not P-256"
    # key matches the (first = leaf) cert in the file
    assert pubkey_of_key(key) == pubkey_of_cert(pki / f"{stem}.crt"), \
        f"{stem}.key does not match {stem}.crt"


@pytest.mark.parametrize("stem", ALL_STEMS)
def test_sha256_ecdsa_signatures(pki, stem):
    for pem in pem_blocks(pki / f"{stem}.crt"):
        txt = run(["openssl", "x509", "-noout", "-text"], input=pem).stdout
        assert "ecdsa-with-SHA256" in txt, \
            f"{stem}.crt: expected an ecdsa-with-SHA256 signature:\n{txt}"


def test_serials_distinct(pki):
    seen = {}
    for stem in ALL_STEMS:
        for pem in pem_blocks(pki / f"{stem}.crt"):
            seen[pem] = field(pem, "-serial")
    serials = list(seen.values())
    # 23 files + 12 deep intermediates (int-ca appears twice but is one cert)
    assert len(serials) == len(ALL_STEMS) + 12
    assert len(set(serials)) == len(serials), "duplicate serial numbers"
    # random, not sequential: big numbers
    small = [s for s in serials if int(s, 16) <= 2**64]
    assert not small, f"expected random serials above 2**64, saw {small}"


# --- CAs ----------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["ca", "other-ca"])
def test_root_cas(pki, stem):
    c = pki / f"{stem}.crt"
    assert len(pem_blocks(c)) == 1
    assert field(c, "-subject") == field(c, "-issuer")
    crit, bc = basic_constraints(c)
    assert crit and bc.startswith("CA:TRUE")
    crit, ku = key_usage(c)
    assert crit and ku == ["CRL Sign", "Certificate Sign"]
    nb, na = dates(c)
    assert nb < now() < na
    assert_verify_ok(pki, stem, cafile=f"{stem}.crt", untrusted=False)


def test_root_ca_name_and_other_ca_unrelated(pki):
    assert "CN = portcullis dev root CA" in field(pki / "ca.crt", "-subject")
    assert field(pki / "ca.crt", "-subject") != \
        field(pki / "other-ca.crt", "-subject")
    assert pubkey_of_cert(pki / "ca.crt") != \
        pubkey_of_cert(pki / "other-ca.crt")
    # other-ca does not chain to ca
    assert_verify_fails(pki, "other-ca", 18, untrusted=False)


def test_int_ca(pki):
    c = pki / "int-ca.crt"
    assert len(pem_blocks(c)) == 1
    assert field(c, "-issuer") == field(pki / "ca.crt", "-subject")
    crit, bc = basic_constraints(c)
    assert crit and bc.startswith("CA:TRUE")
    assert "Certificate Sign" in key_usage(c)[1]
    assert_verify_ok(pki, "int-ca", untrusted=False)


# --- good workload certs --------------------------------------------------------

def assert_frontend_like(cert, uri=FE_URI):
    """The common 'otherwise like web-frontend' properties."""
    crit, bc = basic_constraints(cert)
    assert crit is not None and bc == "CA:FALSE", bc
    crit, ku = key_usage(cert)
    assert crit and ku == ["Digital Signature"]
    assert eku(cert) == sorted([SERVER_AUTH, CLIENT_AUTH])
    assert uris(cert) == [uri]
    assert dnsnames(cert) == [FE_DNS]


def assert_valid_now_30d(cert):
    nb, na = dates(cert)
    t = now()
    # not_before = now - 1h (generous slack for slow machines)
    assert t - dt.timedelta(hours=1, minutes=10) <= nb \
        <= t - dt.timedelta(minutes=50), nb
    assert na - nb == dt.timedelta(days=30), (nb, na)


@pytest.mark.parametrize("stem", GOOD)
def test_good_workload(pki, stem):
    ns, sa = stem.split("-", 1)
    c = pki / f"{stem}.crt"
    assert len(pem_blocks(c)) == 1
    crit, bc = basic_constraints(c)
    assert bc == "CA:FALSE"
    crit, ku = key_usage(c)
    assert crit and ku == ["Digital Signature"]
    assert eku(c) == sorted([SERVER_AUTH, CLIENT_AUTH])
    assert uris(c) == [f"spiffe://{TD}/ns/{ns}/sa/{sa}"]
    assert dnsnames(c) == [f"{sa}.{ns}.svc"]
    assert_valid_now_30d(c)
    assert field(c, "-issuer") == field(pki / "ca.crt", "-subject")
    assert_verify_ok(pki, stem, "-purpose", "sslclient")
    assert_verify_ok(pki, stem, "-purpose", "sslserver")
    # and it is NOT trusted by the unrelated CA
    assert_verify_fails(pki, stem, 20, cafile="other-ca.crt")


def test_web_viaint(pki):
    c = pki / "web-viaint.crt"
    blocks = pem_blocks(c)
    assert len(blocks) == 2, "web-viaint.crt must hold leaf + intermediate"
    assert blocks[1] == pem_blocks(pki / "int-ca.crt")[0]
    assert field(blocks[0], "-issuer") == field(pki / "int-ca.crt", "-subject")
    assert_frontend_like(c)
    assert_valid_now_30d(c)
    assert_verify_ok(pki, "web-viaint", "-purpose", "sslclient")
    # the intermediate is really needed (leaf is not signed by ca directly)
    assert_verify_fails(pki, "web-viaint", 20, untrusted=False)


def test_deep_chain(pki):
    c = pki / "deep-chain.crt"
    blocks = pem_blocks(c)
    assert len(blocks) == 13, "deep-chain.crt must hold leaf + 12 intermediates"
    # each cert is issued by the next one; the last is issued by the root
    for child, parent in zip(blocks, blocks[1:]):
        assert field(child, "-issuer") == field(parent, "-subject")
    assert field(blocks[-1], "-issuer") == field(pki / "ca.crt", "-subject")
    for pem in blocks[1:]:
        assert basic_constraints(pem)[1].startswith("CA:TRUE")
    assert_frontend_like(c)
    assert_valid_now_30d(c)
    assert_verify_ok(pki, "deep-chain")
    assert_verify_ok(pki, "deep-chain", "-verify_depth", "12")
    # 12 intermediates exceed the sidecar's depth bound of 8
    assert_verify_fails(pki, "deep-chain", 22, "-verify_depth", "8")
    assert_verify_fails(pki, "deep-chain", 22, "-verify_depth", "11")


# --- deliberately bad certs --------------------------------------------------------

def test_bad_other_ca(pki):
    c = pki / "bad-other-ca.crt"
    assert_frontend_like(c)
    assert_valid_now_30d(c)
    assert field(c, "-issuer") == field(pki / "other-ca.crt", "-subject")
    assert_verify_fails(pki, "bad-other-ca", 20)
    assert_verify_ok(pki, "bad-other-ca", cafile="other-ca.crt")


def test_bad_self_signed(pki):
    c = pki / "bad-self-signed.crt"
    assert_frontend_like(c)
    assert_valid_now_30d(c)
    assert field(c, "-issuer") == field(c, "-subject")
    assert_verify_fails(pki, "bad-self-signed", 18)


def test_bad_expired(pki):
    c = pki / "bad-expired.crt"
    assert_frontend_like(c)
    nb, na = dates(c)
    assert nb == dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    assert na == dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc)
    assert_verify_fails(pki, "bad-expired", 10)
    # its only defect is time: it verifies at a time inside its window
    at = int(dt.datetime(2020, 6, 1, tzinfo=dt.timezone.utc).timestamp())
    assert_verify_ok(pki, "bad-expired", "-attime", str(at))


def test_bad_not_yet_valid(pki):
    c = pki / "bad-not-yet-valid.crt"
    assert_frontend_like(c)
    nb, na = dates(c)
    ten_years = nb - now()
    assert dt.timedelta(days=3640) < ten_years < dt.timedelta(days=3665), nb
    assert dt.timedelta(days=364) <= na - nb <= dt.timedelta(days=366)
    assert_verify_fails(pki, "bad-not-yet-valid", 9)
    at = int((nb + dt.timedelta(days=1)).timestamp())
    assert_verify_ok(pki, "bad-not-yet-valid", "-attime", str(at))


BAD_URIS = {
    "bad-two-uris": [FE_URI, f"spiffe://{TD}/ns/jobs/sa/worker"],
    "bad-no-uri": [],
    "bad-wrong-td": ["spiffe://evil.example/ns/web/sa/frontend"],
    "bad-malformed-id": [f"spiffe://{TD}/ns/web/sa/../frontend"],
    "bad-not-spiffe": [f"https://{TD}/ns/web/sa/frontend"],
}


@pytest.mark.parametrize("stem", sorted(BAD_URIS))
def test_bad_identity_certs(pki, stem):
    c = pki / f"{stem}.crt"
    assert uris(c) == BAD_URIS[stem]
    assert dnsnames(c) == [FE_DNS]
    assert basic_constraints(c)[1] == "CA:FALSE"
    assert eku(c) == sorted([SERVER_AUTH, CLIENT_AUTH])
    assert_valid_now_30d(c)
    # chain-wise these are fine: the defect is only in the identity
    assert_verify_ok(pki, stem, "-purpose", "sslclient")


def test_bad_server_only(pki):
    c = pki / "bad-server-only.crt"
    assert eku(c) == [SERVER_AUTH]
    assert uris(c) == [FE_URI] and basic_constraints(c)[1] == "CA:FALSE"
    assert_valid_now_30d(c)
    assert_verify_ok(pki, "bad-server-only", "-purpose", "sslserver")
    assert_verify_fails(pki, "bad-server-only", 26, "-purpose", "sslclient")


def test_bad_client_only(pki):
    c = pki / "bad-client-only.crt"
    assert eku(c) == [CLIENT_AUTH]
    assert uris(c) == [FE_URI] and basic_constraints(c)[1] == "CA:FALSE"
    assert_valid_now_30d(c)
    assert_verify_ok(pki, "bad-client-only", "-purpose", "sslclient")
    assert_verify_fails(pki, "bad-client-only", 26, "-purpose", "sslserver")


def test_bad_ca_leaf(pki):
    c = pki / "bad-ca-leaf.crt"
    crit, bc = basic_constraints(c)
    assert crit and bc.startswith("CA:TRUE")
    assert "Certificate Sign" in key_usage(c)[1]
    assert uris(c) == [FE_URI]
    assert eku(c) == sorted([SERVER_AUTH, CLIENT_AUTH])
    assert field(c, "-issuer") == field(pki / "ca.crt", "-subject")
    assert_valid_now_30d(c)
    # NB: `openssl verify` accepts this chain; rejecting a CA leaf is up to
    # the sidecar. We only check it is properly signed by ca.
    assert_verify_ok(pki, "bad-ca-leaf")


# --- CLI behaviour ---------------------------------------------------------------

def test_custom_trust_domain_and_rerun(tmp_path):
    out = tmp_path / "nested" / "pki"
    p = gen(out, "example.org")
    assert p.returncode == 0, p.stderr
    assert uris(out / "web-frontend.crt") == ["spiffe://example.org/ns/web/sa/frontend"]
    assert uris(out / "bad-wrong-td.crt") == ["spiffe://evil.example/ns/web/sa/frontend"]
    serial1 = field(out / "ca.crt", "-serial")
    # re-running into a populated dir works and leaves a consistent set
    p = gen(out, "example.org")
    assert p.returncode == 0, p.stderr
    assert field(out / "ca.crt", "-serial") != serial1, \
        f"expected regeneration (a new CA serial), still {serial1}"
    assert {x.name for x in out.iterdir()} == \
        {f"{s}.{e}" for s in ALL_STEMS for e in ("crt", "key")}
    assert pubkey_of_key(out / "web-frontend.key") == \
        pubkey_of_cert(out / "web-frontend.crt")
    assert_verify_ok(out, "web-frontend")


@pytest.mark.parametrize("args", [[], ["a", "b", "c"]])
def test_usage_errors(args):
    p = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0
    assert "usage" in p.stderr.lower()


def test_invalid_trust_domain_rejected(tmp_path):
    out = tmp_path / "x"
    p = gen(out, "Evil,DOMAIN")
    assert p.returncode != 0
    assert "trust domain" in p.stderr
    assert not out.exists()


# --- --leaf: one more workload certificate from an existing CA --------------------

def test_leaf_mode_issues_a_workload_cert_from_an_existing_ca(pki, tmp_path):
    out = tmp_path / "extra"
    p = subprocess.run([str(SCRIPT), "--leaf", str(out), str(pki / "ca.crt"),
                        str(pki / "ca.key"), "rot1", "payments", "api", TD,
                        "20260101000000Z", "20300101000000Z"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert {x.name for x in out.iterdir()} == {"rot1.crt", "rot1.key"}
    crt = out / "rot1.crt"
    assert uris(crt) == [f"spiffe://{TD}/ns/payments/sa/api"]
    assert field(crt, "-startdate") == "Jan  1 00:00:00 2026 GMT"
    assert field(crt, "-enddate") == "Jan  1 00:00:00 2030 GMT"
    assert field(crt, "-serial") != field(pki / "payments-api.crt", "-serial")
    assert pubkey_of_key(out / "rot1.key") == pubkey_of_cert(crt)
    v = run(["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(pki / "ca.crt"),
             str(crt)], check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    assert stat.S_IMODE((out / "rot1.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("args", [
    ["--leaf", "out"],                                                   # too few
    ["--leaf", "out", "ca.crt", "ca.key", "x", "web", "../a"],           # bad name
    ["--leaf", "out", "ca.crt", "ca.key", "x", "web", "a", TD, "2026", "2030"],  # bad times
])
def test_leaf_mode_usage_errors(args, tmp_path):
    p = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)
    assert p.returncode != 0
    assert "usage" in p.stderr.lower() or "invalid" in p.stderr.lower(), p.stderr
    assert not (tmp_path / "out" / "x.crt").exists()

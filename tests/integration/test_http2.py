"""HTTP/2 on HTTP listeners (issue 13, README "HTTP/2"): inbound ALPN h2 from peers,
outbound prior-knowledge h2c from apps, each stream decided and forwarded as one request
over the HTTP/1.1 pool. Real clients: curl --http2, nghttp, python3-h2 on raw sockets."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from types import SimpleNamespace

import pytest

import harness as h
import httpkit as hk

SELF_ID = h.spiffe("payments", "api")
RULES = [
    {"namespace": "web", "service_account": "frontend", "methods": ["GET", "HEAD"],
     "paths": ["/api"]},
    {"namespace": "web", "service_account": "admin"},
]


@pytest.fixture(scope="module")
def h2env(module_env):
    """One sidecar (payments-api, workers=1):
       api   inbound http  -> app   allow web-frontend (GET/HEAD /api), web-admin (all),
                                    payments-api (the outbound hop below: all)
       out   outbound http -> api   expect payments/api"""
    pki = module_env.pki
    app = hk.HttpApp(name="h2app")
    module_env.apps.append(app)
    ports = {n: h.free_port() for n in ("api", "out")}
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", ports["api"], app.addr,
                           RULES + [{"namespace": "payments", "service_account": "api"}],
                           protocol="http"),
    ], outbound=[
        h.outbound_listener("out", ports["out"], h.addr(ports["api"]),
                            [{"namespace": "payments", "service_account": "api"}],
                            protocol="http"),
    ])
    sc = module_env.sidecar(cfg, name="http2")
    return SimpleNamespace(sc=sc, app=app, ports=ports, pki=pki)


def curl(env, *args: str, stem: str = "web-admin", inbound: bool = True) -> subprocess.CompletedProcess:
    pki = env.pki
    if inbound:
        base = ["curl", "-sS", "--http2", "--cacert", pki.ca, "--cert", pki.crt(stem),
                "--key", pki.key(stem), "--resolve", f"api.payments.svc:{env.ports['api']}:127.0.0.1",
                "-o", "-", "-w", "\n%{http_version} %{http_code}"]
        url = f"https://api.payments.svc:{env.ports['api']}"
    else:
        base = ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w",
                "\n%{http_version} %{http_code}"]
        url = f"http://127.0.0.1:{env.ports['out']}"
    args = [a.replace("URL", url) for a in args]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=60)


def split(r: subprocess.CompletedProcess) -> tuple[str, str, int]:
    body, _, tail = r.stdout.rpartition("\n")
    ver, code = tail.split()
    return body, ver, int(code)


def test_inbound_h2_get_reaches_app_as_http11_with_identity(h2env):
    n = h2env.app.nreq()
    r = curl(h2env, "URL/api/x?q=1", stem="web-frontend")
    body, ver, code = split(r)
    assert (ver, code) == ("2", 200), r.stderr
    seen = h2env.app.reqs_since(n)
    assert len(seen) == 1
    req = seen[0]
    assert req.method == "GET" and req.target == "/api/x?q=1" and req.version == "HTTP/1.1"
    assert req.hv("host") == [f"api.payments.svc:{h2env.ports['api']}"]
    xfcc = req.hv(hk.XFCC)
    assert xfcc == [f"By={SELF_ID};Hash={hk.leaf_der_sha256(h2env.pki.crt('web-frontend'))};"
                    f"URI={h.spiffe('web', 'frontend')}"]
    line = h2env.sc.wait_for_log(lambda e: e.get("path") == "/api/x" and e.get("protocol") == "HTTP/2")
    assert line["status"] == 200 and line["decision"] == "allow"
    assert line["peer_id"] == h.spiffe("web", "frontend") and line["grpc_status"] is None


def test_inbound_h2_policy_per_stream(h2env):
    n = h2env.app.nreq()
    r = curl(h2env, "-X", "POST", "-d", "x", "URL/api/y", stem="web-frontend")
    body, ver, code = split(r)
    assert (ver, code) == ("2", 403)
    assert json.loads(body)["reason"] == "not_allowed"
    assert h2env.app.nreq() == n
    line = h2env.sc.wait_for_log(lambda e: e.get("path") == "/api/y" and e.get("protocol") == "HTTP/2")
    assert line["status"] == 403 and line["reason"] == "not_allowed"


def test_outbound_h2c_prior_knowledge_through_the_pair(h2env):
    n = h2env.app.nreq()
    r = curl(h2env, "-d", "hello", "URL/upload/z", inbound=False)
    body, ver, code = split(r)
    assert (ver, code) == ("2", 200), r.stderr
    seen = h2env.app.reqs_since(n)
    assert len(seen) == 1 and seen[0].method == "POST"

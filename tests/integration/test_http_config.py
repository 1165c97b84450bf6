"""HTTP-mode config validation (README "Access log"): `methods` / `paths` only on inbound HTTP
listeners, the top-level `http` group. `portcullis --check -c FILE` exits 1 with
`portcullis: FILE:LINE: SETTING: message` (same contract as test_config.py)."""

from __future__ import annotations

import re

import pytest

import harness as h
from test_config import check, good_config, write


def http_config(pki: h.PKI) -> dict:
    cfg = good_config(pki)
    cfg["inbound"][0]["protocol"] = "http"
    cfg["inbound"][0]["allow"] = [
        {"namespace": "web", "service_account": "frontend", "methods": ["GET", "HEAD"],
         "paths": ["/api", "/static/"]},
        {"namespace": "jobs", "paths": ["/jobs"]},
        {"namespace": "web", "service_account": "admin"},
    ]
    cfg["outbound"][0]["protocol"] = "http"
    cfg["http"] = {"max_request_line": 4096, "max_header_bytes": 32768, "max_headers": 50,
                   "request_timeout_ms": 5000, "response_timeout_ms": 10000,
                   "pool_max_idle": 8, "pool_idle_timeout_ms": 10000}
    cfg["http2"] = {"max_concurrent_streams": 50, "stream_window": 131072,
                    "connection_window": 2097152}
    cfg["inbound"][0]["app_protocol"] = "h2c"
    cfg["outbound"][0]["upstream_protocol"] = "h2"
    return cfg


def test_check_good_http_config(tmp_path, pki, portcullis_bin):
    p, _ = write(tmp_path, http_config(pki))
    r = check(p)
    assert r.returncode == 0, f"expected exit 0, got {r.returncode}: {r.stderr}\n{p.read_text()}"


def _mut_set(path_parts, value):
    def mut(cfg):
        obj = cfg
        for k in path_parts[:-1]:
            obj = obj[k]
        obj[path_parts[-1]] = value
    return mut


BAD = [
    ("methods-on-tcp-inbound",
     lambda c: (c["inbound"][1]["allow"][0].__setitem__("methods", ["GET"])),
     "inbound[1].allow[0].methods"),
    ("paths-on-tcp-inbound",
     lambda c: (c["inbound"][1]["allow"][0].__setitem__("paths", ["/api"])),
     "inbound[1].allow[0].paths"),
    ("methods-in-outbound-expect",
     lambda c: c["outbound"][0]["expect"][0].__setitem__("methods", ["GET"]),
     "outbound[0].expect[0].methods"),
    ("paths-in-outbound-expect",
     lambda c: c["outbound"][0]["expect"][0].__setitem__("paths", ["/api"]),
     "outbound[0].expect[0].paths"),
    ("paths-in-tcp-outbound-expect",
     lambda c: (c["outbound"][0].__setitem__("protocol", "tcp"),
                c["outbound"][0].pop("upstream_protocol"),
                c["outbound"][0]["expect"][0].__setitem__("paths", ["/x"])),
     "outbound[0].expect[0].paths"),
    ("method-lowercase", _mut_set(["inbound", 0, "allow", 0, "methods"], ["get"]),
     "inbound[0].allow[0].methods"),
    ("path-no-slash", _mut_set(["inbound", 0, "allow", 0, "paths"], ["api"]),
     "inbound[0].allow[0].paths"),
    ("path-with-query", _mut_set(["inbound", 0, "allow", 0, "paths"], ["/api?x=1"]),
     "inbound[0].allow[0].paths"),
    ("paths-empty-list", _mut_set(["inbound", 0, "allow", 1, "paths"], []),
     "inbound[0].allow[1].paths"),
    ("methods-not-strings", _mut_set(["inbound", 0, "allow", 0, "methods"], [1, 2]),
     "inbound[0].allow[0].methods"),
    ("http-unknown-key", _mut_set(["http", "max_body"], 5), "http.max_body"),
    ("http-max-headers-zero", _mut_set(["http", "max_headers"], 0), "http.max_headers"),
    ("http-timeout-type", _mut_set(["http", "request_timeout_ms"], "soon"),
     "http.request_timeout_ms"),
    ("http2-unknown-key", _mut_set(["http2", "max_frame"], 5), "http2.max_frame"),
    ("http2-streams-zero", _mut_set(["http2", "max_concurrent_streams"], 0),
     "http2.max_concurrent_streams"),
    ("http2-window-too-small", _mut_set(["http2", "stream_window"], 1000), "http2.stream_window"),
    ("http2-window-too-big", _mut_set(["http2", "connection_window"], 1 << 31),
     "http2.connection_window"),
    ("app-protocol-unknown", _mut_set(["inbound", 0, "app_protocol"], "h3"),
     "inbound[0].app_protocol"),
    ("app-protocol-on-tcp", _mut_set(["inbound", 1, "app_protocol"], "h2c"),
     "inbound[1].app_protocol"),
    ("app-protocol-on-outbound", _mut_set(["outbound", 0, "app_protocol"], "h2c"),
     "outbound[0].app_protocol"),
    ("upstream-protocol-unknown", _mut_set(["outbound", 0, "upstream_protocol"], "h2c"),
     "outbound[0].upstream_protocol"),
    ("upstream-protocol-on-inbound", _mut_set(["inbound", 0, "upstream_protocol"], "h2"),
     "inbound[0].upstream_protocol"),
    ("upstream-protocol-on-tcp",
     lambda c: (c["outbound"][0].__setitem__("protocol", "tcp")),
     "outbound[0].upstream_protocol"),
]


@pytest.mark.parametrize("mutate,setting", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_rejects_http_settings(tmp_path, pki, portcullis_bin, mutate, setting):
    cfg = http_config(pki)
    mutate(cfg)
    p, lines = write(tmp_path, cfg)
    r = check(p)
    assert r.returncode == 1, \
        f"expected exit 1, got {r.returncode}, stderr: {r.stderr}\n{p.read_text()}"
    m = re.search(r"^portcullis: " + re.escape(str(p)) + r":(\d+): " + re.escape(setting)
                  + r": \S.*$", r.stderr, re.M)
    assert m, f"stderr does not name {p}:LINE: {setting}:\n{r.stderr}\n{p.read_text()}"
    line = int(m.group(1))
    if setting in lines:
        # the setting itself, or (for a bad list entry) a line inside it
        assert line == lines[setting], \
            f"{setting}: expected line {lines[setting]}, reported line {line}:\n{r.stderr}"


def test_config_endpoint_shows_http2_settings(env, pki):
    cfg = h.base_config(pki, "payments-api", workers=1, inbound=[
        dict(h.inbound_listener("api", h.free_port(), "127.0.0.1:9", [{"namespace": "web"}],
                                protocol="http"), app_protocol="h2c")],
        outbound=[dict(h.outbound_listener("out", h.free_port(), "127.0.0.1:9",
                                           [{"namespace": "payments"}], protocol="http"),
                       upstream_protocol="http/1.1")])
    cfg["http2"] = {"max_concurrent_streams": 7}
    sc = env.sidecar(cfg, name="h2conf")
    got = sc.admin_get("/config").json()
    assert got["http2"] == {"max_concurrent_streams": 7, "stream_window": 262144,
                            "connection_window": 1048576}
    assert got["inbound"][0]["app_protocol"] == "h2c"
    assert got["outbound"][0]["upstream_protocol"] == "http/1.1"

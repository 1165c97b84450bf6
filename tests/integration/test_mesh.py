"""Mesh in a box (issue 16): scripts/mesh.sh as an integration test.

Six pods (network namespaces on a bridge, dnsmasq for the mesh's names), each with its app,
its portcullis sidecar (PORTCULLIS_BIN: the build under test, sanitizer builds included) and
portcullis-init's interception rules; the apps call each other by service name over HTTP/1.1
and gRPC while a small issuer re-signs every pod's certificate every 2.5 s and rolls the CA
once. The run's machine-readable summary must show: every allowed path called successfully,
every refused path refused the way policy says, no unexpected failure, at least three
rotations each seen by every sidecar's /certs within a second, the CA roll done, and every
refusal in the right sidecar's metrics and access log. Nothing may be left behind.

Needs root, `ip netns`, iptables, dnsmasq, setpriv, python3-grpcio and python3-h2: without
them this test skips, loudly; with CI=true it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import harness as h
import netkit as nk

MESH = h.REPO / "scripts" / "mesh.sh"
DURATION = 14
ROTATE_EVERY = 2.5


def _problem_or_none() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    problem = nk.missing_tool(("ip", "iptables", "ip6tables", "dnsmasq", "setpriv", "openssl"))
    if problem:
        return problem
    r = subprocess.run(["/usr/bin/python3", "-c", "import grpc, h2"], capture_output=True)
    if r.returncode != 0:
        return "python3-grpcio / python3-h2 missing (scripts/install-deps.sh test)"
    etc = Path("/etc/netns")
    if not os.access(etc if etc.is_dir() else etc.parent, os.W_OK):
        return f"{etc} cannot be written (each pod's resolv.conf goes there)"
    return nk.netns_problem(f"pcmesh-probe-{os.getpid()}", ipv6=False)


@pytest.fixture(scope="module")
def mesh_ok():
    nk.require("the mesh test", _problem_or_none())


def leftovers(prefix: str) -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in ns.splitlines() if line.startswith(prefix + "-")]
    etc = Path("/etc/netns")
    if etc.is_dir():
        left += [str(p) for p in etc.iterdir() if p.name.startswith(prefix + "-")]
    return left


def test_mesh_in_a_box_with_rotation_under_load(mesh_ok, tmp_path):
    prefix = f"pcmt{os.getpid()}"
    summary = tmp_path / "summary.json"
    # the work dir must be readable by the pods' unprivileged app and sidecar users, which
    # pytest's tmp_path (under a 0700 directory) is not; removed after a passing run
    work = Path(tempfile.mkdtemp(prefix="pcmesh-test-"))
    passed = False
    env = dict(os.environ, PORTCULLIS_BIN=str(h.BIN))
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(MESH), "--duration", str(DURATION), "--rotate-every",
                        str(ROTATE_EVERY), "--prefix", prefix, "--summary-json", str(summary),
                        "--workdir", str(work)],
                       capture_output=True, text=True, env=env, timeout=h.T(300))
    took = time.monotonic() - t0
    report = f"mesh.sh exit {r.returncode} after {took:.0f} s\n{r.stdout}\n{r.stderr[-6000:]}"
    try:
        assert not leftovers(prefix), f"left behind: {leftovers(prefix)}\n{report}"
        assert r.returncode == 0, report
        s = json.loads(summary.read_text())
        assert s["ok"] and not s["problems"], report
        assert s["mode"] == "transparent", report
        for p in s["paths"]:
            assert p["unexpected"] == 0, f"{p['id']}: {p['unexpected_samples']}\n{report}"
            if p["expect"] == "allow":
                assert p["ok"] > 0 and p["denied"] == 0, f"{p['id']}\n{report}"
                assert p["p50_ms"] is not None and p["p99_ms"] is not None
            else:
                assert p["denied"] > 0 and p["ok"] == 0, f"{p['id']}\n{report}"
        kinds = {(p["expect"], p["refused_by"], p["kind"]) for p in s["paths"]}
        for want in (("allow", None, "http"), ("allow", None, "grpc"), ("deny", "l7", "http"),
                     ("deny", "l7", "grpc"), ("deny", "handshake", "http"),
                     ("deny", "handshake", "grpc"), ("deny", "route", "http")):
            assert want in kinds, f"no path of kind {want}"
        assert s["unexpected_total"] == 0
        assert s["rotations"] >= 3, report
        assert all(not rot["missing"] and rot["confirmed"] == rot["pods"]
                   for rot in s["rotation_detail"]), report
        assert s["rotation_max_lag_s"] is not None and s["rotation_max_lag_s"] <= 1.0, report
        assert s["ca_roll"] is True and len(s["ca_roll_steps"]) == 3, report
        # refusals show up in the right sidecar: the target's inbound for l7 and handshake
        # refusals (metrics and an access-log line naming the caller), the caller's own
        # outbound for a destination without a route
        for p in s["paths"]:
            if p["expect"] != "deny":
                continue
            pod = p["caller"] if p["refused_by"] == "route" else p["target"]
            rows = s["sidecars"][pod]["metrics"]
            if p["refused_by"] == "l7":
                n = sum(x["value"] for x in rows if x["metric"] == "http_requests_total" and
                        x["direction"] == "inbound" and x["reason"] == "not_allowed")
            else:
                n = sum(x["value"] for x in rows if x["metric"] == "connections_total" and
                        x["direction"] == ("outbound" if p["refused_by"] == "route"
                                           else "inbound") and x["reason"] == "not_allowed")
            assert n > 0, f"{p['id']}: no refusal in {pod}'s metrics: {rows}"
            logged = s["sidecars"][pod]["access_log_denies"]
            assert logged, f"{p['id']}: no deny line in {pod}'s access log"
        passed = True
    finally:
        if passed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"mesh logs kept in {work}", file=sys.stderr)
        if leftovers(prefix):
            subprocess.run(["bash", str(MESH), "--down", "--prefix", prefix],
                           capture_output=True, timeout=120)


def test_mesh_fails_loudly_when_an_allowed_path_breaks(mesh_ok):
    """The summary is no rubber stamp: with api.control's sidecar missing tenant-b in its
    allow-list, tenant-b's calls to api go wrong, and mesh.sh must say which and exit 1."""
    prefix = f"pcmf{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="pcmesh-test-"))
    summary = work / "summary.json"
    env = dict(os.environ, PORTCULLIS_BIN=str(h.BIN))
    try:
        r = subprocess.run(["bash", str(MESH), "--duration", "4", "--min-rotations", "0",
                            "--prefix", prefix, "--summary-json", str(summary),
                            "--workdir", str(work), "--fault", "drop-tenant-b"],
                           capture_output=True, text=True, env=env, timeout=h.T(300))
        report = f"mesh.sh exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
        assert not leftovers(prefix), report
        assert r.returncode == 1, report
        assert "result: FAILED" in r.stdout, report
        s = json.loads(summary.read_text())
        assert not s["ok"], report
        # every tenant-b call to api: the allowed ones fail, and the one api's allow-list
        # should refuse by method is now refused in the handshake, the wrong way
        broken = {p["id"] for p in s["paths"] if p["unexpected"] > 0}
        assert broken == {"scheduler.tenant-b -> api.control http /v1/jobs",
                          "scheduler.tenant-b -> api.control grpc /mesh.Api/Get",
                          "webserver.tenant-b -> api.control http /v1/pages",
                          "scheduler.tenant-b -> api.control grpc /mesh.Api/Admin"}, report
        assert all(p["unexpected"] == 0 for p in s["paths"] if p["id"] not in broken)
        assert s["unexpected_total"] > 0
        assert any("no successful call" in p for p in s["problems"]), report
    finally:
        if leftovers(prefix):
            subprocess.run(["bash", str(MESH), "--down", "--prefix", prefix],
                           capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)

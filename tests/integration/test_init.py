"""portcullis-init (issue 16): iptables interception, proven with real traffic.

Every test that installs rules builds its own world: a "pod" network namespace and a "remote"
one, joined by a veth pair (10.231.0.0/24 and fd00:231::/64, plus 10.232.0.1 and fd00:232::1 on
the remote side as a second network), with small TCP servers in both that answer each
connection with one JSON line: who they are, the address the connection reached, and the
original destination read with SO_ORIGINAL_DST. In the pod, "capture" stands for the sidecar's
transparent outbound listener, "inbound" for its inbound listener, "app" for the app's own
ports; in the remote namespace, "remote" is the service the app calls. Clients run as the app's
uid or the proxy's (setpriv). portcullis-init is only ever run inside these namespaces (or with
--dry-run), never in the namespace the suite runs in. The namespaces, servers and client are
netkit.py's Net (test_transparent.py uses them too).

Needs root, `ip netns`, iptables and setpriv: without them these tests skip, loudly; with CI=true
they fail instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import harness as h
from netkit import (ADMIN_PORT, BASE_ARGS, IN_PORT, INIT, LOOP, OTHER, OUT_PORT, POD, REMOTE,
                    Net)


def nat_state(ns: str) -> str:
    """Both nat tables of a namespace, as iptables-save prints them, without the comment lines
    (they carry a time) and with zeroed counters."""
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        r = subprocess.run(["ip", "netns", "exec", ns, cmd, "-t", "nat"], capture_output=True,
                           text=True, timeout=h.T(30))
        assert r.returncode == 0, f"{cmd} in {ns}: {r.stderr}"
        for line in r.stdout.splitlines():
            if not line.startswith("#"):
                out.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
    return "\n".join(out) + "\n"


@pytest.fixture
def net(netns_ok):
    n = Net()  # removes what it made if it fails half-way
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def mesh(net):
    net.start_servers()
    return net


def captured(reply: dict, host: str, port: int):
    assert reply["server"] == "capture", f"not captured: {reply}"
    assert reply["orig"] == [host, port], f"original destination not recovered: {reply}"


def reached(reply: dict, server: str, port: int):
    assert reply["server"] == server and reply["local"][1] == port, \
        f"expected {server}:{port} directly, got {reply}"


FAMILIES = pytest.mark.parametrize("fam", [4, 6], ids=["ipv4", "ipv6"])


# --------------------------------------------------------------------------- outbound

@FAMILIES
def test_app_outbound_is_captured_with_its_original_destination(mesh, fam):
    # control: without the rules the app reaches the remote service
    reached(mesh.app(REMOTE[fam], 8080), "remote", 8080)
    mesh.init(*BASE_ARGS)
    captured(mesh.app(REMOTE[fam], 8080), REMOTE[fam], 8080)
    captured(mesh.app(REMOTE[fam], 9090), REMOTE[fam], 9090)
    captured(mesh.app(OTHER[fam], 8080), OTHER[fam], 8080)
    # root is an app like any other: only the proxy's uid is exempt
    captured(mesh.connect(mesh.pod, REMOTE[fam], 8080), REMOTE[fam], 8080)


@FAMILIES
def test_proxy_uid_is_not_captured(mesh, fam):
    mesh.init(*BASE_ARGS)
    reached(mesh.proxy(REMOTE[fam], 8080), "remote", 8080)
    reached(mesh.proxy(OTHER[fam], 9090), "remote", 9090)
    captured(mesh.app(REMOTE[fam], 8080), REMOTE[fam], 8080)


@FAMILIES
def test_skipped_ports_and_cidrs_are_not_captured(mesh, fam):
    mesh.init(*BASE_ARGS, "--skip-outbound-ports", "7000,9000-9100",
              "--skip-outbound-cidrs", "10.232.0.0/16,fd00:232::/64")
    reached(mesh.app(REMOTE[fam], 9090), "remote", 9090)   # port in a skipped range
    reached(mesh.app(OTHER[fam], 8080), "remote", 8080)    # skipped network
    captured(mesh.app(REMOTE[fam], 8080), REMOTE[fam], 8080)


@FAMILIES
def test_skipped_single_address(mesh, fam):
    # a bare address is a /32 (/128); the other address of the remote side stays captured
    mesh.init(*BASE_ARGS, "--skip-outbound-cidrs", OTHER[fam])
    reached(mesh.app(OTHER[fam], 8080), "remote", 8080)
    captured(mesh.app(REMOTE[fam], 8080), REMOTE[fam], 8080)


@FAMILIES
def test_pod_calling_itself_is_not_captured(mesh, fam):
    mesh.init(*BASE_ARGS)
    reached(mesh.app(POD[fam], 8081), "app", 8081)         # its own pod IP, routed over lo
    reached(mesh.app(LOOP[fam], 8081), "app", 8081)        # loopback
    reached(mesh.app(LOOP[fam], OUT_PORT), "capture", OUT_PORT)  # the capture port itself


# --------------------------------------------------------------------------- inbound

@FAMILIES
@pytest.mark.parametrize("ports", [None, "*"], ids=["no-list", "star"])
def test_inbound_every_port_but_the_sidecars_own(mesh, fam, ports):
    reached(mesh.from_remote(POD[fam], 8080), "app", 8080)  # control
    extra = [] if ports is None else ["--inbound-ports", ports]
    mesh.init(*BASE_ARGS, *extra, "--skip-inbound-ports", str(ADMIN_PORT))
    for port in (8080, 8081):
        r = mesh.from_remote(POD[fam], port)
        assert r["server"] == "inbound" and r["orig"] == [POD[fam], port], r
    reached(mesh.from_remote(POD[fam], OUT_PORT), "capture", OUT_PORT)  # sidecar's own
    reached(mesh.from_remote(POD[fam], IN_PORT), "inbound", IN_PORT)
    reached(mesh.from_remote(POD[fam], ADMIN_PORT), "app", ADMIN_PORT)  # skipped


@FAMILIES
def test_inbound_only_listed_ports(mesh, fam):
    mesh.init(*BASE_ARGS, "--inbound-ports", "8080,15000")
    r = mesh.from_remote(POD[fam], 8080)
    assert r["server"] == "inbound" and r["orig"] == [POD[fam], 8080], r
    r = mesh.from_remote(POD[fam], ADMIN_PORT)
    assert r["server"] == "inbound" and r["orig"] == [POD[fam], ADMIN_PORT], r
    reached(mesh.from_remote(POD[fam], 8081), "app", 8081)
    reached(mesh.from_remote(POD[fam], OUT_PORT), "capture", OUT_PORT)


def test_ipv4_only_leaves_ipv6_alone(mesh):
    mesh.init(*BASE_ARGS, "--ipv4-only")
    captured(mesh.app(REMOTE[4], 8080), REMOTE[4], 8080)
    reached(mesh.app(REMOTE[6], 8080), "remote", 8080)
    reached(mesh.from_remote(POD[6], 8080), "app", 8080)
    assert "PORTCULLIS" not in nat_state(mesh.pod).split("*nat", 2)[2]


# --------------------------------------------------------------------------- idempotence, undo

def foreign_rules(ns: str):
    """Someone else's nat rules, which portcullis-init must leave as they are."""
    for cmd in ("iptables", "ip6tables"):
        for args in (["-N", "USER_CHAIN"], ["-A", "USER_CHAIN", "-p", "udp", "-j", "RETURN"],
                     ["-A", "OUTPUT", "-p", "udp", "-j", "USER_CHAIN"],
                     ["-A", "PREROUTING", "-p", "tcp", "--dport", "2222", "-j", "REDIRECT",
                      "--to-ports", "22"]):
            r = subprocess.run(["ip", "netns", "exec", ns, cmd, "-w", "-t", "nat", *args],
                               capture_output=True, text=True, timeout=h.T(30))
            assert r.returncode == 0, f"{cmd} {args}: {r.stderr}"


def test_rerun_gives_identical_rules(mesh):
    foreign_rules(mesh.pod)
    args = [*BASE_ARGS, "--skip-outbound-ports", "9090", "--skip-outbound-cidrs",
            "10.232.0.0/16,fd00:232::/64", "--skip-inbound-ports", str(ADMIN_PORT)]
    mesh.init(*args)
    first = nat_state(mesh.pod)
    assert first.count("-j PORTCULLIS_INBOUND") == 2 and first.count("-j PORTCULLIS_OUTPUT") == 2
    mesh.init(*args)
    assert nat_state(mesh.pod) == first
    # different arguments replace the rules (no IPv6 ones with --ipv4-only) ...
    mesh.init(*BASE_ARGS, "--inbound-ports", "8080", "--ipv4-only")
    other = nat_state(mesh.pod)
    assert other != first and "9090" not in other and "--dport 8080" in other
    assert "PORTCULLIS" not in other.split("*nat", 2)[2]
    reached(mesh.from_remote(POD[4], 8081), "app", 8081)
    # ... and the first arguments bring back exactly the first rules
    mesh.init(*args)
    assert nat_state(mesh.pod) == first
    captured(mesh.app(REMOTE[6], 8080), REMOTE[6], 8080)
    reached(mesh.app(REMOTE[4], 9090), "remote", 9090)


@pytest.mark.parametrize("with_args", [False, True], ids=["alone", "same-args"])
def test_undo_restores_the_table_exactly(mesh, with_args):
    foreign_rules(mesh.pod)
    before = nat_state(mesh.pod)
    args = [*BASE_ARGS, "--inbound-ports", "8080,8081", "--skip-outbound-cidrs", "fd00:232::/64"]
    mesh.init(*args)
    assert nat_state(mesh.pod) != before
    captured(mesh.app(REMOTE[4], 8080), REMOTE[4], 8080)
    mesh.init(*(args if with_args else []), "--undo")
    assert nat_state(mesh.pod) == before
    for fam in (4, 6):
        reached(mesh.app(REMOTE[fam], 8080), "remote", 8080)
        reached(mesh.from_remote(POD[fam], 8080), "app", 8080)
    # a second undo has nothing to do
    mesh.init("--undo")
    assert nat_state(mesh.pod) == before


def test_undo_with_nothing_installed(net):
    foreign_rules(net.pod)
    before = nat_state(net.pod)
    net.init("--undo")
    assert nat_state(net.pod) == before


def test_dry_run_prints_the_rules_it_installs(net):
    foreign_rules(net.pod)
    before = nat_state(net.pod)
    args = [*BASE_ARGS, "--skip-inbound-ports", "15000,15020-15021", "--skip-outbound-ports",
            "5432", "--skip-outbound-cidrs", "10.96.0.0/12,fd00:10::/108"]
    dry = net.init(*args, "--dry-run").stdout
    assert nat_state(net.pod) == before, "--dry-run changed the rules"
    # the printed commands, run as they are, give what a real run gives
    r = subprocess.run(["ip", "netns", "exec", net.pod, "bash", "-euc", dry], capture_output=True,
                       text=True, timeout=h.T(60))
    assert r.returncode == 0, r.stderr
    by_hand = nat_state(net.pod)
    net.init("--undo")
    assert nat_state(net.pod) == before
    net.init(*args)
    assert nat_state(net.pod) == by_hand
    # and the printed undo commands remove it again
    undo = net.init("--undo", "--dry-run").stdout
    r = subprocess.run(["ip", "netns", "exec", net.pod, "bash", "-euc", undo],
                       capture_output=True, text=True, timeout=h.T(60))
    assert r.returncode == 0, r.stderr
    assert nat_state(net.pod) == before


def test_missing_ip6tables_is_an_error_that_changes_nothing(net):
    foreign_rules(net.pod)
    before = nat_state(net.pod)
    r = net.init(*BASE_ARGS, expect_rc=1, env={"IP6TABLES": "/nonexistent/ip6tables"})
    assert "--ipv4-only" in r.stderr or "not found" in r.stderr, r.stderr
    assert nat_state(net.pod) == before


def test_a_failed_command_takes_the_rules_back(net, tmp_path):
    """An iptables that refuses the owner match (as a kernel without xt_owner would): exit 1,
    and no half set of rules stays behind, not even an earlier run's."""
    foreign_rules(net.pod)
    before = nat_state(net.pod)
    real = shutil.which("iptables")
    fake = tmp_path / "iptables"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *--uid-owner*) echo "no owner match" >&2; exit 1;; '
                    f'esac\nexec {real} "$@"\n')
    fake.chmod(0o755)
    net.init(*BASE_ARGS)  # an earlier, good run
    r = net.init(*BASE_ARGS, "--inbound-ports", "8080", expect_rc=1, env={"IPTABLES": str(fake)})
    assert "no owner match" in r.stderr and "removing the rules" in r.stderr, r.stderr
    assert nat_state(net.pod) == before


# --------------------------------------------------------------------------- arguments

BAD = [
    ([], "--proxy-uid is required"),
    (["--proxy-uid", "1337", "--inbound-port", "15006"], "--outbound-port is required"),
    (["--proxy-uid", "1337", "--outbound-port", "15001"], "--inbound-port is required"),
    ([*BASE_ARGS[:1], "abc", *BASE_ARGS[2:]], "--proxy-uid: 'abc'"),
    ([*BASE_ARGS[:1], "-1", *BASE_ARGS[2:]], "--proxy-uid: '-1'"),
    ([*BASE_ARGS[:1], "0", *BASE_ARGS[2:]], "--proxy-uid 0"),
    ([*BASE_ARGS[:3], "0", *BASE_ARGS[4:]], "--outbound-port: '0'"),
    ([*BASE_ARGS[:3], "65536", *BASE_ARGS[4:]], "--outbound-port: '65536'"),
    ([*BASE_ARGS[:3], "15001x", *BASE_ARGS[4:]], "--outbound-port: '15001x'"),
    ([*BASE_ARGS[:5], "15001"], "must differ"),
    ([*BASE_ARGS, "--inbound-ports", "8080,,9090"], "--inbound-ports: ''"),
    ([*BASE_ARGS, "--inbound-ports", ""], "--inbound-ports: empty"),
    ([*BASE_ARGS, "--skip-inbound-ports", "http"], "--skip-inbound-ports: 'http'"),
    ([*BASE_ARGS, "--skip-outbound-ports", "9100-9000"], "--skip-outbound-ports: '9100-9000'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "10.0.0.0/33"], "'10.0.0.0/33'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "300.1.1.1"], "'300.1.1.1'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "10.0.0/8"], "'10.0.0/8'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "fd00::/129"], "'fd00::/129'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "fd00:::1"], "'fd00:::1'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "1:2:3:4:5:6:7:8:9"], "'1:2:3:4:5:6:7:8:9'"),
    ([*BASE_ARGS, "--skip-outbound-cidrs", "example.com"], "'example.com'"),
    ([*BASE_ARGS, "--bogus"], "unknown argument '--bogus'"),
    ([*BASE_ARGS, "--undo=yes"], "--undo takes no value"),
    ([*BASE_ARGS, "--skip-outbound-ports"], "--skip-outbound-ports needs a value"),
    (["--undo", "--outbound-port", "0"], "--outbound-port: '0'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_exit_2(args, message):
    # --dry-run: even a check that failed to refuse would change no rules here
    r = subprocess.run([str(INIT), *args, "--dry-run"], capture_output=True, text=True,
                       timeout=h.T(30))
    assert r.returncode == 2, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    assert message in r.stderr, r.stderr
    assert r.stdout == "", "nothing may be printed (or done) after a usage error"


def test_good_addresses_are_accepted():
    cidrs = "10.0.0.0/8,192.168.1.1,0.0.0.0/0,::/0,::1,fd00::,fe80::1:2/64,::ffff:10.0.0.1/128," \
            "1:2:3:4:5:6:7:8,2001:db8::/32"
    r = subprocess.run([str(INIT), *BASE_ARGS, "--skip-outbound-cidrs", cidrs,
                        "--inbound-ports", "1,65535,100-200", "--dry-run"],
                       capture_output=True, text=True, timeout=h.T(30))
    assert r.returncode == 0, r.stderr
    v4 = [l for l in r.stdout.splitlines() if l.startswith("iptables ")]
    v6 = [l for l in r.stdout.splitlines() if l.startswith("ip6tables ")]
    assert any("-d 192.168.1.1/32 -j RETURN" in l for l in v4)
    assert not any("::" in l for l in v4)
    if not Path("/proc/net/if_inet6").exists():
        return  # no IPv6 here: portcullis-init prints IPv4 rules only
    assert any("-d ::ffff:10.0.0.1/128 -j RETURN" in l for l in v6)
    assert not any("10.0.0.0/8" in l for l in v6)
    assert any("--dport 100:200 -j PORTCULLIS_IN_REDIRECT" in l for l in v4)


def test_help():
    r = subprocess.run([str(INIT), "--help"], capture_output=True, text=True, timeout=h.T(30))
    assert r.returncode == 0
    for opt in ("--proxy-uid", "--outbound-port", "--inbound-port", "--inbound-ports",
                "--skip-inbound-ports", "--skip-outbound-ports", "--skip-outbound-cidrs",
                "--ipv4-only", "--dry-run", "--undo"):
        assert opt in r.stdout

"""The Kubernetes manifests (docker/kustomization.yaml, docker/k8s/) agree with the config the
image ships (docker/portcullis.conf) and with the image (docker/Dockerfile): ports, paths,
uid, probes, grace period against drain, resources against workers and max_connections
(issue 17). No cluster is available here: this reads the YAML (python3-yaml)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import harness as h

DOCKER = h.REPO / "docker"
CONF = DOCKER / "portcullis.conf"
KIB = 1024
MIB = 1024 * KIB
# README "Container" / deployment.yaml: what the memory limit must hold.
START_RSS = 6 * MIB                 # measured in the container with the shipped config
IDLE_CONN = 8 * KIB                 # bench: 4.4 KiB TCP, 7.7-8.1 KiB HTTP per idle connection
BUSY_CONN = 2 * (256 + 48 + 64) * KIB   # per direction: high watermark + a read + a batch
BUSY_RESERVE = 128                  # bulk streams into slow readers the limit must also hold
ADMIN_PATHS = {"/ready", "/healthz"}


# --------------------------------------------------------------------------- libconfig

_TOKEN = re.compile(r'''
    (?P<ws>\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>[-+]?(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)L{0,2})
  | (?P<word>[A-Za-z*][-A-Za-z0-9_*]*)
  | (?P<punct>[=:;,{}()\[\]])
''', re.X | re.S)


def parse_libconfig(text: str) -> dict:
    """The subset of libconfig that portcullis configs use: settings, groups, lists,
    arrays, strings (adjacent ones concatenated), integers, floats, booleans."""
    toks: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"libconfig: cannot read {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            toks.append((m.lastgroup, m.group()))
    i = 0

    def peek() -> str:
        return toks[i][1] if i < len(toks) else ""

    def take(expect: str | None = None) -> tuple[str, str]:
        nonlocal i
        kind, val = toks[i]
        if expect is not None and val != expect:
            raise ValueError(f"libconfig: expected {expect!r}, got {val!r}")
        i += 1
        return kind, val

    def value():
        kind, val = take()
        if val == "{":
            return settings("}")
        if val in ("(", "["):
            end = ")" if val == "(" else "]"
            items = []
            while peek() != end:
                items.append(value())
                if peek() == ",":
                    take()
            take(end)
            return items
        if kind == "str":
            s = val[1:-1].encode().decode("unicode_escape")
            while i < len(toks) and toks[i][0] == "str":
                s += take()[1][1:-1].encode().decode("unicode_escape")
            return s
        if kind == "num":
            v = val.rstrip("L")
            return float(v) if re.search(r"[.eE]", v) and not v.startswith("0x") else int(v, 0)
        if val.lower() in ("true", "false"):
            return val.lower() == "true"
        raise ValueError(f"libconfig: unexpected {val!r}")

    def settings(end: str) -> dict:
        out = {}
        while i < len(toks) and peek() != end:
            _, name = take()
            take() if peek() in ("=", ":") else None
            out[name] = value()
            if peek() in (";", ","):
                take()
        if end:
            take(end)
        return out

    return settings("")


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def conf() -> dict:
    return parse_libconfig(CONF.read_text())


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((DOCKER / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objs(kustomization) -> dict[str, dict]:
    """Every object the kustomization applies, by kind (one of each here)."""
    out: dict[str, dict] = {}
    for res in kustomization["resources"]:
        for doc in yaml.safe_load_all((DOCKER / res).read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def pod(objs) -> dict:
    return objs["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def sidecar(pod) -> dict:
    found = [c for c in pod.get("initContainers", []) if c["name"] == "portcullis"]
    assert len(found) == 1, "portcullis is not an init container"
    return found[0]


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def quantity(q: str | int) -> float:
    units = {"Ki": KIB, "Mi": MIB, "Gi": 1024 * MIB, "m": 1e-3, "": 1}
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|m|)", str(q))
    assert m, q
    return float(m.group(1)) * units[m.group(2)]


# --------------------------------------------------------------------------- checks

def test_parser_reads_what_the_binary_reads(conf):
    """A parser that read nothing would pass every check below."""
    assert conf["workers"] == 2 and conf["limits"]["max_connections"] == 10000
    assert conf["inbound"][0]["allow"][1] == {"namespace": "jobs",
                                              "service_account": "scheduler"}


def test_configmap_is_generated_from_the_shipped_config(kustomization, objs):
    gens = kustomization["configMapGenerator"]
    assert [g["name"] for g in gens] == ["portcullis-api"]
    files = gens[0]["files"]
    assert len(files) == 1
    key, _, path = files[0].rpartition("=")
    assert (DOCKER / path).resolve() == CONF.resolve()
    assert (key or Path(path).name) == "portcullis.conf"
    assert "ConfigMap" not in objs, "a hand-written ConfigMap beside the generated one"
    assert not (DOCKER / "k8s" / "configmap.yaml").exists()


def test_sidecar_is_native_and_starts_before_the_app(pod, sidecar):
    assert sidecar["restartPolicy"] == "Always"
    assert "portcullis" not in [c["name"] for c in pod["containers"]]
    startup = sidecar["startupProbe"]["httpGet"]
    assert startup["path"] == "/ready"
    app = [c for c in pod["containers"] if c["name"] == "app"]
    assert app and "readinessProbe" in app[0], "the example app has no readiness probe"


def test_image_name_and_pull_policy(sidecar):
    image = sidecar["image"]
    registry = image.split("/", 1)[0]
    assert "/" in image and ("." in registry or ":" in registry or registry == "localhost"), \
        f"{image}: not fully qualified (podman and kind would prefix docker.io/library/)"
    assert sidecar["imagePullPolicy"] in ("IfNotPresent", "Never")


def test_ports_agree_with_the_config_and_the_image(conf, sidecar, objs):
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    inbound = conf["inbound"][0]["listen"]
    admin = conf["admin"]["listen"]
    assert ports["mtls"] == port_of(inbound)
    assert ports["admin"] == port_of(admin)
    assert admin.startswith("0.0.0.0:"), "the kubelet probes the pod IP"
    assert inbound.startswith("0.0.0.0:")
    exposed = {int(p) for p in re.findall(r"\d+", re.search(r"^EXPOSE (.*)$", dockerfile(),
                                                             re.M).group(1))}
    assert {port_of(inbound), port_of(admin)} <= exposed
    svc = objs["Service"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in svc] == [(port_of(inbound), "mtls")]
    np = objs["NetworkPolicy"]["spec"]["ingress"]
    assert [p["port"] for rule in np for p in rule["ports"]] == [port_of(inbound)]
    namespaces = {v for rule in np for f in rule["from"]
                  for e in f["namespaceSelector"]["matchExpressions"] for v in e["values"]}
    assert namespaces == {a["namespace"] for a in conf["inbound"][0]["allow"]}


def test_probes_use_admin_paths(sidecar):
    src = (h.REPO / "proxy" / "admin.c").read_text()
    for path in ADMIN_PATHS:
        assert f'"{path}"' in src, f"the admin endpoint has no {path}"
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "admin"}, probe


def test_paths_agree_with_the_config_and_the_image(conf, pod, sidecar):
    cmd = json_list(re.search(r"^CMD (.*)$", dockerfile(), re.M).group(1))
    assert sidecar.get("args", cmd) == cmd == ["-c", "/etc/portcullis/portcullis.conf"]
    assert "command" not in sidecar, "the image's ENTRYPOINT is the binary"
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["portcullis-config"]["mountPath"] == str(Path(cmd[1]).parent)
    ident = {str(Path(conf["identity"][k]).parent) for k in ("cert", "key", "ca")}
    assert ident == {mounts["portcullis-identity"]["mountPath"]}
    assert all("subPath" not in m for m in mounts.values()), "subPath mounts never update"
    assert all(m.get("readOnly") for m in mounts.values())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["portcullis-config"]["configMap"]["name"] == "portcullis-api"
    secret = volumes["portcullis-identity"]["secret"]
    assert secret["defaultMode"] == 0o440
    names = {Path(conf["identity"][k]).name for k in ("cert", "key", "ca")}
    assert names == {"tls.crt", "tls.key", "ca.crt"}, "cert-manager's Secret keys"


def json_list(text: str) -> list[str]:
    return yaml.safe_load(text)


def test_uid_agrees_with_the_image(pod, sidecar):
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.M)
    uid, gid = int(user.group(1)), int(user.group(2))
    sc = sidecar["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["fsGroup"] == gid, "the key (0440) must be group-readable"
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_grace_period_outlasts_prestop_and_drain(conf, pod, sidecar):
    cmd = sidecar["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "/bin/sleep" and len(cmd) == 2
    pre_stop = int(cmd[1])
    assert pre_stop >= 3, "too short for endpoint removal to propagate"
    drain = conf["limits"]["drain_timeout_ms"] / 1000
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_resources_hold_workers_and_max_connections(conf, sidecar):
    limits = sidecar["resources"]["limits"]
    assert quantity(limits["cpu"]) == conf["workers"], "workers = CPU limit"
    need = START_RSS + conf["limits"]["max_connections"] * IDLE_CONN + BUSY_RESERVE * BUSY_CONN
    assert quantity(limits["memory"]) >= need, f"memory limit below {need / MIB:.0f} MiB"
    assert quantity(sidecar["resources"]["requests"]["memory"]) <= quantity(limits["memory"])


def test_certificate_issues_the_pods_identity(conf, objs, pod):
    cert = objs["Certificate"]["spec"]
    ns = objs["Deployment"]["metadata"]["namespace"]
    sa = pod["serviceAccountName"]
    assert cert["uris"] == [f"spiffe://{conf['trust_domain']}/ns/{ns}/sa/{sa}"]
    assert cert["secretName"] == \
        {v["name"]: v for v in pod["volumes"]}["portcullis-identity"]["secret"]["secretName"]
    assert objs["ServiceAccount"]["metadata"]["name"] == sa

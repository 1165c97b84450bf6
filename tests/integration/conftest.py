"""pytest fixtures for the portcullis integration suite.

Environment:
  PORTCULLIS_BIN            binary under test (default <repo>/build/portcullis), e.g. an ASan build
  PORTCULLIS_PKI_DIR        use an already generated dev PKI instead of running
                            certs/gen-dev-pki.sh into a temporary directory
  PORTCULLIS_TIMEOUT_SCALE  multiply all timeouts (e.g. 3 for sanitizer builds)
  PORTCULLIS_READY_ADMIN    1: a sidecar is started once its admin listener answers too
                            (ThreadSanitizer builds; see harness.WAIT_ADMIN)
"""

from __future__ import annotations

import faulthandler
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import netkit as nk  # noqa: E402

PER_TEST_HANG_GUARD_S = 120


def pytest_configure(config):
    # 1,000-connection tests need fds in this process and in the sidecar (inherited).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(max(soft, 8192), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._pc_first_sidecar = len(h.Sidecar.created)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report names every sidecar it involved (started during the test, or
    shared and still running), with its config and log paths and the last log lines."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    first = getattr(item, "_pc_first_sidecar", 0)
    seen, parts = set(), []
    for ref in h.Sidecar.created[first:]:
        sc = ref()
        if sc is not None and id(sc) not in seen:
            seen.add(id(sc))
            parts.append(sc.failure_report())
    for sc in list(h.Sidecar.live):
        if id(sc) not in seen:
            seen.add(id(sc))
            parts.append(sc.failure_report())
    if parts:
        rep.sections.append(("portcullis sidecars", "\n\n".join(parts)))


@pytest.fixture(autouse=True)
def _mark_logs():
    """Module-shared sidecars outlive a test: mark where this test's log lines begin."""
    for sc in list(h.Sidecar.live):
        sc.mark_test_start()
    yield


@pytest.fixture(autouse=True)
def _hang_guard():
    """Dump all stacks and exit if one test hangs (every test loop is bounded anyway)."""
    faulthandler.dump_traceback_later(h.T(PER_TEST_HANG_GUARD_S), exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def portcullis_bin() -> Path:
    if not h.BIN.exists() or not os.access(h.BIN, os.X_OK):
        pytest.fail(f"portcullis binary not found/executable at {h.BIN} "
                    f"(build it, or set PORTCULLIS_BIN)")
    return h.BIN


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> h.PKI:
    pre = os.environ.get("PORTCULLIS_PKI_DIR")
    if pre:
        return h.PKI(Path(pre))
    if not h.PKI_SCRIPT.exists():
        pytest.fail(f"{h.PKI_SCRIPT} does not exist (or set PORTCULLIS_PKI_DIR)")
    out = tmp_path_factory.mktemp("pki")
    r = subprocess.run(["bash", str(h.PKI_SCRIPT), str(out)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        pytest.fail(f"gen-dev-pki.sh failed rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    p = h.PKI(out)
    for stem in ("ca", "payments-api", "web-frontend"):
        assert Path(p.crt(stem)).exists(), f"PKI lacks {stem}.crt"
    return p


class _Factory:
    """Creates sidecars / apps / upstreams and tears them all down (bounded)."""

    def __init__(self, tmp: Path, pki: h.PKI):
        self.tmp = tmp
        self.pki = pki
        self.sidecars: list[h.Sidecar] = []
        self.apps: list = []
        self.n = 0

    def sidecar(self, cfg: dict, name: str | None = None, **kw) -> h.Sidecar:
        self.n += 1
        sc = h.Sidecar(self.tmp, cfg, name=name or f"sidecar{self.n}", **kw)
        self.sidecars.append(sc)
        return sc

    def app(self, mode: str = "echo", **kw) -> h.AppServer:
        a = h.AppServer(mode, **kw)
        self.apps.append(a)
        return a

    def upstream(self, stem: str, **kw) -> h.TLSUpstream:
        u = h.TLSUpstream(self.pki, stem, **kw)
        self.apps.append(u)
        return u

    def teardown(self):
        errors = []
        for sc in self.sidecars:
            try:
                if not sc.stopped:
                    sc.stop()  # SIGTERM, asserts exit 0
                if sc.bad_stdout:
                    errors.append(f"{sc.name}: non-JSON lines on stdout: {sc.bad_stdout[:5]}")
            except Exception as e:  # collect, report all
                errors.append(str(e))
            report = sc.sanitizer_report()
            if report:
                errors.append(f"{sc.name}: sanitizer report on stderr ({sc.stderr_path}):\n"
                              + "\n".join(report))
        for a in self.apps:
            try:
                a.stop()
            except Exception as e:
                errors.append(f"app stop: {e}")
        if errors:
            pytest.fail("teardown problems:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def env(tmp_path, pki, portcullis_bin):
    """Per-test factory: env.sidecar(cfg), env.app(mode), env.upstream(stem)."""
    f = _Factory(tmp_path, pki)
    yield f
    f.teardown()


@pytest.fixture(scope="module")
def module_env(tmp_path_factory, pki, portcullis_bin):
    """Module-scoped factory for sidecars shared by many tests."""
    f = _Factory(tmp_path_factory.mktemp("mod"), pki)
    yield f
    f.teardown()


@pytest.fixture(scope="session")
def netns_ok():
    """Network namespaces with iptables can be made here (netkit.Net; test_init.py,
    test_transparent.py), or the test skips (CI=true: fails)."""
    nk.require_netns()

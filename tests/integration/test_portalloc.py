"""The test suite's port allocator (scripts/portalloc.py): two processes allocating at once
never hand out the same port, even from the same starting point, because each port handed
out is claimed across processes while its claimant lives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parents[2] / "scripts")
# Allocates 40 ports from a fixed start, prints them, then holds its claims until stdin ends.
CHILD = ("import sys; sys.path.insert(0, %r); import portalloc; "
         "a = portalloc.PortAllocator(seed=7); "
         "print(' '.join(str(a.take()) for _ in range(40)), flush=True); sys.stdin.read()"
         % SCRIPTS)


def test_two_processes_from_the_same_start_never_share_a_port(tmp_path):
    env = dict(os.environ, PORTCULLIS_PORT_CLAIMS=str(tmp_path / "claims"))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        got = [set(int(x) for x in p.stdout.readline().split()) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)
    assert all(len(g) == 40 for g in got), got
    assert not (got[0] & got[1]), f"both processes were handed {sorted(got[0] & got[1])}"


def test_a_claim_whose_process_ended_is_taken_over(tmp_path):
    env = dict(os.environ, PORTCULLIS_PORT_CLAIMS=str(tmp_path / "claims"))
    run = [sys.executable, "-c", CHILD]
    first = subprocess.run(run, input="", capture_output=True, text=True, env=env, timeout=30)
    second = subprocess.run(run, input="", capture_output=True, text=True, env=env, timeout=30)
    assert first.stdout.split() == second.stdout.split(), "the ended process's claims still held"

#!/usr/bin/env bash
# Builds portcullis twice (plain, and with ASan+UBSan) and runs the whole test
# suite (unit, fuzz-corpus replay, integration with testssl.sh, format)
# against each build; builds and runs the container image once (podman,
# tests/integration/test_container.py); then builds it with ThreadSanitizer
# and runs the unit tests and the threaded part of the integration suite
# (below) against that; then fuzzes every libFuzzer target for a bounded time
# (scripts/fuzz.sh; PC_FUZZ_SECONDS per target, default 40).
# Usage: scripts/test.sh            (from anywhere; needs root or sudo for apt)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh test
jobs=$(nproc)

run_suite() { # $1 = build dir, rest = extra cmake args
  local dir=$1
  shift
  cmake -S . -B "$dir" -DBUILD_TESTING=ON -DPC_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
  (cd "$dir" && ctest --output-on-failure --timeout 1800)
}

echo "== plain build (build/) =="
run_suite build -DCMAKE_BUILD_TYPE=RelWithDebInfo
echo "== container image: docker/Dockerfile built and run with podman =="
# Once per run, not per build: the image is built from the sources. Cached in
# /var/tmp/portcullis-container (about 4 min cold, under 1 min after). -rs
# prints any skip's reason; with CI=true (.ci/run) a skip is a failure.
/usr/bin/python3 -m pytest -q -rs -p no:cacheprovider tests/integration/test_container.py
echo "== ASan + UBSan build (build-asan/) =="
# Sanitized binaries are slower: the integration harness stretches its
# functional deadlines (handshake/idle timeouts under test) by this factor.
PORTCULLIS_TIMEOUT_SCALE=3 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 run_suite build-asan -DCMAKE_BUILD_TYPE=Debug -DPC_SANITIZE=ON
echo "== ThreadSanitizer build (build-tsan/) =="
# A subset of the integration suite, the files that drive several threads at
# once: a sidecar runs its workers (2 unless a test says otherwise) beside the
# main thread (reload, admin, signals) and the log writer, and these files
# hand generations over
# (test_reload.py), scrape the workers' counters (test_admin.py), stop and
# drain the workers (test_shutdown.py), share the handshake budget and wake
# paused workers (test_admission.py), run HTTP/2, gRPC and upstream pools on
# the workers (test_http2.py, test_http2_lifecycle.py, test_grpc.py,
# test_http_outbound.py, and the body and 100-continue deadlines of
# test_body_timeout.py), share one server context's ticket keys across
# workers (test_resumption.py), and carry many connections at once through
# sidecar pairs (test_e2e.py, test_l4.py). The rest of the suite exercises
# single-connection protocol paths that the plain and ASan runs cover.
# About 5 minutes on 2 cores besides the build (measured: 151 tests, 283 s);
# TSan slows the sidecar 5-15x.
tsan_files=(test_reload.py test_admin.py test_shutdown.py test_admission.py test_http2.py
  test_http2_lifecycle.py test_e2e.py test_l4.py test_http_outbound.py test_grpc.py
  test_resumption.py test_body_timeout.py)
cmake -S . -B build-tsan -DBUILD_TESTING=ON -DPC_WERROR=ON -DCMAKE_BUILD_TYPE=Debug -DPC_TSAN=ON >/dev/null
cmake --build build-tsan -j"$jobs"
# TSan maps its shadow memory at fixed addresses; with more than 28 bits of
# mmap randomisation (some newer kernels) a library can land there and the
# runtime dies with "unexpected memory mapping". Disable address
# randomisation for the test processes only (setarch -R is inherited by the
# sidecars the tests start) rather than changing the machine's sysctl.
tsan_run=()
if (($(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0) > 28)); then
  tsan_run=(setarch "$(uname -m)" -R)
fi
# halt_on_error + abort_on_error: the first race kills the sidecar, so its
# test fails on the exit code; the harness also fails any test whose sidecar
# printed a report (tests/integration/conftest.py). tests/tsan.supp says what
# may ever be suppressed (no entry so far).
export TSAN_OPTIONS="halt_on_error=1 abort_on_error=1 second_deadlock_stack=1 suppressions=$root/tests/tsan.supp"
(cd build-tsan && "${tsan_run[@]}" ctest --output-on-failure -R '^unit_')
# PORTCULLIS_READY_ADMIN: a test gets its sidecar once the main loop polls (a
# SIGTERM sent just before that was now and then lost under TSan; harness.py).
PORTCULLIS_BIN=$root/build-tsan/portcullis PORTCULLIS_TIMEOUT_SCALE=3 PORTCULLIS_READY_ADMIN=1 \
  "${tsan_run[@]}" /usr/bin/python3 -m pytest -q -p no:cacheprovider "${tsan_files[@]/#/tests/integration/}"
unset TSAN_OPTIONS
echo "== libFuzzer targets, clang-14 + ASan + UBSan (build-fuzz/) =="
bash scripts/fuzz.sh
echo "test.sh: all suites passed (plain, container image, ASan+UBSan, TSan subset) and every fuzz target ran clean"

#!/usr/bin/env bash
# bench/run_h2.sh - HTTP/2 and gRPC-shaped requests through a sidecar pair, portcullis
# against HAProxy and nginx, in one command (bench/README.md, "HTTP/2 and gRPC-shaped
# requests"). Installs what is missing from Debian, builds portcullis and pc-backend in
# release mode, raises the descriptor limit, runs bench/run_h2.py. Results land in
# bench/results/h2/.
#
#   bash bench/run_h2.sh                                     # ~10-15 min on 2 cores
#   BENCH_ROWS=portcullis-h2,haproxy-h2 bash bench/run_h2.sh
#   BENCH_BUILD_DIR=/tmp/b BENCH_SKIP_BUILD=1 bash bench/run_h2.sh   # use an existing build
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${BENCH_BUILD_DIR:-$root/build-release}
export BENCH_BUILD_DIR=$build

# --- packages (Debian only) -------------------------------------------------------
pkgs=(haproxy nginx nghttp2-client procps iproute2)
source bench/peers.sh
install_bench_pkgs h2bench "${pkgs[@]}"

# --- build (release, its own directory) -------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-} != 1 ]]; then
  bash scripts/install-deps.sh build
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
  cmake --build "$build" -j"$(nproc)" --target portcullis pc-backend >/dev/null
fi

# --- descriptors: each idle connection costs each proxy two -----------------------
ulimit -Hn 65536 2>/dev/null || true
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

exec /usr/bin/python3 bench/run_h2.py "$@"

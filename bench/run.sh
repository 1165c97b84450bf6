#!/usr/bin/env bash
# bench/run.sh - the side-by-side benchmark in one command (see bench/README.md):
# installs what it needs from Debian, builds portcullis and the bench tools in
# release mode, then runs bench/run.py. Results land in bench/results/.
#
#   bash bench/run.sh                                   # full run, ~20-25 min on 2 cores
#   BENCH_QUICK=1 bash bench/run.sh                     # smoke run, ~3 min
#   BENCH_ROWS=portcullis-tcp,haproxy-tcp bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${BENCH_BUILD_DIR:-$root/build-release}
export BENCH_BUILD_DIR=$build

# --- packages (Debian only) -------------------------------------------------------
bash scripts/install-deps.sh build
pkgs=(haproxy nginx libnginx-mod-stream hitch python3-matplotlib procps)
source bench/peers.sh
install_bench_pkgs bench "${pkgs[@]}"

# --- build (release, its own directory) -------------------------------------------
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target portcullis pc-loadgen pc-backend >/dev/null

# --- descriptors: 10,000 idle connections need ~20,000 in the proxy ---------------
ulimit -Hn 65536 2>/dev/null || true
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

exec /usr/bin/python3 bench/run.py "$@"

#!/usr/bin/env bash
# bench/reload_stall.sh - does a reload stall the loop that serves new handshakes?
# (issue 14, item 3). One sidecar (1 worker, inbound protocol = "tcp" to pc-backend)
# holds IDLE established mTLS connections; pc-loadgen then opens new connections
# (handshake + 1 request, 8 at a time) for DURATION s, twice: without reloads, and with a
# SIGHUP every RELOAD_EVERY s (default 2; each reload re-judges every held connection on the
# worker loop).
# Prints the new connections' p50/p99/max latency for both. Compare two builds with
#   bash bench/reload_stall.sh OLD_BINARY; bash bench/reload_stall.sh NEW_BINARY
# Needs bench tools built (bash bench/run.sh builds them into build-release/).
#
#   bash bench/reload_stall.sh [PORTCULLIS_BINARY]   (IDLE=9000 DURATION=8 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build-release/portcullis}
tools=${BENCH_BUILD_DIR:-build-release}/bench
idle=${IDLE:-9000}
dur=${DURATION:-8}
ulimit -n "$(ulimit -Hn)"
tmp=$(mktemp -d /tmp/pc-reload-stall.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

bash certs/gen-dev-pki.sh "$tmp/pki" >/dev/null
mapfile -t ports < <(PORTALLOC_OWNER=$$ /usr/bin/python3 scripts/portalloc.py 3)
p_in=${ports[0]} p_be=${ports[1]} p_adm=${ports[2]}
cat >"$tmp/pc.conf" <<EOF
trust_domain = "cluster.local";
workers = 1;
identity = { cert = "$tmp/pki/payments-api.crt"; key = "$tmp/pki/payments-api.key"; ca = "$tmp/pki/ca.crt"; };
admin = { listen = "127.0.0.1:$p_adm"; };
log = { level = "warn"; access = false; };
limits = { max_connections = 20000; idle_timeout_ms = 600000; };
inbound = ( { name = "api"; listen = "127.0.0.1:$p_in"; forward = "127.0.0.1:$p_be";
              protocol = "tcp"; allow = ( { namespace = "web"; } ); } );
EOF
"$tools/pc-backend" --listen "127.0.0.1:$p_be" --threads 1 >/dev/null 2>&1 &
pids+=($!)
"$bin" -c "$tmp/pc.conf" 2>"$tmp/pc.err" &
pc=$!
pids+=($pc)
for _ in $(seq 100); do
  grep -q '"ready"' "$tmp/pc.err" && break
  sleep 0.1
done
tls=(--tls --ca "$tmp/pki/ca.crt" --cert "$tmp/pki/web-frontend.crt" --key "$tmp/pki/web-frontend.key")

# the idle set, held until a line arrives on its stdin
mkfifo "$tmp/hold"
"$tools/pc-loadgen" --mode idle --target "127.0.0.1:$p_in" "${tls[@]}" --conns "$idle" \
  --inflight 64 --duration 300 <"$tmp/hold" >"$tmp/idle.out" 2>&1 &
pids+=($!)
exec 3>"$tmp/hold"
for _ in $(seq 1200); do
  grep -q '^ready' "$tmp/idle.out" && break
  sleep 0.1
done
grep '^ready' "$tmp/idle.out" || { cat "$tmp/idle.out"; exit 1; }

run() { # $1 = label, $2 = 1 to reload every RELOAD_EVERY s
  "$tools/pc-loadgen" --mode connrate --target "127.0.0.1:$p_in" "${tls[@]}" --conns 8 \
    --duration "$dur" --warmup 1 --label "$1" >"$tmp/$1.out" 2>&1 &
  local lg=$!
  local n=0
  if [[ $2 == 1 ]]; then
    while kill -0 "$lg" 2>/dev/null; do
      kill -HUP "$pc"
      n=$((n + 1))
      sleep "${RELOAD_EVERY:-2}"
    done
  fi
  wait "$lg"
  /usr/bin/python3 - "$tmp/$1.out" "$1" "$n" <<'PY'
import json, sys
r = [json.loads(ln) for ln in open(sys.argv[1]) if ln.startswith("{")][-1]
lat = r["latency_us"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {r.get('conns_per_s', 0):,.0f} | "
      f"{lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {lat['max'] / 1000:.2f} | "
      f"{r.get('errors', '?')} |")
PY
}
echo "binary: $bin ($("$bin" --version 2>&1 | head -1)); idle connections held: $idle"
echo "| run | reloads | new conns/s | p50 ms | p99 ms | max ms | failed |"
echo "|---|---:|---:|---:|---:|---:|---:|"
run quiet 0
run reloading 1
echo >&3

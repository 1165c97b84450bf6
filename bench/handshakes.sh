#!/usr/bin/env bash
# handshakes.sh - full vs resumed mTLS handshakes per second through one portcullis
# inbound TCP listener, in one run: pc-loadgen's connrate workload (connect,
# handshake, one HTTP request with "Connection: close", wait for the close) once
# without and once with --resume (each load-generator thread offers the latest
# TLS 1.3 session it was given). Prints both rates, the proxy's CPU per
# handshake, the ratio, and one JSON line per workload.
#
#   bash bench/handshakes.sh
#   HS_BUILD_DIR=build HS_DURATION=8 HS_CONC=32 HS_WORKERS=2 bash bench/handshakes.sh
#
# Needs portcullis, pc-loadgen and pc-backend built in HS_BUILD_DIR (default
# build-release; bench/run.sh builds it). Loopback only; every process it starts is
# stopped by its pid.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${HS_BUILD_DIR:-$ROOT/build-release}
[[ $BUILD = /* ]] || BUILD=$ROOT/$BUILD
DURATION=${HS_DURATION:-8}
WARMUP=${HS_WARMUP:-1}
CONC=${HS_CONC:-32}
WORKERS=${HS_WORKERS:-2}
THREADS=${HS_LOADGEN_THREADS:-2}
for b in portcullis bench/pc-loadgen bench/pc-backend; do
  [[ -x $BUILD/$b ]] || { echo "handshakes.sh: $BUILD/$b missing (build it first)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/pc-handshakes.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

bash "$ROOT/certs/gen-dev-pki.sh" "$WORK/pki" >/dev/null
port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND=$(port); LISTEN=$(port); ADMIN=$(port)
"$BUILD/bench/pc-backend" --listen "127.0.0.1:$BACKEND" --threads 1 >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/pc.conf" <<EOF
trust_domain = "cluster.local";
workers = $WORKERS;
identity = { cert = "$WORK/pki/payments-api.crt"; key = "$WORK/pki/payments-api.key"; ca = "$WORK/pki/ca.crt"; };
tls = { resumption = true; };
admin = { listen = "127.0.0.1:$ADMIN"; };
log = { level = "warn"; access = false; };
limits = { idle_timeout_ms = 900000; drain_timeout_ms = 1000; };
inbound = ( { name = "bench"; listen = "127.0.0.1:$LISTEN"; forward = "127.0.0.1:$BACKEND";
              protocol = "tcp"; allow = ( { namespace = "web"; } ); } );
EOF
"$BUILD/portcullis" -c "$WORK/pc.conf" >"$WORK/pc.out" 2>"$WORK/pc.err" &
PC=$!
PIDS+=($PC)
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$ADMIN/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$ADMIN/ready" >/dev/null || { cat "$WORK/pc.err" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$PC/stat"; }
resumed_total() {
  curl -fsS "http://127.0.0.1:$ADMIN/metrics" |
    awk '/^portcullis_tls_resumptions_total\{listener="bench"/ {print $2}'
}
run() { # $1 label, rest: extra loadgen flags; prints "rate cpu_ms_per_hs json"
  local label=$1; shift
  local t0 r0 t1 r1 json
  t0=$(cpu_ticks)
  json=$("$BUILD/bench/pc-loadgen" --mode connrate --target "127.0.0.1:$LISTEN" --tls \
    --ca "$WORK/pki/ca.crt" --cert "$WORK/pki/web-frontend.crt" --key "$WORK/pki/web-frontend.key" \
    --threads "$THREADS" --conns "$CONC" --duration "$DURATION" --warmup "$WARMUP" \
    --label "$label" "$@")
  t1=$(cpu_ticks)
  /usr/bin/python3 - "$json" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); ticks = int(sys.argv[3]) - int(sys.argv[2]); hz = int(sys.argv[4])
ms = ticks / hz * 1000 / max(r["connections_total"], 1)
print(f'{r["conns_per_s"]:.0f} {ms:.3f} {r.get("resumed", 0)} {r["handshake_us"]["count"]} {r["errors"]}')
PY
  echo "$json" >>"$WORK/results.jsonl"
}
read -r FULL FULL_MS FULL_RES FULL_N FULL_ERR < <(run full)
R0=$(resumed_total)
read -r RES RES_MS RES_RES RES_N RES_ERR < <(run resumed --resume)
R1=$(resumed_total)

echo "portcullis inbound tcp, $WORKERS workers, $CONC concurrent, ${DURATION}s (${WARMUP}s warm-up), $(nproc) cores shared with the load generator"
printf '%-9s %10s %12s %12s %8s\n' handshake 'per s' 'proxy CPU ms' 'resumed' errors
printf '%-9s %10s %12s %12s %8s\n' full "$FULL" "$FULL_MS" "$FULL_RES/$FULL_N" "$FULL_ERR"
printf '%-9s %10s %12s %12s %8s\n' resumed "$RES" "$RES_MS" "$RES_RES/$RES_N" "$RES_ERR"
/usr/bin/python3 -c "import sys; f,r,fm,rm=map(float,sys.argv[1:]); print(f'resumed/full: {r/f:.2f}x handshakes/s, {rm/fm:.2f}x proxy CPU per handshake')" \
  "$FULL" "$RES" "$FULL_MS" "$RES_MS"
echo "portcullis_tls_resumptions_total during the resumed run: $((${R1%.*} - ${R0%.*}))"
cat "$WORK/results.jsonl"

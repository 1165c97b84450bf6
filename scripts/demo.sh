#!/usr/bin/env bash
# The portcullis demo: builds, makes a dev PKI, starts a demo app with an
# inbound sidecar in front of it and two client-side outbound sidecars (one in
# namespace "web", allowed; one in namespace "evil", not allowed), makes one
# call through each, shows the refusal's log line, and stops everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The demo uses fixed ports (config/demo/*.conf: every listen and forward address, the
# admin listeners included). They lie outside the kernel's ephemeral range, so nothing takes
# them by chance; but another demo or program may hold one: then say which, and stop. The
# probe binds like the servers do (SO_REUSEADDR: a TIME_WAIT leftover is no obstacle) but
# without SO_REUSEPORT, so that any listener there, a SO_REUSEPORT one included, counts.
demo_ports=$(grep -ohE '(listen|forward|upstream) *= *"127\.0\.0\.1:[0-9]+"' config/demo/*.conf |
  grep -oE '[0-9]+"$' | tr -d '"' | sort -un)
/usr/bin/python3 - $demo_ports <<'PY'
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        busy.append(f"127.0.0.1:{port} ({e.strerror})")
    finally:
        s.close()
if busy:
    sys.exit("demo: these ports are not free, stop whatever holds them (e.g. ss -ltnp) and "
             "run the demo again:\n  " + "\n  ".join(busy))
PY

bash scripts/install-deps.sh build
cmake -S . -B build >/dev/null
cmake --build build --target portcullis -j"$(nproc)" >/dev/null
bin=$root/build/portcullis
demo=$root/build/demo
rm -rf "$demo" && mkdir -p "$demo"
cp config/demo/*.conf "$demo/"
cd "$demo"
bash "$root/certs/gen-dev-pki.sh" pki >/dev/null

# Every wait is bounded (DEMO_WAIT_S, default 60 s: a loaded machine is slow, not broken)
# and stops early when the process it waits for has exited. (bash reaps its background
# children as they exit, so `kill -0` tells a running one from an exited one.)
wait_s=${DEMO_WAIT_S:-60}
polls=$((wait_s * 20)) # every 0.05 s

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq "$polls"); do # the sidecars drain, then exit
    local running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    ((running)) || break
    sleep 0.05
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_ready() { # $1 = stderr log of a sidecar, $2 = its pid
  for _ in $(seq "$polls"); do
    grep -q '"msg":"ready"' "$1" 2>/dev/null && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      echo "demo: the sidecar logging to $1 exited before it was ready; its log:" >&2
      cat "$1" >&2
      exit 1
    fi
    sleep 0.05
  done
  echo "demo: the sidecar logging to $1 was not ready within ${wait_s} s; its log:" >&2
  cat "$1" >&2
  exit 1
}

wait_port() { # $1 = a port on 127.0.0.1 that must accept connections, $2 = pid of its server
  for _ in $(seq "$polls"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      echo "demo: the process that should listen on 127.0.0.1:$1 exited" >&2
      exit 1
    fi
    sleep 0.05
  done
  echo "demo: nothing is listening on 127.0.0.1:$1 after ${wait_s} s" >&2
  exit 1
}

wait_log() { # $1 = log file, $2 = extended regex, $3 = how many matching lines
  local n=0
  for _ in $(seq "$polls"); do
    n=$(grep -cE "$2" "$1" 2>/dev/null || true)
    ((${n:-0} >= $3)) && return 0
    sleep 0.05
  done
  echo "demo: expected $3 line(s) matching '$2' in $1 within ${wait_s} s, found ${n:-0}:" >&2
  cat "$1" >&2
  exit 1
}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
call() { # $1 = port, $2 = message; prints the answer or the failure
  /usr/bin/python3 - "$1" "$2" <<'PY'
import socket, sys
port, msg = int(sys.argv[1]), sys.argv[2]
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)  # a hang bound only
    s.sendall(msg.encode() + b"\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print("  answer:", data.decode().strip() if data else "(connection closed, no answer)")
except OSError as e:
    print("  refused:", e)
PY
}

say "starting the demo app (plaintext, 127.0.0.1:18080)"
/usr/bin/python3 "$root/scripts/demo_app.py" 18080 & pids+=($!)
wait_port 18080 $!
/usr/bin/python3 "$root/scripts/demo_app.py" --http 18081 & pids+=($!)
wait_port 18081 $!

say "starting sidecars: payments inbound :18443 (tcp) + :18444 (http), web outbound :18001 (tcp) + :18003 (http), evil outbound :18002"
declare -A sidecar_pid
for name in payments-inbound web-outbound evil-outbound; do
  "$bin" -c "$name.conf" >"$name.access.log" 2>"$name.server.log" & pids+=($!)
  sidecar_pid[$name]=$!
done
for name in payments-inbound web-outbound evil-outbound; do
  wait_ready "$name.server.log" "${sidecar_pid[$name]}"
done

say "web/frontend -> payments (allowed: namespace web is on the allow-list)"
call 18001 "charge order 42"

say "evil/intruder -> payments (not on the allow-list)"
call 18002 "charge order 666"
# access-log lines are written when a connection ends, by a log-writer thread: wait for the
# refusal in both sidecars' logs before showing them below
wait_log payments-inbound.access.log '"decision":"deny"' 1
wait_log evil-outbound.access.log '"listener":"payments"' 1

say "HTTP mode: web/frontend GETs /charges/42 through its outbound sidecar (allowed: GET under /charges)"
http_call() { # $1 = method, $2 = url
  /usr/bin/python3 - "$1" "$2" <<'PY'
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[2], method=sys.argv[1])
try:
    with urllib.request.urlopen(req, timeout=60) as r:  # a hang bound only
        print(f"  {r.status}: {r.read().decode().strip()}")
except urllib.error.HTTPError as e:
    print(f"  {e.code}: {e.read().decode().strip()}")
PY
}
http_call GET http://127.0.0.1:18003/charges/42
say "HTTP mode: the same caller tries DELETE /charges/42 (the allow entry says GET only)"
http_call DELETE http://127.0.0.1:18003/charges/42
wait_log payments-inbound.access.log '"method":"DELETE".*"decision":"deny"' 1

say "payments inbound sidecar: access log"
cat payments-inbound.access.log
say "the refusals, as the inbound sidecar logged them"
grep '"decision":"deny"' payments-inbound.access.log
say "the same refusals in the inbound sidecar's metrics (admin endpoint 127.0.0.1:18100/metrics)"
/usr/bin/python3 -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:18100/metrics", timeout=60).read().decode()
print("\n".join(l for l in text.splitlines()
                if l.startswith(("portcullis_connections_total", "portcullis_http_requests_total"))))'
say "evil's outbound sidecar saw the handshake refused by the upstream"
cat evil-outbound.access.log

say "stopping everything"
cleanup
trap - EXIT
echo "demo: done (logs in $demo)"

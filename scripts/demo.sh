#!/usr/bin/env bash
# The portcullis demo: builds, makes a dev PKI, starts a demo app with an
# inbound sidecar in front of it and two client-side outbound sidecars (one in
# namespace "web", allowed; one in namespace "evil", not allowed), makes one
# call through each, shows the refusal's log line, and stops everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh build
cmake -S . -B build >/dev/null
cmake --build build --target portcullis -j"$(nproc)" >/dev/null
bin=$root/build/portcullis
demo=$root/build/demo
rm -rf "$demo" && mkdir -p "$demo"
cp config/demo/*.conf "$demo/"
cd "$demo"
bash "$root/certs/gen-dev-pki.sh" pki >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_ready() { # $1 = stderr log of a sidecar
  for _ in $(seq 100); do
    grep -q '"msg":"ready"' "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "demo: sidecar did not become ready; its log:" >&2
  cat "$1" >&2
  exit 1
}

wait_port() { # $1 = a port on 127.0.0.1 that must accept connections
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "demo: nothing is listening on 127.0.0.1:$1" >&2
  exit 1
}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
call() { # $1 = port, $2 = message; prints the answer or the failure
  /usr/bin/python3 - "$1" "$2" <<'PY'
import socket, sys
port, msg = int(sys.argv[1]), sys.argv[2]
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
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
/usr/bin/python3 "$root/scripts/demo_app.py" --http 18081 & pids+=($!)
wait_port 18080
wait_port 18081

say "starting sidecars: payments inbound :18443 (tcp) + :18444 (http), web outbound :18001 (tcp) + :18003 (http), evil outbound :18002"
for name in payments-inbound web-outbound evil-outbound; do
  "$bin" -c "$name.conf" >"$name.access.log" 2>"$name.server.log" & pids+=($!)
done
for name in payments-inbound web-outbound evil-outbound; do wait_ready "$name.server.log"; done

say "web/frontend -> payments (allowed: namespace web is on the allow-list)"
call 18001 "charge order 42"

say "evil/intruder -> payments (not on the allow-list)"
call 18002 "charge order 666"
sleep 0.2

say "HTTP mode: web/frontend GETs /charges/42 through its outbound sidecar (allowed: GET under /charges)"
http_call() { # $1 = method, $2 = url
  /usr/bin/python3 - "$1" "$2" <<'PY'
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[2], method=sys.argv[1])
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(f"  {r.status}: {r.read().decode().strip()}")
except urllib.error.HTTPError as e:
    print(f"  {e.code}: {e.read().decode().strip()}")
PY
}
http_call GET http://127.0.0.1:18003/charges/42
say "HTTP mode: the same caller tries DELETE /charges/42 (the allow entry says GET only)"
http_call DELETE http://127.0.0.1:18003/charges/42
sleep 0.2

say "payments inbound sidecar: access log"
cat payments-inbound.access.log
say "the refusals, as the inbound sidecar logged them"
grep '"decision":"deny"' payments-inbound.access.log
say "the same refusals in the inbound sidecar's metrics (admin endpoint 127.0.0.1:18100/metrics)"
/usr/bin/python3 -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:18100/metrics", timeout=5).read().decode()
print("\n".join(l for l in text.splitlines()
                if l.startswith(("portcullis_connections_total", "portcullis_http_requests_total"))))'
say "evil's outbound sidecar saw the handshake refused by the upstream"
cat evil-outbound.access.log

say "stopping everything"
cleanup
trap - EXIT
echo "demo: done (logs in $demo)"

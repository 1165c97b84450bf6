#!/usr/bin/env bash
# Mesh in a box: six pods (network namespaces on a bridge) with their apps, portcullis
# sidecars and portcullis-init interception; the apps call each other by service name over
# HTTP/1.1 and gRPC while every certificate is re-signed every few seconds and the CA rolls
# once; then one summary, and a non-zero exit on any unexpected failure. See the README,
# "Mesh in a box". Needs root (namespaces, iptables); nothing outside the namespaces it
# creates is changed except /etc/netns/<its namespaces>/resolv.conf, removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<'EOF'
usage: scripts/mesh.sh [--duration SECONDS] [--rotate-every SECONDS] [--summary-json PATH]
                       [--keep] [--explicit] [--prefix NAME]
       scripts/mesh.sh --down [--prefix NAME]

  --duration S       seconds of traffic (default 20); rotations run meanwhile
  --rotate-every S   re-sign every pod's certificate every S seconds (default 3)
  --summary-json P   also write the summary as JSON to P
  --keep             leave the mesh running for exploration (prints how to tear it down)
  --explicit         stepping stone without interception: apps call their sidecar's
                     per-destination listeners on 127.0.0.1 (default: transparent)
  --prefix NAME      namespace prefix (default pcm<pid>)
  --down             tear down a kept mesh (all of them without --prefix)

environment: PORTCULLIS_BIN  the portcullis binary to use (default: build/portcullis,
                             built with cmake if missing)
EOF
}

args=()
down=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --down) down=1; shift ;;
    --keep) args+=(--keep); shift ;;
    --explicit) args+=(--mode explicit); shift ;;
    --duration | --rotate-every | --summary-json | --prefix | --ca-roll-at | --max-calls | --workdir | \
      --min-rotations | --fault)
      (($# >= 2)) || { echo "mesh: $1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift 2 ;;
    *) echo "mesh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  echo "mesh: needs root (network namespaces, iptables); run it with sudo" >&2
  exit 2
fi

if ((down)); then
  exec /usr/bin/python3 "$root/scripts/mesh.py" --bin /nonexistent --down "${args[@]}"
fi

for tool in ip iptables ip6tables dnsmasq setpriv openssl curl; do
  command -v "$tool" >/dev/null || {
    echo "mesh: $tool not found: run scripts/install-deps.sh test" >&2
    exit 2
  }
done
/usr/bin/python3 -c 'import grpc, h2' 2>/dev/null || {
  echo "mesh: python3-grpcio and python3-h2 are needed: run scripts/install-deps.sh test" >&2
  exit 2
}

bin=${PORTCULLIS_BIN:-}
if [[ -z $bin ]]; then
  bin=$root/build/portcullis
  if [[ ! -x $bin ]]; then
    echo "mesh: building portcullis (cmake, build/)" >&2
    cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    cmake --build "$root/build" --target portcullis -j"$(nproc)" >/dev/null
  fi
fi
[[ -x $bin ]] || { echo "mesh: $bin is not an executable" >&2; exit 2; }

# mesh.py tears down on its own exit (unless --keep); SIGINT/SIGTERM reach it as well
exec /usr/bin/python3 "$root/scripts/mesh.py" --bin "$bin" "${args[@]}"

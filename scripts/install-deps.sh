#!/usr/bin/env bash
# Installs portcullis's build and test dependencies from Debian 12 packages.
# Idempotent: installs only what is missing, runs apt-get update at most once.
# Usage: scripts/install-deps.sh [build|test]   (default: test, a superset)
set -euo pipefail
what=${1:-test}
build_pkgs=(cmake make gcc pkg-config libc6-dev libuv1-dev android-libboringssl-dev node-llhttp
  libnghttp2-dev libconfig-dev libc-ares-dev openssl python3)
test_pkgs=(python3-pytest python3-prometheus-client python3-h2 python3-grpcio nghttp2-client curl
  clang-format procps util-linux testssl.sh clang-14 libclang-rt-14-dev iptables iproute2
  dnsmasq-base)
pkgs=("${build_pkgs[@]}")
[[ $what == test ]] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

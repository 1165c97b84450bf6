# bench/peers.sh - sourced by bench/run.sh and bench/run_h2.sh: installs the peer
# proxies and tools a benchmark needs from Debian, with the packaged services kept
# from starting (they would take ports 80/443; a policy-rc.d answering 101 is how
# Debian spells that).
#
#   install_bench_pkgs PREFIX PKG...    # PREFIX names the caller in its message
install_bench_pkgs() {
  local who=$1
  shift
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  echo "$who: installing ${missing[*]}" >&2
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  local made_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
  [[ -n $made_policy ]] && $sudo rm -f /usr/sbin/policy-rc.d
  return 0
}

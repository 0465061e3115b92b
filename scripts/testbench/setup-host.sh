#!/usr/bin/env bash
# Install the Debian packages the container test bench needs on this machine.
# Runs as root on Debian 12 or 13; does nothing when every package is already there.
set -euo pipefail

PACKAGES=(
  podman runc debootstrap uidmap slirp4netns fuse-overlayfs netavark aardvark-dns iptables
  python3 python3-venv python3-pip git make swaks openssh-client
  # the unit tests run Lua scripts (the worker's ledger, the relay policy) on a Redis of their own
  redis-server
)

die() { echo "setup-host: $*" >&2; exit 1; }

[[ -r /etc/debian_version ]] || die "this test bench needs Debian 12 or 13 (no /etc/debian_version)"
[[ $(id -u) -eq 0 ]] || die "run as root: it installs Debian packages and runs privileged containers"

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup-host: all ${#PACKAGES[@]} Debian packages present"
  exit 0
fi

echo "setup-host: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || die "apt-get update failed: check the apt sources of this machine"
# With recommends, as measured in shared/notes/test-bench.md.
if ! apt-get install -y -qq "${missing[@]}" >/dev/null; then
  die "apt-get install of ${missing[*]} failed"
fi
for pkg in "${missing[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
    || die "package $pkg is still missing after apt-get install"
done
echo "setup-host: installed ${missing[*]}"

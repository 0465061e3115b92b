#!/usr/bin/env bash
# Unpack the monitoring tools the unit tests run on this machine from Debian's own packages:
# promtool (package prometheus: `promtool test rules` for the alert rules) and mtail (the mail
# log programs). The packages are downloaded and unpacked into DEST, not installed, so no
# Prometheus or mtail service starts on this machine. Does nothing when both are there.
#
#   setup-tools.sh DEST        (e.g. .cache/tools; the tools land in DEST/bin)
set -euo pipefail

dest=${1:?usage: setup-tools.sh DEST}
die() { echo "setup-tools: $*" >&2; exit 1; }

if [[ -x $dest/bin/promtool && -x $dest/bin/mtail ]]; then
  echo "setup-tools: promtool and mtail present in $dest/bin"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest/bin"
# apt-get download runs as the _apt user where it can; a directory it may write to avoids the warning.
chmod 0777 "$work"
(cd "$work" && apt-get download prometheus mtail >/dev/null 2>&1) || {
  apt-get update -qq || die "apt-get update failed: check the apt sources of this machine"
  (cd "$work" && apt-get download prometheus mtail >/dev/null) || die "apt-get download prometheus mtail failed"
}
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/root" || die "cannot unpack $deb"
done
install -m 0755 "$work/root/usr/bin/promtool" "$work/root/usr/bin/mtail" "$dest/bin/"
echo "setup-tools: $("$dest/bin/promtool" --version 2>&1 | head -1); mtail $("$dest/bin/mtail" --version 2>&1 | grep -o 'version [^ ]*' | head -1)"

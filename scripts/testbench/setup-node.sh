#!/usr/bin/env bash
# The lab proof's Node.js application (scripts/labtests/nodeproducer): Node.js and npm from Debian
# when this machine has none, and the producer's packages, at the versions its package.json pins,
# in DEST/node_modules (not in the checkout). Does nothing when they are there.
#
#   setup-node.sh DEST        (e.g. .cache/node)
set -euo pipefail

dest=${1:?usage: setup-node.sh DEST}
here=$(cd "$(dirname "$0")/../labtests/nodeproducer" && pwd)
die() { echo "setup-node: $*" >&2; exit 1; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "setup-node: installing Debian's nodejs and npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed: check the apt sources of this machine"
  apt-get install -y -qq nodejs npm >/dev/null || die "apt-get install nodejs npm failed"
fi

wanted=$(node -e 'const d = require(process.argv[1]).dependencies;
  console.log(Object.entries(d).map(([n, v]) => `${n}@${v}`).join(" "))' "$here/package.json")
missing=0
for spec in $wanted; do
  name=${spec%@*} version=${spec##*@}
  have=$(node -p "try { require('$dest/node_modules/$name/package.json').version } catch (e) { '' }")
  [[ $have == "$version" ]] || missing=1
done
if [[ $missing -eq 0 ]]; then
  echo "setup-node: $wanted present in $dest"
  exit 0
fi
mkdir -p "$dest"
# --no-package-lock: the versions are pinned in package.json; nothing is written to the checkout.
npm install --prefix "$dest" --no-package-lock --no-save --no-audit --no-fund --loglevel=error $wanted \
  || die "npm install $wanted failed"
echo "setup-node: installed $wanted in $dest"

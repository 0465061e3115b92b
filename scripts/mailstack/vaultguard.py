"""Secrets never land in git in clear: vault files outside the lab must be ansible-vault encrypted.

A vault file is any vars file named vault*.yml / vault*.yaml (the convention every inventory here
follows: group_vars/all/vault.yml). The lab's is clear on purpose (its inventory says
mailstack_environment: lab). `scripts/githooks/pre-commit` runs this on what is staged; a unit
test runs it on every tracked file; `mailstack check` warns about a clear one on disk.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

VAULT_NAME = re.compile(r"(^|/)vault[^/]*\.ya?ml$")
HEADER = b"$ANSIBLE_VAULT;"


def inventory_of(path: Path) -> Path | None:
    """The inventory directory a group_vars/host_vars file belongs to."""
    for parent in path.parents:
        if parent.name in ("group_vars", "host_vars"):
            return parent.parent
    return None


def is_lab(inventory: Path) -> bool:
    """The inventory declares itself the lab (mailstack_environment: lab in group_vars/all)."""
    for path in sorted((inventory / "group_vars" / "all").glob("*.y*ml")) + \
            [inventory / "group_vars" / "all.yml"]:
        if not path.is_file() or path.read_bytes().startswith(HEADER):
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and data.get("mailstack_environment") == "lab":
            return True
    return False


def clear_vaults(paths: list[Path], content=lambda p: p.read_bytes()) -> list[Path]:
    """The vault files among paths that are not encrypted and not the lab's."""
    bad = []
    for path in paths:
        if not VAULT_NAME.search(path.as_posix()):
            continue
        inventory = inventory_of(path)
        if inventory is not None and is_lab(inventory):
            continue
        if not content(path).lstrip().startswith(HEADER):
            bad.append(path)
    return bad


def staged() -> list[Path]:
    names = subprocess.run(["git", "diff", "--cached", "--name-only", "--diff-filter=ACMR"], check=True,
                           capture_output=True, text=True).stdout.split()
    return [Path(n) for n in names]


def staged_content(path: Path) -> bytes:
    return subprocess.run(["git", "show", f":{path.as_posix()}"], check=True, capture_output=True).stdout


def main() -> None:
    """The pre-commit hook: refuse a commit that would add a clear-text vault file."""
    bad = clear_vaults(staged(), staged_content)
    for path in bad:
        print(f"refusing to commit {path}: it is a vault file in clear text. Encrypt it first:\n"
              f"  ansible-vault encrypt {path}\n(or unstage it: git restore --staged {path})", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

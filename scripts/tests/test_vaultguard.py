"""A vault file in clear text cannot be committed by accident, nor sit unnoticed in an inventory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner

from mailstack.cli import main
from mailstack.vaultguard import clear_vaults

ROOT = Path(__file__).resolve().parents[2]
ENCRYPTED = "$ANSIBLE_VAULT;1.1;AES256\n3132333435\n"


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env)


def test_no_tracked_vault_file_is_in_clear_text_outside_the_lab():
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split()
    vaults = [ROOT / p for p in tracked if "vault" in p]
    assert any(p.name == "vault.yml" for p in vaults), "the lab's vault.yml is tracked and must be seen"
    assert clear_vaults(vaults) == []


def test_the_pre_commit_hook_refuses_a_clear_vault_and_takes_an_encrypted_one(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "inventories", repo / "inventories", ignore=shutil.ignore_patterns("vault.yml"))
    shutil.copytree(ROOT / "scripts" / "githooks", repo / "scripts" / "githooks")
    shutil.copytree(ROOT / "scripts" / "mailstack", repo / "scripts" / "mailstack")
    git(repo, "init", "-q")
    git(repo, "config", "core.hooksPath", "scripts/githooks")
    vault = repo / "inventories" / "staging" / "group_vars" / "all" / "vault.yml"
    # Control: the rest of the tree commits (the lab's clear vault among it).
    (repo / "inventories" / "lab" / "group_vars" / "all" / "vault.yml").write_text("---\nvault_x: lab\n")
    git(repo, "add", "-A")
    done = git(repo, "commit", "-q", "-m", "inventories")
    assert done.returncode == 0, done.stderr

    vault.write_text("---\nvault_redis_admin_password: s3cret-in-clear\n")
    git(repo, "add", str(vault))
    refused = git(repo, "commit", "-q", "-m", "secrets")
    assert refused.returncode != 0 and "ansible-vault encrypt" in refused.stderr, refused
    assert "inventories/staging/group_vars/all/vault.yml" in refused.stderr

    vault.write_text(ENCRYPTED)
    git(repo, "add", str(vault))
    taken = git(repo, "commit", "-q", "-m", "secrets, encrypted")
    assert taken.returncode == 0, taken.stderr


def test_check_warns_about_a_clear_vault_outside_the_lab(tmp_path):
    copy = tmp_path / "staging"
    shutil.copytree(ROOT / "inventories" / "staging", copy)
    (copy / "group_vars" / "all" / "vault.yml").write_text("---\nvault_haproxy_stats_password: in-clear-0123\n")
    report = json.loads(CliRunner().invoke(main, ["check", "-i", str(copy), "--json"]).output)
    hits = [f for f in report["findings"] if f["level"] == "warning" and "not encrypted" in f["message"]]
    assert hits and hits[0]["file"].endswith("group_vars/all/vault.yml"), report["findings"]
    lab = json.loads(CliRunner().invoke(main, ["check", "-i", str(ROOT / "inventories" / "lab"), "--json"]).output)
    assert not [f for f in lab["findings"] if "not encrypted" in f["message"]]

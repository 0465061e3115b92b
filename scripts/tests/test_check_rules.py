"""Every rule judged the same by `mailstack check` and by the playbooks.

Each case breaks one rule in a copy of fixtures/inventories/good (which both accept) and runs
  - the CLI, which contacts no host: it must name the host, the variable and the file:line;
  - playbooks/check.yml as a real run does it first (facts gathered, the first failure fatal),
    with connection local: it must fail with the same words.
The rules are written once (a role's argument_specs or tasks/assert.yml, playbooks/vars/
inventory_variables.yml, playbooks/action_plugins/mailstack_inventory_check.py); this proves that
both paths run them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailstack.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = Path(__file__).parent / "fixtures" / "inventories" / "good"
PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))



@dataclasses.dataclass
class Case:
    name: str
    path: str  # the file of the inventory changed
    old: str | None  # the text replaced (None: the new line is appended)
    new: str
    host: str  # the finding names this host, this variable, these words
    variable: str
    words: str
    named: str | None = None  # the file:line named, when it is not the changed line
    run_on: str | None = None  # the host whose checks judge the rule, when it is not `host`


CASES = [Case(*c) for c in [
    ("two hosts with one address", "host_vars/relay2.yml", "192.0.2.22", "192.0.2.21",
     "relay2", "mailstack_service_address", "is also the address of relay1"),
    ("a misspelt role variable", "group_vars/postfix_relays/postfix.yml", None, "postfix_relay_network: []",
     "relay1", "postfix_relay_network", "did you mean postfix_relay_networks?"),
    ("relays listening where the balancers do not send", "group_vars/postfix_relays/postfix.yml", None,
     "postfix_proxy_port: 10026", "relay1", "postfix_proxy_port", "sends PROXY connections to port 10025"),
    ("a relay trusting a host that is not a balancer", "group_vars/exim_relays/exim.yml",
     '"{{ mailstack_relay_proxy_trusted }}"', '"{{ mailstack_relay_proxy_trusted + [\'192.0.2.99\'] }}"',
     "relay2", "exim_proxy_trusted_addresses", "trusts 192.0.2.99, which is not a balancer"),
    ("an open relay", "group_vars/exim_relays/exim.yml", '"{{ mailstack_relay_networks }}"', "[0.0.0.0/0]",
     "relay2", "exim_relay_networks", "lets every address relay"),
    ("a relay without PROXY behind balancers that send it", "group_vars/postfix_relays/postfix.yml",
     "postfix_proxy_enabled: true", "postfix_proxy_enabled: false",
     "relay1", "postfix_proxy_enabled", "the balancers send PROXY protocol"),
    ("a VIP that is a host's address", "group_vars/balancers/keepalived.yml", "192.0.2.200/24", "192.0.2.21/24",
     "lb1", "keepalived_vips", "VIP 192.0.2.21 is the address of relay1"),
    ("a VIP outside the balancers' network", "group_vars/balancers/keepalived.yml", "192.0.2.200/24",
     "198.51.100.200/24", "lb1", "keepalived_vips", "is not in the network of balancer(s) lb1, lb2"),
    ("balancers of one pair that disagree", "host_vars/lb2.yml", None, "keepalived_router_ids: [63, 64]",
     "lb2", "keepalived_router_ids", "differs from lb1's"),
    ("a role's own check (assert.yml)", "host_vars/relay1.yml", "relay1.example.com", "relay1",
     "relay1", "postfix_myhostname", "postfix_myhostname must be a fully qualified domain name"),
    ("a role's argument_specs", "group_vars/rabbitmq_nodes/rabbitmq.yml", None, "rabbitmq_management_enabled: maybe",
     "rabbitmq1", "rabbitmq_management_enabled", "rabbitmq_management_enabled"),
    ("the project's inventory variables", "host_vars/relay2.yml", "mail_relay_weight: 1", "mail_relay_weight: heavy",
     "relay2", "mail_relay_weight", "'heavy'"),
    ("a relay weight out of range (haproxy's check of each relay)", "host_vars/relay1.yml", "mail_relay_weight: 3",
     "mail_relay_weight: 300", "relay1", "mail_relay_weight", "from 0 to 256 (got 300)", None, "lb1"),
    ("replication with too few nodes (redis's check of its group)", "group_vars/redis_nodes/redis.yml", None,
     "redis_replication_group: redis_nodes", "redis1", "redis_replication_group", "redis_replication_group"),
    ("a secret that breaks its role's rule", "group_vars/all/secrets.yml", "redis-admin-secret", "short",
     "redis1", "redis_admin_password", "at least 12 characters", "group_vars/redis_nodes/redis.yml:2"),
]]


def broken_copy(tmp_path: Path, path: str, old: str | None, new: str) -> tuple[Path, int]:
    """The good inventory with one change; the line of the change."""
    inventory = tmp_path / "inventory"
    shutil.copytree(GOOD, inventory)
    target = inventory / path
    text = target.read_text()
    if old is None:
        text = text.rstrip("\n") + "\n" + new + "\n"
        line = text.count("\n")
    else:
        assert text.count(old) == 1, f"{old!r} is not once in {path}"
        line = text[:text.index(old)].count("\n") + 1
        text = text.replace(old, new)
    target.write_text(text)
    return inventory, line


def playbook_run(inventory: Path, limit: str | None = None) -> subprocess.Popen:
    """playbooks/check.yml as a real run starts (with --limit, as an operator runs one host)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.Popen([PLAYBOOK, "-i", str(inventory), str(ROOT / "playbooks" / "check.yml"), "-c", "local",
                             "-e", f"ansible_python_interpreter={sys.executable}"] + (["--limit", limit] if limit else []),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cli_check(inventory: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["check", "-i", str(inventory), "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.output)


@functools.lru_cache(maxsize=None)
def good_report() -> tuple[int, dict]:
    """The CLI's verdict on the good fixture (asked once: every run of the check costs seconds)."""
    return cli_check(GOOD)


def test_the_good_inventory_passes_both():
    play = playbook_run(GOOD)
    code, report = good_report()
    output = play.communicate()[0]
    assert code == 0 and report["errors"] == 0, report["findings"]
    assert play.returncode == 0, output[-3000:]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_rule_is_judged_alike_by_the_cli_and_the_playbook(tmp_path, case):
    inventory, line = broken_copy(tmp_path, case.path, case.old, case.new)
    # The playbook on the one host whose checks judge the rule (the inventory-wide checks run in
    # any run): a real run of that host must stop on it, as the CLI's whole-inventory check does.
    play = playbook_run(inventory, case.run_on or case.host)
    code, report = cli_check(inventory)
    output = play.communicate()[0]

    hits = [f for f in report["findings"] if f["level"] == "error" and case.host in f["hosts"]
            and f["variable"] == case.variable and case.words in f["message"]]
    assert code == 1 and hits, f"the CLI did not name {case.host} {case.variable} {case.words!r}: {report['findings']}"
    assert any(f["file"].endswith(case.named or f"{case.path}:{line}") for f in hits), [f["file"] for f in hits]

    assert play.returncode != 0, f"the playbook accepted what the CLI refused:\n{output[-3000:]}"
    assert case.words in output, f"the playbook failed otherwise:\n{output[-3000:]}"


def test_warnings_and_notes_are_named_but_do_not_fail():
    """The good fixture: a relay serving a self-signed certificate outside the lab and a submission
    frontend with no listener behind it are warnings; values left to facts are notes; exit 0."""
    code, report = good_report()
    assert code == 0
    warnings = {(f["variable"], tuple(f["hosts"])): f for f in report["findings"] if f["level"] == "warning"}
    assert "self-signed certificate in production" in warnings[("postfix_tls_certificate", ("relay1",))]["message"]
    assert "nothing listens" in warnings[("postfix_submission_enabled", ("relay1",))]["message"]
    notes = {f["variable"] for f in report["findings"] if f["level"] == "note"}
    assert "keepalived_interface" in notes and "postfix_myhostname" not in notes  # the fixture sets it


def test_a_rule_added_once_to_a_role_is_enforced_by_both(tmp_path):
    """Add a rule to a copy of the project, in one place only (the postfix role's assert.yml): the
    CLI of that copy and its playbooks both refuse the good inventory for it."""
    project = tmp_path / "project"
    for part in ("roles", "playbooks", "scripts/mailstack"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "ansible.cfg", project / "ansible.cfg")
    assert_yml = project / "roles" / "postfix" / "tasks" / "assert.yml"
    assert_yml.write_text(assert_yml.read_text() + """
- name: assert | A new rule, written once
  ansible.builtin.assert:
    that: postfix_message_size_limit <= 10485760
    fail_msg: postfix_message_size_limit must be at most 10 MB in this copy, got {{ postfix_message_size_limit }}
    quiet: true
""")
    env = dict(os.environ, PYTHONPATH=str(project / "scripts"), ANSIBLE_CONFIG=str(project / "ansible.cfg"))
    cli = subprocess.run([sys.executable, "-c", "from mailstack.cli import main; main()", "check", "-i", str(GOOD),
                          "--json"], capture_output=True, text=True, env=env, cwd=project)
    report = json.loads(cli.stdout)
    hits = [f for f in report["findings"] if f["variable"] == "postfix_message_size_limit"]
    assert cli.returncode == 1 and hits and "at most 10 MB in this copy" in hits[0]["message"], report
    play = subprocess.run([PLAYBOOK, "-i", str(GOOD), str(project / "playbooks" / "check.yml"), "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}"], capture_output=True, text=True,
                          env=env, cwd=project)
    assert play.returncode != 0 and "at most 10 MB in this copy" in play.stdout, play.stdout[-2000:]

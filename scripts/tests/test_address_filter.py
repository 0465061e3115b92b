"""mailstack_address (playbooks/filter_plugins) is the one rule every role reads a host's address by:
the first variable named that the host sets, else its default route's address from its facts, else
"" - proven through a real play over real hostvars, as the roles call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_named_variables_then_the_facts_then_nothing(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {
        "set": {"mailstack_service_address": "10.0.0.1", "keepalived_address": "10.0.0.9",
                "ansible_host": "10.0.0.8"},
        "facts_only": {"ansible_host": "10.0.0.2"},
        "empty_value": {"mailstack_service_address": "", "ansible_host": "10.0.0.3"},
        "nothing": {"ansible_host": "nowhere.invalid"},
    }}}))
    out = tmp_path / "out.json"
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([
        {"hosts": "all:!set", "gather_facts": False, "tasks": [{"mailstack_standin_facts": {}}]},
        {"hosts": "localhost", "gather_facts": False, "tasks": [{"ansible.builtin.copy": {"dest": str(out), "content": (
            "{{ {'plain': dict(groups['ungrouped'] | zip(groups['ungrouped'] | map('extract', hostvars)"
            "                                            | map('mailstack_address'))),"
            "    'keepalived': hostvars['set'] | mailstack_address('keepalived_address', 'mailstack_service_address'),"
            "    'unset_first': hostvars['set'] | mailstack_address('redis_address', 'mailstack_service_address')}"
            " | to_json }}")}}]},
    ]))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    proc = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
                           "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(play)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    found = json.loads(out.read_text())
    # the service address over ansible_host; the facts' default route where none is set (also when
    # it is set empty); nothing at all without either
    assert found["plain"] == {"set": "10.0.0.1", "facts_only": "10.0.0.2", "empty_value": "10.0.0.3",
                              "nothing": "", "localhost": ""}, found
    assert found["keepalived"] == "10.0.0.9" and found["unset_first"] == "10.0.0.1", found

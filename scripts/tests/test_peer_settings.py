"""mailstack_peer_settings (playbooks/action_plugins) gives a role the settings of other hosts as
their own roles see them: the inventory's value where it sets one, else the role's default; the
balancers' VIPs; and, asked for presence only, whether a secret is set, never the secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GOOD = Path(__file__).parent / "fixtures" / "inventories" / "good"


def test_settings_follow_the_inventory_then_the_roles_defaults(tmp_path):
    inventory = tmp_path / "inventory"
    subprocess.run(["cp", "-r", str(GOOD), str(inventory)], check=True)
    (inventory / "host_vars" / "lb2.yml").write_text(
        (inventory / "host_vars" / "lb2.yml").read_text() + "haproxy_stats_port: 9404\n")
    (inventory / "host_vars" / "redis1.yml").write_text(
        (inventory / "host_vars" / "redis1.yml").read_text() + "redis_exporter_password: a-secret-of-length\n")
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [
            {"mailstack_peer_settings": {"settings": {
                "balancers": [{"role": "haproxy", "name": "haproxy_stats_port"}],
                "redis_nodes": [{"role": "exporters", "name": "exporters_node_port"},
                                {"role": "redis", "name": "redis_exporter_password", "present": True}]}},
             "register": "peers"},
            {"ansible.builtin.copy": {"content": "{{ peers.hosts | to_json }}", "dest": str(tmp_path / "out.json")}},
        ]}]))
    env = dict(os.environ, ANSIBLE_ACTION_PLUGINS=str(ROOT / "playbooks" / "action_plugins"),
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    proc = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
                           "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(play)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:]
    hosts = json.loads((tmp_path / "out.json").read_text())
    assert hosts["lb1"]["haproxy_stats_port"] == 8404  # the haproxy role's default
    assert hosts["lb2"]["haproxy_stats_port"] == 9404  # the inventory's
    assert hosts["lb1"]["vips"] and all("/" not in v for v in hosts["lb1"]["vips"])
    assert hosts["redis1"] == {"address": hosts["redis1"]["address"], "exporters_node_port": 9100,
                               "redis_exporter_password": True}
    assert "a-secret-of-length" not in proc.stdout

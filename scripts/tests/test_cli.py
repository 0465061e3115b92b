"""The mailstack CLI against real inventories: the project's own (lab, staging, production) and
the fixtures under fixtures/inventories (good, broken, single)."""

from __future__ import annotations

import json
import shutil
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mailstack.cli import main
from mailstack.inventory import Inventory

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "inventories"


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def check_json(inventory: Path | str) -> tuple[int, dict]:
    result = run("check", "-i", str(inventory), "--json")
    return result.exit_code, json.loads(result.output)


def findings(report: dict, level: str = "error") -> list[dict]:
    return [f for f in report["findings"] if f["level"] == level]


def one(report: dict, variable: str, text: str, level: str = "error") -> dict:
    hits = [f for f in findings(report, level) if f["variable"] == variable and text in f["message"]]
    assert len(hits) == 1, f"expected one {level} on {variable} with {text!r}, got {hits}\nall: {report['findings']}"
    return hits[0]


# ---------------------------------------------------------------- check

def test_a_correct_inventory_passes_with_its_single_points_of_failure_as_warnings():
    code, report = check_json(FIXTURES / "good")
    assert code == 0, report
    assert report["errors"] == 0
    warnings = [f["message"] for f in findings(report, "warning")]
    assert any("one Redis node" in w for w in warnings)
    assert any("one RabbitMQ node" in w for w in warnings)


@pytest.fixture(scope="module")
def broken() -> dict:
    code, report = check_json(FIXTURES / "broken")
    assert code == 1
    return report


def test_weights_out_of_range_or_not_numbers_name_host_variable_and_file(broken):
    f = one(broken, "mail_relay_weight", "from 0 to 256 (got 300)")
    assert f["hosts"] == ["relay1"] and f["file"].endswith("broken/host_vars/relay1.yml:3")
    f = one(broken, "mail_relay_weight", 'whole number from 0 to 256 (got "heavy")')
    assert f["hosts"] == ["relay3"] and f["file"].endswith("broken/host_vars/relay3.yml:3")


def test_repeated_router_ids_are_refused(broken):
    f = one(broken, "keepalived_router_ids", "two instances share a router id ([61, 61])")
    assert f["file"].endswith("group_vars/balancers/keepalived.yml:5")


def test_vips_outside_the_balancers_network_or_owned_by_a_host_are_refused(broken):
    f = one(broken, "keepalived_vips", "198.51.100.201/24 is not in the network of balancer(s) lb1, lb2")
    assert f["file"].endswith("group_vars/balancers/keepalived.yml:4")
    one(broken, "keepalived_vips", "VIP 192.0.2.21 is the address of relay1")


def test_a_backup_priority_above_the_master_is_refused(broken):
    f = one(broken, "keepalived_priority_master", "(100) must be higher than keepalived_priority_backup (120)")
    assert f["hosts"] == ["lb1", "lb2"]


def test_a_relay_in_both_mta_groups_is_refused(broken):
    hits = [f for f in findings(broken) if "exactly one of its child groups postfix_relays or exim_relays" in f["message"]]
    assert [f["hosts"] for f in hits] == [["relay4"]]
    assert hits[0]["variable"] == "mail_relays" and hits[0]["file"].endswith("broken/hosts.yml")


def test_missing_and_misspelt_secrets_are_named(broken):
    f = one(broken, "exim_smarthost_password", "refers to vault_smarthost_pasword")
    assert f["file"].endswith("group_vars/exim_relays/exim.yml:9")
    f = one(broken, "redis_admin_password", "must be set (from the vault)")
    assert f["hosts"] == ["redis1"]
    summary = [f for f in findings(broken) if f["message"].startswith("vault variables not defined")]
    assert len(summary) == 1 and "vault_smarthost_pasword" in summary[0]["message"]


def test_argument_types_are_checked_as_the_role_would(broken):
    f = one(broken, "rabbitmq_management_enabled", "rabbitmq role")
    assert "maybe" in f["message"] and f["file"].endswith("rabbitmq.yml:4")


def test_a_relay_open_to_everyone_or_to_the_balancers_is_refused(broken):
    f = one(broken, "exim_relay_networks", "0.0.0.0/0 lets every address relay")
    assert sorted(f["hosts"]) == ["relay2", "relay3", "relay4"]
    one(broken, "postfix_relay_networks", "192.0.2.0/28 contains the balancer address(es) 192.0.2.11, 192.0.2.12")


def test_relays_must_trust_exactly_the_balancers_proxy_headers(broken):
    one(broken, "exim_proxy_trusted_addresses", "lacks the balancer address(es) 192.0.2.12")
    one(broken, "exim_proxy_trusted_addresses", "trusts 192.0.2.99, which is not a balancer")
    f = one(broken, "postfix_proxy_enabled", "is false, but the balancers send PROXY protocol")
    assert f["file"].endswith("group_vars/postfix_relays/postfix.yml:4")


def test_single_points_of_failure_are_warnings_and_exit_zero():
    code, report = check_json(FIXTURES / "single")
    assert code == 0 and report["errors"] == 0
    messages = [f["message"] for f in findings(report, "warning")]
    assert any("one balancer" in m for m in messages)
    assert any("one relay takes traffic" in m for m in messages)
    assert any("redis_nodes is missing or empty" in m for m in messages)
    one(report, "mail_relay_weight", "is 0: the relay is drained", level="warning")


def test_text_output_names_host_variable_and_file_and_counts(broken):
    result = run("check", "-i", str(FIXTURES / "broken"))
    assert result.exit_code == 1
    assert ("ERROR   relay1: mail_relay_weight (" in result.output
            and "broken/host_vars/relay1.yml:3): relay relay1: mail_relay_weight must be a whole number from 0 "
                "to 256 (got 300)" in result.output)
    assert result.output.rstrip().endswith(f"{broken['errors']} error(s), {broken['warnings']} warning(s), "
                                           f"{broken['notes']} note(s)")


def test_a_missing_inventory_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["check", "-i", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "does not exist" in result.output


@pytest.mark.parametrize("env", ["staging", "production"])
def test_example_inventories_fail_only_for_the_vault_secrets_they_leave_out(env):
    code, report = check_json(ROOT / "inventories" / env)
    assert code == 1
    example = yaml.safe_load((ROOT / "inventories" / env / "group_vars/all/vault.yml.example").read_text())
    for f in findings(report):
        assert "vault secret that is not defined" in f["message"] or \
            f["message"].startswith("vault variables not defined"), f
    summary = [f for f in findings(report) if f["message"].startswith("vault variables not defined")][0]
    named = set(summary["message"].split(": ", 1)[1].split(" (")[0].split(", "))
    assert named == set(example), "the check and vault.yml.example disagree on the secrets"
    assert "NOT in the example" not in summary["message"]


def fill(name: str) -> str:
    """A value a vault secret of this name could have."""
    if name.endswith("_certificate"):
        return "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    if name.endswith("_private_key"):
        return "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
    return "Cookie" + "x" * 24 if "cookie" in name else "vrrp-pw" if "keepalived" in name else f"{name[:20]}-0123456789"


@pytest.mark.parametrize("env", ["staging", "production"])
def test_example_inventories_pass_once_their_vault_is_filled(env, tmp_path):
    copy = tmp_path / env
    shutil.copytree(ROOT / "inventories" / env, copy)
    example = yaml.safe_load((copy / "group_vars/all/vault.yml.example").read_text())
    values = {name: fill(name) for name in example}
    vault = copy / "group_vars/all/vault.yml"
    vault.write_text(yaml.safe_dump(values))
    password = tmp_path / "vault-pass"
    password.write_text("fixture-vault-password\n")
    subprocess.run([str(Path(sys.executable).with_name("ansible-vault")), "encrypt", "--vault-password-file",
                    str(password), str(vault)], check=True, capture_output=True)
    result = run("check", "-i", str(copy), "--vault-password-file", str(password), "--json")
    code, report = result.exit_code, json.loads(result.output)
    assert code == 0, report["findings"]
    assert report["errors"] == 0 and report["warnings"] == 0


def test_the_lab_inventory_passes():
    code, report = check_json(ROOT / "inventories" / "lab")
    assert code == 0, report
    assert {f["hosts"][0] for f in findings(report, "warning")} == {"redis1", "rabbitmq1"}
    assert not [f for f in report["findings"] if "self-signed" in f["message"]]  # the lab may serve one


# ---------------------------------------------------------------- weights

def test_weights_table_shows_each_relays_share():
    result = run("weights", "-i", str(ROOT / "inventories" / "lab"), "--json")
    assert result.exit_code == 0
    backends = json.loads(result.output)["backends"]
    assert [b["backend"] for b in backends] == ["be_smtp"]
    shares = {r["host"]: (r["mta"], r["weight"], r["share_percent"]) for r in backends[0]["relays"]}
    assert shares == {"relay1": ("postfix", 3, 37.5), "relay2": ("postfix", 3, 37.5), "relay3": ("exim", 2, 25.0)}
    text = run("weights", "-i", str(FIXTURES / "single")).output
    assert "drained" in text and "100.0 %" in text


def test_weights_refuses_a_weight_it_cannot_use():
    result = run("weights", "-i", str(FIXTURES / "broken"))
    assert result.exit_code != 0 and "relay3: mail_relay_weight is 'heavy', not a number" in result.output


# ---------------------------------------------------------------- smoke

class FakeSMTP(socketserver.StreamRequestHandler):
    """Just enough SMTP: refuses recipients at refused.test, accepts the rest."""

    received: list[bytes] = []

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self):
        self.reply("220 fake.test ESMTP")
        while line := self.rfile.readline():
            cmd = line.decode().strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 fake.test")
            elif verb == "RCPT":
                self.reply("554 5.7.1 Relay access denied" if "refused.test" in cmd else "250 ok")
            elif verb == "DATA":
                self.reply("354 go on")
                body = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    body += chunk
                FakeSMTP.received.append(body)
                self.reply("250 2.0.0 Ok: queued as FAKE1")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


@pytest.fixture()
def fake_smtp():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), FakeSMTP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_smoke_reports_an_accepted_message_and_a_refused_one(fake_smtp):
    good = str(FIXTURES / "good")
    result = run("smoke", "-i", good, "--vip", "127.0.0.1", "--port", str(fake_smtp), "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"]
    (r,) = report["results"]
    assert r["accepted"] and r["code"] == 250 and "queued as FAKE1" in r["reply"]
    assert r["delivered"] is None  # no sink to ask outside the lab
    assert any(r["test_id"].encode() in body for body in FakeSMTP.received)
    result = run("smoke", "-i", good, "--vip", "127.0.0.1", "--port", str(fake_smtp),
                 "--recipient", "x@refused.test")
    assert result.exit_code == 1 and "NOT accepted (554" in result.output


def test_smoke_reports_a_vip_that_does_not_answer():
    result = run("smoke", "-i", str(FIXTURES / "good"), "--vip", "127.0.0.1", "--port", "9", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and not report["results"][0]["accepted"]
    assert "ConnectionRefusedError" in report["results"][0]["reply"]


def test_smoke_sends_through_every_vip_of_the_inventory_by_default():
    from mailstack.smoke import smtp_port, vip_addresses

    inv = Inventory(FIXTURES / "good")
    assert vip_addresses(inv) == ["192.0.2.200", "192.0.2.201"]
    assert smtp_port(inv) == 25
    assert vip_addresses(Inventory(ROOT / "inventories" / "staging")) == ["192.0.2.200"]


# ---------------------------------------------------------------- help, playbooks

@pytest.mark.parametrize("command", [["check"], ["weights"], ["smoke"], ["status"], ["lab", "up"], ["lab", "down"],
                                     ["lab", "status"]])
def test_every_command_has_help_with_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_the_tier_playbooks_apply_the_roles_the_check_expects():
    """playbooks/check.yml's group -> roles map is what relays/balancers/cache/queue/workers/monitoring.yml run."""
    applied: dict[str, list[str]] = {}
    for name in ("relays", "balancers", "cache", "queue", "workers", "monitoring"):
        for play in yaml.safe_load((ROOT / "playbooks" / f"{name}.yml").read_text()):
            if "roles" in play:
                for group in play["hosts"].split(":"):
                    applied.setdefault(group, []).extend(r["role"] for r in play["roles"])
    assert applied == yaml.safe_load((ROOT / "playbooks" / "vars" / "tier_roles.yml").read_text())["mailstack_tier_roles"]
    site = yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())
    assert [p["ansible.builtin.import_playbook"] for p in site] == [
        "check.yml", "relays.yml", "balancers.yml", "cache.yml", "queue.yml", "workers.yml", "monitoring.yml"]

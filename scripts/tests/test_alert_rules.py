"""The monitoring role's rules, rendered with the role's defaults, pass `promtool check rules`,
and every alert has a promtool unit test that expects it to fire
(scripts/tests/fixtures/rules/mailstack.test.yml; each test also holds a series that must stay
silent). promtool comes from `make tools` (Debian's, unpacked into .cache/tools/bin)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from test_mail_log_metrics import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "roles" / "monitoring" / "templates" / "etc" / "prometheus" / "rules" / "mailstack.rules.yml.j2"
TESTS = Path(__file__).parent / "fixtures" / "rules" / "mailstack.test.yml"


def render_rules(dest: Path) -> dict:
    defaults = yaml.safe_load((ROOT / "roles" / "monitoring" / "defaults" / "main.yml").read_text())
    ansible = Path(sys.executable).with_name("ansible")
    subprocess.run([str(ansible), "localhost", "-c", "local", "-m", "ansible.builtin.template",
                    "-a", f"src={RULES} dest={dest}", "-e", json.dumps(defaults)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    return yaml.safe_load(dest.read_text())


def test_the_rules_are_valid_and_every_alert_has_a_unit_test_that_passes(tmp_path):
    rules = render_rules(tmp_path / "mailstack.rules.yml")
    check = subprocess.run([tool("promtool"), "check", "rules", str(tmp_path / "mailstack.rules.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(TESTS.read_text())["tests"]
    fired = {t["alertname"] for test in tests for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts - fired == set(), "alerts without a unit test that expects them to fire"
    assert fired - alerts == set(), "unit tests of alerts the rules do not have"

    shutil.copy(TESTS, tmp_path / TESTS.name)
    run = subprocess.run([tool("promtool"), "test", "rules", TESTS.name], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr

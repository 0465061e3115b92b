"""The mail log programs (roles/exporters/templates/etc/mtail/) turn each MTA's own log into the
same vocabulary: the fixtures hold the lines Postfix and Exim write for one mix of mail (accepted,
delivered to a listed and an unlisted domain, deferred, bounced, a relay's own bounce notice,
refused at RCPT with 4xx and 5xx), and Debian's mtail, run once over them, must count each.

The tools come from `make tools` (Debian's mtail and promtool unpacked into .cache/tools/bin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("MAILSTACK_TOOLS", ROOT / ".cache" / "tools" / "bin"))
FIXTURES = Path(__file__).parent / "fixtures" / "mail_logs"
CLASSES = [{"name": "google", "domains": ["gmail.com", "googlemail.com"]}]


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} is missing: run `make tools`"
    return str(path)


def render(template: str, dest: Path) -> None:
    """The program as the role writes it, through Ansible's own template module."""
    ansible = Path(sys.executable).with_name("ansible")
    extra = json.dumps({"exporters_mail_domain_classes": CLASSES})
    subprocess.run([str(ansible), "localhost", "-c", "local", "-m", "ansible.builtin.template",
                    "-a", f"src={ROOT / 'roles/exporters/templates/etc/mtail' / template} dest={dest}",
                    "-e", extra], check=True, capture_output=True, text=True, cwd=ROOT)


def counts(program: str, log: str, tmp_path: Path) -> dict[tuple, float]:
    progs = tmp_path / "progs"
    progs.mkdir()
    render(f"{program}.mtail.j2", progs / f"{program}.mtail")
    out = subprocess.run([tool("mtail"), "--one_shot", "--one_shot_format", "json", "--progs", str(progs),
                          "--logs", str(FIXTURES / log), "--logtostderr"],
                         check=True, capture_output=True, text=True).stdout
    found = {}
    for metric in json.loads(out).values():
        for m in metric:
            for datum in m.get("LabelValues") or []:
                labels = dict(zip(m.get("Keys") or [], datum.get("Labels") or []))
                labels.pop("mta", None)
                found[(m["Name"], tuple(sorted(labels.items())))] = datum["Value"]["Value"]
    return found


def key(name, **labels):
    return (name, tuple(sorted(labels.items())))


COMMON = {
    key("mailstack_mail_deliveries_total", status="delivered", domain_class="google"): 1,
    key("mailstack_mail_deliveries_total", status="deferred", domain_class="other"): 1,
    key("mailstack_mail_deliveries_total", status="bounced", domain_class="other"): 1,
    key("mailstack_mail_smtp_rejects_total", stage="RCPT", **{"class": "5xx"}): 1,
    key("mailstack_mail_smtp_rejects_total", stage="RCPT", **{"class": "4xx"}): 1,
    key("mailstack_mail_tls_total", direction="in"): 1,
}


@pytest.mark.parametrize("program, log, own", [
    ("postfix", "postfix.log", {
        key("mailstack_mail_accepted_total"): 1,
        key("mailstack_mail_deliveries_total", status="delivered", domain_class="other"): 1,
        key("mailstack_mail_deliveries_total", status="expired", domain_class=""): 1,
        # a connection through the proxied listener and one to submission
        key("mailstack_mail_smtp_connections_total"): 2,
        # Postfix logs TLS per connection: one connection to the sink
        key("mailstack_mail_tls_total", direction="out"): 1,
    }),
    ("exim", "exim.log", {
        # the message and the relay's own bounce notice
        key("mailstack_mail_accepted_total"): 2,
        key("mailstack_mail_deliveries_total", status="delivered", domain_class="other"): 2,
        key("mailstack_mail_smtp_connections_total"): 1,
        # Exim logs TLS per delivery: two recipients over TLS
        key("mailstack_mail_tls_total", direction="out"): 2,
    }),
])
def test_each_mta_log_counts_in_the_shared_vocabulary(program, log, own, tmp_path):
    found = counts(program, log, tmp_path)
    expected = {**COMMON, **own}
    got = {k: found.get(k, 0) for k in expected}
    assert got == expected
    unexpected = {k: v for k, v in found.items() if k not in expected and v}
    assert unexpected == {}, "a line counted where the fixture has none"

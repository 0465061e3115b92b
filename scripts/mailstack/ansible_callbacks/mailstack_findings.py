"""Records what playbooks/check.yml found, for `mailstack check` (mailstack.checks).

Every failed task (an assert, an argument spec, a template that does not resolve) and every
finding of the inventory-wide checks is written, with its host and task, as JSON to the file
named by MAILSTACK_FINDINGS when the play ends; and, for each host, the roles whose checks ran,
and the variable names the roles and the inventory declare (as the inventory-wide checks read them).
"""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: mailstack_findings
type: aggregate
short_description: record the failures of playbooks/check.yml as JSON for mailstack check
description: Writes failed tasks and inventory-wide findings to the file in MAILSTACK_FINDINGS.
requirements: [MAILSTACK_FINDINGS set in the environment]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "mailstack_findings"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []
        self.roles: dict[str, set[str]] = {}
        self.declared: list[str] = []

    def _task(self, result) -> tuple[str, str, str]:
        host, name = result.host.get_name(), result.task.get_name()
        role = name.split(" : ", 1)[0] if " : " in name else ""
        if role:
            self.roles.setdefault(host, set()).add(role)
        return host, name, role

    def _record(self, result, failed: bool) -> None:
        host, task, role = self._task(result)
        data = result.result
        base = {"host": host, "task": task, "role": role}
        if "findings" in data:
            self.records.append({**base, "findings": data["findings"]})
            self.declared = data.get("declared", [])
            return
        if not failed:
            return
        if data.get("argument_errors"):
            self.records.append({**base, "argument_errors": [str(e) for e in data["argument_errors"]]})
            return
        items = [r for r in data.get("results") or [] if isinstance(r, dict) and r.get("failed")]
        for item in items or [data]:
            self.records.append({**base, "msg": str(item.get("msg", ""))})

    def v2_runner_on_failed(self, result, ignore_errors=False) -> None:
        self._record(result, failed=True)

    def v2_runner_on_ok(self, result) -> None:
        self._record(result, failed=False)

    def v2_runner_on_skipped(self, result) -> None:
        self._task(result)

    def v2_playbook_on_stats(self, stats) -> None:
        path = os.environ.get("MAILSTACK_FINDINGS")
        if path:
            with open(path, "w", encoding="utf-8") as out:
                json.dump({"records": self.records, "roles": {h: sorted(r) for h, r in self.roles.items()},
                           "declared": self.declared}, out)

"""Record how long each task of a playbook run took, as JSON lines, for the test bench's profile.

Enabled by the bench's runner (ANSIBLE_CALLBACKS_ENABLED=mailstack_timings); writes nothing unless
MAILSTACK_TIMINGS names a file. Each line: the step (MAILSTACK_STEP), the playbook, the role, the
task's name and action, whether it is a handler or waits in a retry loop, how many hosts ran it
and how many changed, and its wall time from its start to the start of the next task (what the
play waited for, as profile_tasks counts it). ansible.posix.profile_tasks prints the same times as
text without the action, which the profile needs to tell apt from waits from service starts.
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

try:
    from mailstack.gate import waited_in_process
except ImportError:        # outside the project's environment nothing gives way
    def waited_in_process():
        return 0.0

DOCUMENTATION = """
    name: mailstack_timings
    type: aggregate
    short_description: task timings as JSON lines for the mailstack test bench
    description:
      - Appends one JSON object per task to the file named by MAILSTACK_TIMINGS.
    requirements:
      - enabled in callbacks_enabled
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "mailstack_timings"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._path = os.environ.get("MAILSTACK_TIMINGS")
        self._step = os.environ.get("MAILSTACK_STEP", "")
        self._playbook = ""
        self._current = None

    def _flush(self):
        if self._current is None or not self._path:
            self._current = None
            return
        record = self._current
        self._current = None
        # Not the time the next task waited for a timed step elsewhere (mailstack_gate, listed first).
        gave_way = waited_in_process() - record.pop("_gave_way")
        record["seconds"] = round(time.monotonic() - record.pop("_started") - gave_way, 3)
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _start(self, task, handler=False):
        self._flush()
        role = task._role.get_name() if getattr(task, "_role", None) else ""
        self._current = {
            "kind": "task", "step": self._step, "playbook": self._playbook, "role": role,
            "task": task.get_name(), "action": task.action, "handler": handler,
            "retries": bool(getattr(task, "until", None)), "hosts": 0, "changed": 0,
            "_started": time.monotonic(), "_gave_way": waited_in_process(),
        }

    def _count(self, result, changed=False):
        if self._current is not None:
            self._current["hosts"] += 1
            self._current["changed"] += int(bool(changed))

    def v2_playbook_on_start(self, playbook):
        self._playbook = os.path.basename(playbook._file_name)

    def v2_playbook_on_play_start(self, play):
        self._flush()

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start(task, handler=True)

    def v2_runner_on_ok(self, result):
        self._count(result, result._result.get("changed"))

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._count(result)

    def v2_runner_on_skipped(self, result):
        pass

    def v2_playbook_on_stats(self, stats):
        self._flush()

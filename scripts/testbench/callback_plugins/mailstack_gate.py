"""Give way, between two tasks, to a test bench step that measures time (see mailstack.gate).

Enabled by the bench's runner (ANSIBLE_CALLBACKS_ENABLED) and active only when MAILSTACK_GATE names
the gate: before each task, the play waits while a timed step runs elsewhere, and holds the gate
shared while the task runs. It is listed before mailstack_timings, which leaves the wait out of
the task times.
"""

from __future__ import annotations

from ansible.plugins.callback import CallbackBase

try:
    from mailstack import gate as _gate
except ImportError:        # ansible-playbook from outside the project's environment: no bench
    _gate = None

DOCUMENTATION = """
    name: mailstack_gate
    type: aggregate
    short_description: give way between tasks to a timed step of the mailstack test bench
    description:
      - Waits before each task while the bench's gate (MAILSTACK_GATE) is held by a timed step.
    requirements:
      - enabled in callbacks_enabled
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "mailstack_gate"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._gate = _gate.from_environment() if _gate else None

    def _turn(self, task):
        if self._gate is not None:
            waited = self._gate.enter()
            if waited:
                _gate.record_wait(waited, task.get_name())

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._turn(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._turn(task)

    def v2_playbook_on_stats(self, stats):
        if self._gate is not None:
            self._gate.leave()

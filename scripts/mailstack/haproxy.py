"""HAProxy's runtime state, as the CLI reads it: by running the haproxy role's
mailstack-haproxy-state on a balancer (the one reader of `show stat`, shared with the
relay_maintenance role and the tests), never by parsing HAProxy's output here."""

from __future__ import annotations

import json
import shlex

STATE_COMMAND = "mailstack-haproxy-state"


class HAProxyStateError(Exception):
    """mailstack-haproxy-state did not answer, or refused."""


def command(socket: str | None = None, server: str | None = None, set_state: str | None = None) -> str:
    """The shell command that prints (and, with set_state, first changes) the servers' state."""
    args = [STATE_COMMAND]
    if socket:
        args += ["--socket", socket]
    if server:
        args += ["--server", server]
    if set_state:
        args += ["--set", set_state]
    return shlex.join(args)


def servers(stdout: str, where: str = "") -> list[dict]:
    """The servers of mailstack-haproxy-state's answer: backend, server, status, weight,
    configured_weight, sessions, total_sessions, check."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        raise HAProxyStateError(f"{where}: {STATE_COMMAND} gave no JSON ({stdout.strip()[:200]!r}); "
                                "run playbooks/balancers.yml, whose haproxy role installs it") from None
    if answer.get("error"):
        raise HAProxyStateError(f"{where}: {answer['error']}")
    return answer["servers"]

"""mailstack-haproxy-state, the one reader of HAProxy's runtime state, against a stand-in for
HAProxy's runtime socket that answers `show stat` and `set server ... state` as HAProxy does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailstack import haproxy

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "roles" / "haproxy" / "templates" / "usr" / "local" / "sbin" / "mailstack-haproxy-state.j2"
HEADER = "# pxname,svname,scur,stot,status,weight,uweight,type,check_status"


class FakeHAProxy(threading.Thread):
    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.state = {("be_smtp", "relay1"): ["UP", 2, 3], ("be_smtp", "relay2"): ["UP", 1, 0],
                      ("be_submission", "relay1"): ["UP", 2, 0], ("be_submission", "relay2"): ["UP", 1, 0]}
        self.commands: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)

    def stat(self) -> str:
        rows = [HEADER, "fe_smtp,FRONTEND,0,9,OPEN,,,0,"]
        for (be, sv), (status, weight, sessions) in self.state.items():
            rows.append(f"{be},{sv},{sessions},{10 + sessions},{status},{weight if status != 'DRAIN' else 0},"
                        f"{weight},2,L7OK")
        rows += ["be_smtp,BACKEND,3,20,UP,3,3,1,", ""]
        return "\n".join(rows) + "\n"

    def run(self) -> None:
        while True:
            conn, _ = self.server.accept()
            with conn:
                command = conn.recv(4096).decode().strip()
                self.commands.append(command)
                if command == "show stat":
                    conn.sendall(self.stat().encode())
                elif command.startswith("set server "):
                    target, _, state = command[len("set server "):].split()
                    be, sv = target.split("/")
                    if (be, sv) not in self.state:
                        conn.sendall(b"No such server.\n")
                    else:
                        self.state[(be, sv)][0] = {"drain": "DRAIN", "ready": "UP", "maint": "MAINT"}[state]
                        self.state[(be, sv)][2] = 0 if state == "drain" else self.state[(be, sv)][2]
                        conn.sendall(b"\n")


@pytest.fixture()
def fake(tmp_path):
    sock = tmp_path / "admin.sock"
    lb = FakeHAProxy(sock)
    lb.start()
    script = tmp_path / "mailstack-haproxy-state"
    text = TEMPLATE.read_text().replace("{{ ansible_managed | comment }}", "#").replace(
        "{{ haproxy_runtime_socket }}", str(sock))
    assert "{{" not in text, "the template uses variables this test does not fill in"
    script.write_text(text)
    return lb, script


def state(script: Path, *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ))
    return proc.returncode, json.loads(proc.stdout)


def test_it_lists_every_server_of_every_backend_and_nothing_else(fake):
    _, script = fake
    code, answer = state(script)
    assert code == 0 and answer["ok"]
    found = haproxy.servers(json.dumps(answer))
    assert {(s["backend"], s["server"]) for s in found} == {("be_smtp", "relay1"), ("be_smtp", "relay2"),
                                                           ("be_submission", "relay1"), ("be_submission", "relay2")}
    relay1 = [s for s in found if s["backend"] == "be_smtp" and s["server"] == "relay1"][0]
    assert relay1 == {"backend": "be_smtp", "server": "relay1", "status": "UP", "weight": 2, "configured_weight": 2,
                      "sessions": 3, "total_sessions": 13, "check": "L7OK"}


def test_set_drains_the_server_in_every_backend_that_has_it_and_only_it(fake):
    lb, script = fake
    code, answer = state(script, "--server", "relay1", "--set", "drain", "--wait-status", "DRAIN", "--timeout", "5")
    assert code == 0 and {s["status"] for s in answer["servers"]} == {"DRAIN"}
    assert sorted(c for c in lb.commands if c.startswith("set")) == [
        "set server be_smtp/relay1 state drain", "set server be_submission/relay1 state drain"]
    assert lb.state[("be_smtp", "relay2")][0] == "UP"  # control: the other relay untouched
    code, answer = state(script, "--server", "relay1", "--wait-idle", "--timeout", "5")
    assert code == 0 and sum(s["sessions"] for s in answer["servers"]) == 0


def test_a_wait_that_times_out_exits_1_with_what_it_saw(fake):
    _, script = fake
    code, answer = state(script, "--server", "relay1", "--wait-idle", "--timeout", "1")
    assert code == 1 and not answer["ok"] and sum(s["sessions"] for s in answer["servers"]) == 3


def test_an_unknown_server_is_an_error_not_an_empty_success(fake):
    lb, script = fake
    code, answer = state(script, "--server", "relay9", "--set", "drain")
    assert code == 2 and "relay9 is in no backend" in answer["error"]
    assert not [c for c in lb.commands if c.startswith("set")]
    with pytest.raises(haproxy.HAProxyStateError, match="relay9 is in no backend"):
        haproxy.servers(json.dumps(answer), "lb1")

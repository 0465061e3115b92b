"""Shared by the mail worker's unit tests: its package on the path, a Redis stand-in for what the
template cache uses (get/set/delete), and an SMTP server on loopback that answers as told."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "roles" / "mail_worker" / "files"))
sys.path.insert(0, str(ROOT / "molecule" / "resources" / "playbooks" / "files"))

from mailsink import rcpt_refusal  # noqa: E402  the bench sink's own rule for defer*/bounce*


class DictRedis:
    """get/set/delete over a dict: enough for the template cache (the ledger's Lua scripts are proven
    against a real Redis in the lab proof)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.gets = 0

    def get(self, key):
        self.gets += 1
        return self.data.get(key)

    def set(self, key, value, ex=None):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def delete(self, key):
        return 1 if self.data.pop(key, None) is not None else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """aiosmtpd on loopback: records (envelope, content) and answers RCPT by the recipient's local
    part like the bench's sink ("defer..." 451, "bounce..." 550); `data_reply` overrides the reply to
    the message, `drop_after_data` closes the connection instead of answering it."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list[tuple] = []
        self.data_reply = None
        self.drop_after_data = False
        self.connections = 0
        relay = self

        class Handler:
            async def handle_EHLO(self, server, session, envelope, hostname, responses):
                relay.connections += 1
                session.host_name = hostname
                return responses

            async def handle_RCPT(self, server, session, envelope, address, options):
                refusal = rcpt_refusal(address)
                if refusal:
                    return refusal
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):
                if relay.drop_after_data:
                    server.transport.close()
                    return "250 never seen"
                if relay.data_reply:
                    return relay.data_reply
                relay.messages.append((envelope.mail_from, tuple(envelope.rcpt_tos), envelope.content))
                return "250 2.0.0 queued"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()


def wait_for(predicate, timeout=5.0):
    done = threading.Event()
    for _ in range(int(timeout * 20)):
        if predicate():
            return True
        done.wait(0.05)
    return predicate()

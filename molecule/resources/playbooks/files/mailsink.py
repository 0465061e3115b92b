#!/usr/bin/env python3
"""A recording SMTP sink for the test bench: it stands in for "the internet" or an upstream relay.

Every message it accepts is written as one JSON file (envelope, connection id, peer address,
TLS, authenticated user, headers) so that tests can ask what arrived, from whom and how.
Recipients whose local part starts with "defer" are answered 451 at RCPT (the relay keeps the
message and retries), those starting with "bounce" 550 (the relay returns it to its sender); a
local part starting with "defer<N>s" (defer30s-...) is answered 451 for N seconds from the first
time that address is seen, then accepted.

  mailsink.py serve --port 25 [--cert C --key K] [--auth-file F]
  mailsink.py dump          print every recorded message as a JSON list
  mailsink.py clear         forget every recorded message
"""

import argparse
import asyncio
import email
import itertools
import json
import os
import re
import ssl
import sys
import time
from pathlib import Path

SPOOL = Path(os.environ.get("MAILSINK_SPOOL", "/var/lib/mailsink"))


TIMED_DEFERRAL = re.compile(r"defer([0-9]+)s")
_first_seen: dict[str, float] = {}


def rcpt_refusal(address: str, now: float | None = None) -> str | None:
    """The sink's answer at RCPT by the recipient's local part: 451 for defer<N>s* during the N
    seconds after the address was first seen, 451 for any other defer*, 550 for bounce*, None
    (accepted) for anything else. The unit tests' stand-in relay answers the same way."""
    local = address.split("@", 1)[0].lower()
    timed = TIMED_DEFERRAL.match(local)
    if timed:
        now = time.monotonic() if now is None else now
        first = _first_seen.setdefault(address.lower(), now)
        return "451 4.3.0 mailsink: try again later" if now - first < int(timed.group(1)) else None
    if local.startswith("defer"):
        return "451 4.3.0 mailsink: try again later"
    if local.startswith("bounce"):
        return "550 5.1.1 mailsink: no such user"
    return None


def serve(args: argparse.Namespace) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    SPOOL.mkdir(parents=True, exist_ok=True)
    counter = itertools.count()
    connections = itertools.count(1)
    users = {}
    if args.auth_file:
        for line in Path(args.auth_file).read_text().splitlines():
            if ":" in line:
                name, password = line.split(":", 1)
                users[name] = password

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            refusal = rcpt_refusal(address)
            if refusal:
                return refusal
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"

        async def handle_DATA(self, server, session, envelope):
            if not hasattr(session, "mailsink_id"):
                session.mailsink_id = next(connections)
            message = email.message_from_bytes(envelope.original_content or envelope.content)
            record = {
                "received_at": time.time(),
                "connection": session.mailsink_id,
                "peer": session.peer[0],
                "peer_port": session.peer[1],
                "helo": session.host_name,
                "tls": session.ssl is not None,
                "auth_user": (session.auth_data.login.decode()
                              if isinstance(session.auth_data, LoginPassword) else None),
                "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos,
                "subject": message.get("Subject"),
                "message_id": message.get("Message-ID"),
                "x_test_id": message.get("X-Test-Id"),
                "received": message.get_all("Received") or [],
                "size": len(envelope.original_content or envelope.content),
            }
            name = f"{time.time_ns()}-{next(counter)}.json"
            tmp = SPOOL / ("." + name)
            tmp.write_text(json.dumps(record))
            tmp.rename(SPOOL / name)
            return "250 2.0.0 Ok: recorded by mailsink"

    def authenticator(server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            name, password = auth_data.login.decode(), auth_data.password.decode()
            if users.get(name) == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    tls_context = None
    if args.cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.cert, args.key)
    kwargs = {"tls_context": tls_context} if tls_context else {}
    if users:
        kwargs.update(authenticator=authenticator, auth_required=False, auth_require_tls=True)
    controller = Controller(Handler(), hostname="0.0.0.0", port=args.port,
                            server_hostname=args.hostname, ident="mailsink",
                            data_size_limit=100 * 1024 * 1024, **kwargs)
    controller.start()
    print(f"mailsink: listening on port {args.port}", flush=True)
    try:
        asyncio.new_event_loop().run_forever()
    finally:
        controller.stop()


def dump(_args: argparse.Namespace) -> None:
    records = []
    for path in sorted(SPOOL.glob("[0-9]*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    json.dump(records, sys.stdout)


def clear(_args: argparse.Namespace) -> None:
    for path in SPOOL.glob("*.json"):
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--port", type=int, default=25)
    p.add_argument("--hostname", default=os.uname().nodename)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--auth-file")
    p.set_defaults(func=serve)
    sub.add_parser("dump").set_defaults(func=dump)
    sub.add_parser("clear").set_defaults(func=clear)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

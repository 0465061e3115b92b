#!/usr/bin/env python3
"""Speak SMTP like a real client and report every reply as JSON, for tests.

It can prepend a PROXY protocol header (v1 or v2) claiming any client address, use STARTTLS,
authenticate, and send several messages on one connection. It never raises: a refused or reset
connection is reported as {"connected": false, "error": ...}.

  smtpprobe.py --host 10.0.0.1 --port 25 --from a@x.test --to b@y.test [--starttls] [--auth u:p]
               [--proxy v2 --proxy-src 10.0.0.9] [--count 3] [--id TESTID]
"""

import argparse
import ipaddress
import json
import smtplib
import socket
import ssl
import struct
import sys
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, src: str, dst: str, src_port: int, dst_port: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if version == "v1":
        fam = "TCP4" if s.version == 4 else "TCP6"
        return f"PROXY {fam} {s} {d} {src_port} {dst_port}\r\n".encode()
    if s.version == 4:
        body = s.packed + d.packed + struct.pack("!HH", src_port, dst_port)
        fam = 0x11  # AF_INET, STREAM
    else:
        body = s.packed + d.packed + struct.pack("!HH", src_port, dst_port)
        fam = 0x21  # AF_INET6, STREAM
    return PROXY_V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


class ProxySMTP(smtplib.SMTP):
    """smtplib.SMTP that sends a PROXY header right after the TCP connection is made."""

    header_args = None

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout, self.source_address)
        if self.header_args:
            version, src, src_port = self.header_args
            dst = sock.getpeername()[0]
            sock.sendall(proxy_header(version, src, dst, src_port, port))
        return sock


def reply(code_msg):
    code, msg = code_msg
    return [code, msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)]


def tls_context(args) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    versions = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
    if args.tls_version:
        # Let this client speak old versions, so that only the server can refuse them.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = versions[args.tls_version]
        ctx.maximum_version = versions[args.tls_version]
    return ctx


def build_message(args, n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = args.mail_from or "probe@probe.test"
    msg["To"] = ", ".join(args.to)
    msg["Subject"] = f"{args.subject} {n}"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="probe.test")
    msg["X-Test-Id"] = f"{args.id}-{n}" if args.count > 1 else args.id
    msg.set_content(("probe body line\n" * max(1, args.size // 16))[: max(args.size, 16)])
    return msg


def probe(args) -> dict:
    out: dict = {"connected": False, "id": args.id, "messages": []}
    cls = ProxySMTP
    cls.header_args = (args.proxy, args.proxy_src, args.proxy_src_port) if args.proxy else None
    started = time.monotonic()
    try:
        smtp = cls(timeout=args.timeout)
        out["banner"] = reply(smtp.connect(args.host, args.port))
        smtp._host = args.host  # smtplib uses it as the TLS server name
        out["connected"] = True
        out["ehlo"] = reply(smtp.ehlo(args.helo))
        out["esmtp_features"] = sorted(smtp.esmtp_features)
        out["starttls_offered"] = smtp.has_extn("starttls")
        if args.starttls:
            out["starttls"] = reply(smtp.starttls(context=tls_context(args)))
            out["tls_version"] = smtp.sock.version()
            out["ehlo_tls"] = reply(smtp.ehlo(args.helo))
            out["esmtp_features_tls"] = sorted(smtp.esmtp_features)
        if args.auth:
            user, password = args.auth.split(":", 1)
            try:
                out["auth"] = reply(smtp.login(user, password))
            except smtplib.SMTPAuthenticationError as exc:
                out["auth"] = [exc.smtp_code, exc.smtp_error.decode(errors="replace")]
            except smtplib.SMTPNotSupportedError as exc:
                out["auth"] = [0, f"AUTH not offered: {exc}"]
        for n in range(args.count):
            one = {"mail": reply(smtp.docmd("MAIL", f"FROM:<{args.mail_from}>")), "rcpt": []}
            if one["mail"][0] >= 400:
                out["messages"].append(one)
                smtp.rset()
                continue
            for rcpt in args.to:
                one["rcpt"].append(reply(smtp.docmd("RCPT", f"TO:<{rcpt}>")))
            if args.no_data or not any(r[0] < 300 for r in one["rcpt"]):
                smtp.rset()
            else:
                try:
                    one["data"] = reply(smtp.data(build_message(args, n).as_bytes()))
                except smtplib.SMTPDataError as exc:
                    one["data"] = [exc.smtp_code, exc.smtp_error.decode(errors="replace")]
            out["messages"].append(one)
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def sessions(args) -> dict:
    """Open args.sessions connections one after another, one message each.

    With --retry-seconds, a session that fails to connect or gets a 4xx is retried after
    --retry-delay, as a real sending MTA would, until it is accepted or the time is up. Reports
    every attempt's outcome and the timeline of failures, for failover measurements.
    """
    base_id = args.id
    summary = {"sessions": args.sessions, "accepted": [], "failed": [], "attempts": 0,
               "errors": [], "first_error_at": None, "last_error_at": None}
    started = time.monotonic()
    for i in range(args.sessions):
        args.id = f"{base_id}-s{i}"
        deadline = time.monotonic() + args.retry_seconds
        while True:
            summary["attempts"] += 1
            t = time.monotonic() - started
            report = probe(args)
            ok = (report["connected"] and report["messages"]
                  and code_of(report["messages"][0].get("data")) == 250)
            if ok:
                summary["accepted"].append(args.id)
                break
            summary["errors"].append([round(t, 3), report.get("error") or str(report["messages"])[:200]])
            summary["first_error_at"] = summary["first_error_at"] if summary["first_error_at"] is not None else round(t, 3)
            summary["last_error_at"] = round(t, 3)
            if time.monotonic() >= deadline:
                summary["failed"].append(args.id)
                break
            time.sleep(args.retry_delay)
        if args.interval:
            time.sleep(args.interval)
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary["errors"] = summary["errors"][:50]
    return summary


def watch(args) -> dict:
    """For args.watch seconds, connect every --watch-every seconds and wait for the 220 greeting.

    Reports the longest time between two successful greetings (the outage a client saw) and
    the greeting banners seen, so tests can tell which relay answered.
    """
    started = time.monotonic()
    last_ok = None
    longest = 0.0
    failures = 0
    outage_from = outage_to = None
    while time.monotonic() - started < args.watch:
        t = time.monotonic()
        ok = False
        try:
            with socket.create_connection((args.host, args.port), timeout=args.watch_timeout) as sock:
                sock.settimeout(args.watch_timeout)
                ok = sock.recv(512).startswith(b"220")
                sock.sendall(b"QUIT\r\n")
        except OSError:
            ok = False
        now = time.monotonic()
        if ok:
            if last_ok is not None and now - last_ok > longest:
                longest, outage_from, outage_to = now - last_ok, last_ok - started, now - started
            last_ok = now
        else:
            failures += 1
        time.sleep(max(0.0, args.watch_every - (time.monotonic() - t)))
    return {"watched": args.watch, "longest_gap": round(longest, 3), "failures": failures,
            "gap_from": outage_from and round(outage_from, 3), "gap_to": outage_to and round(outage_to, 3)}


def code_of(r):
    return r[0] if r else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=25)
    p.add_argument("--helo", default=socket.getfqdn())
    p.add_argument("--from", dest="mail_from", default="probe@probe.test")
    p.add_argument("--to", action="append", default=[])
    p.add_argument("--subject", default="mailstack probe")
    p.add_argument("--id", default=None, help="X-Test-Id header (default: a random id)")
    p.add_argument("--count", type=int, default=1, help="messages on this one connection")
    p.add_argument("--size", type=int, default=200, help="body size in bytes")
    p.add_argument("--no-data", action="store_true", help="stop after RCPT")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--tls-version", choices=["1.0", "1.1", "1.2", "1.3"])
    p.add_argument("--auth", help="user:password")
    p.add_argument("--proxy", choices=["v1", "v2"])
    p.add_argument("--proxy-src", help="client address the PROXY header claims")
    p.add_argument("--proxy-src-port", type=int, default=40000)
    p.add_argument("--timeout", type=float, default=15)
    p.add_argument("--sessions", type=int, default=0,
                   help="open this many connections in turn, one message each; print a summary")
    p.add_argument("--interval", type=float, default=0, help="pause between sessions")
    p.add_argument("--retry-seconds", type=float, default=0, help="retry a failed session this long")
    p.add_argument("--retry-delay", type=float, default=0.2)
    p.add_argument("--watch", type=float, default=0,
                   help="for this many seconds, measure how long the server stops greeting")
    p.add_argument("--watch-every", type=float, default=0.05)
    p.add_argument("--watch-timeout", type=float, default=0.5)
    args = p.parse_args()
    if args.id is None:
        args.id = uuid.uuid4().hex
    if args.proxy and not args.proxy_src:
        p.error("--proxy needs --proxy-src")
    if args.watch:
        result = watch(args)
    elif args.sessions:
        result = sessions(args)
    else:
        result = probe(args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

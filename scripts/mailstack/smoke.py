"""`mailstack smoke`: one test message through each VIP, from this machine, and (in the lab) the
proof that it arrived at the sink standing in for the internet.
"""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
import subprocess
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate

from mailstack.inventory import Inventory, Undefined
from mailstack.testbench import podman_env


@dataclasses.dataclass
class SmokeResult:
    vip: str
    port: int
    test_id: str
    accepted: bool = False
    code: int | None = None
    reply: str = ""
    banner: str = ""
    tls: bool = False
    seconds: float = 0.0
    delivered: bool | None = None  # None: no sink to ask
    delivered_after: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def vip_addresses(inv: Inventory) -> list[str]:
    """Every VIP of the balancers, or the balancers' own addresses when they have none."""
    return [vip for vip, _, _ in inv.vips()] or \
        [a for a in (inv.address(h) for h in inv.hosts("balancers")) if a]


def smtp_port(inv: Inventory) -> int:
    balancers = inv.hosts("balancers")
    if not balancers:
        return 25
    try:
        frontends = inv.setting(balancers[0], "haproxy", "haproxy_frontends")
    except (Undefined, KeyError):
        return 25
    for fe in frontends:
        if fe.get("name") == "smtp":
            return int(fe["port"])
    return int(frontends[0]["port"]) if frontends else 25


def send_one(vip: str, port: int, sender: str, recipient: str, *, helo: str, starttls: str = "auto",
             user: str | None = None, password: str | None = None, verify: bool = False,
             timeout: float = 30) -> SmokeResult:
    test_id = f"smoke-{uuid.uuid4().hex[:16]}"
    result = SmokeResult(vip, port, test_id)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"mailstack smoke test via {vip} ({test_id})"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = f"<{test_id}@mailstack.smoke>"
    msg["X-Test-Id"] = test_id
    msg.set_content(f"A test message sent by `mailstack smoke` through {vip}:{port}.\n")
    started = time.monotonic()
    try:
        with smtplib.SMTP(local_hostname=helo, timeout=timeout) as smtp:
            smtp._host = vip  # connect() does not set it, and STARTTLS needs a server name
            code, banner = smtp.connect(vip, port)
            result.banner = banner.decode(errors="replace")
            if code != 220:
                result.code, result.reply = code, result.banner
                return result
            smtp.ehlo()
            if starttls != "never" and smtp.has_extn("starttls"):
                context = ssl.create_default_context()
                if not verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                smtp.starttls(context=context)
                smtp.ehlo()
                result.tls = True
            elif starttls == "always":
                result.reply = "the server does not offer STARTTLS"
                return result
            if user:
                smtp.login(user, password or "")
            smtp.mail(sender)
            code, reply = smtp.rcpt(recipient)
            if code >= 300:
                result.code, result.reply = code, reply.decode(errors="replace")
                return result
            code, reply = smtp.data(msg.as_bytes())
            result.code, result.reply = code, reply.decode(errors="replace")
            result.accepted = 200 <= code < 300
    except smtplib.SMTPResponseException as exc:
        result.code, result.reply = exc.smtp_code, exc.smtp_error.decode(errors="replace")
    except (OSError, ValueError, smtplib.SMTPException) as exc:
        result.reply = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = round(time.monotonic() - started, 3)
    return result


def lab_sinks(inv: Inventory) -> list[str]:
    """Containers of the inventory's sinks that this machine can look into (the lab's, by mailstack_lab_container)."""
    containers = []
    for host in inv.hosts("sinks"):
        container = inv.value(host, "mailstack_lab_container", None)
        if container:
            containers.append(str(container))
    return containers


def delivered_to(sinks: list[str], test_id: str) -> bool:
    for container in sinks:
        proc = subprocess.run(["podman", "exec", container, "grep", "-rlq", "--", test_id, "/var/lib/mailsink"],
                              capture_output=True, env=podman_env())
        if proc.returncode == 0:
            return True
    return False


def wait_delivered(sinks: list[str], results: list[SmokeResult], timeout: float) -> None:
    pending = [r for r in results if r.accepted]
    for r in results:
        r.delivered = False if r.accepted else None
    started = time.monotonic()
    while pending:
        for r in list(pending):
            if delivered_to(sinks, r.test_id):
                r.delivered = True
                r.delivered_after = round(time.monotonic() - started, 1)
                pending.remove(r)
        if not pending or time.monotonic() - started > timeout:
            break
        time.sleep(0.5)

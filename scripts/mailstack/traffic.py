"""Mail traffic for drills and proofs: a sender that keeps sending through the VIPs and records what
happened to every message, and the lab sink's count of what arrived."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
import smtplib
import subprocess
import threading
import time
import uuid

from mailstack.testbench import podman_env


@dataclasses.dataclass
class Sent:
    test_id: str
    vip: str
    at: float
    accepted: bool
    detail: str = ""


class Sender(threading.Thread):
    """Sends one message per SMTP session, every `interval` seconds, through the VIPs in turn.

    Every message carries an X-Test-Id of `<prefix>-<n>`; `results` says what happened to each."""

    def __init__(self, vips: list[str], port: int, sender: str, recipient: str, prefix: str | None = None,
                 interval: float = 0.1, timeout: float = 10, retry_on_refusal: bool = False):
        super().__init__(daemon=True)
        self.vips, self.port, self.sender, self.recipient = vips, port, sender, recipient
        self.prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
        self.interval, self.timeout = interval, timeout
        self.results: list[Sent] = []
        self._stop_event = threading.Event()
        self.started_at = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.timeout + 5)

    def send(self, vip: str, test_id: str) -> Sent:
        at = time.monotonic() - self.started_at
        body = (f"From: {self.sender}\r\nTo: {self.recipient}\r\nSubject: mailstack traffic {test_id}\r\n"
                f"X-Test-Id: {test_id}\r\nMessage-ID: <{test_id}@mailstack.traffic>\r\n\r\ntraffic\r\n")
        try:
            with smtplib.SMTP(vip, self.port, timeout=self.timeout) as smtp:
                smtp.sendmail(self.sender, [self.recipient], body)
            return Sent(test_id, vip, at, True)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return Sent(test_id, vip, at, False, f"{code} {text.decode(errors='replace')}")
        except smtplib.SMTPResponseException as exc:
            return Sent(test_id, vip, at, False, f"{exc.smtp_code} {exc.smtp_error.decode(errors='replace')}")
        except (OSError, smtplib.SMTPException) as exc:
            return Sent(test_id, vip, at, False, f"{type(exc).__name__}: {exc}")

    def run(self) -> None:
        vips = itertools.cycle(self.vips)
        for n in itertools.count():
            if self._stop_event.is_set():
                return
            started = time.monotonic()
            self.results.append(self.send(next(vips), f"{self.prefix}-{n}"))
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    @property
    def accepted(self) -> list[Sent]:
        return [r for r in self.results if r.accepted]

    @property
    def refused(self) -> list[Sent]:
        return [r for r in self.results if not r.accepted]


def sink_counts(container: str, prefix: str) -> collections.Counter:
    """How many times each test id with this prefix arrived at a lab sink (mailsink's records)."""
    proc = subprocess.run(["podman", "exec", container, "sh", "-c",
                           f"grep -rhoE '\"x_test_id\": \"{re.escape(prefix)}-[0-9]+\"' /var/lib/mailsink || true"],
                          capture_output=True, text=True, env=podman_env(), timeout=120)
    return collections.Counter(line.split('"')[3] for line in proc.stdout.splitlines() if line.strip())


@dataclasses.dataclass
class Delivery:
    sent: int
    accepted: int
    refused: int
    delivered: int
    lost: list[str]
    duplicated: list[str]


def wait_for_delivery(sender: Sender, sink: str, timeout: float = 120) -> Delivery:
    """Wait until every accepted message is at the sink (or the timeout) and count the outcome."""
    want = {r.test_id for r in sender.accepted}
    deadline = time.monotonic() + timeout
    while True:
        counts = sink_counts(sink, sender.prefix)
        missing = want - set(counts)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    return Delivery(sent=len(sender.results), accepted=len(want), refused=len(sender.refused),
                    delivered=len(set(counts) & want), lost=sorted(missing),
                    duplicated=sorted(k for k, v in counts.items() if v > 1))

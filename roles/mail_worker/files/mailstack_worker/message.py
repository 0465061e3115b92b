"""The message a job becomes: headers the worker owns (From, To, Subject, Date, Message-ID from the
idempotency key) and the rendered parts, text with an HTML alternative when the template has one."""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage

from .job import Job

POLICY = email.policy.SMTP.clone(max_line_length=998)


def message_id(job: Job, domain: str) -> str:
    return f"<{job.idempotency_key}@{domain}>"


def build(job: Job, rendered: dict, domain: str, template_name: str) -> bytes:
    msg = EmailMessage(policy=POLICY)
    msg["From"] = job.sender
    msg["To"] = ", ".join(job.recipients)
    msg["Subject"] = rendered["subject"]
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = message_id(job, domain)
    for name, value in job.headers.items():
        msg[name] = value
    msg["X-Mailstack-Template"] = template_name
    msg.set_content(rendered["text"])
    if "html" in rendered:
        msg.add_alternative(rendered["html"], subtype="html")
    return msg.as_bytes(policy=POLICY)

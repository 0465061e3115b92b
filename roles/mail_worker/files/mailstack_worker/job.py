"""A mail job as the worker receives it: JSON checked against job.schema.json (the documented
format), then the few rules JSON Schema cannot say. A job that fails is dead-lettered with the
reason this module gives; it is never retried."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema

SCHEMA = json.loads((Path(__file__).with_name("job.schema.json")).read_text())
_VALIDATOR = jsonschema.Draft7Validator(SCHEMA)

# Header fields the worker writes itself: a job may not set or repeat them.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version", "sender",
    "return-path", "received", "content-type", "content-transfer-encoding", "content-disposition",
})


class InvalidJob(ValueError):
    """The reason a job cannot be sent, ever (it goes to mail.dead with it)."""


@dataclasses.dataclass(frozen=True)
class Job:
    idempotency_key: str
    sender: str
    recipients: tuple[str, ...]
    variables: dict
    headers: dict
    template_id: str | None = None
    template_version: str | None = None
    body: dict | None = None

    @property
    def template_name(self) -> str:
        """How logs and metrics name what was rendered."""
        if self.template_id is None:
            return "(inline)"
        return f"{self.template_id}@{self.template_version or 'newest'}"


def parse(raw: bytes) -> Job:
    """The job in a message body, or InvalidJob saying what is wrong with it."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidJob(f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"not JSON: {exc}") from None
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise InvalidJob("; ".join(_describe(e) for e in errors[:5]))
    headers = data.get("headers", {})
    reserved = sorted(h for h in headers if h.lower() in RESERVED_HEADERS)
    if reserved:
        raise InvalidJob(f"headers: {', '.join(reserved)} written by the worker, not by a job")
    if len({h.lower() for h in headers}) != len(headers):
        raise InvalidJob("headers: a field named twice (names are case-insensitive)")
    to = data["to"]
    template = data.get("template") or {}
    return Job(idempotency_key=data["idempotency_key"], sender=data["from"],
               recipients=tuple([to] if isinstance(to, str) else to), variables=data.get("variables", {}),
               headers=dict(headers), template_id=template.get("id"), template_version=template.get("version"),
               body=data.get("body"))


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(the job)"
    if error.validator == "oneOf" and not error.absolute_path:
        return "(the job): give exactly one of template and body"
    return f"{where}: {error.message}"

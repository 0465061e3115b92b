"""Templates: found in the directory the role deploys, cached in Redis under versioned keys, compiled
once per worker; rendered in Jinja2's sandbox with the job's variables. Only templates are cached,
never what they render (that is personal).

A deployed template is <dir>/<id>/<version>.json, {"subject": ..., "text": ..., "html": ...} (html
optional), version an integer. A job names an id and a version, or only an id for the newest
version deployed: the directory is looked at again every `rescan_seconds`, so a new version is used
without a restart. A version is not meant to change once deployed; when one does, the role deletes
its cached copy (`mailstack-worker forget-template ID VERSION`) and workers pick it up within
`local_seconds`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .job import InvalidJob, Job

KEY = "mail:template:{id}:{version}"
PARTS = ("subject", "text", "html")


class TemplateError(InvalidJob):
    """A template that is missing, broken, or needs a variable the job does not give."""


class Rendered(dict):
    """subject, text and (when the template has one) html."""


class TemplateStore:
    def __init__(self, directory: str | Path, redis, ttl_seconds: int = 3600, rescan_seconds: float = 5.0,
                 local_seconds: float = 5.0, metrics=None):
        self.directory = Path(directory)
        self.redis = redis
        self.ttl = ttl_seconds
        self.rescan = rescan_seconds
        self.local_seconds = local_seconds
        self.metrics = metrics
        self._lock = threading.Lock()
        self._newest: dict[str, tuple[float, str | None]] = {}   # id -> (checked at, newest version)
        self._compiled: dict[tuple[str, str], tuple[float, str, dict]] = {}  # (id, version) -> (at, sha, parts)
        self._inline: dict[str, dict] = {}                        # sha -> compiled parts (bounded)
        self._text_env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
        self._html_env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)

    # ---------------------------------------------------------------- finding a template
    def newest_version(self, template_id: str) -> str:
        now = time.monotonic()
        with self._lock:
            checked = self._newest.get(template_id)
        if checked is None or now - checked[0] >= self.rescan:
            versions = [int(p.stem) for p in (self.directory / template_id).glob("*.json") if p.stem.isdigit()]
            checked = (now, str(max(versions)) if versions else None)
            with self._lock:
                self._newest[template_id] = checked
        if checked[1] is None:
            raise TemplateError(f"template {template_id}: none deployed")
        return checked[1]

    def source(self, template_id: str, version: str) -> tuple[str, dict]:
        """(sha256 of the source, its parts): from Redis, else from the directory (then cached)."""
        key = KEY.format(id=template_id, version=version)
        cached = self.redis.get(key)
        if cached is not None:
            self._count("hit")
            entry = json.loads(cached)
            return entry["sha"], entry["parts"]
        self._count("miss")
        path = self.directory / template_id / f"{version}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise TemplateError(f"template {template_id} version {version}: not deployed") from None
        parts = _parts(raw, f"template {template_id} version {version}")
        sha = hashlib.sha256(raw).hexdigest()
        self.redis.set(key, json.dumps({"sha": sha, "parts": parts}), ex=self.ttl)
        return sha, parts

    def forget(self, template_id: str, version: str) -> None:
        self.redis.delete(KEY.format(id=template_id, version=version))

    # ---------------------------------------------------------------- rendering
    def compiled(self, job: Job) -> tuple[str, dict]:
        """(what was rendered, its compiled parts) for the job's template or inline body."""
        if job.template_id is None:
            raw = json.dumps(job.body, sort_keys=True).encode()
            sha = hashlib.sha256(raw).hexdigest()
            with self._lock:
                parts = self._inline.get(sha)
            if parts is None:
                parts = self._compile(job.body, "the job's body")
                with self._lock:
                    if len(self._inline) > 256:
                        self._inline.clear()
                    self._inline[sha] = parts
            return "(inline)", parts
        version = job.template_version or self.newest_version(job.template_id)
        name = (job.template_id, version)
        now = time.monotonic()
        with self._lock:
            local = self._compiled.get(name)
        if local is not None and now - local[0] < self.local_seconds:
            return f"{job.template_id}@{version}", local[2]
        sha, parts = self.source(*name)
        if local is not None and local[1] == sha:
            compiled = local[2]
        else:
            compiled = self._compile(parts, f"template {job.template_id} version {version}")
        with self._lock:
            self._compiled[name] = (now, sha, compiled)
        return f"{job.template_id}@{version}", compiled

    def render(self, job: Job) -> tuple[str, Rendered]:
        name, compiled = self.compiled(job)
        out = Rendered()
        for part, template in compiled.items():
            try:
                out[part] = template.render(job.variables)
            except jinja2.UndefinedError as exc:
                raise TemplateError(f"{name} {part}: {exc.message}") from None
            except jinja2.TemplateError as exc:
                raise TemplateError(f"{name} {part}: {exc}") from None
        subject = out["subject"].strip()
        if not subject or "\n" in subject or "\r" in subject:
            raise TemplateError(f"{name} subject: must render to one non-empty line (got {subject!r})")
        out["subject"] = subject
        return name, out

    def _compile(self, parts: dict, what: str) -> dict:
        compiled = {}
        for part in PARTS:
            if parts.get(part) is None:
                continue
            env = self._html_env if part == "html" else self._text_env
            try:
                compiled[part] = env.from_string(parts[part])
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(f"{what} {part}: line {exc.lineno}: {exc.message}") from None
        return compiled

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.template_lookups.labels(result=result).inc()


def _parts(raw: bytes, what: str) -> dict:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"{what}: not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("subject"), str) or not isinstance(data.get("text"), str):
        raise TemplateError(f"{what}: needs a subject and a text (strings)")
    unknown = sorted(set(data) - set(PARTS))
    if unknown:
        raise TemplateError(f"{what}: unknown parts {', '.join(unknown)} (known: {', '.join(PARTS)})")
    return {p: data[p] for p in PARTS if data.get(p) is not None}


def check_file(path: Path) -> None:
    """Raise TemplateError when a template file would not load or compile."""
    parts = _parts(path.read_bytes(), str(path))
    store = TemplateStore(path.parent, redis=None)
    store._compile(parts, str(path))

"""The mail worker's job format (job.schema.json) and what it becomes: a job that does not validate
is refused with a reason naming what is wrong; templates render in a sandbox with StrictUndefined;
a new template version is used without a restart; the message carries the idempotency key as its
Message-ID."""

from __future__ import annotations

import email
import email.policy
import json
import time

import pytest
from worker_support import DictRedis

from mailstack_worker import message
from mailstack_worker.job import InvalidJob, parse
from mailstack_worker.templates import TemplateError, TemplateStore

GOOD = {"idempotency_key": "order-1001", "from": "shop@app.example", "to": "ann@example.net",
        "template": {"id": "welcome"}, "variables": {"name": "Ann"}}


def job(**changes):
    data = dict(GOOD, **changes)
    return parse(json.dumps({k: v for k, v in data.items() if v is not None}).encode())


@pytest.mark.parametrize("changes, reason", [
    ({"idempotency_key": "has space"}, "idempotency_key: 'has space' does not match"),
    ({"from": "not an address"}, "from: 'not an address' does not match"),
    ({"to": []}, "to: [] is not valid"),
    ({"template": None}, "give exactly one of template and body"),
    ({"body": {"subject": "s", "text": "t"}}, "give exactly one of template and body"),
    ({"template": {"id": "welcome", "version": "two"}}, "template/version: 'two' does not match"),
    ({"headers": {"Message-ID": "<x@y>"}}, "headers: Message-ID written by the worker"),
    ({"headers": {"X-Tag": "a\r\nBcc: evil@example.org"}}, "headers/X-Tag"),
    ({"extra": 1}, "Additional properties are not allowed ('extra' was unexpected)"),
])
def test_a_job_that_does_not_validate_is_refused_saying_what_is_wrong(changes, reason):
    with pytest.raises(InvalidJob) as info:
        job(**changes)
    assert reason in str(info.value)
    # control: the same job without the change is valid
    assert job().idempotency_key == "order-1001"


@pytest.mark.parametrize("raw, reason", [(b"\xff\xfe", "not UTF-8"), (b"{", "not JSON"), (b"[]", "is not of type 'object'")])
def test_a_body_that_is_not_a_json_object_is_refused(raw, reason):
    with pytest.raises(InvalidJob, match=reason):
        parse(raw)


def deploy(directory, template_id, version, **parts):
    path = directory / template_id
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{version}.json").write_text(json.dumps(parts))


def test_templates_render_cached_by_version_and_a_new_version_is_used_without_a_restart(tmp_path):
    redis = DictRedis()
    deploy(tmp_path, "welcome", 1, subject="Hello {{ name }}", text="Hi {{ name }}, v1")
    store = TemplateStore(tmp_path, redis, rescan_seconds=0.2, local_seconds=0.2)
    assert store.render(job()) == ("welcome@1", {"subject": "Hello Ann", "text": "Hi Ann, v1"})
    assert "mail:template:welcome:1" in redis.data
    # a second worker finds the source in Redis, not in its directory
    other = TemplateStore(tmp_path / "nothing-deployed-here", redis)
    assert other.render(job(template={"id": "welcome", "version": "1"}))[1]["text"] == "Hi Ann, v1"
    # personalised output is never cached: only the source is in Redis
    assert b"Ann" not in b"".join(redis.data.values())
    deploy(tmp_path, "welcome", 2, subject="Hello {{ name }}", text="Hi {{ name }}, v2",
           html="<p>{{ name }} &amp; co</p>")
    time.sleep(0.25)
    name, rendered = store.render(job(variables={"name": "<Ann>"}))
    assert name == "welcome@2" and rendered["text"] == "Hi <Ann>, v2"
    assert rendered["html"] == "<p>&lt;Ann&gt; &amp; co</p>", "HTML escapes the job's variables"
    # a job may still ask for the old version
    assert store.render(job(template={"id": "welcome", "version": "1"}))[1]["text"] == "Hi Ann, v1"


@pytest.mark.parametrize("template, variables, reason", [
    ({"subject": "Hi", "text": "{{ missing }}"}, {}, "'missing' is undefined"),
    ({"subject": "Hi", "text": "{{ ''.__class__.__mro__ }}"}, {}, "unsafe"),
    ({"subject": "{{ s }}", "text": "t"}, {"s": "two\nlines"}, "must render to one non-empty line"),
    ({"subject": "Hi", "text": "{% if %}"}, {}, "line 1"),
])
def test_a_template_that_cannot_render_the_job_is_a_reason_not_a_crash(tmp_path, template, variables, reason):
    deploy(tmp_path, "t", 1, **template)
    store = TemplateStore(tmp_path, DictRedis())
    with pytest.raises(TemplateError, match=reason):
        store.render(job(template={"id": "t"}, variables=variables))
    with pytest.raises(TemplateError, match="template nothing: none deployed"):
        store.render(job(template={"id": "nothing"}))


def test_an_inline_body_renders_like_a_template_and_the_message_is_complete(tmp_path):
    j = job(template=None, body={"subject": "Order {{ n }}", "text": "Order {{ n }}\n.\n.leading dot"},
            variables={"n": 7}, to=["a@example.net", "b@example.net"], headers={"X-Campaign": "spring"})
    name, rendered = TemplateStore(tmp_path, DictRedis()).render(j)
    raw = message.build(j, rendered, "mail.example", name)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Message-ID"] == "<order-1001@mail.example>"
    assert msg["To"] == "a@example.net, b@example.net" and msg["Subject"] == "Order 7"
    assert msg["X-Campaign"] == "spring" and msg["X-Mailstack-Template"] == "(inline)" and msg["Date"]
    assert msg.get_content().splitlines() == ["Order 7", ".", ".leading dot"]

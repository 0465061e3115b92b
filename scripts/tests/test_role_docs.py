"""Each role documents every variable once: argument_specs carry the defaults/main.yml values and
a description, ansible-doc shows them, and README.md is what the spec makes of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mailstack.roledocs import roles, sync

ROOT = Path(__file__).resolve().parents[2]


def test_specs_and_readmes_are_what_the_generator_writes():
    stale = sync(check=True)
    assert stale == [], f"run `mailstack-testbench docs` and commit: {stale}"


@pytest.mark.parametrize("role", roles())
def test_ansible_doc_shows_every_default_and_description(role):
    doc = subprocess.run([str(Path(sys.executable).with_name("ansible-doc")), "-t", "role", "-r", str(ROOT / "roles"),
                          role, "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    options = json.loads(doc.stdout)[role]["entry_points"]["main"]["options"]
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}
    for name, value in defaults.items():
        if not options[name].get("required"):
            assert options[name].get("default") == value, f"{role}: ansible-doc shows {name} without its default"
    assert all(o.get("description") for o in options.values())


@pytest.mark.parametrize("role", roles())
def test_the_spec_is_one_ansible_accepts_and_the_defaults_pass_it(role):
    """What Ansible checks when the role starts: the spec itself (a required option may not have a
    default) and, for the literal defaults, their types and choices."""
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}
    templated = {k for k, v in defaults.items() if isinstance(v, str) and "{{" in v}
    # A templated default is the role's to resolve: leave it out, value and spec default alike.
    options = {k: ({x: y for x, y in o.items() if x != "default"} if k in templated else o) for k, o in options.items()}
    result = ArgumentSpecValidator(options).validate({k: v for k, v in defaults.items() if k not in templated})
    assert result.error_messages == [], f"{role}: {result.error_messages}"

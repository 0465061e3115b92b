"""Each role's documentation from one source: `mailstack-testbench docs [--check]`.

A role's defaults/main.yml holds its defaults (with the comments an operator reads next to them);
its meta/argument_specs.yml holds types, choices and descriptions. This writes every default into
the argument_specs (so `ansible-doc -t role -r roles ROLE` shows them and validate_argument_spec
checks them) and the role's README.md from the spec. Nothing here is written by hand twice: a
unit test runs `--check`, which fails when a file is not what this would write, or when a
default has no option in the spec, or an option no description.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from mailstack.testbench import ROOT

ROLES = ROOT / "roles"
WIDTH = 120
GENERATED = "Generated from meta/argument_specs.yml and defaults/main.yml by `mailstack-testbench docs`."


class DocsError(Exception):
    """A role's spec and defaults cannot be made to agree (a default without an option, ...)."""


def _scalar(value) -> str:
    """A value as a one-line YAML flow node (strings that need quotes in double quotes)."""
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_scalar(v)}" for k, v in value.items()) + "}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    text = text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()
    if isinstance(value, str) and (text[:1] in "'\"" or any(c in value for c in ",[]{}#") or ": " in value):
        return json.dumps(value)  # plain scalars cannot hold flow indicators
    return text


def _shown(value) -> str:
    """A default as a README shows it: a string as it is, anything else as YAML."""
    return value if isinstance(value, str) else _scalar(value)


def _flow(option: dict) -> str | None:
    """An option as one flow mapping, if it is simple (no suboptions)."""
    if any(isinstance(v, dict) for v in option.values()):
        return None
    return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in option.items()) + "}"


def _block(data, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            flow = _flow(value) if key not in ("argument_specs", "main", "options") else None
            if flow is not None and len(pad) + len(key) + 2 + len(flow) <= WIDTH:
                lines.append(f"{pad}{key}: {flow}")
            else:
                lines.append(f"{pad}{key}:")
                lines += _block(value, indent + 2)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value) and key == "description":
            folded = yaml.safe_dump(value, width=WIDTH - indent - 24, allow_unicode=True).rstrip()
            lines += [f"{pad}{key}:", *(f"{pad}  {line}" for line in folded.splitlines())]
        elif isinstance(value, list) and len(pad) + len(key) + 2 + len(_scalar(value)) > WIDTH:
            lines += [f"{pad}{key}:", *(f"{pad}  - {_scalar(v)}" for v in value)]
        else:
            text = _scalar(value)
            if len(pad) + len(key) + 2 + len(text) > WIDTH and isinstance(value, str):
                folded = yaml.safe_dump({key: value}, width=WIDTH - indent - 2, default_style=None).rstrip()
                lines += [pad + line for line in folded.splitlines()]
            else:
                lines.append(f"{pad}{key}: {text}")
    return lines


def _ordered(option: dict, default) -> dict:
    """type, choices/elements, required, default, no_log, description, suboptions: the order a reader expects."""
    order = ["type", "elements", "choices", "required", "default", "no_log", "description", "options"]
    merged = {k: v for k, v in option.items() if k != "default"}
    if default is not _NONE and not option.get("required"):
        merged["default"] = default  # Ansible refuses a default on a required option
    return {k: merged[k] for k in order if k in merged} | {k: v for k, v in merged.items() if k not in order}


_NONE = object()


@dataclasses.dataclass
class RoleDocs:
    name: str
    spec_text: str
    readme_text: str


def build(role: str) -> RoleDocs:
    base = ROLES / role
    spec_path, defaults_path = base / "meta" / "argument_specs.yml", base / "defaults" / "main.yml"
    spec = yaml.safe_load(spec_path.read_text())
    defaults = (yaml.safe_load(defaults_path.read_text()) or {}) if defaults_path.is_file() else {}
    main = spec["argument_specs"]["main"]
    options = main.get("options") or {}
    undeclared = sorted(set(defaults) - set(options))
    if undeclared:
        raise DocsError(f"{role}: defaults/main.yml sets {', '.join(undeclared)}, which meta/argument_specs.yml "
                        "does not declare (add an option with a type and a description)")
    silent = sorted(n for n, o in options.items() if not o.get("description"))
    if silent:
        raise DocsError(f"{role}: options without a description: {', '.join(silent)}")
    main["options"] = {name: _ordered(option, defaults.get(name, _NONE)) for name, option in options.items()}
    header = [line for line in spec_path.read_text().splitlines() if line.startswith("#")]
    spec_text = "\n".join(["---", *header, *_block(spec, 0)]) + "\n"
    return RoleDocs(role, spec_text, readme(role, main))


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def readme(role: str, main: dict) -> str:
    description = main.get("description") or []
    if isinstance(description, str):
        description = [description]
    lines = [f"# {role}", "", main.get("short_description", ""), ""]
    lines += [*(d.strip() for d in description), ""] if description else []
    lines += ["## Variables", "",
              "Set them in the inventory (`group_vars/<group>/" + role + ".yml`); secrets from the vault.", "",
              "| Variable | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name, option in main["options"].items():
        kind = option.get("type", "str")
        if option.get("elements"):
            kind += f" of {option['elements']}"
        if option.get("choices"):
            kind += ": " + ", ".join(map(str, option["choices"]))
        if option.get("required"):
            default = "required"
        elif "default" in option:
            default = "`" + _cell(_shown(option["default"])) + "`" if option["default"] != "" else '`""`'
        else:
            default = ""
        text = option.get("description", "")
        text = " ".join(text) if isinstance(text, list) else text
        if option.get("options"):
            text += " Each entry: " + "; ".join(
                f"`{k}` ({v.get('type', 'str')}{', required' if v.get('required') else ''}"
                f"{', default ' + _scalar(v['default']) if 'default' in v else ''}): {v.get('description', '')}"
                for k, v in option["options"].items())
        if option.get("no_log"):
            text += " Secret: from the vault."
        lines.append(f"| `{name}` | {_cell(kind)} | {default} | {_cell(text)} |")
    lines += ["", f"_{GENERATED} Do not edit it by hand._", ""]
    return "\n".join(lines)


def roles() -> list[str]:
    return sorted(p.parent.parent.name for p in ROLES.glob("*/meta/argument_specs.yml"))


def sync(check: bool) -> list[str]:
    """Write (or, with check, compare) every role's spec and README; the files that differ."""
    stale: list[str] = []
    for role in roles():
        docs = build(role)
        for path, text in ((ROLES / role / "meta" / "argument_specs.yml", docs.spec_text),
                           (ROLES / role / "README.md", docs.readme_text)):
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
                if not check:
                    path.write_text(text)
    return stale

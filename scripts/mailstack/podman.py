"""podman, as the lab and the drills use it: run a command, run a shell command in a container,
inspect a container or a network. Errors name the podman command and what it said."""

from __future__ import annotations

import json
import subprocess

import click

from mailstack.testbench import podman_env


class PodmanError(click.ClickException):
    """A podman command failed."""


def podman(*args: str, check: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise PodmanError(f"podman {' '.join(args[:3])} ... failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def pexec(container: str, command: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a shell command in a lab container; never raises on its exit code."""
    args = ["exec"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    try:
        return podman(*args, container, "sh", "-c", command, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timed out after {timeout}s")


def container_info(name: str) -> dict | None:
    proc = podman("container", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def network_subnet(name: str) -> str | None:
    proc = podman("network", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)[0]
    subnets = data.get("subnets") or []
    return subnets[0].get("subnet") if subnets else ""


def image_tag(kind: str, distro: str) -> str:
    return f"localhost/mailstack-{kind}:{distro}"

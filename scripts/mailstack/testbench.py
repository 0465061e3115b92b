"""The container test bench: podman settings, locally built images, and its command line.

Nothing here can pull an image: there is no registry. Images are built with debootstrap from
the Debian mirror this machine's apt is configured with, then imported into podman. Each image
carries a label with the hash of its recipe, so a changed recipe rebuilds it and an unchanged
one is reused. The runner of the scenarios and the lab proof is suite.py, its profile profile.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
IMAGES_DIR = ROOT / "scripts" / "testbench" / "images"
RECIPE_LABEL = "org.mailstack.recipe"
SSH_DIR = CACHE / "ssh"
SSH_KEY = SSH_DIR / "id_ed25519"

# The Debian releases the bench can build, by the name TEST_DISTRO uses.
DISTROS = {"debian12": "bookworm", "debian13": "trixie"}

BASE_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "python3", "python3-apt", "iproute2", "procps",
    "ca-certificates", "gnupg", "sudo", "less", "openssh-server",
]
# Ansible and the tests reach the containers as they reach real hosts: root over SSH with the
# bench's key (see ensure_ssh_key), with pipelining and a shared connection per host. Measured
# here, a copy or command task took 1.3 s over podman exec (five podman commands per task: the
# connection plugin cannot pipeline) and 0.45-0.55 s over SSH.
SSHD_CONFIG = """\
# The mailstack test bench reaches this container as root with the key mounted as
# /root/.ssh/authorized_keys; nothing else logs in.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
# Ansible's forks and the tests share one connection per host: many sessions at once.
MaxSessions 100
MaxStartups 100:30:200
"""
# Units that cannot work inside a container; masking them keeps `systemctl is-system-running`
# meaningful and the journal free of noise.
MASKED_UNITS = [
    "systemd-modules-load.service", "getty.target", "console-getty.service",
    "systemd-firstboot.service", "systemd-udevd.service", "systemd-udev-trigger.service",
    "sys-kernel-config.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "systemd-remount-fs.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "e2scrub_all.timer", "fstrim.timer",
]


class BenchError(click.ClickException):
    """A failure of the bench that names what failed."""


# ---------------------------------------------------------------- apt sources and the mirror

@dataclasses.dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_deb822(text: str) -> list[AptSource]:
    """Parse deb822 `.sources` text into sources (one per URI)."""
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            sources.append(AptSource(uri.rstrip("/"), tuple(fields.get("suites", "").split()),
                                     tuple(fields.get("components", "").split())))
    return sources


def parse_one_line(text: str) -> list[AptSource]:
    """Parse classic one-line `sources.list` text."""
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        parts = line.split()[1:]
        if parts and parts[0].startswith("["):
            while parts and not parts[0].endswith("]"):
                parts.pop(0)
            parts.pop(0)
        if len(parts) >= 2:
            sources.append(AptSource(parts[0].rstrip("/"), (parts[1],), tuple(parts[2:])))
    return sources


def host_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    sources: list[AptSource] = []
    listfile = etc_apt / "sources.list"
    if listfile.is_file():
        sources += parse_one_line(listfile.read_text())
    for path in sorted((etc_apt / "sources.list.d").glob("*.list")):
        sources += parse_one_line(path.read_text())
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        sources += parse_deb822(path.read_text())
    return sources


def pick_mirrors(sources: list[AptSource]) -> tuple[str, str | None]:
    """Return (archive mirror, security mirror or None) from the machine's apt sources.

    The archive mirror is the first source that serves a plain release suite (no `-security`,
    `-updates` or `-backports`) with the `main` component; the security mirror is the first that
    serves a `-security` suite.
    """
    archive = security = None
    for src in sources:
        plain = [s for s in src.suites if "-" not in s and "/" not in s]
        if archive is None and plain and ("main" in src.components or not src.components):
            archive = src.uri
        if security is None and any(s.endswith("-security") or "/updates" in s for s in src.suites):
            security = src.uri
    if archive is None:
        raise BenchError("no Debian archive mirror found in /etc/apt/sources.list{,.d}: "
                         "the images are built from the mirror this machine uses")
    return archive, security


# ---------------------------------------------------------------- containers.conf

def container_limits() -> dict[str, int]:
    """The highest ulimits a container may ask for on this machine.

    Without CAP_SYS_RESOURCE a container may not raise a limit above the host's hard limit, and
    the pids limit must also stay below the kernel's pid_max.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    unlimited = resource.RLIM_INFINITY
    nofile = 1048576 if nofile == unlimited else nofile
    nproc = pid_max if nproc == unlimited else min(nproc, pid_max)
    return {"nofile": nofile, "nproc": nproc}


def render_containers_conf(limits: dict[str, int]) -> str:
    return (
        "# Written by scripts/mailstack/testbench.py for this machine; do not edit.\n"
        "[containers]\n"
        "default_ulimits = [\n"
        f'  "nofile={limits["nofile"]}:{limits["nofile"]}",\n'
        f'  "nproc={limits["nproc"]}:{limits["nproc"]}",\n'
        "]\n"
        "[engine]\n"
        "# crun refuses cgroup v1 hybrid hierarchies; runc works on both.\n"
        'runtime = "runc"\n'
        "[network]\n"
        'network_backend = "netavark"\n'
    )


def containers_conf_path() -> Path:
    return CACHE / "containers" / "containers.conf"


def write_containers_conf() -> Path:
    path = containers_conf_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_containers_conf(container_limits())
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def ensure_ssh_key() -> Path:
    """The key the bench reaches its containers with, made once per checkout in .cache/ssh.

    Its public half is mounted read-only as root's authorized_keys in every bench and lab container
    (.cache/ssh/authorized_keys); the private key never leaves this machine.
    """
    SSH_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not SSH_KEY.exists():
        if shutil.which("ssh-keygen") is None:
            raise BenchError("ssh-keygen is not installed: run scripts/testbench/setup-host.sh")
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mailstack-bench", "-f", str(SSH_KEY)],
            "ssh-keygen of the bench key")
    public = SSH_KEY.with_name(SSH_KEY.name + ".pub").read_text()
    authorized = SSH_DIR / "authorized_keys"
    if not authorized.exists() or authorized.read_text() != public:
        authorized.write_text(public)
    authorized.chmod(0o644)
    return SSH_KEY


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(containers_conf_path())
    return env


# ---------------------------------------------------------------- images

@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    """How one image is made. Its hash decides whether a built image is current."""
    name: str
    distro: str
    archive: str
    security: str | None
    packages: tuple[str, ...]
    containerfile: str = ""   # a Containerfile layered on the base image, for derived images
    parent_digest: str = ""   # a derived image is rebuilt when its base changes

    @property
    def suite(self) -> str:
        return DISTROS[self.distro]

    @property
    def tag(self) -> str:
        return f"localhost/mailstack-{self.name}:{self.distro}"

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.name, self.distro, self.archive, self.security or "",
                     " ".join(self.packages), " ".join(MASKED_UNITS), SSHD_CONFIG, self.containerfile,
                     self.parent_digest,
                     inspect.getsource(build_base) if self.name == "base" else "",
                     inspect.getsource(apt_sources_for) if self.name == "base" else ""):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


def apt_sources_for(recipe: ImageRecipe) -> str:
    suite = recipe.suite
    text = (f"Types: deb\nURIs: {recipe.archive}\nSuites: {suite} {suite}-updates\n"
            "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    if recipe.security:
        text += (f"\nTypes: deb\nURIs: {recipe.security}\nSuites: {suite}-security\n"
                 "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    return text


def run(cmd: list[str], what: str, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure raise an error that says what failed and where its output is."""
    kw.setdefault("env", podman_env())
    if log:
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, **kw)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        detail = f"see {log}" if log else (proc.stderr or proc.stdout).strip()[-2000:]
        raise BenchError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc


def image_label(tag: str) -> str | None:
    proc = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{ index .Labels \"" + RECIPE_LABEL + "\" }}", tag],
        capture_output=True, text=True, env=podman_env())
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def build_base(recipe: ImageRecipe, log: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise BenchError("debootstrap is not installed: run scripts/testbench/setup-host.sh")
    with tempfile.TemporaryDirectory(prefix="mailstack-rootfs-", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "--include=" + ",".join(recipe.packages),
             recipe.suite, str(rootfs), recipe.archive],
            f"debootstrap of {recipe.suite} from {recipe.archive}", log=log)
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(apt_sources_for(recipe))
        # Keep images small and apt quiet; recommends are what a role asks for by name.
        (rootfs / "etc/apt/apt.conf.d/90mailstack-bench").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
            'Acquire::Retries "3";\n')
        for unit in MASKED_UNITS:
            link = rootfs / "etc/systemd/system" / unit
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to("/dev/null")
        (rootfs / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
        (rootfs / "etc/ssh/sshd_config.d/mailstack-bench.conf").write_text(SSHD_CONFIG)
        (rootfs / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        (rootfs / "etc/machine-id").write_text("")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        # An empty package list must look old, or apt's cache_valid_time would trust it.
        os.utime(rootfs / "var/lib/apt/lists", (0, 0))
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["podman", "import",
                 "--change", 'CMD ["/sbin/init"]',
                 "--change", "STOPSIGNAL SIGRTMIN+3",
                 "--change", f"LABEL {RECIPE_LABEL}={recipe.digest()}",
                 "-", recipe.tag],
                f"podman import of {recipe.tag}", log=log, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()


def build_derived(recipe: ImageRecipe, base_tag: str, log: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mailstack-build-", dir=CACHE) as tmp:
        cfile = Path(tmp) / "Containerfile"
        cfile.write_text(recipe.containerfile)
        run(["podman", "build", "--network", "host", "--build-arg", f"BASE={base_tag}",
             "--label", f"{RECIPE_LABEL}={recipe.digest()}", "-t", recipe.tag, "-f", str(cfile), tmp],
            f"podman build of {recipe.tag}", log=log)


def recipes(distro: str) -> list[ImageRecipe]:
    archive, security = pick_mirrors(host_apt_sources())
    base = ImageRecipe("base", distro, archive, security, tuple(BASE_PACKAGES))
    tools_cf = (IMAGES_DIR / "tools.Containerfile").read_text()
    tools = ImageRecipe("tools", distro, archive, security, (), tools_cf, base.digest())
    return [base, tools]


def ensure_images(distro: str, force: bool = False) -> list[tuple[str, str]]:
    """Build each image whose recipe changed or that is missing; return (tag, action) pairs."""
    if distro not in DISTROS:
        raise BenchError(f"TEST_DISTRO={distro!r} is not one of {', '.join(DISTROS)}")
    write_containers_conf()
    ensure_ssh_key()
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done = []
    base_tag = None
    for recipe in recipes(distro):
        want = recipe.digest()
        if not force and image_label(recipe.tag) == want:
            done.append((recipe.tag, "current"))
        else:
            log = logs / f"image-{recipe.name}-{distro}.log"
            log.write_text("")
            click.echo(f"testbench: building {recipe.tag} (log: {log})", err=True)
            started = time.monotonic()
            if recipe.name == "base":
                build_base(recipe, log)
            else:
                build_derived(recipe, base_tag, log)
            if image_label(recipe.tag) != want:
                raise BenchError(f"image {recipe.tag} did not build: see {log}")
            done.append((recipe.tag, f"built in {time.monotonic() - started:.0f}s"))
            # The image this tag pointed to before is now dangling: free its space.
            subprocess.run(["podman", "image", "prune", "--force"], capture_output=True,
                           env=podman_env())
        if recipe.name == "base":
            base_tag = recipe.tag
    return done


# ---------------------------------------------------------------- command line

@click.group()
def main() -> None:
    """Helpers for the Molecule test bench (podman, runc, locally built Debian images)."""


@main.command("conf")
def conf_cmd() -> None:
    """Write the containers.conf this machine needs and print its path."""
    click.echo(write_containers_conf())


@main.command("images")
@click.option("--distro", default=lambda: os.environ.get("TEST_DISTRO", "debian12"),
              show_default="$TEST_DISTRO or debian12")
@click.option("--force", is_flag=True, help="Rebuild even when the recipe did not change.")
def images_cmd(distro: str, force: bool) -> None:
    """Build the bench images for DISTRO if they are missing or their recipe changed.

    Example: mailstack-testbench images --distro debian13
    """
    for tag, action in ensure_images(distro, force):
        click.echo(f"testbench: image {tag}: {action}")


@main.command("run")
@click.option("--distro", "distros", multiple=True,
              default=lambda: os.environ.get("TEST_DISTRO", "debian12").split(),
              show_default="$TEST_DISTRO or debian12", help="Debian release(s); repeat for several.")
@click.option("--scenario", "names", multiple=True,
              help="Run only these Molecule scenarios; `lab` is the lab proof (default: all and the lab).")
@click.option("--unit/--no-unit", default=True, show_default=True, help="Run the unit tests first.")
@click.option("--jobs", default=1, show_default=True,
              help="Jobs (a scenario or the lab proof on one release) run at once.")
def run_cmd(distros: tuple[str, ...], names: tuple[str, ...], unit: bool, jobs: int) -> None:
    """Run the Molecule scenarios and the lab proof, time each step, end with one summary table.

    Steps that measure time run while nothing else does. What each step spent its time on is
    kept in .cache/timings/: `mailstack-testbench profile` prints it.

    Example: mailstack-testbench run --distro debian12 --distro debian13 --jobs 2
    """
    from mailstack import suite

    distros = tuple(d for item in distros for d in item.split())
    for distro in distros:
        if distro not in DISTROS:
            raise BenchError(f"TEST_DISTRO={distro!r} is not one of {', '.join(DISTROS)}")
    chosen = [n for item in names for n in item.split()]
    molecule = [n for n in chosen if n != "lab"] if chosen else suite.all_scenarios()
    with_lab = not chosen or "lab" in chosen
    if not suite.run_suite(list(distros), molecule, with_lab, unit, jobs):
        sys.exit(1)


@main.command("docs")
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if a file is not what this would write.")
def docs_cmd(check: bool) -> None:
    """Write each role's defaults into its argument_specs, and its README.md from the spec.

    \b
    Example:
      mailstack-testbench docs && git diff roles/
    """
    from mailstack.roledocs import DocsError, sync

    try:
        stale = sync(check)
    except DocsError as exc:
        raise click.ClickException(str(exc)) from None
    for path in stale:
        click.echo(f"{'out of date' if check else 'wrote'}: {path}")
    if check and stale:
        raise SystemExit("run `mailstack-testbench docs` and commit what it writes")


@main.command("profile")
@click.option("--top", default=15, show_default=True, help="How many of the slowest tasks and tests to list.")
def profile_cmd(top: int) -> None:
    """Print where the last run's time went: each job's steps, and inside them apt, waits,
    service starts, fact gathering and the slowest tasks and tests.

    Example: mailstack-testbench profile --top 25
    """
    from mailstack import profile

    profiles = profile.load()
    if not profiles:
        raise BenchError("no timings in .cache/timings: run `make test` (or mailstack-testbench run) first")
    for line in profile.render(profiles, top):
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

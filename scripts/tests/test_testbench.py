"""Unit tests of the test bench helpers: mirror discovery, container limits, image recipes,
and the shape of the Molecule scenarios (unique networks, subnets and container names)."""

import ipaddress
import resource
from pathlib import Path

import pytest
import yaml

from mailstack import testbench as tb

ROOT = Path(__file__).resolve().parents[2]

DEB822 = """\
Types: deb
# a snapshot comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main contrib

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def test_deb822_sources_are_parsed_and_disabled_ones_skipped():
    sources = tb.parse_deb822(DEB822)
    assert [s.uri for s in sources] == ["http://mirror.example/debian",
                                        "http://security.example/debian-security"]
    assert sources[0].suites == ("bookworm", "bookworm-updates")


def test_one_line_sources_with_options_are_parsed():
    text = ("# comment\n"
            "deb [signed-by=/usr/share/keyrings/k.gpg arch=amd64] http://m.example/debian/ trixie main\n"
            "deb-src http://m.example/debian trixie main\n"
            "deb http://s.example/debian-security trixie-security main\n")
    sources = tb.parse_one_line(text)
    assert [(s.uri, s.suites) for s in sources] == [
        ("http://m.example/debian", ("trixie",)),
        ("http://s.example/debian-security", ("trixie-security",)),
    ]


def test_mirrors_are_taken_from_the_machines_sources():
    archive, security = tb.pick_mirrors(tb.parse_deb822(DEB822))
    assert archive == "http://mirror.example/debian"
    assert security == "http://security.example/debian-security"


def test_no_archive_mirror_is_a_clear_error():
    only_security = tb.parse_one_line("deb http://s.example/debian-security bookworm-security main\n")
    with pytest.raises(tb.BenchError, match="no Debian archive mirror"):
        tb.pick_mirrors(only_security)


def test_container_limits_stay_within_the_hosts_hard_limits(monkeypatch, tmp_path):
    limits = {resource.RLIMIT_NOFILE: (1024, 20000), resource.RLIMIT_NPROC: (4000, 96365)}
    monkeypatch.setattr(tb.resource, "getrlimit", lambda which: limits[which])
    real_path = tb.Path

    def fake_path(p):
        return real_path(tmp_path / "pid_max") if p == "/proc/sys/kernel/pid_max" else real_path(p)

    (tmp_path / "pid_max").write_text("32768\n")
    monkeypatch.setattr(tb, "Path", fake_path)
    assert tb.container_limits() == {"nofile": 20000, "nproc": 32768}


def test_containers_conf_selects_runc_and_the_limits():
    text = tb.render_containers_conf({"nofile": 20000, "nproc": 32768})
    assert 'runtime = "runc"' in text
    assert '"nofile=20000:20000"' in text and '"nproc=32768:32768"' in text


def test_recipe_digest_changes_with_the_recipe():
    base = tb.ImageRecipe("base", "debian12", "http://m/debian", None, ("systemd", "python3"))
    assert base.digest() == tb.ImageRecipe("base", "debian12", "http://m/debian", None,
                                           ("systemd", "python3")).digest()
    assert base.digest() != tb.ImageRecipe("base", "debian12", "http://m/debian", None,
                                           ("systemd",)).digest()
    assert base.digest() != tb.ImageRecipe("base", "debian13", "http://m/debian", None,
                                           ("systemd", "python3")).digest()
    tools = tb.ImageRecipe("tools", "debian12", "http://m/debian", None, (), "FROM x", base.digest())
    other_base = tb.ImageRecipe("tools", "debian12", "http://m/debian", None, (), "FROM x", "0" * 16)
    assert tools.digest() != other_base.digest()


def test_image_apt_sources_use_the_chosen_mirrors():
    recipe = tb.ImageRecipe("base", "debian13", "http://m/debian", "http://s/debian-security", ())
    text = tb.apt_sources_for(recipe)
    assert "URIs: http://m/debian\nSuites: trixie trixie-updates" in text
    assert "URIs: http://s/debian-security\nSuites: trixie-security" in text


def test_unknown_distro_is_refused():
    with pytest.raises(tb.BenchError, match="TEST_DISTRO"):
        tb.ensure_images("debian11")


def scenarios():
    for path in sorted((ROOT / "molecule").glob("*/molecule.yml")):
        yield path.parent.name, yaml.safe_load(path.read_text())


def test_every_scenario_has_its_own_network_subnet_and_container_names():
    nets, subnets, names = {}, {}, {}
    for name, cfg in scenarios():
        driver = cfg["driver"]
        net = driver["bench_network"]
        subnet = ipaddress.ip_network(driver["bench_subnet"])
        assert net not in nets, f"{name} and {nets.get(net)} share network {net}"
        for other, other_subnet in subnets.items():
            assert not subnet.overlaps(other_subnet), f"{name} and {other} have overlapping subnets"
        nets[net], subnets[name] = name, subnet
        for platform in cfg["platforms"]:
            assert platform["name"] not in names, f"container {platform['name']} in {name} and {names.get(platform['name'])}"
            names[platform["name"]] = name
            assert ipaddress.ip_address(platform["ip"]) in subnet, f"{platform['name']} outside {subnet}"
            assert platform["network"] == net
    assert nets, "no scenario found"

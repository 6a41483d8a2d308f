"""Golden images (pibake.bake.golden): the pure parts - cache key, marker, binfmt_misc parsing, the bake's apt
sources - and the seed of a baked image (no apt at first boot). The bake itself (loop device, apt under
qemu-user) and a baked worker's boot are in tests/target/."""

import dataclasses

import pytest
import yaml

from pibake.bake import golden
from pibake.bake.golden import (BakeError, apt_fetch_summary, bake_key, baked_name, baked_packages,
                                binfmt_rule_with_fix_binary, emulation_problem, local_sources, marker, os_codename,
                                parse_binfmt_entry, parse_marker, private_sources)
from pibake.bake.lint import lint_seed
from pibake.bake.seed import seed_packages
from pibake.layout import ROLE_PACKAGES
from pibake.layout import role_packages as layout_role_packages
from tests.bake.seed_fixtures import NODES, cluster_for, render

SHA = "cb6ff674c025548e3475eeff52c4cdddbc3f7c69b61c9fd1cb87d7335b1f59fd"
# /proc/sys/fs/binfmt_misc/qemu-aarch64 on this machine kind (Debian 12 qemu-user-static, registered from
# /usr/lib/binfmt.d/qemu-aarch64.conf)
AARCH64_ENTRY = """enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: POF
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
"""
AARCH64_CONF = (r"# qemu-user-static\n"
                r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
                r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
                r":/usr/libexec/qemu-binfmt/aarch64-binfmt-P:PO").replace(r"\n", "\n")


def role_packages(cluster, role):
    return layout_role_packages(role, mqtt=cluster.mqtt.enabled)


def test_the_cache_key_changes_with_image_role_and_package_set_not_order():
    base = bake_key(SHA, "worker", ("slurmd", "munge"))
    assert base == bake_key(SHA, "worker", ("munge", "slurmd", "munge"))
    assert len({base, bake_key("0" * 64, "worker", ("slurmd", "munge")), bake_key(SHA, "sensor", ("slurmd", "munge")),
                bake_key(SHA, "worker", ("slurmd", "munge", "python3-paho-mqtt"))}) == 4
    assert baked_name("raspios-trixie-lite-arm64.img.xz", "worker", base) == \
        f"raspios-trixie-lite-arm64-worker-baked-{base}.img"


def test_the_bake_installs_the_seeds_own_list_including_mqtt():
    plain = cluster_for()
    mqtt = dataclasses.replace(plain, mqtt=dataclasses.replace(plain.mqtt, enabled=True))
    for role in ROLE_PACKAGES:
        seed = yaml.safe_load(render(role, cluster=plain).user_data)
        assert list(role_packages(plain, role)) == seed["packages"]
        assert list(role_packages(mqtt, role)) == yaml.safe_load(render(role, cluster=mqtt).user_data)["packages"]
    assert "python3-paho-mqtt" in role_packages(mqtt, "worker") and "mosquitto" in role_packages(mqtt, "manager")


def test_the_marker_round_trips_and_foreign_json_is_not_a_marker():
    value = marker("worker", ("slurmd", "munge"), SHA)
    assert parse_marker(__import__("json").dumps(value).encode()) == value
    assert baked_packages(value, "worker") == ("munge", "slurmd")
    assert baked_packages(value, "manager") == ()  # baked for another role: the seed installs everything
    for data in (None, b"", b"not json", b"[1]", b'{"role": "worker"}', b'{"pibake_baked": 1, "packages": "x"}'):
        assert parse_marker(data) is None


def test_a_baked_image_seed_has_no_apt_at_all():
    cluster = cluster_for()
    seed = yaml.safe_load(render("worker").user_data)
    baked = golden_seed("worker", role_packages(cluster, "worker"))
    assert seed["package_update"] is True and seed["packages"]
    assert baked["package_update"] is False and "packages" not in baked
    assert {k: v for k, v in baked.items() if k not in ("package_update",)} == \
        {k: v for k, v in seed.items() if k not in ("package_update", "packages")}


def test_a_partly_baked_image_installs_only_what_it_lacks():
    cluster = cluster_for()
    mqtt = dataclasses.replace(cluster, mqtt=dataclasses.replace(cluster.mqtt, enabled=True))
    # baked before mqtt was switched on: only the publisher's library is left for first boot
    assert seed_packages(mqtt, "worker", role_packages(cluster, "worker")) == ["python3-paho-mqtt"]
    seed = golden_seed("worker", role_packages(cluster, "worker"), cluster=mqtt)
    assert seed["package_update"] is True and seed["packages"] == ["python3-paho-mqtt"]


def test_baked_seeds_lint_clean_for_every_role():
    from pibake.bake.seed import render_seed
    from tests.bake.seed_fixtures import BUNDLE, SECRETS

    cluster = cluster_for()
    for role, node in NODES.items():
        seed = render_seed(cluster, node, SECRETS, instance_id="pibake-golden-test",
                           manager_bundle=BUNDLE if role == "manager" else None,
                           preinstalled=role_packages(cluster, role))
        report = lint_seed(seed, hostname=node.hostname, family="raspios")
        assert report.errors == [], report.errors


def golden_seed(role, preinstalled, cluster=None):
    from pibake.bake.seed import render_seed
    from tests.bake.seed_fixtures import SECRETS

    seed = render_seed(cluster or cluster_for(), NODES[role], SECRETS, instance_id="pibake-golden-test",
                       preinstalled=preinstalled)
    return yaml.safe_load(seed.user_data)


def test_binfmt_entry_parsing_and_the_fix_binary_flag(tmp_path):
    entry = parse_binfmt_entry(AARCH64_ENTRY)
    assert entry == {"enabled": True, "interpreter": "/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "flags": "POF",
                     "magic": "7f454c460201010000000000000000000200b700"}
    assert parse_binfmt_entry("disabled\nflags: \n")["enabled"] is False
    rule = binfmt_rule_with_fix_binary(AARCH64_CONF)
    assert rule.startswith(":qemu-aarch64:M::") and rule.endswith(":POF")
    assert binfmt_rule_with_fix_binary(AARCH64_CONF + "F") == rule  # already has F: unchanged
    with pytest.raises(BakeError):
        binfmt_rule_with_fix_binary("# nothing\n")

    binfmt = tmp_path / "binfmt_misc"
    binfmt.mkdir()
    assert "not mounted" in emulation_problem("arm64", binfmt, host_arch="amd64")
    (binfmt / "register").write_text("")
    assert "not registered" in emulation_problem("arm64", binfmt, host_arch="amd64")
    (binfmt / "qemu-aarch64").write_text(AARCH64_ENTRY.replace("flags: POF", "flags: PO"))
    assert "F (fix-binary)" in emulation_problem("arm64", binfmt, host_arch="amd64")
    (binfmt / "qemu-aarch64").write_text(AARCH64_ENTRY.replace("enabled", "disabled"))
    assert "disabled" in emulation_problem("arm64", binfmt, host_arch="amd64")
    (binfmt / "qemu-aarch64").write_text(AARCH64_ENTRY)
    assert emulation_problem("arm64", binfmt, host_arch="amd64") is None
    assert emulation_problem("amd64", binfmt, host_arch="amd64") is None  # native: nothing to emulate
    assert "no emulation for riscv64" in emulation_problem("riscv64", binfmt, host_arch="amd64")


def test_ensure_emulation_says_in_one_line_when_the_machine_cannot(tmp_path, monkeypatch):
    binfmt = tmp_path / "binfmt_misc"
    binfmt.mkdir()
    (binfmt / "register").write_text("")
    monkeypatch.setattr(golden, "_host_arch", lambda: "amd64")
    monkeypatch.setattr(golden.os, "geteuid", lambda: 0)
    with pytest.raises(BakeError) as missing:
        golden.ensure_emulation("arm64", binfmt_dir=binfmt, conf_dir=tmp_path / "no-binfmt.d")
    assert "qemu-user-static" in str(missing.value) and "\n" not in str(missing.value)


def test_the_bake_reads_only_local_repositories_and_the_mirror():
    files = {
        "debian.sources": "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie trixie-updates\n"
                          "Components: main\n",
        "raspi.list": "deb http://archive.raspberrypi.com/debian/ trixie main\n# deb file:/commented ./\n",
        "pibake-target.sources": "# local\nTypes: deb\nURIs: file:/var/lib/pibake-target/debs\nSuites: ./\n"
                                 "Trusted: yes\n",
        "local.list": "deb [trusted=yes] file:/srv/debs ./\n",
    }
    local = local_sources(files)
    assert local == ["deb [trusted=yes] file:/srv/debs ./",
                     "deb [trusted=yes] file:/var/lib/pibake-target/debs ./"]
    text = private_sources(local, "http://mirror.example/debian", "trixie", "/run/k.gpg")
    assert text.splitlines()[-1] == "deb [signed-by=/run/k.gpg] http://mirror.example/debian trixie main"
    assert "raspberrypi" not in text and "deb.debian.org" not in text
    assert private_sources(local, None, "trixie", "/run/k.gpg").count("\n") == 2  # offline: local only
    assert os_codename('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\n') == "trixie"


def test_apt_summary_lines():
    out = ("Reading package lists...\nThe following NEW packages will be installed:\n  munge slurmd\n"
           "0 upgraded, 12 newly installed, 0 to remove and 0 not upgraded.\n"
           "Need to get 0 B/5,321 kB of archives.\n")
    assert apt_fetch_summary(out) == {"need_to_get": "0 B/5,321 kB", "installed": 12}
    assert apt_fetch_summary("0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n") == \
        {"need_to_get": None, "installed": 0}

"""slurm.conf generation: pure, table-driven, on `slurmd -C` output from Pi 3/4/5 and this machine."""

from pathlib import Path

import pytest

from pibake.registry.slurmconf import (
    SlurmdCError,
    configured_memory,
    generate_slurm_conf,
    node_lines,
    nodes_section,
    parse_slurm_version,
    parse_slurmd_c,
    slurm_cluster_name,
)
from pibake.registry.slurmctl import conf_settings, parse_sinfo
from tests.registry.conftest import SLURMD_C

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


def node(name, ip, kind):
    return {"hostname": name, "ip": ip, "facts": parse_slurmd_c(SLURMD_C[kind].format(h=name))}


@pytest.mark.parametrize("kind,expected", [
    ("pi3", {"CPUs": 4, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": 4, "ThreadsPerCore": 1,
             "RealMemory": 906}),
    ("pi4", {"CPUs": 4, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": 4, "ThreadsPerCore": 1,
             "RealMemory": 3789}),
    ("pi5", {"CPUs": 4, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": 4, "ThreadsPerCore": 1,
             "RealMemory": 8052}),
    ("vm", {"CPUs": 2, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": 2, "ThreadsPerCore": 1,
            "RealMemory": 24105}),
])
def test_parse_slurmd_c(kind, expected):
    facts = parse_slurmd_c(SLURMD_C[kind].format(h="x"))
    assert {k: facts[k] for k in expected} == expected
    assert facts["NodeName"] == "x"
    assert "UpTime" not in facts  # only the NodeName line counts


def test_parse_slurmd_c_older_format_with_sockets():
    # Older slurmd prints Sockets= instead of Boards/SocketsPerBoard.
    facts = parse_slurmd_c("NodeName=n CPUs=8 Sockets=2 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=16000")
    assert facts["Boards"] == 1 and facts["SocketsPerBoard"] == 2


@pytest.mark.parametrize("text,message", [
    ("", "no line starting with NodeName="),
    ("UpTime=0-00:00:01", "no line starting with NodeName="),
    ("NodeName=n CPUs=4 RealMemory=100", "lacks CoresPerSocket, ThreadsPerCore"),
    ("NodeName=n CPUs=x CoresPerSocket=4 ThreadsPerCore=1 RealMemory=100", "CPUs=x is not a whole number"),
    ("NodeName=n CPUs=0 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=100", "CPUs must be at least 1"),
    (None, "slurmd_c must be the text"),
])
def test_parse_slurmd_c_errors(text, message):
    with pytest.raises(SlurmdCError, match=message):
        parse_slurmd_c(text)


@pytest.mark.parametrize("reported,configured", [
    (906, 832),        # Pi 3 B+ 1 GB: 906 - 64 = 842 -> 832
    (3789, 3648),      # Pi 4 4 GB: 3789 - 113 = 3676 -> 3648
    (3818, 3680),      # another Pi 4 4 GB image reports 3818: 3818 - 114 = 3704 -> 3680
    (7806, 7552),      # Pi 4 8 GB
    (8052, 7808),      # Pi 5 8 GB
    (24105, 23360),    # this machine
    (50, 1),           # never below 1
])
def test_configured_memory_margin(reported, configured):
    assert configured_memory(reported) == configured
    assert configured <= reported - min(64, reported - 1) or configured == 1


def test_identical_boards_with_slightly_different_memory_fold():
    a = {"hostname": "red01", "ip": "10.1.1.11", "facts": parse_slurmd_c(SLURMD_C["pi4"].format(h="a"))}
    b = {"hostname": "red02", "ip": "10.1.1.12",
         "facts": parse_slurmd_c(SLURMD_C["pi4"].format(h="b").replace("3789", "3793"))}
    assert node_lines([a, b]) == [
        "NodeName=red[01-02] NodeAddr=10.1.1.[11-12] CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 "
        "ThreadsPerCore=1 RealMemory=3648 State=UNKNOWN"]


MIXED = [node("red01", "10.1.1.11", "pi4"), node("red02", "10.1.1.12", "pi4"), node("red03", "10.1.1.13", "pi4"),
         node("red04", "10.1.1.14", "pi5"), node("red05", "10.1.1.15", "pi5"), node("red06", "10.1.1.16", "pi3"),
         node("lab1", "10.1.1.30", "vm")]


def test_mixed_models_get_their_own_lines():
    assert node_lines(MIXED) == [
        "NodeName=lab1 NodeAddr=10.1.1.30 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 "
        "RealMemory=23360 State=UNKNOWN",
        "NodeName=red[01-03] NodeAddr=10.1.1.[11-13] CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 "
        "ThreadsPerCore=1 RealMemory=3648 State=UNKNOWN",
        "NodeName=red[04-05] NodeAddr=10.1.1.[14-15] CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 "
        "ThreadsPerCore=1 RealMemory=7808 State=UNKNOWN",
        "NodeName=red06 NodeAddr=10.1.1.16 CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 "
        "RealMemory=832 State=UNKNOWN",
    ]


def test_order_of_input_does_not_matter():
    assert node_lines(MIXED) == node_lines(list(reversed(MIXED)))


def slurm_hostnames(hostlist):
    """Expand a hostlist with Slurm's own parser (`scontrol show hostnames`), or ours without Slurm."""
    import shutil
    import subprocess
    import tempfile

    if not shutil.which("scontrol"):
        from pibake.registry.slurmconf import expand_hostlist
        return expand_hostlist(hostlist)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write("ClusterName=x\nSlurmctldHost=localhost\nNodeName=a\nPartitionName=p Nodes=ALL\n")
        conf.flush()
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                             env={"SLURM_CONF": conf.name, "PATH": "/usr/bin:/bin"}, timeout=30, check=True)
    return out.stdout.split()


def pairs_as_slurm_reads_them(lines):
    pairs = []
    for ln in lines:
        fields = dict(f.split("=", 1) for f in ln.split())
        names, addrs = slurm_hostnames(fields["NodeName"]), slurm_hostnames(fields["NodeAddr"])
        assert len(names) == len(addrs), ln
        pairs += zip(names, addrs)
    return sorted(pairs)


PAIRING_CASES = {
    "in order": [("red01", "10.1.1.11"), ("red02", "10.1.1.12"), ("red03", "10.1.1.13")],
    "addresses out of name order": [("red01", "10.1.1.13"), ("red02", "10.1.1.11"), ("red03", "10.1.1.12")],
    "gaps and other prefixes": [("red01", "10.1.1.11"), ("red03", "10.1.1.13"), ("blue01", "10.1.1.40")],
    "several /24s": [(f"n{i:03d}", f"10.77.{i // 5}.{250 - i}") for i in range(20)],
    "padding widths": [("n9", "10.0.0.9"), ("n10", "10.0.0.10"), ("n010", "10.0.0.11")],
}


@pytest.mark.parametrize("case", PAIRING_CASES)
def test_every_name_keeps_its_address_as_slurm_reads_it(case):
    pairs = PAIRING_CASES[case]
    lines = node_lines([node(n, ip, "pi4") for n, ip in pairs])
    assert pairs_as_slurm_reads_them(lines) == sorted(pairs)
    assert len(lines) == 1 or case == "padding widths"


def test_long_lines_are_split():
    pairs = [(f"red{i:04d}", f"10.77.{i // 250}.{i % 250 + 1}") for i in range(0, 1200, 3)]
    lines = node_lines([node(n, ip, "pi4") for n, ip in pairs])
    assert len(lines) > 1 and all(len(ln) <= 1000 for ln in lines)
    assert pairs_as_slurm_reads_them(lines) == sorted(pairs)


def test_full_conf_has_the_required_settings():
    text = generate_slurm_conf(MIXED, cluster_name="Red Lab", manager="red00", manager_ip="10.1.1.10")
    settings = conf_settings(text)
    assert settings["ClusterName"] == "red-lab"
    assert settings["SlurmctldHost"] == "red00(10.1.1.10)"
    for key, value in {"AuthType": "auth/munge", "SlurmctldParameters": "enable_configless",
                       "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
                       "MailProg": "/bin/true", "ReturnToService": "2", "SlurmctldPort": "6817",
                       "SlurmdPort": "6818", "SlurmdTimeout": "60", "StateSaveLocation": "/var/spool/slurmctld",
                       "SelectType": "select/cons_tres"}.items():
        assert settings[key] == value, key
    assert text.rstrip().splitlines()[-1] == "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    assert len(nodes_section(text)) == 4


@pytest.mark.parametrize("name, version", [
    ("slurmctld-V.bookworm.txt", (22, 5, 8)),
    ("slurmd-V.bookworm.txt", (22, 5, 8)),
    ("slurmctld-V.trixie.txt", (24, 11, 5)),
    ("slurmd-V.trixie.txt", (24, 11, 5)),
])
def test_parse_slurm_version_of_recorded_outputs(name, version):
    assert parse_slurm_version((RECORDED / name).read_text()) == version


@pytest.mark.parametrize("text, version", [
    ("slurm 23.11.4\n", (23, 11, 4)),  # an upstream build says slurm, Debian's slurm-wlm
    ("slurm 24.11.0-0rc1\n", (24, 11, 0)),
    ("scontrol: fatal: Could not establish a configuration source\n", None),
    ("", None),
    (None, None),
])
def test_parse_slurm_version_other_texts(text, version):
    assert parse_slurm_version(text) == version


def _settings_for(version):
    return conf_settings(generate_slurm_conf(MIXED[:1], cluster_name="x", manager="m", manager_ip="10.0.0.1",
                                             slurm_version=version))


NONE_PLUGINS = {"TaskPlugin": "task/none", "JobAcctGatherType": "jobacct_gather/none",
                "AccountingStorageType": "accounting_storage/none", "JobCompType": "jobcomp/none"}


@pytest.mark.parametrize("version", [None, (22, 5, 8), (23, 2, 7)])
def test_conf_for_slurm_before_23_11(version):
    settings = _settings_for(version)
    assert settings["CredType"] == "cred/munge" and "CryptoType" not in settings  # CredType since 19.05
    assert {k: settings[k] for k in NONE_PLUGINS} == NONE_PLUGINS
    assert "DebugFlags" not in settings  # 22.05 refuses GLOB_SILENCE


@pytest.mark.parametrize("version, glob_silence", [((23, 11, 0), False), ((23, 11, 4), True), ((24, 11, 5), True)])
def test_conf_for_slurm_23_11_and_later(version, glob_silence):
    settings = _settings_for(version)
    assert settings["CredType"] == "cred/munge" and "CryptoType" not in settings
    assert not set(NONE_PLUGINS) & set(settings)  # the none plugins were removed in 23.11
    assert ("DebugFlags" in settings) is glob_silence
    if glob_silence:
        assert settings["DebugFlags"] == "GLOB_SILENCE"
    assert settings["ProctrackType"] == "proctrack/linuxproc" and settings["SelectType"] == "select/cons_tres"


def test_callers_settings_win_over_the_versions():
    text = generate_slurm_conf(MIXED[:1], cluster_name="x", manager="m", manager_ip="10.0.0.1",
                               slurm_version=(24, 11, 5), settings={"DebugFlags": None, "TaskPlugin": "task/affinity"})
    settings = conf_settings(text)
    assert "DebugFlags" not in settings and settings["TaskPlugin"] == "task/affinity"


def test_settings_override_and_drop():
    text = generate_slurm_conf(MIXED[:1], cluster_name="x", manager="m", manager_ip="10.0.0.1",
                               settings={"SlurmUser": "root", "MailProg": None, "AuthInfo": "socket=/tmp/s"})
    settings = conf_settings(text)
    assert settings["SlurmUser"] == "root" and "MailProg" not in settings and settings["AuthInfo"] == "socket=/tmp/s"


def test_injection_through_settings_is_refused():
    with pytest.raises(ValueError, match="one line"):
        generate_slurm_conf([], cluster_name="x", manager="m", manager_ip="10.0.0.1",
                            settings={"MailProg": "/bin/true\nNodeName=evil"})


@pytest.mark.parametrize("bad,message", [
    ({"hostname": "Evil Name", "ip": "10.0.0.1"}, "nodes[0].hostname"),
    ({"hostname": "ok", "ip": "10.0.0.999"}, "nodes[0].ip"),
])
def test_bad_nodes_are_refused(bad, message):
    nodes = [{**node("x", "10.0.0.1", "pi4"), **bad}]
    with pytest.raises(ValueError) as err:
        generate_slurm_conf(nodes, cluster_name="x", manager="m", manager_ip="10.0.0.1")
    assert message in str(err.value)


def test_no_nodes_still_gives_a_partition():
    text = generate_slurm_conf([], cluster_name="x", manager="m", manager_ip="10.0.0.1")
    assert nodes_section(text) == []
    assert "PartitionName=main Default=YES" in text


@pytest.mark.parametrize("name,expected", [("Red Lab", "red-lab"), ("pi.cluster", "pi-cluster"), ("", "pibake"),
                                           ("a" * 60, "a" * 40)])
def test_slurm_cluster_name(name, expected):
    assert slurm_cluster_name(name) == expected


def test_generation_is_deterministic():
    a = generate_slurm_conf(MIXED, cluster_name="x", manager="m", manager_ip="10.0.0.1")
    b = generate_slurm_conf(list(reversed(MIXED)), cluster_name="x", manager="m", manager_ip="10.0.0.1")
    assert a == b


def test_parse_sinfo():
    out = "red01 idle\nred02 allocated\nred03 down*\nred01 idle\n\n"
    assert parse_sinfo(out) == {"red01": "idle", "red02": "allocated", "red03": "down*"}


def test_board_models_never_share_a_line_but_revisions_do():
    a = {**node("red01", "10.1.1.11", "pi4-8g"), "model": "Raspberry Pi 4 Model B Rev 1.4"}
    b = {**node("red02", "10.1.1.12", "pi4-8g"), "model": "Raspberry Pi 4 Model B Rev 1.5"}
    c = {**node("red03", "10.1.1.13", "pi4-8g"), "model": "Raspberry Pi 5 Model B Rev 1.0"}
    lines = node_lines([a, b, c])
    assert [ln.split()[0] for ln in lines] == ["NodeName=red[01-02]", "NodeName=red03"]


def test_folded_memory_is_the_smallest_of_the_line():
    nodes = [node(f"red{i:02d}", f"10.1.1.{10 + i}", "pi4") for i in range(1, 4)]
    nodes[1]["facts"] = {**nodes[1]["facts"], "RealMemory": 3818}
    nodes[2]["facts"] = {**nodes[2]["facts"], "RealMemory": 3793}
    (line,) = node_lines(nodes)
    assert "RealMemory=3648 " in line and line.startswith("NodeName=red[01-03] NodeAddr=10.1.1.[11-13] ")


@pytest.mark.parametrize("names", [
    ["red01", "red02", "red03"], ["red1", "red2", "red10"], ["n9", "n10", "n010"], ["blue01", "red01", "gw"],
    [f"bench{i:04d}" for i in range(0, 300, 3)],
])
def test_fold_names_order_is_slurms(names):
    from pibake.registry.slurmconf import fold_names

    folded, order = fold_names(names)
    assert sorted(order) == sorted(names)
    assert slurm_hostnames(folded) == order


def test_gres_and_unknown_fields_are_kept_as_text():
    facts = parse_slurmd_c("NodeName=g CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 "
                           "RealMemory=3789 Gres=gpu:1 TmpDisk=1000")
    assert facts["Gres"] == "gpu:1" and facts["TmpDisk"] == 1000

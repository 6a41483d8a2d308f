"""Hostname/IP plans: NodeSet pairing, validation tables, plan.yaml, cloudmesh inventories."""

import ipaddress
import os
from pathlib import Path

import pytest
from ClusterShell.NodeSet import NodeSet
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pibake.errors import PlanError
from pibake.model import Cluster, PlannedNode
from pibake.plan import (
    PLAN_FILE,
    expand_iplist,
    plan_from_inventory,
    plan_nodes,
    record_plan,
    recorded_plan,
    resolve_plan,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "inventory"
CLUSTER = Cluster(name="red", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24", gateway="10.1.1.1",
                  dns=("10.1.1.1",))
# cloudmesh-pi-burn's default layout: the manager "red" is 10.1.1.1 and routes for the workers.
CM_CLUSTER = Cluster(name="red", manager="red", manager_ip="10.1.1.1", network="10.1.1.0/24", gateway="10.1.1.1")


def pairs(nodes):
    return [(n.hostname, n.ip, n.role) for n in nodes]


def test_hostlist_and_ip_range_pair_one_to_one():
    nodes = plan_nodes(CLUSTER, "red[01-04]", "10.1.1.[11-14]")
    assert pairs(nodes) == [(f"red0{i}", f"10.1.1.1{i}", "worker") for i in range(1, 5)]


@pytest.mark.parametrize(
    "hostnames, ips, expected",
    [
        ("red01", "10.1.1.11", [("red01", "10.1.1.11")]),
        ("red05,red02", "10.1.1.15,10.1.1.12", [("red05", "10.1.1.15"), ("red02", "10.1.1.12")]),  # order kept
        ("red[01-02],red07", "10.1.1.[21-22],10.1.1.27", [("red01", "10.1.1.21"), ("red02", "10.1.1.22"),
                                                          ("red07", "10.1.1.27")]),
        ("red[1-3]", "10.1.1.[100-102]", [("red1", "10.1.1.100"), ("red2", "10.1.1.101"), ("red3", "10.1.1.102")]),
        ("red[01-02,05]", "10.1.1.[11-12,15]", [("red01", "10.1.1.11"), ("red02", "10.1.1.12"), ("red05", "10.1.1.15")]),
        (["red01", "red02"], ["10.1.1.11", "10.1.1.12"], [("red01", "10.1.1.11"), ("red02", "10.1.1.12")]),
        (NodeSet("red[01-02]"), "10.1.1.[11-12]", [("red01", "10.1.1.11"), ("red02", "10.1.1.12")]),
        ("red0[1-3]", "10.1.1.[2-4]", [("red01", "10.1.1.2"), ("red02", "10.1.1.3"), ("red03", "10.1.1.4")]),
        ("r-[1-2]x", "10.1.1.[31-32]", [("r-1x", "10.1.1.31"), ("r-2x", "10.1.1.32")]),
    ],
)
def test_accepted_forms(hostnames, ips, expected):
    assert [(n.hostname, n.ip) for n in plan_nodes(CLUSTER, hostnames, ips)] == expected


def test_roles():
    nodes = plan_nodes(CLUSTER, "red00,red01", "10.1.1.10,10.1.1.11")
    assert [n.role for n in nodes] == ["manager", "worker"]
    assert plan_nodes(CLUSTER, "red01", "10.1.1.11", role="sensor")[0].role == "sensor"
    assert plan_nodes(CLUSTER, "red00", "10.1.1.10", role="manager")[0].role == "manager"


BAD = [
    # (hostnames, ips, role, fragment of the error)
    ("red[01-04]", "10.1.1.[11-13]", None, "--hostname gives 4 names but --ip gives 3 addresses; give exactly one IP per hostname"),
    ("red01", "10.1.1.[11-12]", None, "--hostname gives 1 name but --ip gives 2 addresses"),
    ("red01,red02", "10.1.1.11,10.1.1.11", None, "red02: 10.1.1.11 is given to both red01 and red02"),
    ("red01,red01", "10.1.1.11,10.1.1.12", None, "red01: hostname red01 appears twice"),
    ("red01", "10.2.2.2", None, "red01: 10.2.2.2 is outside the cluster network 10.1.1.0/24"),
    ("red01", "10.1.1.0", None, "red01: 10.1.1.0 is the network address of 10.1.1.0/24"),
    ("red01", "10.1.1.255", None, "red01: 10.1.1.255 is the broadcast address of 10.1.1.0/24"),
    ("red01", "10.1.1.1", None, "red01: 10.1.1.1 is the gateway"),
    ("red01", "10.1.1.10", None, "red01: 10.1.1.10 is the manager's address (red00)"),
    ("red00", "10.1.1.11", None, "red00: red00 is the cluster's manager, its IP is 10.1.1.10"),
    ("red00", "10.1.1.10", "worker", "red00: red00 is the cluster's manager in cluster.yaml, its role is manager, not worker"),
    ("red01", "10.1.1.11", "manager", "only red00 (manager in cluster.yaml) can have role manager, not red01"),
    ("red01", "10.1.1.11", "login", "--role: 'login' is not one of manager, worker, sensor"),
    ("Red01", "10.1.1.11", None, "'Red01' is not a valid hostname (RFC 1123 label"),
    ("red01.lan", "10.1.1.11", None, "'red01.lan' is not a valid hostname"),
    ("-red", "10.1.1.11", None, "'-red' is not a valid hostname"),
    ("red-", "10.1.1.11", None, "'red-' is not a valid hostname"),
    ("a" * 64, "10.1.1.11", None, "is not a valid hostname"),
    ("1234", "10.1.1.11", None, "'1234' is not a valid hostname"),
    ("red_01", "10.1.1.11", None, "'red_01' is not a valid hostname"),
    ("red01\nruncmd: [reboot]", "10.1.1.11", None, "--hostname: 'red01\\nruncmd: [reboot]' is not a hostlist"),
    ("red[01-", "10.1.1.11", None, "--hostname: 'red[01-' is not a valid hostlist"),
    ("red[04-01]", "10.1.1.11", None, "--hostname: 'red[04-01]' is not a valid hostlist"),
    ("red[a-c]", "10.1.1.11", None, "--hostname: 'red[a-c]' is not a valid hostlist"),
    ("red0[1-10]", "10.1.1.[11-20]", None, "both ends of a zero-padded range need the same width (write e.g. 'red[01-10]'"),
    ("@workers", "10.1.1.11", None, "--hostname: '@workers' is not a hostlist"),
    ("red01,,red02", "10.1.1.11,10.1.1.12", None, "has an empty entry (check the commas)"),
    ("red[1-100000]", "10.1.1.11", None, "--hostname: 'red[1-100000]' expands to 100000 entries; at most 4096"),
    ("red01", "10.1.1.[300]", None, "--ip: '10.1.1.300' is not an IPv4 address"),
    ("red01", "10.1.1.011", None, "--ip: '10.1.1.011' is not an IPv4 address"),
    ("red01", "fe80::1", None, "--ip: 'fe80::1' is not"),
    ("red01", "10.1.1.[11-", None, "--ip: '10.1.1.[11-' is not a valid hostlist"),
    ("", "10.1.1.11", None, "--hostname: missing"),
    ("red01", "", None, "--ip: missing"),
]


@pytest.mark.parametrize("hostnames, ips, role, fragment", BAD, ids=[b[3][:50] for b in BAD])
def test_plan_errors_say_what_to_fix(hostnames, ips, role, fragment):
    with pytest.raises(PlanError) as err:
        plan_nodes(CLUSTER, hostnames, ips, role=role)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value).replace("\\n", "")


def test_every_plan_problem_is_reported_at_once():
    with pytest.raises(PlanError) as err:
        plan_nodes(CLUSTER, "red01,Red02,red03,red04,red05", "10.1.1.11,10.1.1.12,10.9.9.9,10.1.1.11,10.1.1.10")
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert any("'Red02' is not a valid hostname" in p for p in problems)
    assert any("10.9.9.9 is outside" in p for p in problems)
    assert any("10.1.1.11 is given to both red01 and red04" in p for p in problems)
    assert any("10.1.1.10 is the manager's address" in p for p in problems)


def test_counts_and_syntax_problems_come_together():
    with pytest.raises(PlanError) as err:
        plan_nodes(CLUSTER, "red[01-03],Bad", "10.1.1.[11-12]")
    assert any("gives 4 names but --ip gives 2 addresses" in p for p in err.value.problems)
    assert any("'Bad' is not a valid hostname" in p for p in err.value.problems)


def test_a_recorded_hostname_keeps_its_ip():
    recorded = (PlannedNode("red01", "10.1.1.11"), PlannedNode("red02", "10.1.1.12"))
    assert pairs(plan_nodes(CLUSTER, "red[01-03]", "10.1.1.[11-13]", recorded=recorded))[2] == ("red03", "10.1.1.13", "worker")
    with pytest.raises(PlanError) as err:
        plan_nodes(CLUSTER, "red01,red05", "10.1.1.21,10.1.1.12", recorded=recorded)
    message = str(err.value)
    assert "red01 is already planned with 10.1.1.11 (plan.yaml); use 10.1.1.11, or remove red01 from plan.yaml" in message
    assert "10.1.1.12 is already planned for red02 (plan.yaml)" in message


def test_a_gateway_that_is_the_manager_is_fine_for_the_manager():
    nodes = plan_nodes(CM_CLUSTER, "red,red01", "10.1.1.1,10.1.1.2")
    assert pairs(nodes) == [("red", "10.1.1.1", "manager"), ("red01", "10.1.1.2", "worker")]


def test_expand_iplist_single_and_ranges():
    assert expand_iplist("10.1.1.7") == ["10.1.1.7"]
    assert expand_iplist("10.1.1.[8-9],10.1.2.1") == ["10.1.1.8", "10.1.1.9", "10.1.2.1"]


@settings(max_examples=120, deadline=None)
@given(prefix=st.from_regex(r"[a-z]([a-z0-9]{0,7}[a-z])?", fullmatch=True), first=st.integers(1, 200),
       count=st.integers(1, 40), width=st.integers(1, 3), ip_start=st.integers(11, 200))
def test_ranges_pair_in_order(prefix, first, count, width, ip_start):
    assume(ip_start + count - 1 <= 254)
    last = first + count - 1
    width = max(width, len(str(last)))  # 'red[1-10]' or 'red[01-10]'; ClusterShell refuses '[01-100]'
    hostlist = f"{prefix}[{first:0{width}d}-{last:0{width}d}]"
    nodes = plan_nodes(CLUSTER, hostlist, f"10.1.1.[{ip_start}-{ip_start + count - 1}]")
    assume(all(n.hostname != "red00" for n in nodes))
    assert len(nodes) == count
    for i, node in enumerate(nodes):
        assert node.hostname == f"{prefix}{first + i:0{width}d}"
        assert node.ip == f"10.1.1.{ip_start + i}"
        assert node.role == "worker"


@settings(max_examples=300, deadline=None)
@given(hostname=st.text(min_size=1, max_size=70))
def test_any_hostname_is_valid_or_a_clean_plan_error(hostname):
    try:
        nodes = plan_nodes(CLUSTER, hostname, "10.1.1.50")
    except PlanError as err:
        assert str(err)
        return
    for node in nodes:
        assert node.hostname.isascii() and node.hostname == node.hostname.lower()
        assert len(node.hostname) <= 63 and "." not in node.hostname and "\n" not in node.hostname


# --------------------------------------------------------------------------- plan.yaml


def test_record_plan_is_idempotent_and_never_duplicates(tmp_path):
    nodes = plan_nodes(CLUSTER, "red[01-03]", "10.1.1.[11-13]")
    assert recorded_plan(tmp_path) == ()
    record_plan(tmp_path, nodes)
    text = (tmp_path / PLAN_FILE).read_text()
    mtime = os.stat(tmp_path / PLAN_FILE).st_mtime_ns
    assert record_plan(tmp_path, nodes) == tuple(nodes)
    assert (tmp_path / PLAN_FILE).read_text() == text
    assert os.stat(tmp_path / PLAN_FILE).st_mtime_ns == mtime  # nothing to write, nothing written
    record_plan(tmp_path, plan_nodes(CLUSTER, "red[03-04]", "10.1.1.[13-14]"))
    assert [n.hostname for n in recorded_plan(tmp_path)] == ["red01", "red02", "red03", "red04"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_record_plan_updates_a_role_in_place(tmp_path):
    record_plan(tmp_path, plan_nodes(CLUSTER, "red01", "10.1.1.11"))
    record_plan(tmp_path, plan_nodes(CLUSTER, "red01", "10.1.1.11", role="sensor"))
    assert recorded_plan(tmp_path) == (PlannedNode("red01", "10.1.1.11", "sensor"),)


def test_record_plan_refuses_conflicts_and_writes_nothing(tmp_path):
    record_plan(tmp_path, plan_nodes(CLUSTER, "red[01-02]", "10.1.1.[11-12]"))
    before = (tmp_path / PLAN_FILE).read_text()
    with pytest.raises(PlanError) as err:
        record_plan(tmp_path, [PlannedNode("red03", "10.1.1.13"), PlannedNode("red01", "10.1.1.21"),
                               PlannedNode("red09", "10.1.1.12")])
    assert "red01 is already planned with 10.1.1.11" in str(err.value)
    assert "10.1.1.12 is already planned for red02" in str(err.value)
    assert (tmp_path / PLAN_FILE).read_text() == before


def test_plan_yaml_feeds_the_next_plan(tmp_path):
    record_plan(tmp_path, plan_nodes(CLUSTER, "red01", "10.1.1.11"))
    with pytest.raises(PlanError, match="red01 is already planned with 10.1.1.11"):
        plan_nodes(CLUSTER, "red01", "10.1.1.50", recorded=recorded_plan(tmp_path))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("nodes:\n- hostname: red01\n  ip: 10.1.1.11\n   role: worker\n", "line 4"),
        ("nodes: red01\n", "expected 'nodes:' with a list"),
        ("nodes:\n- hostname: red01\n", "nodes[0]: expected hostname and ip"),
        ("nodes:\n- hostname: Red01\n  ip: 10.1.1.11\n", "nodes[0].hostname: 'Red01' is not a valid hostname"),
        ("nodes:\n- hostname: red01\n  ip: 10.1.1.x\n", "nodes[0].ip: '10.1.1.x' is not an IPv4 address"),
    ],
)
def test_damaged_plan_yaml_is_a_clear_error(tmp_path, text, fragment):
    (tmp_path / PLAN_FILE).write_text(text)
    with pytest.raises(PlanError) as err:
        recorded_plan(tmp_path)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------- cloudmesh inventories


def test_cloudmesh_inventory_becomes_a_plan():
    nodes = plan_from_inventory(CM_CLUSTER, FIXTURES / "cloudmesh-red.yaml")
    assert pairs(nodes) == [
        ("red", "10.1.1.1", "manager"),
        ("red01", "10.1.1.2", "worker"),
        ("red02", "10.1.1.3", "worker"),
        ("red03", "10.1.1.4", "worker"),
    ]


def test_cloudmesh_manager_must_match_cluster_yaml():
    with pytest.raises(PlanError) as err:
        plan_from_inventory(CLUSTER, FIXTURES / "cloudmesh-red.yaml")
    message = str(err.value)
    assert "cloudmesh-red.yaml: red: the inventory's manager is red but cluster.yaml's manager is red00" in message


def test_cloudmesh_inventory_reports_every_problem():
    with pytest.raises(PlanError) as err:
        plan_from_inventory(CM_CLUSTER, FIXTURES / "conflicts.yaml")
    problems = err.value.problems
    assert len(problems) == 5, problems
    for fragment in (
        "conflicts.yaml: red05.ip: missing",
        "conflicts.yaml: red06.service: 'kubernetes' is not one of manager, worker",
        "conflicts.yaml: red02: 10.1.1.2 is given to both red01 and red02",
        "conflicts.yaml: red03: 10.2.2.2 is outside the cluster network 10.1.1.0/24",
        "conflicts.yaml: Red04: 'Red04' is not a valid hostname",
    ):
        assert any(fragment in p for p in problems), fragment


def test_cloudmesh_inventory_respects_recorded_plan():
    with pytest.raises(PlanError, match="red01 is already planned with 10.1.1.11"):
        plan_from_inventory(CM_CLUSTER, FIXTURES / "cloudmesh-red.yaml", recorded=(PlannedNode("red01", "10.1.1.11"),))


def test_malformed_inventory_names_the_line(tmp_path):
    with pytest.raises(PlanError) as err:
        plan_from_inventory(CM_CLUSTER, FIXTURES / "broken-indent.yaml")
    assert "broken-indent.yaml: line 5, column 7: mapping values are not allowed here" in str(err.value)
    (tmp_path / "list.yaml").write_text("- red01\n- red02\n")
    with pytest.raises(PlanError, match="not a cloudmesh inventory"):
        plan_from_inventory(CM_CLUSTER, tmp_path / "list.yaml")
    with pytest.raises(PlanError, match="no such file"):
        plan_from_inventory(CM_CLUSTER, tmp_path / "missing.yaml")


def test_resolve_plan_reads_plan_yaml_and_inventory(tmp_path):
    cluster = Cluster(**{**CM_CLUSTER.__dict__, "directory": tmp_path})
    record_plan(tmp_path, [PlannedNode("red01", "10.1.1.2")])
    with pytest.raises(PlanError, match="red01 is already planned with 10.1.1.2"):
        resolve_plan(cluster, hostnames="red01", ips="10.1.1.9")
    workers = resolve_plan(cluster, inventory=FIXTURES / "cloudmesh-red.yaml", role="worker")
    assert [n.hostname for n in workers] == ["red01", "red02", "red03"]
    with pytest.raises(PlanError, match="either --inventory or --hostname/--ip"):
        resolve_plan(cluster, hostnames="red01", ips="10.1.1.2", inventory=FIXTURES / "cloudmesh-red.yaml")
    assert all(ipaddress.IPv4Address(n.ip) in ipaddress.IPv4Network(cluster.network) for n in workers)

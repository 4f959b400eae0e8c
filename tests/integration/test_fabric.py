"""The fabric check across three namespace nodes, for real: gloo all_reduce started as training is.

A node's link shaped slow with tc is named as the slowest and fails the check; a node whose collectives
cannot connect (TCP into it dropped, but for ssh and the rendezvous port: the store and the launch check
pass, gloo's own connections do not) fails the check within its timeout, and nothing is left running;
``train --fabric-check`` then starts no training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXE = Path(sys.executable).parent / "llamafleet"
SMALL = ["--fabric-sizes", "1,4", "--fabric-pair-mb", "4", "--fabric-iters", "2"]


@pytest.fixture(scope="module")
def three_nodes(testbed, default_stack, tmp_path_factory):
    _, roots = default_stack
    return testbed.write_inventory(tmp_path_factory.mktemp("fabric") / "hosts.yml",
                                   extra_host_vars={n.name: {"llamafleet_root": str(roots / n.name)} for n in testbed.nodes},
                                   extra_group_vars={"stack_offline": True})


def _veth(testbed, node: str) -> str:
    return next(n.netns for n in testbed.nodes if n.name == node) + "h"


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True)


def _fabric(inventory, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), "check", "--fabric", "-i", str(inventory), *args], capture_output=True,
                          text=True, timeout=timeout)


def _report(out: str) -> dict:
    return json.loads(out)


def test_fabric_check_reports_every_size_and_node_then_names_a_shaped_node_the_slowest(testbed, three_nodes):
    ok = _fabric(three_nodes, *SMALL, "--fabric-min-ratio", "0.1", "--json")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    report = _report(ok.stdout)
    assert report["ok"] and report["backend"] == "gloo" and report["world_size"] == 3
    assert [s["bytes"] for s in report["sizes"]] == [1 << 20, 4 << 20]
    assert all(s["busbw_gbps"] > 0 for s in report["sizes"]) and report["latency_us"] > 0
    assert [n["name"] for n in report["nodes"]] == ["node1", "node2", "node3"]
    assert all(n["link_gbps"] > 0 and n["interface"] == "eth0" for n in report["nodes"])
    assert not run_processes(report["run_id"])

    veth = _veth(testbed, "node3")
    _tc("qdisc", "add", "dev", veth, "root", "tbf", "rate", "40mbit", "burst", "64kb", "latency", "400ms")
    try:
        slow = _fabric(three_nodes, *SMALL)
    finally:
        _tc("qdisc", "del", "dev", veth, "root")
    text = slow.stdout + slow.stderr
    assert slow.returncode == 1, text[-3000:]
    assert "fabric check: FAILED" in text and "node3: link" in text and "<- slowest" in text
    assert "node3: its link carries" in text and "fabric_min_ratio" in text, text[-3000:]
    assert "GB/s" in text and "all_reduce" in text  # the table, for every size
    assert "node1: its link" not in text and "node2: its link" not in text


def test_a_node_whose_collectives_cannot_connect_fails_within_the_timeout_and_train_does_not_start(
        testbed, three_nodes, job, default_stack):
    _, roots = default_stack
    before = {p.name for n in ("node1", "node2", "node3") for p in (roots / n / "runs").glob("*")}
    veth = _veth(testbed, "node3")
    # into node3: ARP, UDP (heartbeats), ssh and the rendezvous port at full speed; every other TCP packet in a
    # class of 8 bit/s, which holds it far beyond the timeout (this kernel has no tc drop action, no netem)
    _tc("qdisc", "add", "dev", veth, "root", "handle", "1:", "htb", "default", "2")
    try:
        _tc("class", "add", "dev", veth, "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit")
        _tc("class", "add", "dev", veth, "parent", "1:", "classid", "1:2", "htb", "rate", "8bit", "ceil", "8bit")
        _tc("filter", "add", "dev", veth, "parent", "1:", "protocol", "arp", "prio", "1", "u32", "match", "u32",
            "0", "0", "flowid", "1:1")
        for prio, match in (("2", ["ip", "protocol", "17", "0xff"]), ("3", ["ip", "dport", "22", "0xffff"]),
                            ("4", ["ip", "sport", "29500", "0xffff"]), ("5", ["ip", "dport", "29500", "0xffff"])):
            _tc("filter", "add", "dev", veth, "parent", "1:", "protocol", "ip", "prio", prio, "u32", "match", *match,
                "flowid", "1:1")
        t0 = time.monotonic()
        failed = _fabric(three_nodes, *SMALL, "--fabric-timeout", "20", "--json")
        took = time.monotonic() - t0
        report = _report(failed.stdout)
        assert failed.returncode == 1 and not report["ok"], failed.stdout[-3000:]
        assert any("the fabric check did not complete within 20 s" in e and "train_fabric_timeout_s" in e
                   for e in report["errors"]), report
        assert took < 20 + 90, took  # its timeout, plus the launch and the stop
        assert not run_processes(report["run_id"])
        train = subprocess.run([str(EXE), "train", "-i", str(three_nodes), str(job / "sft_lora.yaml"), "--follow",
                                "--fabric-check", *SMALL, "--fabric-timeout", "20"], capture_output=True, text=True,
                               timeout=600, cwd=job.parents[1])
    finally:
        _tc("qdisc", "del", "dev", veth, "root")
    text = train.stdout + train.stderr
    assert train.returncode == 1, text[-3000:]
    assert "failed, so training was not started" in text, text[-3000:]
    new = {p.name for n in ("node1", "node2", "node3") for p in (roots / n / "runs").glob("*")} - before
    assert new and all("-fabric-" in name for name in new), new  # the checks' runs, no training run

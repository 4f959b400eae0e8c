"""The run belongs to the cluster: with no controller following (killed, or gone after the start), the nodes'
supervisors stop every rank on every node when a rank dies, a link is cut, or a collective stalls, and a short
network blip stops nothing. Real training across namespace nodes (each with its own process table)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_processes, variant
from llamafleet import follow, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXE = Path(sys.executable).parent / "llamafleet"


@pytest.fixture(scope="module")
def three_nodes(testbed, default_stack, tmp_path_factory):
    _, roots = default_stack
    return testbed.write_inventory(tmp_path_factory.mktemp("inv3") / "hosts.yml",
                                   extra_host_vars={n.name: {"llamafleet_root": str(roots / n.name)} for n in testbed.nodes},
                                   extra_group_vars={"stack_offline": True})


def _run_dir(roots: Path, node: str, run_id: str) -> Path:
    return roots / node / "runs" / run_id


def _wait_for_step(roots: Path, run_id: str, timeout: float = 600) -> None:
    log = _run_dir(roots, "node1", run_id) / "output" / "trainer_log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and log.stat().st_size:
            return
        assert run_processes(run_id), "the run ended before its first step"
        time.sleep(0.5)
    raise AssertionError("no training step in time")


def _ranks(run_id: str, node: str) -> list[int]:
    """The training processes (torchrun's children running LLaMA-Factory) of ``node``."""
    return [p for p in run_processes(run_id)
            if "launcher.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            and f"/{node}/" in os.readlink(f"/proc/{p}/cwd") + "/"]


def _until_gone(run_id: str, timeout: float) -> float:
    t0 = time.time()
    while run_processes(run_id):
        assert time.time() - t0 < timeout, f"ranks still alive after {timeout:g} s: {run_processes(run_id)}"
        time.sleep(0.1)
    return time.time() - t0


def _reasons(roots: Path, run_id: str, nodes) -> dict[str, str]:
    return {n: json.loads((_run_dir(roots, n, run_id) / "supervisor.json").read_text())["reason"] for n in nodes}


def _link(testbed, node: str, up: bool) -> None:
    veth = next(n.netns for n in testbed.nodes if n.name == node) + "h"
    subprocess.run(["ip", "link", "set", veth, "up" if up else "down"], check=True)


def test_with_the_controller_killed_a_killed_rank_stops_every_rank_on_every_node(three_nodes, job, default_stack):
    _, roots = default_stack
    cfg = variant(job, "orphan", max_steps=3000, save_steps=100000)
    active = roots / "node1" / "runs" / "active"
    before = active.read_text() if active.exists() else ""
    controller = subprocess.Popen([str(EXE), "train", "-i", str(three_nodes), str(cfg), "--workdir", str(job.parents[1]),
                                   "--follow"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (active.exists() and active.read_text() != before):
            assert controller.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        run_id = active.read_text().strip()
        _wait_for_step(roots, run_id)
    finally:
        os.killpg(controller.pid, signal.SIGKILL)  # the laptop closes: nothing follows the run any more
        controller.wait()
    time.sleep(3)
    assert all(_ranks(run_id, n) for n in ("node1", "node2", "node3")), "the run did not go on without its controller"
    for p in _ranks(run_id, "node3"):
        os.kill(p, signal.SIGKILL)
    took = _until_gone(run_id, 30)
    assert took <= 5, f"all ranks stopped {took:.1f} s after a rank was killed (target <= 5 s)"
    reasons = _reasons(roots, run_id, ("node1", "node2", "node3"))
    assert all(r and r.startswith("node3: training exited with code") for r in reasons.values()), reasons
    # a controller that comes back reads what happened
    result = follow(three_nodes, run_id, poll_s=1)
    assert not result.ok and result.state == "failed"
    assert "the run failed: node3: training exited with code" in "\n".join(result.errors), result.format()


def test_a_cut_link_stops_the_survivors_within_the_peer_timeout(testbed, two_nodes, job, default_stack):
    _, roots = default_stack
    cfg = variant(job, "cut", max_steps=3000, save_steps=100000)
    started = train(two_nodes, cfg, workdir=job.parents[1], peer_timeout_s=10)  # nothing follows it
    assert started.ok, started.format()
    _wait_for_step(roots, started.run_id)
    _link(testbed, "node2", up=False)
    try:
        took = _until_gone(started.run_id, 60)
    finally:
        _link(testbed, "node2", up=True)
    assert took <= 10 + 5, f"stopped {took:.1f} s after the cut (target <= train_peer_timeout_s + 5 s)"
    reasons = _reasons(roots, started.run_id, ("node1", "node2"))
    assert "node node2 not heard from for 10 s" in reasons["node1"], reasons
    assert "the master node1 not heard from for 10 s" in reasons["node2"], reasons


def test_a_five_second_blip_stops_nothing(testbed, two_nodes, job, default_stack):
    _, roots = default_stack
    cfg = variant(job, "blip", max_steps=40, save_steps=100000)
    started = train(two_nodes, cfg, workdir=job.parents[1], peer_timeout_s=10)
    assert started.ok, started.format()
    _wait_for_step(roots, started.run_id)
    _link(testbed, "node2", up=False)
    time.sleep(5)
    _link(testbed, "node2", up=True)
    result = follow(two_nodes, started.run_id, poll_s=2)
    assert result.ok, result.format()
    assert json.loads((_run_dir(roots, "node1", started.run_id) / "output" / "all_results.json").read_text())


def test_a_stalled_collective_is_stopped_after_the_stall_timeout(two_nodes, job, default_stack):
    _, roots = default_stack
    cfg = variant(job, "stall", max_steps=3000, save_steps=100000)
    started = train(two_nodes, cfg, workdir=job.parents[1], stall_timeout_s=15)
    assert started.ok, started.format()
    _wait_for_step(roots, started.run_id)
    victims = _ranks(started.run_id, "node2")
    assert victims
    for p in victims:
        os.kill(p, signal.SIGSTOP)  # alive, holding its socket, in no collective: rank 0 waits for it
    took = _until_gone(started.run_id, 60)
    assert 15 - 3 <= took <= 15 + 10, took
    reasons = _reasons(roots, started.run_id, ("node1", "node2"))
    assert all("no progress for 15 s after the first step" in r for r in reasons.values()), reasons


def test_two_concurrent_launches_exactly_one_starts_and_the_other_names_it(two_nodes, job, default_stack):
    cfgs = [variant(job, f"race{i}", max_steps=3000, save_steps=100000) for i in (1, 2)]
    procs = [subprocess.Popen([str(EXE), "train", "-i", str(two_nodes), str(c), "--workdir", str(job.parents[1]),
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cfgs]
    outs = [p.communicate(timeout=600) for p in procs]
    results = [json.loads(o[0]) for o in outs]
    try:
        started = [r for r in results if r["state"] == "started"]
        refused = [r for r in results if r["state"] == "not-started"]
        assert len(started) == 1 and len(refused) == 1, [r["state"] for r in results]
        why = "\n".join(refused[0]["errors"])
        assert started[0]["run_id"] in why and ("still running" in why or "has not started yet" in why), why
        assert run_processes(started[0]["run_id"]) and not run_processes(refused[0]["run_id"])
    finally:
        for r in results:
            if r.get("run_id"):
                from llamafleet import stop

                stop(two_nodes, r["run_id"])
    assert not any(run_processes(r["run_id"]) for r in results if r.get("run_id"))


def test_provision_refuses_to_change_a_venv_a_running_run_uses(two_nodes, job, default_stack):
    from conftest import stack
    from llamafleet import provision, stop

    _, roots = default_stack
    cfg = variant(job, "busy", max_steps=3000, save_steps=100000)
    started = train(two_nodes, cfg, workdir=job.parents[1])
    assert started.ok, started.format()
    site = next((roots / "node2" / "stacks" / stack().venv_name / "lib").glob("python3.*/site-packages"))
    extra = site / "lfplanted-1.0.dist-info"  # a package the lock does not list: provision would remove it
    extra.mkdir()
    (extra / "METADATA").write_text("Metadata-Version: 2.1\nName: lfplanted\nVersion: 1.0\n")
    (extra / "INSTALLER").write_text("pip\n")
    (extra / "RECORD").write_text("lfplanted-1.0.dist-info/METADATA,,\nlfplanted-1.0.dist-info/INSTALLER,,\n"
                                  "lfplanted-1.0.dist-info/RECORD,,\n")
    try:
        refused = provision(two_nodes)
        assert not refused.ok
        text = refused.format()
        assert f"run {started.run_id} is running with the stack venv" in text and "--force" in text, text
        assert extra.exists() and run_processes(started.run_id), "provision changed the venv under the running ranks"
    finally:
        stop(two_nodes, started.run_id)
    fixed = provision(two_nodes)
    assert fixed.ok, fixed.format()
    assert not extra.exists()

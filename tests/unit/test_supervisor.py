"""The run's supervisor (module_utils/supervisor.py) as it runs on a node: real processes, a real UDP heartbeat
on this machine's loopback, real signals. What ranks do is played by small shell scripts; the testbed tests
(tests/integration/test_supervision.py) run it with real training across namespace nodes."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT

SUPERVISOR = PROJECT / "collections/ansible_collections/llamafleet/cluster/plugins/module_utils/supervisor.py"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, base: Path, name: str, master: bool, peers: list[str], script: str, port: int, key: str,
                 run_id: str, **timeouts):
        self.name, self.run_id = name, run_id
        self.dir = base / name
        self.dir.mkdir(parents=True)
        (self.dir / "launch.sh").write_text("#!/bin/sh\n" + script + "\nrc=$?\necho $rc > rc\nexit $rc\n")
        cfg = {"run_id": run_id, "node": name, "master": master, "master_addr": "127.0.0.1", "port": port,
               "peers": peers, "secret": key, "peer_timeout_s": 6, "stall_timeout_s": 0, "start_timeout_s": 0,
               "fail_grace_s": 1, "progress_file": "output/trainer_log.jsonl"}
        cfg.update(timeouts)
        (self.dir / "supervise.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([sys.executable, str(SUPERVISOR), str(self.dir)], cwd=self.dir,
                                     stdout=open(self.dir / "supervisor.log", "wb"), stderr=subprocess.STDOUT)

    def state(self) -> dict:
        try:
            return json.loads((self.dir / "supervisor.json").read_text())
        except (OSError, ValueError):
            return {}

    def ranks_alive(self) -> bool:
        """Whether this node's ranks run, or are still to start."""
        if not (self.dir / "pid").exists() and self.proc.poll() is None:
            return True
        marker = f"LLAMAFLEET_RUN_ID={self.run_id}".encode()
        pgid = int((self.dir / "pid").read_text()) if (self.dir / "pid").exists() else None
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") \
                            and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" \
                            and (pgid is None or os.getpgid(int(entry)) == pgid):
                        return True
                except OSError:
                    pass
        return False

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def cluster(tmp_path):
    started: list[Node] = []
    port, key = _free_udp_port(), secrets.token_hex(32)

    def make(scripts: dict[str, str], **timeouts) -> dict[str, Node]:
        names = list(scripts)
        run_id = f"test-{secrets.token_hex(4)}"
        nodes = {}
        for i, name in enumerate(names):
            peers = names[1:] if i == 0 else [names[0]]
            nodes[name] = Node(tmp_path, name, i == 0, peers, scripts[name], port, key, run_id, **timeouts)
            started.append(nodes[name])
        return nodes

    make.port, make.key = port, key
    yield make
    for n in started:
        if n.proc.poll() is None:
            n.proc.kill()
        if (n.dir / "pid").exists():
            try:
                os.killpg(int((n.dir / "pid").read_text()), signal.SIGKILL)
            except OSError:
                pass


def _until(cond, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError("not within %.0f s" % timeout)


def test_all_ranks_succeed_and_every_supervisor_exits_done(cluster):
    nodes = cluster({"m": "sleep 1", "w1": "sleep 0.5", "w2": "sleep 1.5"})
    assert [n.wait() for n in nodes.values()] == [0, 0, 0]
    for n in nodes.values():
        st = n.state()
        assert st["state"] == "done" and st["reason"] is None and st["rc"] == 0, st


def test_a_worker_that_fails_stops_every_rank_on_every_node_and_says_why(cluster):
    nodes = cluster({"m": "sleep 60", "w1": "sleep 60", "w2": "sleep 1; exit 3"})
    # within the heartbeat: the master hears it, stops its own ranks and tells the other worker
    took = _until(lambda: not any(n.ranks_alive() for n in nodes.values()), 10)
    assert took < 5, took
    for n in nodes.values():
        assert n.wait() == 1
        st = n.state()
        assert st["reason"] == "w2: training exited with code 3" and st["by"] == "w2", (n.name, st)
    assert nodes["w1"].state()["state"] == "stopped" and nodes["m"].state()["state"] == "failed"
    assert (nodes["m"].dir / "stopped").exists()


def test_a_rank_that_ignores_term_is_killed_after_the_grace(cluster):
    nodes = cluster({"m": "trap '' TERM; sleep 60 & wait; sleep 60", "w": "sleep 1; exit 1"})
    took = _until(lambda: not nodes["m"].ranks_alive(), 10)
    assert 1 <= took < 5, took


def test_a_silent_peer_stops_the_run_after_the_peer_timeout_and_a_blip_does_not(cluster):
    nodes = cluster({"m": "sleep 60", "w": "sleep 60"}, peer_timeout_s=3)
    time.sleep(1.5)
    # a blip shorter than the timeout: the worker's supervisor frozen for 1.5 s, then going on
    os.kill(nodes["w"].proc.pid, signal.SIGSTOP)
    time.sleep(1.5)
    os.kill(nodes["w"].proc.pid, signal.SIGCONT)
    time.sleep(2)
    assert nodes["m"].state()["state"] == "running" and nodes["m"].ranks_alive()
    # gone for good: the master stops its ranks after 3 s; the frozen worker's own ranks are its peers' to stop
    # when it comes back (it hears the master's stop, or no master at all)
    os.kill(nodes["w"].proc.pid, signal.SIGSTOP)
    t0 = time.time()
    _until(lambda: not nodes["m"].ranks_alive(), 10)
    assert 2 <= time.time() - t0 < 6  # its last heartbeat came up to 1 s before it froze
    assert "node w not heard from for 3 s" in nodes["m"].state()["reason"]
    os.kill(nodes["w"].proc.pid, signal.SIGCONT)
    _until(lambda: not nodes["w"].ranks_alive(), 10)
    assert nodes["w"].wait() == 1


def test_forged_and_replayed_datagrams_change_nothing(cluster):
    nodes = cluster({"m": "sleep 5", "w": "sleep 5"}, peer_timeout_s=5)
    _until(lambda: nodes["m"].state().get("peers", {}).get("w", {}).get("heard_s_ago", 9) < 1.5, 5)
    time.sleep(1.5)  # the master has heard the worker's heartbeats for a while
    target = ("127.0.0.1", cluster.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        stop = json.dumps({"r": nodes["m"].run_id, "n": "w", "s": 10**15, "k": "hb", "state": "failed",
                           "reason": "forged"}, sort_keys=True).encode()
        s.sendto(hmac.new(b"wrong key", stop, hashlib.sha256).hexdigest().encode() + b" " + stop, target)
        # signed, but with a sequence number already used: a replay
        old = json.dumps({"r": nodes["m"].run_id, "n": "w", "s": 1, "k": "hb", "state": "failed",
                          "reason": "replayed"}, sort_keys=True).encode()
        s.sendto(hmac.new(bytes.fromhex(cluster.key), old, hashlib.sha256).hexdigest().encode() + b" " + old, target)
    assert nodes["m"].wait() == 0 and nodes["w"].wait() == 0
    assert nodes["m"].state()["state"] == "done"


def test_a_stall_after_the_first_step_and_no_first_step_are_failures(cluster, tmp_path):
    step = "mkdir -p output; echo '{\"current_steps\": 1}' >> output/trainer_log.jsonl"
    nodes = cluster({"m": f"{step}; sleep 60", "w": "sleep 60"}, stall_timeout_s=2)
    _until(lambda: not nodes["m"].ranks_alive(), 10)
    assert "no progress for 2 s after the first step" in nodes["m"].state()["reason"]
    assert nodes["w"].wait() == 1 and "no progress" in nodes["w"].state()["reason"]


def test_no_first_step_in_time_is_a_failure(cluster):
    nodes = cluster({"m": "sleep 60", "w": "sleep 60"}, start_timeout_s=2)
    _until(lambda: not any(n.ranks_alive() for n in nodes.values()), 10)
    assert "no training step within 2 s" in nodes["w"].state()["reason"]


def test_a_fabric_check_that_does_not_complete_says_so_not_training(cluster):
    nodes = cluster({"m": "sleep 60", "w": "sleep 60"}, start_timeout_s=2, activity="fabric")
    _until(lambda: not any(n.ranks_alive() for n in nodes.values()), 10)
    reason = nodes["w"].state()["reason"]
    assert "the fabric check did not complete within 2 s of the start" in reason and "train_fabric_timeout_s" in reason
    assert "training step" not in reason


def test_a_heartbeat_port_in_use_is_reported_and_nothing_starts(cluster):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", cluster.port))
        nodes = cluster({"m": "touch started; sleep 60"})
        assert nodes["m"].wait() == 2
    assert nodes["m"].state()["state"] == "error" and "Address already in use" in nodes["m"].state()["reason"]
    assert not (nodes["m"].dir / "started").exists()


def test_term_to_the_supervisor_stops_its_ranks_and_tells_the_peers(cluster):
    nodes = cluster({"m": "sleep 60", "w": "sleep 60"})
    time.sleep(1)
    nodes["w"].proc.terminate()
    _until(lambda: not any(n.ranks_alive() for n in nodes.values()), 10)
    assert "the supervisor on w was terminated" in nodes["m"].state()["reason"]


def _spawned(tmp_path: Path, name: str, script: str) -> tuple[subprocess.Popen, int, int, Path]:
    """The supervisor as the train module spawns it: before the decision, from another directory, silent,
    with its control pipe (GO_R,UP_W)."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "launch.sh").write_text("#!/bin/sh\n" + script + "\nrc=$?\necho $rc > rc\nexit $rc\n")
    (run_dir / "supervise.json").write_text(json.dumps({
        "run_id": f"test-{name}", "node": name, "master": True, "master_addr": "127.0.0.1", "port": _free_udp_port(),
        "peers": [], "secret": secrets.token_hex(32), "peer_timeout_s": 6, "stall_timeout_s": 0,
        "start_timeout_s": 0, "fail_grace_s": 1}))
    go_r, go_w = os.pipe()
    up_r, up_w = os.pipe()
    proc = subprocess.Popen([sys.executable, str(SUPERVISOR), str(run_dir), f"{go_r},{up_w}"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(go_r, up_w))
    os.close(go_r)
    os.close(up_w)
    return proc, go_w, up_r, run_dir


def test_a_supervisor_spawned_before_the_decision_starts_nothing_until_go(tmp_path):
    proc, go_w, up_r, run_dir = _spawned(tmp_path, "nogo", "touch started")
    time.sleep(0.5)
    assert proc.poll() is None and not (run_dir / "started").exists() and not (run_dir / "pid").exists()
    os.close(go_w)  # the module exited without a go (another node could not start): it ends, nothing ran
    assert proc.wait(10) == 0
    assert os.read(up_r, 100) == b""
    assert not (run_dir / "started").exists() and not (run_dir / "supervisor.log").exists()

    proc, go_w, up_r, run_dir = _spawned(tmp_path, "go", "touch started; sleep 0.5")
    os.write(go_w, b"go\n")
    os.close(go_w)
    assert os.read(up_r, 100) == b"up\n"  # the ranks started: pid recorded, log in the run directory
    assert proc.wait(10) == 0 and (run_dir / "started").exists() and (run_dir / "pid").exists()
    assert json.loads((run_dir / "supervisor.json").read_text())["state"] == "done"
    assert (run_dir / "supervisor.log").exists()  # its log moved into the run directory at go


def test_a_spawned_supervisor_that_cannot_start_answers_why(tmp_path):
    proc, go_w, up_r, run_dir = _spawned(tmp_path, "bad", "true")
    (run_dir / "supervise.json").write_text("{}")  # no run id: it cannot supervise anything
    os.write(go_w, b"go\n")
    os.close(go_w)
    answer = os.read(up_r, 500).decode()
    assert answer.startswith("the supervisor could not start:") and "run_id" in answer, answer
    assert proc.wait(10) == 2 and not (run_dir / "pid").exists()

"""A secret of train_env reaches the nodes' node.env and nothing else: not the controller's state
(logs, runs, reports, runner artifacts and events), not any other node file, not the nodes' syslog,
not a command line. A real two-node training run over real SSH, with the default stack."""

from __future__ import annotations

import os
import secrets
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from llamafleet import stop, train
from llamafleet.runner import KEEP_DIRS_VAR
from conftest import run_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEV_LOG = "/dev/log"


class Syslog:
    """A unix datagram socket at /dev/log (the nodes share this filesystem): everything the nodes'
    modules send to syslog during the run."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(DEV_LOG)
        os.chmod(DEV_LOG, 0o666)
        self.sock.settimeout(0.2)
        self.messages: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.done.is_set():
            try:
                self.messages.append(self.sock.recv(1 << 20))
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.sock.close()
        os.unlink(DEV_LOG)


class Sampler:
    """``ps -ww -eo args`` (full command lines) and the modes of the runner's extra-vars files, sampled while the run goes on."""

    def __init__(self, state: Path):
        self.state = state
        self.lines: set[str] = set()
        self.samples = 0
        self.extravars_modes: dict[str, tuple[int, int]] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.done.is_set():
            out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
            self.lines.update(out.splitlines())
            self.samples += 1
            for f in self.state.glob("runner-*/env/extravars"):
                try:
                    self.extravars_modes[str(f)] = (stat.S_IMODE(f.stat().st_mode), stat.S_IMODE(f.parent.stat().st_mode))
                except OSError:
                    pass
            self.done.wait(0.2)

    def close(self):
        self.done.set()
        self.thread.join(10)


def files_holding(token: bytes, base: Path, since: float | None = None, skip=()) -> list[str]:
    """Files under ``base`` (changed since ``since``, when given) whose bytes hold ``token``."""
    found = []
    for top, _dirs, names in os.walk(base):
        for name in names:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or path in skip:
                    continue
                if since is not None and max(st.st_mtime, st.st_ctime) < since:
                    continue
                with open(path, "rb") as fh:
                    if token in fh.read():
                        found.append(path)
            except OSError:
                continue
    return found


@pytest.fixture
def syslog():
    if os.path.exists(DEV_LOG):
        pytest.skip(f"{DEV_LOG} exists already: a syslog daemon runs here, its messages cannot be captured")
    log = Syslog()
    yield log
    log.close()


def test_a_secret_reaches_only_the_nodes_node_env(two_nodes, job, default_stack, syslog, tmp_path,
                                                   monkeypatch):
    _, roots = default_stack
    token = "hf_lfsecret_" + secrets.token_hex(12)
    state = tmp_path / "state"
    monkeypatch.setenv("LLAMAFLEET_STATE_DIR", str(state))
    monkeypatch.setenv(KEEP_DIRS_VAR, "1")  # keep the runner's artifacts and events, to search them too
    t0 = time.time() - 1
    sampler = Sampler(state)
    result = None
    try:
        result = train(two_nodes, job / "sft_lora.yaml", workdir=job.parents[1], env={"HF_TOKEN": token, "NCCL_P2P_DISABLE": "1"},
                       follow_run=True, poll_s=3)
    finally:
        sampler.close()
        if result and result.run_id and run_processes(result.run_id):
            stop(two_nodes, result.run_id)
    assert result.ok, result.format()
    run_id = result.run_id
    needle = token.encode()

    # the nodes: node.env holds it, mode 0600, in a run directory of mode 0700; no other file does
    node_envs = []
    for node in ("node1", "node2"):
        run_dir = roots / node / "runs" / run_id
        env_file = run_dir / "node.env"
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        text = env_file.read_text()
        assert f"export HF_TOKEN={token}" in text and "export NCCL_P2P_DISABLE=1" in text
        node_envs.append(str(env_file))
        assert not files_holding(needle, roots / node, since=t0, skip=node_envs), f"{node} leaks the token"
        assert not files_holding(needle, run_dir, skip=node_envs)
    ansible_tmp = Path.home() / ".ansible"
    if ansible_tmp.exists():
        assert not files_holding(needle, ansible_tmp, since=t0)

    # the controller: logs, runs (the collected run directories), reports, caches, the runner's dirs
    assert (state / "logs").is_dir() and list((state / "runs" / run_id / "nodes").iterdir())
    runner_dirs = list(state.glob("runner-*"))
    events = [p for d in runner_dirs for p in d.glob("artifacts/*/job_events/*.json")]
    assert runner_dirs and events, "the runner's private data dirs were not kept"
    assert not files_holding(needle, state), "the controller's state leaks the token"
    # the start task's event is there, its secret option masked by the module
    assert any(b"VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in p.read_bytes() for p in events)
    assert not list(state.glob("runner-*/env/extravars")), "an extra-vars file outlived its run"
    assert result.plan["nodes"]["node1"]["env"]["HF_TOKEN"] == "***"
    assert token not in result.to_json()

    # every extra-vars file seen during the run was private; none was on a command line
    assert sampler.extravars_modes and set(sampler.extravars_modes.values()) == {(0o600, 0o700)}, \
        sampler.extravars_modes
    assert any("ansible-playbook" in line and "-e @" in line for line in sampler.lines), \
        (sampler.samples, [line for line in sampler.lines if "playbook" in line])
    assert not [line for line in sampler.lines if token in line]

    # what the nodes' modules logged: their invocations, the secret option not among them
    logged = b"\n".join(syslog.messages)
    assert b"Invoked with" in logged and b"secret_env=NOT_LOGGING_PARAMETER" in logged, logged[-2000:]
    assert needle not in logged

    # the supervisors' heartbeat key of this launch: in the controller's key file and each node's
    # supervise.json (both 0600), nowhere else: not in events, logs, collected files, syslog or ps
    key_file = state / "runs" / run_id / "supervisor.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes().strip()
    assert len(key) == 64
    assert b"supervisor_secret=NOT_LOGGING_PARAMETER" in logged
    assert key not in logged and not [line for line in sampler.lines if key.decode() in line]
    assert files_holding(key, state) == [str(key_file)]
    for node in ("node1", "node2"):
        cfg = roots / node / "runs" / run_id / "supervise.json"
        assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
        assert files_holding(key, roots / node, since=t0) == [str(cfg)]

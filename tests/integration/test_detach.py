"""Ctrl-C in a real terminal (tmux) while `llamafleet train --follow` follows a real two-node run:
the follower detaches and the run goes on (`llamafleet follow` re-attaches to it), or with
--stop-on-interrupt every rank is stopped."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT
from llamafleet import stop
from conftest import run_processes, variant

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXE = Path(sys.executable).parent / "llamafleet"


class Terminal:
    """One tmux session on a private server, running one command in a real pty."""

    def __init__(self, name: str, command: str):
        self.server = f"lftest-{os.getpid()}-{name}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "220", "-y", "50",
                  f"cd {shlex.quote(str(PROJECT))} && {command}; echo LLAMAFLEET_EXIT=$?; sleep 600")
        self.socket = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-5000", "-t", "t")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert "LLAMAFLEET_EXIT=" not in self.text(), self.text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not shown within {timeout:g} s:\n{self.text()[-3000:]}")

    def close(self):
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=30)
        if self.socket:
            Path(self.socket).unlink(missing_ok=True)


@pytest.fixture
def terminal():
    if not shutil.which("tmux"):
        pytest.skip("needs tmux (make setup installs it)")
    made = []

    def start(name, command):
        made.append(Terminal(name, command))
        return made[-1]

    yield start
    for t in made:
        t.close()


def _follow_in_terminal(terminal, name, inv, cfg, *flags):
    workdir = shlex.quote(str(cfg.parents[2]))  # the job's yaml paths start there (conftest's job fixture)
    term = terminal(name, f"{EXE} train -i {shlex.quote(str(inv))} {shlex.quote(str(cfg))} --workdir {workdir} "
                          f"--follow {' '.join(flags)}")
    run_id = term.wait_for(r"run (\S+): \S+ with the torchrun launcher", 300).group(1)
    term.wait_for(r"loss \d", 600)  # following, and rank 0 has logged a training step
    return term, run_id


def test_ctrl_c_detaches_and_follow_reattaches(terminal, two_nodes, job, cli):
    cfg = variant(job, "detach", max_steps=1500, save_steps=100000)  # ~60 s: still running at Ctrl-C
    term, run_id = _follow_in_terminal(terminal, "detach", two_nodes, cfg)
    try:
        term.tmux("send-keys", "-t", "t", "C-c")
        sent = time.time()
        term.wait_for(r"LLAMAFLEET_EXIT=\d+", 15)
        assert time.time() - sent < 10, "the follower took too long to detach"
        out = term.text()
        assert f"run {run_id} goes on" in out and "LLAMAFLEET_EXIT=130" in out, out[-3000:]
        for verb in ("follow", "status", "stop"):
            assert f"llamafleet {verb} {run_id} -i {two_nodes}" in out, out[-3000:]
        assert "Traceback" not in out
        assert run_processes(run_id), "detaching stopped the run"
        again = cli("follow", run_id, "-i", str(two_nodes), timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"run {run_id}: succeeded" in again.stdout
        assert not run_processes(run_id)
        collected = Path(re.search(r"adapter: (\S+)", again.stdout).group(1))
        assert (collected / "adapter_model.safetensors").is_file()
    finally:
        if run_processes(run_id):
            stop(two_nodes, run_id)


def test_ctrl_c_with_stop_on_interrupt_stops_every_rank(terminal, two_nodes, job):
    cfg = variant(job, "interrupt", max_steps=20000, save_steps=100000)  # stopped long before its end
    term, run_id = _follow_in_terminal(terminal, "interrupt", two_nodes, cfg, "--stop-on-interrupt")
    try:
        assert run_processes(run_id)
        term.tmux("send-keys", "-t", "t", "C-c")
        term.wait_for(r"LLAMAFLEET_EXIT=\d+", 120)
        out = term.text()
        assert f"run {run_id}: stopped" in out and "every rank was stopped" in out and "LLAMAFLEET_EXIT=130" in out, \
            out[-3000:]
        assert not run_processes(run_id), "a rank outlived the stop"
    finally:
        if run_processes(run_id):
            stop(two_nodes, run_id)

"""Shared fixtures: the project, the CLI, and a real-SSH testbed of network-namespace nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
TESTS = PROJECT / "tests"
LIGHT_LOCK = TESTS / "locks" / "light.yml"
sys.path.insert(0, str(TESTS))
# The suite's many inventories are one testbed: they share one state (the wheelhouse, the recorded
# LLaMA-Factory surface), as before state went beside each inventory. test_package.py runs without it.
os.environ.setdefault("LLAMAFLEET_STATE_DIR", str(PROJECT / ".llamafleet"))


def _can_make_hosts() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "unshare", "rsync"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not Path("/usr/sbin/sshd").exists():
        return "needs openssh-server (make setup installs it)"
    return None


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """Three nodes, each a network namespace with its own sshd, IP, hostname and host key."""
    why = _can_make_hosts()
    if why:
        pytest.skip(why)
    from testbed import Testbed

    # LLAMAFLEET_TEST_SLOT: another testbed slot, to run tests beside a session that holds slot 1
    tb = Testbed(tmp_path_factory.mktemp("testbed"), nodes=3, slot=int(os.environ.get("LLAMAFLEET_TEST_SLOT", "1")))
    tb.up()
    yield tb
    tb.down()


@pytest.fixture
def cli():
    """Run the `llamafleet` CLI as a user does; returns the CompletedProcess."""
    exe = Path(sys.executable).parent / "llamafleet"

    def run(*args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT,
                              env={**os.environ, **(env or {})})

    return run


@pytest.fixture(scope="session")
def default_stack(testbed, tmp_path_factory):
    """The real default lock (torch, deepspeed, llamafactory, ...) provisioned over SSH on every
    testbed node, offline from a wheelhouse the controller builds. Shared by the slow tests."""
    from llamafleet import provision

    # LLAMAFLEET_TEST_ROOTS: node roots of an earlier session to reuse while developing (provision
    # still runs, for real; it finds the stack in place and changes nothing).
    roots = Path(os.environ["LLAMAFLEET_TEST_ROOTS"]) if os.environ.get("LLAMAFLEET_TEST_ROOTS") \
        else tmp_path_factory.mktemp("default-roots")
    path = testbed.write_inventory(roots / "inventory" / "hosts.yml",
                                   extra_host_vars={n.name: {"llamafleet_root": str(roots / n.name)} for n in testbed.nodes},
                                   extra_group_vars={"stack_offline": True})
    result = provision(path)
    assert result.ok, result.format()
    return path, roots


def stack():
    """The default lock's cpu flavor, as the default_stack fixture provisions it."""
    from llamafleet import lock

    return lock.load_stack(None, "cpu")


def run_processes(run_id: str) -> list[int]:
    """Processes of a run anywhere on this machine (every namespace node shares its process table)."""
    marker = f"LLAMAFLEET_RUN_ID={run_id}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if marker in fh.read().split(b"\0"):
                        with open(f"/proc/{entry}/stat") as st:
                            if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                                pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="session")
def job(default_stack, tmp_path_factory):
    """The built-in tiny job, copied out of the repo with its layout (its yaml's paths are relative to
    ``job.parents[1]``, as to the repository's root), with its model built by a node's stack Python."""
    _, roots = default_stack
    tiny = tmp_path_factory.mktemp("job") / "examples" / "tiny"
    shutil.copytree(PROJECT / "examples" / "tiny", tiny, ignore=shutil.ignore_patterns("model", "saves"))
    python = roots / "node1" / "stacks" / stack().venv_name / "bin" / "python"
    subprocess.run([str(python), str(PROJECT / "python" / "llamafleet" / "tinymodel.py"), str(tiny / "model"),
                    "--data", str(tiny / "data" / "tiny_alpaca.jsonl")], check=True, capture_output=True, timeout=600)
    return tiny


@pytest.fixture(scope="session")
def two_nodes(testbed, default_stack, tmp_path_factory):
    _, roots = default_stack
    path = tmp_path_factory.mktemp("inv2") / "hosts.yml"
    return testbed.write_inventory(path, nodes=["node1", "node2"],
                                   extra_host_vars={n: {"llamafleet_root": str(roots / n)} for n in ("node1", "node2")},
                                   extra_group_vars={"stack_offline": True})


def variant(job: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((job / "sft_lora.yaml").read_text())
    data.update(changes)
    out = job / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out

"""llamafleet as users install it: a wheel built from this tree, installed into a fresh venv outside the
checkout, run from another directory with state beside the inventory; provision, train across two nodes,
status and stop on the namespace testbed give what the checkout gives."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT, variant

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The ``llamafleet`` executable of a fresh venv that has only the built wheel (and its dependencies)."""
    base = tmp_path_factory.mktemp("package")
    tree = base / "tree"  # what git would check out: the build never sees the checkout's state or build dirs
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (PROJECT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(base / "dist"), str(tree)], check=True, timeout=600,
                   capture_output=True)
    wheel = next((base / "dist").glob("llamafleet-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    subprocess.run([str(base / "venv/bin/python"), "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    str(wheel)], check=True, timeout=900, capture_output=True)
    return base / "venv" / "bin" / "llamafleet"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAFLEET_", "ANSIBLE_", "PYTHON"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # no venv activated
    return env


def test_the_installed_package_provisions_trains_and_reports_from_any_directory(installed, testbed, default_stack,
                                                                                 job, cli, tmp_path):
    _, roots = default_stack
    cluster = tmp_path / "clusters" / "a"
    inv = testbed.write_inventory(cluster / "hosts.yml", nodes=["node1", "node2"],
                                  extra_host_vars={n: {"llamafleet_root": str(roots / n)} for n in ("node1", "node2")},
                                  extra_group_vars={"stack_offline": True})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def llamafleet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(installed), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=elsewhere, env=_env())

    where = subprocess.run([str(installed.parent / "python"), "-c", "import llamafleet.paths as p; print(p.PROJECT_DIR)"],
                           capture_output=True, text=True, cwd=elsewhere, env=_env(), check=True).stdout.strip()
    assert where.startswith(str(installed.parents[1])) and where.endswith("llamafleet/share"), where

    proc = llamafleet("provision", "-i", str(inv))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "provision OK on 2 node(s): node1 unchanged, node2 unchanged" in proc.stdout, proc.stdout[-3000:]
    state = cluster / ".llamafleet"
    assert (state / "logs").is_dir() and not (elsewhere / ".llamafleet").exists()

    cfg = variant(job, "package", max_steps=4, save_steps=1000)
    workdir = str(cfg.parents[2])
    # the plan is the checkout's plan: the same run id gives the same per-node commands and environments
    plans = []
    for run in (llamafleet, lambda *a: cli(*a, env={"LLAMAFLEET_STATE_DIR": str(tmp_path / "checkout-state")})):
        proc = run("train", "-i", str(inv), str(cfg), "--workdir", workdir, "--dry-run", "--json",
                   "--run-id", "20261202-000000-package-same")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        plans.append(json.loads(proc.stdout)["plan"]["plan"])
    assert plans[0] == plans[1]

    proc = llamafleet("train", "-i", str(inv), str(cfg), "--workdir", workdir, "--follow", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = re.search(r"run (\S+): succeeded", proc.stdout).group(1)
    adapter = Path(re.search(r"adapter: (\S+)", proc.stdout).group(1))
    assert adapter == state / "runs" / run_id / "nodes" / "node1" / "output"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (PROJECT / ".llamafleet" / "runs" / run_id).exists(), "the run's state went to the checkout"

    proc = llamafleet("status", run_id, "-i", str(inv), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = {n["name"]: n for n in json.loads(proc.stdout)["nodes"]}
    assert sorted(nodes) == ["node1", "node2"] and all(n["state"] == "exited" and n["rc"] == 0 for n in nodes.values())

    proc = llamafleet("stop", run_id, "-i", str(inv))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]

    # --state-dir: another state for the same cluster, named once on the command line
    other = tmp_path / "other-state"
    proc = llamafleet("collect", run_id, "-i", str(inv), "--state-dir", str(other))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (other / "runs" / run_id / "nodes" / "node1" / "output" / "adapter_model.safetensors").is_file()

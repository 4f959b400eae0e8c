"""The real default lock, provisioned for real over SSH, and drift of torch, deepspeed and transformers."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from llamafleet import check, lock, provision

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STACK = lock.load_stack(None, "cpu")


def test_default_stack_is_identical_everywhere_and_a_rerun_changes_nothing(default_stack):
    path, roots = default_stack
    again = provision(path)
    assert again.ok and again.changed == 0, again.format()
    torch = next(r for r in again.parity.rows if r.component == "torch")
    assert set(torch.found.values()) == {"2.13.0+cpu"}
    for component in ("deepspeed", "llamafactory", "transformers", "peft", "trl", "datasets", "accelerate"):
        row = next(r for r in again.parity.rows if r.component == component)
        assert row.ok and len(set(row.found.values())) == 1


def test_drift_of_torch_deepspeed_and_transformers_is_named_then_repaired(testbed, default_stack, tmp_path):
    path, roots = default_stack
    wheels = tmp_path / "wheels"
    planted = {"node2": "torch==2.14.1", "node3": "deepspeed==0.19.7", "node1": "transformers==5.5.0"}
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *planted.values()],
                   check=True, capture_output=True, timeout=900)
    for node, pin in planted.items():
        python = roots / node / "stacks" / STACK.venv_name / "bin" / "python"
        testbed.ssh(node, f"{shlex.quote(str(python))} -m pip -q install --no-deps --no-build-isolation --no-index "
                          f"--find-links {shlex.quote(str(wheels))} {pin}", timeout=900)
    bad = check(path)
    assert not bad.ok
    rows = {r.component: r for r in bad.parity.rows}
    assert rows["torch"].bad == ("node2",) and rows["torch"].found["node2"].startswith("2.14.1")
    assert rows["deepspeed"].bad == ("node3",) and rows["deepspeed"].found["node3"] == "0.19.7"
    assert rows["transformers"].bad == ("node1",) and rows["transformers"].found["node1"] == "5.5.0"
    table = bad.parity.table(only_problems=True)
    assert "2.14.1" in table and "0.19.7" in table and "5.5.0" in table
    fixed = provision(path)
    assert fixed.ok, fixed.format()
    assert {n.action for n in fixed.nodes} == {"repaired"}
    assert check(path).ok

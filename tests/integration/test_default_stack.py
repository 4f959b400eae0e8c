"""The real default lock, provisioned for real over SSH, and drift of torch, deepspeed and transformers."""

from __future__ import annotations

import re
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


def relabel_torch(venv, version: str) -> None:
    """What installing another build of the same torch leaves: a dist-info of another name whose METADATA says
    ``version`` (the files themselves stay: only the build label differs, as between +cpu and +cu130)."""
    site = next(venv.glob("lib/python3.*/site-packages"))
    old = next(site.glob("torch-*.dist-info"))
    meta = old / "METADATA"
    meta.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta.read_text(), count=1))
    new = f"torch-{version}.dist-info"
    (old / "RECORD").write_text((old / "RECORD").read_text().replace(old.name + "/", new + "/"))
    old.rename(site / new)


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
    relabel_torch(roots / "node3" / "stacks" / STACK.venv_name, "2.13.0+cu130")
    bad = check(path)
    assert not bad.ok
    rows = {r.component: r for r in bad.parity.rows}
    # node3's torch is the pinned version in another build: the pin (2.13.0) alone matches it, its build record does not
    assert rows["torch"].bad == ("node2", "node3") and rows["torch"].found["node2"].startswith("2.14.1")
    assert rows["torch"].found["node3"] == "2.13.0+cu130"
    assert "node3: torch is 2.13.0+cu130, expected 2.13.0 (another build than provision installed" in "\n".join(
        bad.parity.problems)
    assert rows["deepspeed"].bad == ("node3",) and rows["deepspeed"].found["node3"] == "0.19.7"
    assert rows["transformers"].bad == ("node1",) and rows["transformers"].found["node1"] == "5.5.0"
    table = bad.parity.table(only_problems=True)
    assert "2.14.1" in table and "0.19.7" in table and "5.5.0" in table
    fixed = provision(path)
    assert fixed.ok, fixed.format()
    assert {n.action for n in fixed.nodes} == {"repaired"}
    assert check(path).ok

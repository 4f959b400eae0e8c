"""After training: the run's LoRA adapter merged into its base model on a namespace node with the run's own stack
(`llamafleet export`), checked, copied to the controller, and generating text with transformers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import stack, variant
from llamafleet import export, stop, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d)
ids = tok("Hello", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(out.shape[1] - ids["input_ids"].shape[1])
"""


@pytest.fixture(scope="module")
def trained(two_nodes, job):
    result = train(two_nodes, variant(job, "toexport", max_steps=4, save_steps=100), workdir=job.parents[1],
                   follow_run=True, poll_s=2)
    assert result.ok, result.format()
    return result


def test_the_adapter_is_merged_checked_fetched_and_generates(two_nodes, trained, default_stack, cli):
    _, roots = default_stack
    result = export(two_nodes, trained.run_id, fetch=True)
    assert result.ok, result.format()
    assert result.node == "node1" and result.export_dir == str(roots / "node1" / "runs" / trained.run_id / "export")
    assert result.load_check["missing"] == [] and result.load_check["wrong_shape"] == []
    assert result.load_check["parameters"] > 0 and "model.safetensors" in result.files
    assert result.adapter.endswith("/output") and result.base_model.endswith("/model")
    here = Path(result.controller_dir)
    assert (here / "config.json").is_file() and (here / "model.safetensors").stat().st_size == result.files["model.safetensors"]
    record = json.loads((here.parent / "export.json").read_text())
    assert record["base_model"] == result.base_model and record["export_dir"] == result.export_dir
    # the merged model loads and generates, with the stack that trained it
    python = roots / "node1" / "stacks" / stack().venv_name / "bin" / "python"
    gen = subprocess.run([str(python), "-c", GENERATE, str(here)], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0 and gen.stdout.strip().splitlines()[-1] == "4", gen.stderr[-2000:]
    # the CLI says the same, on the worker this time, and a second export replaces the first
    proc = cli("export", trained.run_id, "-i", str(two_nodes), "--node", "node2", "--json")
    assert proc.returncode == 1, proc.stdout  # node2 holds no adapter: rank 0 writes it
    assert "node2: run %s has no adapter" % trained.run_id in proc.stdout
    again = cli("export", trained.run_id, "-i", str(two_nodes))
    assert again.returncode == 0 and f"export of run {trained.run_id}: merged on node1" in again.stdout, again.stdout


def test_bad_exports_are_one_clear_message_and_change_nothing(two_nodes, job, trained, cli):
    proc = cli("export", "no-such-run", "-i", str(two_nodes))
    assert proc.returncode == 1 and "run no-such-run is not on this node" in proc.stdout, proc.stdout + proc.stderr
    proc = cli("export", trained.run_id, "-i", str(two_nodes), "--node", "node9")
    assert proc.returncode == 1 and "train_export_node node9 is not a node of this inventory" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    running = train(two_nodes, variant(job, "busyexport", max_steps=3000, save_steps=100000), workdir=job.parents[1])
    assert running.ok, running.format()
    try:
        busy = export(two_nodes, running.run_id)
        assert not busy.ok and f"run {running.run_id} is still running" in "\n".join(busy.errors)
    finally:
        stop(two_nodes, running.run_id)

"""Inputs where they really live: a model already on the nodes' own disks, and (test_hub.py) on a hub.

Every testbed node sees its own directory at ``testbed.local_dir`` (a private bind mount), as every
real host has its own /data: a model placed there is on the nodes and nowhere else.
"""

from __future__ import annotations

import shutil

import pytest

from conftest import run_processes, variant
from llamafleet import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_on_nodes(testbed, job):
    """The tiny model on node1's and node2's own disks only (not on the controller, not shared)."""
    for node in testbed.nodes[:2]:
        dest = node.local_source / "models" / "tiny"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(job / "model", dest)
    return testbed.local_dir / "models" / "tiny"


def test_a_model_on_the_nodes_trains_without_being_copied(two_nodes, job, model_on_nodes):
    assert not model_on_nodes.exists()  # the controller does not see it
    cfg = variant(job, "on_nodes", model_name_or_path=str(model_on_nodes))
    result = train(two_nodes, cfg, workdir=job.parents[1], follow_run=True, poll_s=3)
    assert result.ok, result.format()
    assert result.plan["model"]["source"] == "nodes"
    assert not [f for f in result.plan["manifest"] if f.startswith("model/")], "the model was synced"
    row = next(i for i in result.plan["inputs"] if i["key"] == "model_name_or_path")
    assert row["resolved"] == str(model_on_nodes) and row["source"].startswith("nodes")
    assert "model" in result.summary and "nodes: already there" in result.summary


def test_a_truncated_weight_file_on_one_node_is_refused_before_anything_starts(testbed, two_nodes, job, model_on_nodes,
                                                                                default_stack):
    _, roots = default_stack
    weights = testbed.nodes[1].local_source / "models" / "tiny" / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1000])  # a copy that stopped short on node2
        cfg = variant(job, "on_nodes_cut", model_name_or_path=str(model_on_nodes))
        result = train(two_nodes, cfg, workdir=job.parents[1])
        assert not result.ok and result.state == "not-started", result.format()
        text = "\n".join(result.errors)
        assert "node2: model" in text and "model.safetensors is truncated" in text, text
        assert "node1: model" not in text  # node1's copy is whole
        assert "model: model.safetensors" in text  # the component x node table names the file
        for node in ("node1", "node2"):
            assert not (roots / node / "runs" / result.run_id).exists(), "a run directory was created"
        assert not run_processes(result.run_id)
    finally:
        weights.write_bytes(original)

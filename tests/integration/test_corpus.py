"""LLaMA-Factory's own example configs run from the root of a checkout (tests/corpus), on the testbed.

Every example is planned through llamafleet on the CPU testbed with its hub model id served by a
local server speaking the Hub's API (bf16 set false: the testbed has no GPU); three of them train for
real across two nodes with the tiny model put inside the checkout, as a user's own model would be.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TESTS
from hubserver import HubServer
from llamafleet import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CORPUS = TESTS / "corpus" / "lf-checkout"
HUB_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
# what a 2-core CPU testbed can run in a minute, the rest of each example unchanged
CPU = {"bf16": False, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "max_samples": 16,
       "cutoff_len": 64, "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 1000}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, job):
    """A copy of the corpus checkout with the tiny model at models/tiny (its own weights, like a user's)."""
    root = tmp_path_factory.mktemp("lf") / "LLaMA-Factory"
    shutil.copytree(CORPUS, root)
    shutil.copytree(job / "model", root / "models" / "tiny")
    return root


@pytest.fixture(scope="module")
def hub(testbed, job, tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), host=f"{testbed.subnet}.1") as server:
        server.repos.commit(HUB_MODEL, {p.name: p for p in (job / "model").iterdir() if p.is_file()})
        yield server


def cpu_variant(checkout: Path, config: str, **changes) -> Path:
    data = yaml.safe_load((checkout / config).read_text())
    data.update(CPU, **changes)
    out = (checkout / config).with_name(Path(config).stem + "_cpu.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_every_example_is_planned_from_the_checkout_root(two_nodes, checkout, hub):
    configs = sorted(str(p.relative_to(checkout)) for p in (checkout / "examples").glob("train_*/*.yaml"))
    assert len(configs) >= 8
    for config in configs:
        result = train(two_nodes, cpu_variant(checkout, config), workdir=checkout, dry_run=True,
                       env={"HF_ENDPOINT": hub.url})
        assert result.ok, f"{config}: {result.format()}"
        assert result.plan["model"]["hub"]["repo_id"] == HUB_MODEL and result.plan["workdir"] == str(checkout)


@pytest.mark.parametrize("config", ["examples/train_lora/qwen3_lora_sft_ds3.yaml",
                                    "examples/train_lora/qwen3_lora_dpo.yaml",
                                    "examples/train_lora/qwen3_lora_pretrain.yaml"])
def test_tiny_model_examples_train_across_two_nodes(config, two_nodes, checkout):
    cfg = cpu_variant(checkout, config, model_name_or_path="models/tiny", template="qwen", max_steps=2,
                      per_device_train_batch_size=1)
    result = train(two_nodes, cfg, workdir=checkout, follow_run=True, poll_s=3)
    assert result.ok, result.format()
    logs = {n: Path(result.outputs[f"log {n}"]).read_text() for n in ("node1", "node2")}
    assert "world size: 2" in logs["node1"] and "world size: 2" in logs["node2"]
    assert (Path(result.outputs["adapter"]) / "adapter_model.safetensors").is_file()

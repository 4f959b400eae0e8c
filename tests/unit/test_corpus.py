"""LLaMA-Factory's own example configs, from the root of a checkout (tests/corpus), planned for a GPU cluster."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import TESTS
from hubserver import HubServer
from llamafleet import inventory, launchplan, lock
from llamafleet.errors import ConfigError

CHECKOUT = TESTS / "corpus" / "lf-checkout"
CONFIGS = sorted(p.relative_to(CHECKOUT) for p in (CHECKOUT / "examples").glob("train_*/*.yaml"))
HUB_MODEL = "Qwen/Qwen3-4B-Instruct-2507"


def test_the_corpus_covers_what_users_run():
    assert len(CONFIGS) >= 8, CONFIGS
    assert {c.parent.name for c in CONFIGS} == {"train_lora", "train_full", "train_qlora"}
    texts = [(CHECKOUT / c).read_text() for c in CONFIGS]
    assert {line.split(":")[1].strip() for t in texts for line in t.splitlines() if line.startswith("stage:")} >= \
        {"sft", "pt", "dpo", "rm", "kto"}
    assert any("quantization_bit: 4" in t for t in texts)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The hub id LLaMA-Factory's examples name, served by a local server speaking the Hub's API."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}).encode()
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        server.repos.commit(HUB_MODEL, {"config.json": b'{"model_type": "qwen3"}', "tokenizer.json": b"{}",
                                        "model.safetensors": struct.pack("<Q", len(header)) + header + b"\1" * 8})
        yield server


@pytest.fixture(scope="module")
def gpu_cluster():
    hv = {f"gpu{i}": {"ansible_host": f"10.0.0.{i}", "llamafleet_gpus": 8, "llamafleet_root": f"/srv/{i}",
                      "llamafleet_master": i == 1} for i in (1, 2)}
    return inventory.validate(list(hv), hv)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_each_example_plans_from_the_checkout_root(config, hub, gpu_cluster, tmp_path):
    stack = lock.load_stack(None, "cu128")
    plan = launchplan.make_plan(CHECKOUT / config, gpu_cluster, stack, state_dir=tmp_path, workdir=CHECKOUT,
                                fetch_now=False, extra_env={"HF_ENDPOINT": hub.url})
    assert plan.plan["world_size"] == 16
    assert plan.model["source"] == "hub" and plan.model["hub"]["commit"] == hub.repos.resolve("model", HUB_MODEL, "main").sha
    inputs = {i["key"]: i for i in plan.inputs}
    assert inputs["dataset_dir"]["resolved"] == str(CHECKOUT / "data")
    if "deepspeed" in inputs:
        assert inputs["deepspeed"]["resolved"].startswith(str(CHECKOUT / "examples" / "deepspeed"))
        assert any(f.startswith("deepspeed/") for f in plan.manifest)
    node = plan.nodes["gpu2"]
    assert node.env["NPROC_PER_NODE"] == "8" and node.env["NODE_RANK"] == "1"
    assert "data/dataset_info.json" in plan.manifest


def test_the_same_example_run_from_elsewhere_is_refused_naming_the_working_directory(hub, gpu_cluster, tmp_path):
    with pytest.raises(ConfigError) as err:
        launchplan.make_plan(CHECKOUT / "examples/train_full/qwen3_full_sft.yaml", gpu_cluster,
                             lock.load_stack(None, "cu128"), state_dir=tmp_path, workdir=CHECKOUT / "examples",
                             fetch_now=False, extra_env={"HF_ENDPOINT": hub.url})
    assert all(f"relative to the working directory {CHECKOUT / 'examples'}" in p for p in err.value.problems)
    assert len(err.value.problems) == 2  # the DeepSpeed config and data/dataset_info.json


def test_bf16_examples_are_refused_on_a_cpu_stack_with_the_fix(hub, gpu_cluster, tmp_path):
    with pytest.raises(ConfigError, match="bf16: transformers refuses bf16 without a GPU"):
        launchplan.make_plan(CHECKOUT / "examples/train_lora/qwen3_lora_sft.yaml", gpu_cluster,
                             lock.load_stack(None, "cpu"), state_dir=tmp_path, workdir=CHECKOUT, fetch_now=False,
                             extra_env={"HF_ENDPOINT": hub.url})


def test_zero_stages_and_offload_are_read_from_the_examples_configs():
    stages = {}
    for c in CONFIGS:
        text = (CHECKOUT / c).read_text()
        ds = next((line.split(":", 1)[1].split("#")[0].strip() for line in text.splitlines()
                   if line.startswith("deepspeed:")), None)
        if ds:
            conf = json.loads((CHECKOUT / ds).read_text())
            stages[str(c)] = (conf["zero_optimization"]["stage"],
                              "offload_optimizer" in conf["zero_optimization"])
    assert {s for s, _ in stages.values()} == {0, 2, 3} and any(off for _, off in stages.values()), stages
    assert Path(CHECKOUT / "data" / "dataset_info.json").is_file()

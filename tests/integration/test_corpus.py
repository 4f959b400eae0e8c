"""LLaMA-Factory's own example configs (tests/corpus/lf-checkout) run from the root of a checkout, on the testbed.

Every example goes through ``llamafleet train --dry-run`` as a user runs it, with its hub model id served
by a local server speaking the Hub's API on the testbed's bridge: as LLaMA-Factory wrote it (``bf16: true``)
it is refused on the testbed's CPU stack with one message; with bf16 off it plans, its keys and template
checked against the nodes' own LLaMA-Factory. Three of them (LoRA SFT with ZeRO-3, DPO, pretraining) train
for real across two nodes with the tiny model put inside the checkout, as a user's own model would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TESTS, stack
from hubserver import HubServer
from llamafleet import parity, paths, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CORPUS = TESTS / "corpus" / "lf-checkout"
CONFIGS = sorted(str(p.relative_to(CORPUS)) for p in (CORPUS / "examples").glob("train_*/*.yaml"))
BF16_ON_CPU = ("bf16: transformers refuses bf16 without a GPU (this stack has none) unless use_cpu is true; "
               "remove it, or set use_cpu: true")
# What a 2-core CPU testbed trains in a minute; every other key of the example stays as LLaMA-Factory has it.
TINY = {"model_name_or_path": "models/tiny", "template": "qwen", "bf16": False, "max_steps": 2, "cutoff_len": 64,
        "max_samples": 16, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
        "save_steps": 1000, "preprocessing_num_workers": 1, "dataloader_num_workers": 0}


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def write_variant(checkout: Path, config: str, suffix: str, **changes) -> Path:
    """The example with ``changes``, beside it in the checkout (its relative paths still start at the root)."""
    data = read_yaml(checkout / config)
    data.update(changes)
    out = (checkout / config).with_name(f"{Path(config).stem}_{suffix}.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, job):
    """A copy of the corpus checkout with the tiny model at models/tiny (its own files, like a user's model)."""
    root = tmp_path_factory.mktemp("lf") / "LLaMA-Factory"
    shutil.copytree(CORPUS, root)
    shutil.copytree(job / "model", root / "models" / "tiny")
    return root


@pytest.fixture(scope="module")
def hub(testbed, job, tmp_path_factory):
    """Every hub id the corpus names, on the testbed's bridge, each a commit of the tiny model's files."""
    with HubServer(tmp_path_factory.mktemp("hub"), host=f"{testbed.subnet}.1") as server:
        ids = {read_yaml(CORPUS / c)["model_name_or_path"] for c in CONFIGS}
        server.commits = {i: server.repos.commit(i, {p.name: p for p in (job / "model").iterdir() if p.is_file()})
                          for i in sorted(ids)}
        yield server


def train_env(hub) -> str:
    return "train_env=" + json.dumps({"HF_ENDPOINT": hub.url})


def test_every_example_uses_only_what_the_nodes_llamafactory_accepts(default_stack):
    """The surface the nodes' probe recorded at provision (what the dry runs below are checked against)."""
    surface = parity.load_llamafactory(paths.state_dir(), stack().venv_name)
    assert surface and surface["version"] == "0.9.5", surface and surface.get("version")
    for config in CONFIGS:
        data = read_yaml(CORPUS / config)
        assert set(data) <= set(surface["args"]), (config, set(data) - set(surface["args"]))
        assert data.get("template", "qwen") in surface["templates"], config


@pytest.mark.parametrize("config", CONFIGS)
def test_each_example_dry_runs_through_the_cli(config, two_nodes, checkout, hub, cli):
    # as LLaMA-Factory wrote it: bf16 on a CPU stack, refused before any node is touched, with one message
    proc = cli("train", "-i", str(two_nodes), str(checkout / config), "--dry-run", "--workdir", str(checkout),
               "-e", train_env(hub))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert out.count(BF16_ON_CPU) == 1, out
    assert f"{checkout / config}: {BF16_ON_CPU}" in out, out
    # the same example with bf16 off plans from the checkout's root
    variant = write_variant(checkout, config, "nobf16", bf16=False)
    proc = cli("train", "-i", str(two_nodes), str(variant), "--dry-run", "--workdir", str(checkout), "-e", train_env(hub),
               "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["state"] == "planned", result
    plan = result["plan"]
    assert plan["workdir"] == str(checkout) and plan["plan"]["world_size"] == 2
    repo_id = read_yaml(variant)["model_name_or_path"]
    assert plan["model"]["source"] == "hub" and plan["model"]["hub"]["commit"] == hub.commits[repo_id]
    for row in plan["inputs"]:
        if row["key"] not in ("model_name_or_path", "output_dir"):
            assert row["resolved"].startswith(str(checkout) + "/"), row
    deepspeed = read_yaml(variant).get("deepspeed")
    if deepspeed:
        assert {r["key"]: r["resolved"] for r in plan["inputs"]}["deepspeed"] == str(checkout / deepspeed)


def test_from_the_checkouts_root_relative_paths_need_no_workdir(two_nodes, checkout, hub):
    """``cd LLaMA-Factory && llamafleet train -i ... examples/train_lora/x.yaml``: the working directory is the root."""
    config = "examples/train_lora/qwen3_lora_sft_ds3.yaml"
    write_variant(checkout, config, "nobf16", bf16=False)
    proc = subprocess.run([str(Path(sys.executable).parent / "llamafleet"), "train", "-i", str(two_nodes),
                           "examples/train_lora/qwen3_lora_sft_ds3_nobf16.yaml", "--dry-run", "-e", train_env(hub)],
                          capture_output=True, text=True, timeout=600, cwd=checkout, env=os.environ.copy())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"relative paths from {checkout}" in out, out
    assert f"deepspeed: examples/deepspeed/ds_z3_config.json -> {checkout}/examples/deepspeed/ds_z3_config.json" in out, out
    assert f"dataset_dir: data -> {checkout}/data" in out, out


@pytest.mark.parametrize("config", ["examples/train_lora/qwen3_lora_sft_ds3.yaml",
                                    "examples/train_lora/qwen3_lora_dpo.yaml",
                                    "examples/train_lora/qwen3_lora_pretrain.yaml"])
def test_tiny_model_examples_train_across_two_nodes(config, two_nodes, checkout, default_stack):
    _, roots = default_stack
    cfg = write_variant(checkout, config, "tiny", **TINY)
    result = train(two_nodes, cfg, workdir=checkout, follow_run=True, poll_s=3)
    assert result.ok, result.format()
    assert result.plan["model"]["source"] == "controller" and result.plan["model"]["path"] == str(checkout / "models" / "tiny")
    logs = {n: Path(result.outputs[f"log {n}"]).read_text() for n in ("node1", "node2")}
    assert "world size: 2" in logs["node1"] and "world size: 2" in logs["node2"]
    assert "Process rank: 0" in logs["node1"] and "Process rank: 1" in logs["node2"]
    assert (Path(result.outputs["adapter"]) / "adapter_model.safetensors").is_file()
    steps = [json.loads(line) for line in Path(result.outputs["trainer log"]).read_text().splitlines()]
    assert steps[-1]["current_steps"] == steps[-1]["total_steps"] == 2 and any(s.get("loss") is not None for s in steps)
    assert "train_loss" in json.loads(Path(result.outputs["results"]).read_text())
    # the worker trained the example's own stage on the example's own data (and DeepSpeed config)
    data = read_yaml(CORPUS / config)
    node_yaml = read_yaml(roots / "node2" / "runs" / result.run_id / "train.yaml")
    assert node_yaml["stage"] == data["stage"] and node_yaml["dataset"] == data["dataset"]
    for name in data["dataset"].split(","):
        file_name = json.loads((CORPUS / "data" / "dataset_info.json").read_text())[name]["file_name"]
        assert (Path(node_yaml["dataset_dir"]) / file_name).read_bytes() == (CORPUS / "data" / file_name).read_bytes()
    if "deepspeed" in data:
        ds = json.loads(Path(node_yaml["deepspeed"]).read_text())
        assert ds == json.loads((CORPUS / data["deepspeed"]).read_text()) and ds["zero_optimization"]["stage"] == 3

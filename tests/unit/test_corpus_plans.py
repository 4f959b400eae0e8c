"""LLaMA-Factory's own example configs (tests/corpus/lf-checkout), read and planned from the checkout's root.

Each example is checked as ``llamafactory-cli train examples/...`` would run it from the root of a
LLaMA-Factory checkout: its relative paths (``dataset_dir`` default ``data``, ``deepspeed:
examples/deepspeed/...``) start there, and its hub model id is pinned against a local server speaking
the Hub's API (tests/hubserver.py), for a GPU cluster of 2 nodes x 8 GPUs.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import yaml

from conftest import TESTS
from hubserver import HubServer
from llamafleet import inventory, launchplan, lock, trainconfig
from llamafleet.errors import ConfigError

CHECKOUT = TESTS / "corpus" / "lf-checkout"
CONFIGS = sorted(str(p.relative_to(CHECKOUT)) for p in (CHECKOUT / "examples").glob("train_*/*.yaml"))
NODES, GPUS = 2, 8
# What each example is, written down here (not read back through llamafleet): stage, finetuning type,
# datasets, and the ZeRO stage and optimizer offload of its DeepSpeed config (None: no DeepSpeed).
EXPECTED = {
    "examples/train_full/qwen3_full_sft.yaml": ("sft", "full", ["identity", "alpaca_en_demo"], 3, False),
    "examples/train_full/qwen3_full_sft_ds2_offload.yaml": ("sft", "full", ["identity", "alpaca_en_demo"], 2, True),
    "examples/train_lora/qwen3_lora_dpo.yaml": ("dpo", "lora", ["dpo_en_demo"], None, False),
    "examples/train_lora/qwen3_lora_kto.yaml": ("kto", "lora", ["kto_en_demo"], None, False),
    "examples/train_lora/qwen3_lora_pretrain.yaml": ("pt", "lora", ["c4_demo"], None, False),
    "examples/train_lora/qwen3_lora_reward.yaml": ("rm", "lora", ["dpo_en_demo"], None, False),
    "examples/train_lora/qwen3_lora_sft.yaml": ("sft", "lora", ["identity", "alpaca_en_demo"], None, False),
    "examples/train_lora/qwen3_lora_sft_ds0.yaml": ("sft", "lora", ["identity", "alpaca_en_demo"], 0, False),
    "examples/train_lora/qwen3_lora_sft_ds3.yaml": ("sft", "lora", ["identity", "alpaca_en_demo"], 3, False),
    "examples/train_qlora/qwen3_lora_sft_otfq.yaml": ("sft", "lora", ["identity", "alpaca_en_demo"], None, False),
}
BF16_ON_CPU = ("bf16: transformers refuses bf16 without a GPU (this stack has none) unless use_cpu is true; "
               "remove it, or set use_cpu: true")


def read_yaml(config: str) -> dict:
    return yaml.safe_load((CHECKOUT / config).read_text())


def records(file: Path) -> int:
    text = file.read_text()
    return len(json.loads(text)) if file.suffix == ".json" else sum(1 for line in text.splitlines() if line.strip())


def hub_ids() -> set[str]:
    return {read_yaml(c)["model_name_or_path"] for c in CONFIGS}


def tiny_safetensors() -> bytes:
    """A valid safetensors file: an 8-byte little-endian header length, the JSON header (padded with spaces to
    8-byte alignment, as the format allows), then the tensor bytes: one float32 2x2 tensor."""
    data = struct.pack("<4f", 0.5, -0.5, 0.25, -0.25)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, len(data)]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def fake_model() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2,
                                   "num_hidden_layers": 1, "vocab_size": 2}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode(),
        "model.safetensors": tiny_safetensors(),
    }


def test_the_corpus_is_what_users_run():
    """At least 8 examples, every kind the issue names, each config file exactly as listed here."""
    assert CONFIGS == sorted(EXPECTED), "a corpus config was added or removed: update EXPECTED"
    stages = {read_yaml(c)["stage"] for c in CONFIGS}
    assert stages >= {"sft", "pt", "dpo", "rm", "kto"}, stages
    assert any(read_yaml(c).get("quantization_bit") == 4 for c in CONFIGS)
    assert {z for *_, z, _ in EXPECTED.values()} >= {0, 2, 3} and any(off for *_, off in EXPECTED.values())
    # LLaMA-Factory's own spelling, unchanged: hub ids, bf16, the relative DeepSpeed path from the checkout's root
    for c in CONFIGS:
        data = read_yaml(c)
        assert data["bf16"] is True and "dataset_dir" not in data and data["output_dir"].startswith("saves/"), c
        assert data.get("deepspeed", "examples/deepspeed/").startswith("examples/deepspeed/"), c
    assert hub_ids() == {"Qwen/Qwen3-4B-Instruct-2507"}
    size = sum(p.stat().st_size for p in CHECKOUT.rglob("*") if p.is_file())
    assert size < 1_000_000, f"the corpus is {size} bytes; keep it well under 1 MB"


def test_the_checkouts_data_has_lf_shapes():
    """dataset_info.json entries keep LLaMA-Factory's shapes; the data files are trimmed, placeholders kept."""
    info = json.loads((CHECKOUT / "data" / "dataset_info.json").read_text())
    assert info["dpo_en_demo"]["ranking"] is True and info["dpo_en_demo"]["formatting"] == "sharegpt"
    assert info["kto_en_demo"]["columns"] == {"messages": "messages", "kto_tag": "label"}
    assert info["c4_demo"]["columns"] == {"prompt": "text"}
    for entry in info.values():
        assert 10 <= records(CHECKOUT / "data" / entry["file_name"]) <= 60, entry
    assert "{{name}}" in (CHECKOUT / "data" / "identity.json").read_text()
    assert "{{author}}" in (CHECKOUT / "data" / "identity.json").read_text()


@pytest.mark.parametrize("config", CONFIGS)
def test_each_example_loads_from_the_checkout_root(config):
    stage, ftype, datasets, zero, offload = EXPECTED[config]
    cfg = trainconfig.load_training(CHECKOUT / config, workdir=CHECKOUT)
    assert (cfg.data.get("stage"), cfg.data.get("finetuning_type", "lora")) == (stage, ftype)
    assert cfg.dataset_dir == str(CHECKOUT / "data")
    assert cfg.dataset_info_path == str(CHECKOUT / "data" / "dataset_info.json")
    assert [d.name for d in cfg.datasets] == datasets
    for ref in cfg.datasets:
        assert ref.files == (str(CHECKOUT / "data" / ref.entry["file_name"]),)
        assert ref.samples == records(Path(ref.files[0]))
    assert cfg.model.source == "hub" and cfg.model.repo_id == "Qwen/Qwen3-4B-Instruct-2507" and cfg.model.revision == "main"
    assert cfg.zero_stage == zero
    if zero is None:
        assert cfg.deepspeed_path is None
    else:
        assert cfg.deepspeed_path == str(CHECKOUT / read_yaml(config)["deepspeed"])
        ds = json.loads(Path(cfg.deepspeed_path).read_text())["zero_optimization"]
        assert ds["stage"] == cfg.zero_stage  # what llamafleet read is what the JSON says
        assert ("offload_optimizer" in ds) == offload
    # LLaMA-Factory's pretrain example sets no template (stage pt reads raw text): llamafleet says so, as LF does
    assert [w.split(": ", 2)[1] for w in cfg.warnings] == (["template"] if stage == "pt" else []), cfg.warnings


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Every hub id the corpus names, served by a local server speaking the Hub's API: a small fake model each."""
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        commits = {}
        for repo_id in sorted(hub_ids()):
            commits[repo_id] = server.repos.commit(repo_id, fake_model(), message="a tiny stand-in")
        server.commits = commits
        yield server


@pytest.fixture(scope="module")
def gpu_cluster():
    hv = {f"gpu{i}": {"ansible_host": f"10.0.0.{i}", "llamafleet_gpus": GPUS, "llamafleet_root": f"/srv/gpu{i}",
                      "llamafleet_master": i == 1} for i in range(1, NODES + 1)}
    return inventory.validate(list(hv), hv)


def plan_for(config: Path, cluster, flavor: str, state_dir: Path, hub, workdir: Path = CHECKOUT):
    return launchplan.make_plan(config, cluster, lock.load_stack(None, flavor), state_dir=state_dir, workdir=workdir,
                                fetch_now=False, extra_env={"HF_ENDPOINT": hub.url})


@pytest.mark.parametrize("config", CONFIGS)
def test_each_example_plans_for_a_gpu_cluster_from_the_checkout_root(config, hub, gpu_cluster, tmp_path):
    _, _, datasets, zero, _ = EXPECTED[config]
    data = read_yaml(config)
    plan = plan_for(CHECKOUT / config, gpu_cluster, "cu128", tmp_path, hub)
    p = plan.plan
    assert p["world_size"] == NODES * GPUS == 16
    assert p["effective_batch"] == data["per_device_train_batch_size"] * 16 * data["gradient_accumulation_steps"]
    samples = sum(records(CHECKOUT / "data" / json.loads((CHECKOUT / "data" / "dataset_info.json").read_text())[d]["file_name"])
                  for d in datasets)
    assert p["train_samples"] == samples
    # transformers' Trainer: ceil(samples / world) per rank, in batches, one step per accumulation, rounded up
    per_epoch = math.ceil(math.ceil(math.ceil(samples / 16) / data["per_device_train_batch_size"])
                          / data["gradient_accumulation_steps"])
    assert p["total_steps"] == math.ceil(data["num_train_epochs"] * per_epoch)
    # the hub model, pinned to the server's commit, fetched by every node into its own cache
    repo_id = data["model_name_or_path"]
    commit = hub.commits[repo_id]
    assert plan.model["source"] == "hub" and plan.model["hub"]["commit"] == commit
    assert plan.model["hub"]["files"] == {name: len(content) for name, content in fake_model().items()}
    assert plan.hub_endpoint == hub.url and [h["commit"] for h in plan.hub] == [commit]
    # every input as the yaml names it, resolved under the checkout's root
    inputs = {i["key"]: i for i in plan.inputs}
    assert set(inputs) == {"model_name_or_path", "dataset_dir", "output_dir", *(f"dataset {d}" for d in datasets),
                           *(["deepspeed"] if zero is not None else [])}
    assert inputs["model_name_or_path"]["resolved"].startswith(f"{repo_id}@{commit[:12]}")
    assert inputs["dataset_dir"]["resolved"] == str(CHECKOUT / "data")
    for key, row in inputs.items():
        if key not in ("model_name_or_path", "output_dir"):
            assert row["resolved"].startswith(str(CHECKOUT) + "/"), row
    if zero is not None:
        assert inputs["deepspeed"]["resolved"] == str(CHECKOUT / data["deepspeed"])
    expected_files = {"data/dataset_info.json", *(f"data/{inputs[f'dataset {d}']['value']}" for d in datasets),
                      *([f"deepspeed/{Path(data['deepspeed']).name}"] if zero is not None else [])}
    assert set(plan.manifest) == expected_files
    # what the second node gets: its rank, 8 processes, the pinned snapshot, the DeepSpeed config at its node path
    node = plan.nodes["gpu2"]
    assert (node.env["NODE_RANK"], node.env["NPROC_PER_NODE"], node.env["NNODES"]) == ("1", "8", "2")
    assert node.env["HF_ENDPOINT"] == hub.url and node.env["HF_HUB_OFFLINE"] == "1"
    node_yaml = yaml.safe_load(node.files["train.yaml"])
    snapshot = f"/srv/gpu2/cache/huggingface/hub/models--{repo_id.replace('/', '--')}/snapshots/{commit}"
    assert node_yaml["model_name_or_path"] == snapshot
    assert node_yaml["dataset_dir"] == f"{node.inputs_dir}/data"
    if zero is not None:
        assert node_yaml["deepspeed"] == f"{node.inputs_dir}/deepspeed/{Path(data['deepspeed']).name}"
    # every other key is the user's, unchanged
    changed = {"model_name_or_path", "dataset_dir", "output_dir", "deepspeed"}
    assert {k: v for k, v in node_yaml.items() if k not in changed} == {k: v for k, v in data.items() if k not in changed}


@pytest.mark.parametrize("config", CONFIGS)
def test_the_same_example_run_from_another_directory_is_refused_naming_it(config, hub, gpu_cluster, tmp_path):
    """From examples/ (not the checkout's root), data/ and examples/deepspeed/ are not there."""
    elsewhere = CHECKOUT / "examples"
    with pytest.raises(ConfigError) as err:
        plan_for(CHECKOUT / config, gpu_cluster, "cu128", tmp_path / "state", hub, workdir=elsewhere)
    problems = err.value.problems
    assert len(problems) == (1 if EXPECTED[config][3] is None else 2), problems  # dataset_info.json (+ DeepSpeed)
    for problem in problems:
        assert problem.startswith(f"{CHECKOUT / config}: ") and f"relative to the working directory {elsewhere}" in problem
    assert any(str(elsewhere / "data" / "dataset_info.json") in p for p in problems)
    assert not (tmp_path / "state" / "stage").exists()


@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_examples_are_refused_on_a_cpu_stack_with_one_message(config, hub, gpu_cluster, tmp_path):
    assert read_yaml(config)["bf16"] is True
    with pytest.raises(ConfigError) as err:
        plan_for(CHECKOUT / config, gpu_cluster, "cpu", tmp_path, hub)
    assert err.value.problems == [f"{CHECKOUT / config}: {BF16_ON_CPU}"]
    # the same example with bf16 off (written elsewhere: only the working directory counts) plans on that stack
    data = read_yaml(config)
    data["bf16"] = False
    variant = tmp_path / "elsewhere" / Path(config).name
    variant.parent.mkdir()
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = plan_for(variant, gpu_cluster, "cpu", tmp_path / "state", hub)
    assert plan.plan["world_size"] == NODES and plan.nodes["gpu2"].env["NPROC_PER_NODE"] == "1"
    assert {i["key"]: i["resolved"] for i in plan.inputs}["dataset_dir"] == str(CHECKOUT / "data")

"""Per-node fit: the memory per GPU estimated from the model's config and the yaml, checked against each node's
GPUs at the launch judgement. The expected figures are the formula's arithmetic, written out here by hand
(ZeRO paper: 2 bytes per weight, 12 of fp32 master + Adam m and v and 2 of gradient per trained parameter)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from llamafleet import fit, inventory, launchplan, lock, parity

PROJECT = Path(__file__).resolve().parents[2]
GIB = 2**30
# Llama-3-8B's shape
H, L, V, I, HEADS, KV = 4096, 32, 128256, 14336, 32, 8
LLAMA3_8B = {"model_type": "llama", "hidden_size": H, "num_hidden_layers": L, "vocab_size": V, "intermediate_size": I,
             "num_attention_heads": HEADS, "num_key_value_heads": KV, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}
KV_DIM = KV * (H // HEADS)  # 1024
BLOCK_LINEAR = L * (2 * H * H + 2 * H * KV_DIM + 3 * H * I)  # q, o; k, v; gate, up, down
EMBED = V * H  # the input embedding; lm_head is as large (not tied)
PARAMS = BLOCK_LINEAR + 2 * EMBED + L * 2 * H + H  # + the norms
LORA_8_ALL = L * 8 * ((H + H) * 2 + (H + KV_DIM) * 2 + (H + I) * 2 + (I + H))  # rank 8 on every linear layer
L4 = {"name": "NVIDIA L4", "memory_mib": 23034}
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}


def shape():
    return fit.shape_from_config(LLAMA3_8B)


def activations(tokens):
    """Bytes of activations with gradient checkpointing: a 16-bit hidden state per layer, one layer recomputed
    (norm in/out, q, k, v, attention out, o_proj in: 6h + 2 kv in 16 bits; four MLP tensors), fp32 logits."""
    return tokens * (2 * H * L + 2 * (6 * H + 2 * KV_DIM) + 8 * I + 4 * V)


def estimate(data, world=1, **kw):
    inputs, notes = fit.inputs_for(data, shape(), world_size=world, **kw)
    return inputs, fit.estimate(inputs)


def test_the_shape_of_a_llama3_8b_config_counts_8b_parameters():
    s = shape()
    assert s.params == PARAMS and 8.0e9 < PARAMS < 8.1e9  # Meta's model card: 8.03B
    assert s.head_dim == 128 and s.largest_layer == EMBED
    assert fit.shape_from_config({"model_type": "qwen2"}) is None  # no sizes: no estimate, never an error


def test_lora_bf16_of_an_8b_model_holds_16_gb_of_weights():
    data = {"finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "bf16": True,
            "per_device_train_batch_size": 1, "cutoff_len": 2048}
    inputs, est = estimate(data)
    assert inputs.trainable == LORA_8_ALL
    assert est.weights * GIB == pytest.approx(2 * PARAMS + 2 * LORA_8_ALL, rel=1e-6)
    assert 15.9e9 < est.weights * GIB < 16.2e9  # ~16 GB, as every LoRA-on-8B guide says
    assert est.states * GIB == pytest.approx(LORA_8_ALL * 14, rel=1e-6)
    assert est.activations * GIB == pytest.approx(activations(2048), rel=1e-6)
    assert est.overhead == 1.0 and est.total == pytest.approx(est.weights + est.states + est.activations + 1.0)


def test_full_finetuning_under_zero3_on_16_gpus_shards_weights_and_states(tmp_path):
    ds = tmp_path / "ds_z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    data = {"finetuning_type": "full", "bf16": True, "per_device_train_batch_size": 1, "cutoff_len": 1024}
    inputs, est = estimate(data, world=16, zero_stage=3, deepspeed_path=str(ds))
    assert (inputs.engine, inputs.zero_stage, inputs.offload_optimizer) == ("deepspeed", 3, False)
    # 2 bytes/16 per weight, plus DeepSpeed's 4 bytes x the largest gathered module (the embedding)
    assert est.weights * GIB == pytest.approx(2 * PARAMS / 16 + 4 * EMBED, rel=1e-6)
    assert est.states * GIB == pytest.approx(14 * PARAMS / 16, rel=1e-6)  # 7.0 GB
    # unsharded it is ~16 bytes per parameter, which no GPU holds
    _, unsharded = estimate(data, world=16)
    assert unsharded.weights + unsharded.states > 16 * PARAMS / GIB * 0.99
    # offload: the optimizer states leave the GPU, then the weights (only the gathered layer stays)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                    "offload_param": {"device": "cpu"}}}))
    _, offloaded = estimate(data, world=16, zero_stage=3, deepspeed_path=str(ds))
    assert offloaded.states == 0 and offloaded.weights * GIB == pytest.approx(4 * EMBED)


def test_qlora_4bit_quantizes_the_decoder_blocks_only():
    data = {"finetuning_type": "lora", "quantization_bit": 4, "bf16": True, "per_device_train_batch_size": 1,
            "cutoff_len": 1024}
    _, est = estimate(data)
    by_hand = BLOCK_LINEAR * 0.5 + (PARAMS - BLOCK_LINEAR) * 2 + LORA_8_ALL * 2  # embeddings, lm_head stay 16-bit
    assert est.weights * GIB == pytest.approx(by_hand, rel=0.04)  # + NF4's quantization constants
    _, bf16 = estimate(dict(data, quantization_bit=None))
    assert est.weights < 0.4 * bf16.weights


def _refused(fit_inputs, node_gpus):
    return fit.check_nodes({"inputs": fit_inputs.to_dict()}, node_gpus)


def test_a_24gb_node_beside_80gb_nodes_is_refused_with_a_cluster_wide_setting_that_fits():
    data = {"finetuning_type": "lora", "bf16": True, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4, "cutoff_len": 4096}
    inputs, est = estimate(data, world=8 + 8 + 4)
    assert est.total * 1.1 > L4["memory_mib"] / 1024 and est.total * 1.1 < H100["memory_mib"] / 1024
    problems = _refused(inputs, {"gpu-a": [H100] * 8, "gpu-b": [H100] * 8, "gpu-c": [L4] * 4})
    assert len(problems) == 1, problems
    msg = problems[0]
    assert msg.startswith("gpu-c: ") and "NVIDIA L4" in msg and "23034 MiB" in msg and f"{est.total:.1f} GiB" in msg
    assert "on every node, sized for the smallest GPUs" in msg and "accumulation steps" in msg
    # the first setting tried is ZeRO-3, and with it the run fits the 24 GB GPUs
    assert "zero_optimization.stage 3" in msg
    z3 = fit.estimate(fit.options(inputs)[0][1])
    assert z3.total * 1.1 <= L4["memory_mib"] / 1024 and f"estimate {z3.total:.1f} GiB" in msg


def test_the_advice_keeps_batch_times_accumulation(tmp_path):
    """Already ZeRO-3 with offload: only a smaller micro-batch is left, with accumulation raised to match."""
    ds = tmp_path / "ds_z3_offload.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                    "offload_param": {"device": "cpu"}}}))
    data = {"finetuning_type": "lora", "bf16": True, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2, "cutoff_len": 8192}
    inputs, est = estimate(data, world=12, zero_stage=3, deepspeed_path=str(ds))
    problems = _refused(inputs, {"a": [H100] * 8, "b": [L4] * 4})
    assert [p.split(":")[0] for p in problems] == ["b"]  # 8 x 8192 tokens: ~58 GiB of activations
    assert "set zero_optimization" not in problems[0]  # nothing left to shard or offload
    batch, accumulation = map(int, re.search(r"per_device_train_batch_size: (\d+) and gradient_accumulation_steps: "
                                             r"(\d+) \(the same 16 per rank, the same effective batch 192\)",
                                             problems[0]).groups())
    assert batch < 8 and batch * accumulation == 8 * 2
    # by hand: the weights are the gathered embedding only, so the micro-batch is what must shrink
    fits = [b for b in (4, 2, 1) if (4 * EMBED + activations(b * 8192)) / GIB + 1.0 <= L4["memory_mib"] / 1024 / 1.1]
    assert batch == fits[0] == 2


def test_nothing_fits_says_so():
    data = {"finetuning_type": "full", "per_device_train_batch_size": 1, "cutoff_len": 131072}
    inputs, _ = estimate(data, world=2)
    problems = _refused(inputs, {"a": [L4], "b": [L4]})
    assert len(problems) == 2 and "nothing llamafleet tries fits" in problems[0]
    assert "sized for the smallest" not in problems[0]  # the same GPUs everywhere


def test_a_node_without_a_memory_figure_is_skipped():
    data = {"finetuning_type": "lora", "per_device_train_batch_size": 4, "cutoff_len": 4096}
    inputs, _ = estimate(data, world=3)
    inspections = {"a": {"node": {"gpus": [L4]}}, "b": {"node": {"gpus": [{"name": "GPU", "memory_mib": None}]}},
                   "c": {"node": {}}, "d": {"node": {"npus": [{"name": "910B", "memory_mib": None}]}}}
    node_gpus = parity.node_gpus(inspections)
    assert node_gpus["b"][0]["memory_mib"] is None and node_gpus["c"] == []
    assert [p.split(":")[0] for p in _refused(inputs, node_gpus)] == ["a"]
    assert _refused(inputs, {"b": node_gpus["b"], "c": []}) == []


def test_cpu_stacks_and_plans_without_an_estimate_check_nothing(tmp_path):
    class Cfg:
        data = {"finetuning_type": "lora"}
        zero_stage = None
        deepspeed_path = None
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert fit.for_plan(Cfg, 2, True, [str(model)]) == {}
    assert fit.check_nodes({}, {"a": [L4]}) == [] and fit.check_nodes({"skipped": "x"}, {"a": [L4]}) == []
    assert fit.plan_lines({}) == []
    assert "inputs" in fit.for_plan(Cfg, 2, False, [str(model)])


def test_a_hub_model_without_config_is_estimated_from_its_file_sizes(tmp_path):
    class Cfg:
        data = {"finetuning_type": "full", "per_device_train_batch_size": 1}
        zero_stage = None
        deepspeed_path = None
    sizes = {"model-00001-of-00002.safetensors": 10 * 10**9, "model-00002-of-00002.safetensors": 6 * 10**9,
             "config.json": 700}
    got = fit.for_plan(Cfg, 1, False, [None, None], sizes)
    assert got["inputs"]["shape"]["params"] == 8 * 10**9
    assert got["estimate"]["weights"] * GIB == pytest.approx(16e9) and got["estimate"]["activations"] == 0
    assert "activations not counted" in fit.plan_lines(got)[0]
    assert fit.for_plan(Cfg, 1, False, [None], {}) == {
        "skipped": "no config.json of the model on the controller, and no sizes of its files"}


@pytest.fixture
def job(tmp_path):
    """The built-in job with a Llama-3-8B-shaped config.json (no weights: the plan only reads the config)."""
    job = tmp_path / "examples" / "tiny"
    shutil.copytree(PROJECT / "examples" / "tiny", job, ignore=shutil.ignore_patterns("model", "saves"))
    (job / "model").mkdir()
    (job / "model" / "config.json").write_text(json.dumps(LLAMA3_8B))
    return job


def _cluster():
    hv = {"a": {"ansible_host": "10.0.0.1", "llamafleet_gpus": 8, "llamafleet_root": "/srv/a", "llamafleet_master": True},
          "b": {"ansible_host": "10.0.0.2", "llamafleet_gpus": 8, "llamafleet_root": "/srv/b"}}
    return inventory.validate(["a", "b"], hv)


def test_the_plan_shows_the_estimate_and_carries_it_to_the_launch_judgement(job, tmp_path):
    plan = launchplan.make_plan(job / "sft_lora.yaml", _cluster(), lock.load_stack(None, "system"),
                                state_dir=tmp_path / "state", workdir=job.parents[1], run_id="r1")
    assert plan.fit["inputs"]["world_size"] == 16 and plan.arguments["fit"] == plan.fit
    inputs = fit.FitInputs.from_dict(plan.fit["inputs"])
    assert (inputs.batch, inputs.cutoff_len, inputs.trainable) == (2, 128, LORA_8_ALL)  # the yaml's lora_rank 8
    line = next(x for x in plan.format().splitlines() if "memory per GPU" in x)
    e = plan.fit["estimate"]
    assert line.strip() == (f"memory per GPU (estimate): {e['total']:.1f} GiB (weights {e['weights']:.1f}, states "
                            f"{e['states']:.1f}, activations {e['activations']:.1f}, overhead 1.0)")
    assert e["weights"] * GIB == pytest.approx(2 * PARAMS + 2 * LORA_8_ALL)
    cpu = launchplan.make_plan(job / "sft_lora.yaml", _cluster(), lock.load_stack(None, "cpu"),
                               state_dir=tmp_path / "state", workdir=job.parents[1], run_id="r2")
    assert cpu.fit == {} and "memory per GPU" not in cpu.format()


def test_a_config_without_sizes_is_skipped_with_a_note(job, tmp_path):
    (job / "model" / "config.json").write_text('{"model_type": "qwen2"}')
    plan = launchplan.make_plan(job / "sft_lora.yaml", _cluster(), lock.load_stack(None, "system"),
                                state_dir=tmp_path / "state", workdir=job.parents[1], run_id="r1")
    assert "inputs" not in plan.fit and "memory per GPU (estimate): skipped (" in plan.format()
    assert fit.check_nodes(plan.arguments["fit"], {"a": [L4]}) == []


def test_the_launch_judgement_refuses_the_small_node_before_any_rank_starts(tmp_path):
    """The parity action, as the preflight role's launch task calls it: the plan's fit travels in train_config."""
    pytest.importorskip("ansible")
    import sys
    from types import SimpleNamespace
    sys.path.insert(0, str(PROJECT / "collections"))
    from ansible_collections.llamafleet.cluster.plugins.action.parity import ActionModule

    data = {"finetuning_type": "lora", "bf16": True, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4, "cutoff_len": 4096}
    inputs, _ = estimate(data, world=20)
    stack = lock.load_stack(None, "system")
    hostvars = {h: {"__checked": {"node": {"gpus": gpus}, "stack": {"status": "ok"}}}
                for h, gpus in (("gpu-a", [H100] * 8), ("gpu-b", [H100] * 8), ("gpu-c", [L4] * 4))}
    args = {"stack": stack.to_dict(), "nodes": list(hostvars), "results_vars": ["__checked"], "state_dir": str(tmp_path),
            "train_config": {"path": "x.yaml", "keys": [], "allow_extra": True, "fit": {"inputs": inputs.to_dict()}},
            "failure_note": "\nnothing was started on any node"}
    action = ActionModule.__new__(ActionModule)
    action._task = SimpleNamespace(args=args, async_val=0, check_mode=False, action="llamafleet.cluster.parity")
    action._connection = SimpleNamespace(_shell=SimpleNamespace(tmpdir="/tmp"))
    result = action.run(task_vars={"hostvars": hostvars, "ansible_play_hosts_all": list(hostvars)})
    assert result["failed"] and "a node's GPUs cannot hold the run" in result["msg"]
    refused = [p for p in result["problems"] if "estimated memory per GPU" in p]
    assert len(refused) == 1 and refused[0].startswith("gpu-c: its GPUs (NVIDIA L4, 23034 MiB)"), refused
    assert result["msg"].endswith("nothing was started on any node")

"""Per-node fit: will the run's memory per GPU fit every node's GPUs? Estimated before launch.

One formula, used twice: the plan shows the estimate (``for_plan``), and the launch judgement, which has every
node's probed GPU memory, refuses a node whose GPUs are too small and names the first setting that fits
(``check_nodes``). It is a documented approximation (ZeRO paper, DeepSpeed's estimators, Korthikanti et al.
for activations), meant to catch the run that cannot fit, before any rank starts, not to predict the last MiB:

- weights: every parameter x its bytes (2 in bf16/fp16, 4 in fp32; QLoRA: the decoder blocks' linear layers at
  4 or 8 bits, embeddings and lm_head kept in 16 bits), divided by the world size under ZeRO-3 (FSDP FULL_SHARD),
  plus 4 bytes x the largest layer that ZeRO-3 gathers (DeepSpeed's estimator); LoRA adds its adapters.
- states: per trainable parameter, fp32 master weights and Adam's m and v (12 bytes; 8 without a master copy in
  fp32, 4 with pure_bf16) and its gradient (2 bytes, 4 in fp32); ZeRO-1 shards the optimizer states over the
  world, ZeRO-2 the gradients too; optimizer offload moves both to the CPU.
- activations: tokens = per_device_train_batch_size x cutoff_len (the worst case: every sequence full; x2 for
  preference pairs). With gradient checkpointing (LLaMA-Factory's default) one 16-bit hidden state per layer and
  token is kept, 2 x hidden x layers bytes, plus one layer's recomputation during backward, 2 x (6 hidden +
  2 kv width) + 8 x intermediate bytes per token; without it, that layer figure for every layer. Logits: vocab x
  tokens x 4 bytes (the fp32 loss), none with enable_liger_kernel (fused cross-entropy).
- overhead: 1 GiB for the CUDA context, NCCL buffers and the allocator's fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

GIB = 2**30
OVERHEAD_GIB = 1.0
MARGIN = 0.10  # a node's GPUs must hold the estimate and 10% more
_QUANT_BYTES = {4: 0.516, 8: 1.0}  # NF4 with double-quantized constants (~0.13 bit per weight); LLM.int8
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert")
_PAIRED_STAGES = ("dpo", "kto")  # chosen and rejected (or KL) sequences in every example
_NO_REFERENCE = ("orpo", "simpo")  # preference losses without a reference model
_Z3_EXAMPLE = "LLaMA-Factory's examples/deepspeed/ds_z3_config.json"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama, Qwen, Mistral, MoE variants), as its config.json says. ``layers`` 0:
    only the parameter count is known (from the checkpoint's file sizes): activations are not counted."""

    params: int
    layers: int = 0
    hidden: int = 0
    vocab: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    experts: int = 1  # routed experts per MoE layer (1: a dense MLP)
    active_experts: int = 1  # experts each token goes through
    shared_intermediate: int = 0  # an MoE layer's shared expert(s), as one MLP of this width
    source: str = "config.json"

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """The linear layers of one decoder block: name -> (in features, out features, how many)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        out = {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1),
               "gate_proj": (h, i, self.experts), "up_proj": (h, i, self.experts), "down_proj": (i, h, self.experts)}
        if self.shared_intermediate:
            out["shared_expert"] = (h, self.shared_intermediate, 3)  # its gate, up and down projections
        return out

    @property
    def block_linear_params(self) -> int:
        """Parameters of the decoder blocks' linear layers: what bitsandbytes quantizes."""
        if not self.layers:
            return self.params
        return self.layers * sum(a * b * n for a, b, n in self.linears().values())

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder block: its linear layers, two norms and an MoE router."""
        if not self.layers:
            return 0
        router = self.hidden * self.experts if self.experts > 1 else 0
        return self.block_linear_params // self.layers + 2 * self.hidden + router

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest module ZeRO-3 gathers at once: a decoder block or the embedding."""
        return max(self.layer_params, self.vocab * self.hidden)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shape_from_config(config: Mapping[str, Any]) -> ModelShape | None:
    """The shape of a Hugging Face config.json (its ``text_config`` for a vision-language model); None when it
    lacks the sizes (hidden_size, num_hidden_layers, vocab_size, intermediate_size, num_attention_heads)."""
    c = dict(config.get("text_config") or config)
    try:
        h, layers, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
        heads = int(c["num_attention_heads"])
        experts = int(c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 1)
        inter = int(c.get("moe_intermediate_size") if experts > 1 and c.get("moe_intermediate_size")
                    else c["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    shared = int(c.get("shared_expert_intermediate_size") or 0) or inter * int(c.get("n_shared_experts") or 0)
    shape = ModelShape(params=0, layers=layers, hidden=h, vocab=vocab, intermediate=inter, heads=heads,
                       kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=int(c.get("head_dim") or h // heads),
                       experts=experts, active_experts=int(c.get("num_experts_per_tok") or 1) if experts > 1 else 1,
                       shared_intermediate=shared if experts > 1 else 0)
    embed = vocab * h * (1 if c.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return dataclasses.replace(shape, params=layers * shape.layer_params + embed + h)


def shape_from_sizes(files: Mapping[str, int]) -> ModelShape | None:
    """Parameters from a hub checkpoint's weight file sizes (2 bytes each: a 16-bit checkpoint), when the
    controller has no config.json; None when the sizes are not known."""
    total = sum(size for name, size in files.items() if name.endswith((".safetensors", ".bin")))
    return ModelShape(params=total // 2, source="safetensors sizes") if total else None


@dataclasses.dataclass(frozen=True)
class FitInputs:
    """What the memory per GPU depends on, from the yaml, its DeepSpeed (or FSDP) settings and the plan."""

    shape: ModelShape
    finetuning: str  # lora | freeze | full
    trainable: int  # trainable parameters
    weight_bytes: int  # 2 (bf16/fp16) or 4 (fp32)
    quantization_bit: int | None
    pure_bf16: bool
    zero_stage: int  # 0 without DeepSpeed; FSDP's strategies map to 0, 2, 3
    engine: str  # deepspeed | fsdp | "" (neither)
    offload_optimizer: bool
    offload_param: bool
    batch: int  # per_device_train_batch_size
    accumulation: int  # gradient_accumulation_steps
    cutoff_len: int
    gradient_checkpointing: bool
    logits: bool  # False with enable_liger_kernel: the fused loss never holds them
    sequences: int  # sequences per example: 2 for preference pairs
    reference_model: bool  # a frozen copy of the model (dpo/kto of full or freeze tuning)
    world_size: int
    deepspeed: str = ""  # the DeepSpeed config's file name, for the advice

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FitInputs":
        return cls(**dict(d, shape=ModelShape(**d["shape"])))


@dataclasses.dataclass(frozen=True)
class FitEstimate:
    """Memory per GPU, in GiB, by what holds it."""

    weights: float
    states: float
    activations: float
    overhead: float
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return self.weights + self.states + self.activations + self.overhead

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), total=self.total)

    def format(self) -> str:
        return (f"{self.total:.1f} GiB (weights {self.weights:.1f}, states {self.states:.1f}, activations "
                f"{self.activations:.1f}, overhead {self.overhead:.1f})" + "".join(f"; {n}" for n in self.notes))


def estimate(f: FitInputs) -> FitEstimate:
    """The memory per GPU of ``f`` (the formula of this module's docstring)."""
    s, world = f.shape, max(f.world_size, 1)
    quant = _QUANT_BYTES.get(f.quantization_bit or 0)
    base = s.block_linear_params * quant + (s.params - s.block_linear_params) * f.weight_bytes if quant \
        else s.params * f.weight_bytes
    weights = base * (2 if f.reference_model else 1) + (f.trainable * f.weight_bytes if f.finetuning == "lora" else 0)
    if f.zero_stage == 3:
        weights = (0 if f.offload_param else weights / world) + 4 * s.largest_layer
    master = 4 if f.pure_bf16 else 12 if f.weight_bytes == 2 else 8  # fp32 master + Adam m, v (or m, v only)
    states = f.trainable * (master / (world if f.zero_stage >= 1 else 1)
                            + f.weight_bytes / (world if f.zero_stage >= 2 else 1))
    if f.offload_optimizer:
        states = 0.0
    notes = []
    if s.layers:
        tokens = f.batch * f.cutoff_len * f.sequences
        layer = 2 * (6 * s.hidden + 2 * s.kv_heads * s.head_dim) + 8 * (
            s.intermediate * s.active_experts + s.shared_intermediate)
        per_token = 2 * s.hidden * s.layers + layer if f.gradient_checkpointing else layer * s.layers
        activations = tokens * (per_token + (4 * s.vocab if f.logits else 0))
    else:
        activations = 0.0
        notes.append(f"activations not counted (parameters from the {s.source}: no config.json on the controller)")
    return FitEstimate(weights=weights / GIB, states=states / GIB, activations=activations / GIB,
                       overhead=OVERHEAD_GIB, notes=tuple(notes))


def _trainable(data: Mapping[str, Any], shape: ModelShape, kind: str) -> tuple[int, list[str]]:
    """Trainable parameters of ``finetuning_type`` (LLaMA-Factory's defaults: lora_rank 8, lora_target all,
    freeze_trainable_layers 2), and a note when they cannot be counted (only the parameter count is known)."""
    if kind == "full":
        return shape.params, []
    if not shape.layers:
        return 0, [f"the {kind} parameters' states not counted (no config.json)"]
    if kind == "freeze":
        return min(abs(int(data.get("freeze_trainable_layers", 2))), shape.layers) * shape.layer_params, []
    linears = shape.linears()
    names = [t.strip() for t in str(data.get("lora_target") or "all").split(",") if t.strip()]
    if "all" in names or any(n not in linears for n in names):  # other architectures' names: count them all
        names = list(linears)
    adapters = shape.layers * sum(int(data.get("lora_rank", 8)) * (a + b) * n
                                  for a, b, n in (linears[name] for name in names))
    extra = [t.strip() for t in str(data.get("additional_target") or "").split(",")]
    return adapters + sum(shape.vocab * shape.hidden for t in extra if t in ("embed_tokens", "lm_head")), []


def _offloaded(settings: Mapping[str, Any], key: str) -> bool:
    value = settings.get(key)
    device = value.get("device") if isinstance(value, Mapping) else value
    return str(device).lower() in ("cpu", "nvme")


def _sharding(data: Mapping[str, Any], zero_stage: int | None, deepspeed_path: str | None,
              accelerate: Mapping[str, Any] | None) -> tuple[str, int, bool, bool]:
    """(engine, ZeRO stage, optimizer offload, parameter offload): from the yaml's DeepSpeed config, else the
    accelerate config's FSDP or DeepSpeed settings, else the yaml's own ``fsdp`` option. FSDP FULL_SHARD shards
    as ZeRO-3 does, SHARD_GRAD_OP as ZeRO-2; its fsdp_offload_params offloads parameters and optimizer states."""
    if deepspeed_path:
        try:
            with open(deepspeed_path, encoding="utf-8") as fh:
                zero = json.load(fh).get("zero_optimization") or {}
        except (OSError, ValueError, AttributeError):
            zero = {}
        stage = zero_stage or 0
        return "deepspeed", stage, _offloaded(zero, "offload_optimizer"), stage == 3 and _offloaded(zero, "offload_param")
    acc = accelerate or {}
    kind = str(acc.get("distributed_type") or "").upper()
    if kind == "FSDP":
        fc = acc.get("fsdp_config") or {}
        strategy = str(fc.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        stage = {"SHARD_GRAD_OP": 2, "2": 2, "NO_SHARD": 0, "3": 0}.get(strategy, 3)
        if str(fc.get("fsdp_version")) == "2" and fc.get("fsdp_reshard_after_forward") is False:
            stage = 2
        offload = bool(fc.get("fsdp_offload_params"))
        return "fsdp", stage, offload, offload and stage == 3
    if kind == "DEEPSPEED":
        dc = acc.get("deepspeed_config") or {}
        stage = int(dc.get("zero_stage") or 0)
        return ("deepspeed", stage, _offloaded(dc, "offload_optimizer_device"),
                stage == 3 and _offloaded(dc, "offload_param_device"))
    fsdp = str(data.get("fsdp") or "")
    if "shard" in fsdp:  # TrainingArguments' fsdp: "full_shard auto_wrap", "shard_grad_op", "hybrid_shard offload"
        stage = 2 if "shard_grad_op" in fsdp else 3
        return "fsdp", stage, "offload" in fsdp, "offload" in fsdp and stage == 3
    return "", 0, False, False


def inputs_for(data: Mapping[str, Any], shape: ModelShape, *, world_size: int, zero_stage: int | None = None,
               deepspeed_path: str | None = None, accelerate: Mapping[str, Any] | None = None) -> tuple[FitInputs, list[str]]:
    """The fit inputs of a LLaMA-Factory yaml's ``data`` on ``shape``, with notes on what is not counted.

    Weights are 2 bytes with or without bf16/fp16: on GPUs LLaMA-Factory loads the model in a 16-bit dtype
    either way (infer_optim_dtype), and the trainable parameters it upcasts to fp32 cost the same 16 bytes."""
    kind = str(data.get("finetuning_type") or "lora")
    trainable, notes = _trainable(data, shape, kind)
    engine, stage, offload_optimizer, offload_param = _sharding(data, zero_stage, deepspeed_path, accelerate)
    stage_name = str(data.get("stage") or "sft")
    paired = stage_name in _PAIRED_STAGES
    reference = paired and str(data.get("pref_loss") or "sigmoid") not in _NO_REFERENCE and (
        kind != "lora" or bool(data.get("ref_model")))
    bits = data.get("quantization_bit")
    f = FitInputs(shape=shape, finetuning=kind, trainable=trainable, weight_bytes=2,
                  quantization_bit=int(bits) if bits in (4, 8) else None, pure_bf16=data.get("pure_bf16") is True,
                  zero_stage=stage, engine=engine, offload_optimizer=offload_optimizer, offload_param=offload_param,
                  batch=int(data.get("per_device_train_batch_size", 8)),
                  accumulation=int(data.get("gradient_accumulation_steps", 1)),
                  cutoff_len=int(data.get("cutoff_len", 2048)),
                  gradient_checkpointing=data.get("disable_gradient_checkpointing") is not True,
                  logits=data.get("enable_liger_kernel") is not True and stage_name != "rm",
                  sequences=2 if paired else 1, reference_model=reference, world_size=world_size,
                  deepspeed=os.path.basename(deepspeed_path) if deepspeed_path else "")
    return f, notes


def _read_shape(model_dirs: Sequence[str | os.PathLike | None],
                hub_files: Mapping[str, int] | None) -> tuple[ModelShape | None, str]:
    """The model's shape from the first of ``model_dirs`` that has a config.json on the controller, else from
    the hub checkpoint's file sizes; (None, why) when neither is there."""
    for d in model_dirs:
        path = os.path.join(str(d), "config.json") if d else ""
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    shape = shape_from_config(json.load(fh))
            except (OSError, ValueError, AttributeError):
                shape = None
            return shape, "" if shape else (f"{path} lacks hidden_size, num_hidden_layers, vocab_size, "
                                            "intermediate_size or num_attention_heads")
    shape = shape_from_sizes(hub_files or {})
    return shape, "" if shape else "no config.json of the model on the controller, and no sizes of its files"


def for_plan(cfg: Any, world_size: int, cpu_only: bool, model_dirs: Sequence[str | os.PathLike | None],
             hub_files: Mapping[str, int] | None = None, accelerate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The plan's fit (``cfg``: a trainconfig.TrainingConfig): ``{"inputs", "estimate"}``, what the launch
    judgement checks each node against, or ``{"skipped": why}``; ``{}`` on a CPU stack, where nothing is checked."""
    if cpu_only:
        return {}
    shape, why = _read_shape(model_dirs, hub_files)
    if shape is None:
        return {"skipped": why}
    f, notes = inputs_for(cfg.data, shape, world_size=world_size, zero_stage=cfg.zero_stage,
                          deepspeed_path=cfg.deepspeed_path, accelerate=accelerate)
    est = estimate(f)
    return {"inputs": f.to_dict(), "estimate": dataclasses.replace(est, notes=est.notes + tuple(notes)).to_dict()}


def plan_lines(fit: Mapping[str, Any]) -> list[str]:
    """The plan's line about memory per GPU (none on a CPU stack)."""
    if not fit:
        return []
    if "estimate" not in fit:
        return [f"memory per GPU (estimate): skipped ({fit.get('skipped')})"]
    e = fit["estimate"]
    est = FitEstimate(e["weights"], e["states"], e["activations"], e["overhead"], tuple(e.get("notes") or ()))
    return ["memory per GPU (estimate): " + est.format()]


def _smaller_batches(f: FitInputs) -> list[int]:
    """Micro-batches below ``f.batch`` that divide batch x accumulation, largest first: with accumulation
    raised to match, each keeps the effective batch."""
    per_rank = f.batch * f.accumulation
    return [b for b in range(f.batch - 1, 0, -1) if per_rank % b == 0]


def _sharding_steps(f: FitInputs) -> list[tuple[str, FitInputs]]:
    """ZeRO-3 (when not already), then optimizer offload, then parameter offload, each on top of the one before."""
    steps, cur = [], f
    fsdp = f.engine == "fsdp"
    if f.zero_stage != 3:
        cur = dataclasses.replace(cur, zero_stage=3, engine=f.engine or "deepspeed")
        steps.append(("set fsdp_sharding_strategy: FULL_SHARD in the accelerate config" if fsdp else
                      f"set zero_optimization.stage: 3 in {f.deepspeed}" if f.deepspeed else
                      f"use DeepSpeed ZeRO-3 (deepspeed: a config with zero_optimization.stage 3, e.g. {_Z3_EXAMPLE})",
                      cur))
    if not cur.offload_optimizer:
        cur = dataclasses.replace(cur, offload_optimizer=True, offload_param=fsdp)
        steps.append(("set fsdp_offload_params: true (parameters and optimizer states on the CPU)" if fsdp else
                      "set zero_optimization.offload_optimizer.device: cpu", cur))
    if not cur.offload_param:
        cur = dataclasses.replace(cur, offload_param=True)
        steps.append(("set zero_optimization.offload_param.device: cpu", cur))
    return steps


def options(f: FitInputs) -> list[tuple[str, FitInputs]]:
    """The settings the advice tries, in order, each with the inputs it gives: the sharding steps, then a
    smaller per_device_train_batch_size with gradient_accumulation_steps raised (batch x accumulation kept),
    alone, then with every sharding step. Each is cluster-wide: every rank must take the same micro-batch and
    the same number of accumulation steps, or the ranks' collectives no longer pair up and hang."""
    steps = _sharding_steps(f)
    out = [(" and ".join(text for text, _ in steps[:i + 1]), g) for i, (_, g) in enumerate(steps)]
    bases = [("", f)] + ([(out[-1][0] + " and ", steps[-1][1])] if steps else [])
    for prefix, base in bases:
        for b in _smaller_batches(f):
            a = f.batch * f.accumulation // b
            out.append((f"{prefix}set per_device_train_batch_size: {b} and gradient_accumulation_steps: {a} (the same "
                        f"{b * a} per rank, the same effective batch {b * a * f.world_size})",
                        dataclasses.replace(base, batch=b, accumulation=a)))
    return out


def advise(f: FitInputs, memory_gib: float) -> str:
    """The first of ``options`` whose estimate, with the margin, fits GPUs of ``memory_gib``."""
    for text, g in options(f):
        need = estimate(g).total
        if need * (1 + MARGIN) <= memory_gib:
            return f"{text} (estimate {need:.1f} GiB per GPU)"
    last = options(f)[-1][1] if options(f) else f
    return (f"nothing llamafleet tries fits: ZeRO-3 with optimizer and parameter offload at per_device_train_batch_size "
            f"{last.batch} still needs {estimate(last).total:.1f} GiB per GPU; use GPUs with more memory, LoRA or "
            "QLoRA (quantization_bit: 4), or a smaller cutoff_len")


def _smallest_gpu(gpus: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The node's GPU with the least memory the probe reported, or None when it reported no figure."""
    known = [g for g in gpus or () if isinstance(g.get("memory_mib"), (int, float)) and g["memory_mib"] > 0]
    return min(known, key=lambda g: g["memory_mib"]) if known else None


def check_nodes(fit: Mapping[str, Any] | None, node_gpus: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """One problem for each node whose GPUs hold less than the plan's estimate with the margin, naming the first
    setting that fits the smallest GPUs of the cluster (the change must be the same on every node). Nodes whose
    probe gave no memory figure are skipped; a plan without an estimate (a CPU stack, no model config) checks
    nothing."""
    if not fit or "inputs" not in fit:
        return []
    f = FitInputs.from_dict(fit["inputs"])
    est = estimate(f)
    need = est.total * (1 + MARGIN)
    smallest = {n: g for n, gpus in node_gpus.items() if (g := _smallest_gpu(gpus)) is not None}
    small = [n for n, g in smallest.items() if g["memory_mib"] / 1024 < need]
    if not small:
        return []
    least = min(g["memory_mib"] for g in smallest.values())
    differ = len({g["memory_mib"] for g in smallest.values()}) > 1
    advice = advise(f, least / 1024)
    scope = ("on every node, sized for the smallest GPUs of the cluster" if differ else "on every node") + (
        " (ranks run in lockstep: each takes the same micro-batch and accumulation steps, or the collectives hang)")
    return [f"{n}: its GPUs ({smallest[n].get('name') or 'GPU'}, {smallest[n]['memory_mib']} MiB) hold less than the "
            f"estimated memory per GPU, {est.format()}, with a {MARGIN:.0%} margin ({need:.1f} GiB); "
            f"{scope}: {advice}" for n in small]

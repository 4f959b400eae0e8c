# -*- coding: utf-8 -*-
"""vLLM's command line for a llamafleet run: its LoRA rank, tensor parallel size and argv, written once.

Pure functions of the run's files (``adapter_config.json``, the model's ``config.json``) and the node's GPU count,
used by the serve module on the node and by the unit tests. The rules are vLLM's own:
- ``--max-lora-rank`` must be one of ``LORA_RANKS`` (vLLM's LoRAConfig refuses any other value) and at least the
  adapter's ``r``: the adapter's rank is rounded up to the next allowed value;
- the tensor parallel size divides the model's attention heads, and its key/value heads divide it or it divides
  them (vLLM's check when it shards the attention layers), and is at most the node's GPUs; unasked, it is the
  largest power of two that does.
The API key never appears here: vLLM reads it from ``VLLM_API_KEY`` in the server's 0600 env file.
"""

from __future__ import annotations

import json
import os

# vllm/config/lora.py (LoRAConfig): possible_max_ranks
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KEY_ENV = "VLLM_API_KEY"


class VllmError(ValueError):
    """A run that vLLM cannot serve as asked: the message names the file or setting and the fix."""


def lora_rank(rank, source="adapter_config.json"):
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise VllmError("%s: r is %r; a LoRA adapter's rank is a positive integer" % (source, rank))
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise VllmError("%s: r is %d, above the largest LoRA rank vLLM serves (%d); merge the adapter "
                    "(llamafleet export RUN_ID) and serve the export, or serve with --backend api"
                    % (source, rank, LORA_RANKS[-1]))


def _heads_ok(tp, heads, kv_heads):
    if heads and heads % tp:
        return False
    if kv_heads and not (kv_heads % tp == 0 or tp % kv_heads == 0):
        return False
    return True


def tensor_parallel(gpus, heads=None, kv_heads=None, asked=0):
    """The tensor parallel size: ``asked`` when it is valid, else the largest power of two up to ``gpus`` that vLLM
    can shard this model's heads over (powers of two: the MLP and vocabulary shards of common models divide too)."""
    gpus = max(1, int(gpus or 1))
    if asked:
        if asked > gpus:
            raise VllmError("tensor parallel size %d is more than the node's %d GPU(s) (llamafleet_gpus); use at "
                            "most %d, or serve on a node with more GPUs" % (asked, gpus, gpus))
        if not _heads_ok(asked, heads, kv_heads):
            raise VllmError("tensor parallel size %d does not divide the model's %s attention heads (key/value heads "
                            "%s); use one of %s" % (asked, heads, kv_heads, ", ".join(
                                str(t) for t in range(1, gpus + 1) if _heads_ok(t, heads, kv_heads))))
        return asked
    tp = 1
    while tp * 2 <= gpus and _heads_ok(tp * 2, heads, kv_heads):
        tp *= 2
    return tp


def read_json(path):
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_heads(model_dir):
    """(attention heads, key/value heads) from a model directory's config.json; (None, None) when unknown
    (a hub id not in a local directory): vLLM checks them itself then."""
    cfg = read_json(os.path.join(model_dir, "config.json")) if model_dir and os.path.isdir(model_dir) else None
    if not cfg:
        return None, None
    cfg = cfg.get("text_config") or cfg
    heads = cfg.get("num_attention_heads")
    return heads, cfg.get("num_key_value_heads") or heads


def has_chat_template(directory):
    """Whether the tokenizer saved in ``directory`` carries a chat template (LLaMA-Factory saves its template
    there): vLLM then takes the tokenizer from it, so the adapter answers in the template it was trained with."""
    if os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        return True
    cfg = read_json(os.path.join(directory, "tokenizer_config.json")) or {}
    return bool(cfg.get("chat_template"))


def argv(vllm_bin, *, model, name, host, port, gpus, adapter=None, lora_r=None, heads=None, kv_heads=None,
         tensor_parallel_size=0, trust_remote_code=False, tokenizer=None, extra=()):
    """``vllm serve`` for the base model with the run's adapter as the LoRA module ``name`` (the base is listed as
    ``name-base``), or for a merged model served as ``name`` when ``adapter`` is None."""
    tp = tensor_parallel(gpus, heads, kv_heads, tensor_parallel_size)
    out = [vllm_bin, "serve", model, "--host", host, "--port", str(int(port)), "--tensor-parallel-size", str(tp)]
    if adapter:
        out += ["--served-model-name", name + "-base", "--enable-lora", "--lora-modules", "%s=%s" % (name, adapter),
                "--max-lora-rank", str(lora_rank(lora_r)), "--max-loras", "1"]
    else:
        out += ["--served-model-name", name]
    if tokenizer:
        out += ["--tokenizer", tokenizer]
    if trust_remote_code:
        out.append("--trust-remote-code")
    for arg in extra:
        if not isinstance(arg, str) or arg.split("=", 1)[0] in ("--api-key",):
            raise VllmError("serve_vllm_args: %r; give the API key with --api-key-env or $LLAMAFLEET_API_KEY, never "
                            "on a command line" % (arg if isinstance(arg, str) else type(arg).__name__))
        out.append(arg)
    return out

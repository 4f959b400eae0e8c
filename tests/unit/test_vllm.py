"""vLLM's command line for a run (module_utils/vllm.py): the LoRA rank rounded up to the values vLLM accepts, the
tensor parallel size within the node's GPUs and the model's heads, and an argv that never carries the key."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "collections"))
from ansible_collections.llamafleet.cluster.plugins.module_utils import vllm  # noqa: E402


@pytest.mark.parametrize("r,expected", [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (64, 64), (100, 128),
                                        (256, 256), (257, 320), (320, 320), (321, 512), (512, 512)])
def test_the_adapter_rank_is_rounded_up_to_a_rank_vllm_accepts(r, expected):
    assert vllm.lora_rank(r) == expected
    assert expected in vllm.LORA_RANKS


@pytest.mark.parametrize("r", [0, -8, None, "16", 8.0, True])
def test_a_rank_that_is_not_a_positive_integer_is_named(r):
    with pytest.raises(vllm.VllmError, match=r"adapter_config.json: r is .*positive integer"):
        vllm.lora_rank(r)


def test_a_rank_above_vllms_largest_says_to_merge_or_use_the_api():
    with pytest.raises(vllm.VllmError, match=r"r is 1024, above the largest LoRA rank vLLM serves \(512\).*llamafleet "
                                             r"export RUN_ID.*--backend api"):
        vllm.lora_rank(1024)


@pytest.mark.parametrize("gpus,heads,kv,expected", [
    (8, 32, 8, 8),      # Llama-3-8B: 32 heads, 8 kv heads
    (4, 32, 8, 4),
    (1, 32, 8, 1),
    (8, 28, 4, 4),      # Qwen2.5-7B: 28 heads, 4 kv heads: 8 does not divide 28
    (8, 40, 40, 8),     # Llama-2-13B
    (8, 12, 12, 4),     # 12 heads: 6 divides them, but only powers of two are chosen unasked
    (16, 32, 8, 16),    # 16 > 8 kv heads: each is replicated twice (16 % 8 == 0)
    (6, 32, 8, 4),      # 6 GPUs: the largest power of two is 4
    (8, None, None, 8), # heads unknown (a hub id): vLLM checks them itself
    (3, None, None, 2),
])
def test_the_tensor_parallel_size_fits_the_gpus_and_the_heads(gpus, heads, kv, expected):
    tp = vllm.tensor_parallel(gpus, heads, kv)
    assert tp == expected and tp <= gpus
    if heads:
        assert heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def test_an_asked_tensor_parallel_size_beyond_the_gpus_or_the_heads_is_refused_with_the_valid_ones():
    assert vllm.tensor_parallel(8, 12, 12, asked=6) == 6
    with pytest.raises(vllm.VllmError, match=r"tensor parallel size 8 is more than the node's 4 GPU\(s\).*at most 4"):
        vllm.tensor_parallel(4, 32, 8, asked=8)
    with pytest.raises(vllm.VllmError, match=r"size 8 does not divide the model's 28 attention heads.*use one of 1, 2, 4$"):
        vllm.tensor_parallel(8, 28, 4, asked=8)


def _adapter_run(tmp_path, heads=32, kv=8, r=16, template=True):
    base, adapter = tmp_path / "base", tmp_path / "output"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    if template:
        (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return base, adapter


def test_the_argv_serves_the_adapter_as_the_runs_model_name_with_its_rank_and_the_nodes_gpus(tmp_path):
    base, adapter = _adapter_run(tmp_path, r=12)
    heads, kv = vllm.model_heads(str(base))
    assert (heads, kv) == (32, 8)
    argv = vllm.argv("/srv/lf/stacks/stack-abc/bin/vllm", model=str(base), name="run1", host="10.0.0.11", port=8000,
                     gpus=8, adapter=str(adapter), lora_r=12, heads=heads, kv_heads=kv,
                     tokenizer=str(adapter) if vllm.has_chat_template(str(adapter)) else None)
    assert argv[:3] == ["/srv/lf/stacks/stack-abc/bin/vllm", "serve", str(base)]

    def after(flag):
        return argv[argv.index(flag) + 1]

    assert after("--host") == "10.0.0.11" and after("--port") == "8000"
    assert after("--tensor-parallel-size") == "8"
    assert "--enable-lora" in argv and after("--lora-modules") == f"run1={adapter}"
    assert after("--max-lora-rank") == "16" and after("--served-model-name") == "run1-base"
    assert after("--tokenizer") == str(adapter)
    assert not any("key" in a.lower() for a in argv)


def test_an_export_is_served_as_the_model_name_without_lora(tmp_path):
    base, _ = _adapter_run(tmp_path, heads=28, kv=4)
    argv = vllm.argv("vllm", model=str(base), name="run1", host="127.0.0.1", port=9000, gpus=8,
                     heads=28, kv_heads=4, trust_remote_code=True, extra=["--max-model-len=4096"])
    assert "--enable-lora" not in argv and "--lora-modules" not in argv
    assert argv[argv.index("--served-model-name") + 1] == "run1"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[-2:] == ["--trust-remote-code", "--max-model-len=4096"]


def test_no_chat_template_means_the_base_tokenizer_and_unknown_heads_mean_none(tmp_path):
    _, adapter = _adapter_run(tmp_path, template=False)
    assert not vllm.has_chat_template(str(adapter))
    assert vllm.model_heads("Qwen/Qwen2.5-7B-Instruct") == (None, None)


@pytest.mark.parametrize("extra", [["--api-key", "sk-1"], ["--api-key=sk-1"]])
def test_the_api_key_is_never_accepted_on_the_command_line(extra):
    with pytest.raises(vllm.VllmError, match=r"serve_vllm_args: '--api-key.*never on a command line"):
        vllm.argv("vllm", model="m", name="n", host="h", port=1, gpus=1, extra=extra)
    assert vllm.KEY_ENV == "VLLM_API_KEY"

"""The tiny local model of the built-in job: it loads, and its tokenizer round-trips chat text.

Needs transformers, tokenizers and torch (a node's stack venv), so it is skipped on the controller.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from llamafleet.tinymodel import build_tiny_model, read_texts  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "data" / "tiny_alpaca.jsonl"
CHAT = [
    {"role": "user", "content": "Write the word backwards.\nriver"},
    {"role": "assistant", "content": "river backwards is revir. Ünïcode and emoji 🙂 too."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", read_texts([DATA]))


def test_model_loads_and_runs(model_dir):
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings and config.vocab_size % 64 == 0 and config.vocab_size >= len(tokenizer)
    ids = tokenizer("What is 1 plus 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)


def test_tokenizer_round_trips_chat_text(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == text.count(token)


def test_saved_tokenizer_names_a_class_transformers_4_has(model_dir):
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in config["chat_template"]


def test_build_is_deterministic(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "model", read_texts([DATA]))

    def digest(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(directory).iterdir()}

    assert digest(again) == digest(model_dir)

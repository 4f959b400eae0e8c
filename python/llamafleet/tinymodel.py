"""Build a tiny random Qwen2 model and its tokenizer locally, for the built-in job (no hub needed).

The tokenizer is a byte-level BPE trained on the job's own dataset text, with Qwen's ChatML
special tokens, so LLaMA-Factory's ``template: qwen`` works with it. The build is deterministic
(fixed seed), so every node can build the same model itself, in seconds.

This file imports nothing from llamafleet: a node's stack venv (transformers, tokenizers, torch)
runs it as a script, ``python tinymodel.py OUT_DIR --data FILE``, or ``python -m llamafleet.tinymodel``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_VOCAB = 1024  # an upper bound: a small corpus stops merging earlier
VOCAB_MULTIPLE = 64


def build_tiny_model(out_dir: str | os.PathLike[str], texts: Iterable[str], *, seed: int = 0) -> str:
    """Train the tokenizer on ``texts``, save it and a random model to ``out_dir``; return its path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = os.path.abspath(out_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=SPECIAL_TOKENS,  # ids 0-2, whole tokens, never split
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte can be encoded
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    _portable_tokenizer_class(out)

    config = Qwen2Config(
        vocab_size=math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def _portable_tokenizer_class(out: str) -> None:
    """Make the saved tokenizer loadable by transformers 4 too.

    transformers 5 records ``TokenizersBackend``, a class transformers 4 lacks, and keeps the chat
    template only in chat_template.jinja, which older 4.x releases do not read.
    """
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHATML_TEMPLATE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def read_texts(paths: Iterable[str]) -> list[str]:
    """Every string in the records of JSON (array) or JSON-lines files, in order."""
    texts: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        texts += _strings(records)
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the model to")
    parser.add_argument("--data", action="append", required=True, help="JSON/JSON-lines file to train the tokenizer on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, read_texts(args.data), seed=args.seed))


if __name__ == "__main__":
    main()

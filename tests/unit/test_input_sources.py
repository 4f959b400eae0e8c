"""Inputs where they live: a model directory's fingerprint, models compared across nodes, hub revisions
pinned with the real client, and a yaml checked against what the nodes' LLaMA-Factory accepts."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from conftest import PROJECT
from hubserver import HubServer
from llamafleet import hub, parity, trainconfig
from llamafleet.errors import ConfigError
from llamafleet.lock import load_stack

sys.path.insert(0, str(PROJECT / "collections"))

from ansible_collections.llamafleet.cluster.plugins.module_utils.modelcheck import fingerprint  # noqa: E402


def safetensors(tensors: dict[str, int]) -> bytes:
    """A valid safetensors file: each tensor a run of bytes (uint8) of the given length."""
    header, offset = {}, 0
    for name, size in tensors.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\1" * offset


def write_model(path, weights=b"", **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights or safetensors({"w": 64, "b": 8}))
    for name, data in extra.items():
        (path / name).write_bytes(data)
    return path


def test_a_complete_model_directory_has_no_problems(tmp_path):
    fp = fingerprint(str(write_model(tmp_path / "m")))
    assert fp["present"] and fp["problems"] == []
    assert fp["files"]["model.safetensors"].split()[1].startswith("header:")
    assert fp["files"]["config.json"].split()[1].startswith("sha256:")


def test_truncated_weights_missing_shards_and_wrong_sizes_are_named(tmp_path):
    whole = safetensors({"w": 64})
    m = write_model(tmp_path / "m", weights=whole[:-10])
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors",
                                                                               "v": "model-2.safetensors"}}))
    problems = fingerprint(str(m), {"config.json": 999, "tokenizer.json": 2})["problems"]
    assert any("model.safetensors is truncated" in p for p in problems), problems
    assert any("names model-2.safetensors, which is missing" in p for p in problems), problems
    assert any("config.json has 23 bytes, the hub's commit has 999" in p for p in problems), problems
    assert not any("tokenizer.json" in p for p in problems)
    assert fingerprint(str(tmp_path / "absent"))["problems"] == [f"{tmp_path / 'absent'} does not exist"]
    (tmp_path / "x").mkdir()
    assert {"config.json is missing: not a saved model directory", "no weight file (*.safetensors, *.bin)"} <= \
        set(fingerprint(str(tmp_path / "x"))["problems"])


def test_models_that_differ_between_nodes_fail_parity_file_by_file(tmp_path):
    a = fingerprint(str(write_model(tmp_path / "a")))
    b = fingerprint(str(write_model(tmp_path / "b", weights=safetensors({"w": 64, "b": 9}))))
    stack = load_stack(None, "cpu")
    base = parity.ParityReport(ok=True, lock_file="", flavor="cpu", stack_hash=stack.hash, nodes=("n1", "n2"),
                               rows=(), problems=(), warnings=())
    same = parity.compare_model({"n1": a, "n2": a}, label="/m", reference="n1", report=base)
    assert same.ok and same.rows[-1].component == "model /m"
    differ = parity.compare_model({"n1": a, "n2": b}, label="/m", reference="n1", report=base)
    assert not differ.ok
    assert [r.component for r in differ.rows if r.bad] == ["model: model.safetensors"]
    assert differ.problems[0].startswith("n2: model file model.safetensors is ")
    assert "model: model.safetensors" in differ.table(only_problems=True)


def test_hub_revisions_are_pinned_with_the_real_client(tmp_path):
    with HubServer(tmp_path / "hub", token="t0k") as server:
        sha = server.repos.commit("org/tiny", {"config.json": b"{}", "model.safetensors": safetensors({"w": 4})})
        rev = hub.resolve("huggingface", "model", "org/tiny", "main", endpoint=server.url, token="t0k", what="m")
        assert rev.commit == sha and rev.files["model.safetensors"] == len(safetensors({"w": 4}))
        assert rev.cache_subdir == f"models--org--tiny/snapshots/{sha}"
        moved = server.repos.commit("org/tiny", {"config.json": b'{"a": 1}'})
        assert hub.resolve("huggingface", "model", "org/tiny", sha, endpoint=server.url, token="t0k",
                           what="m").commit == sha != moved
        with pytest.raises(ConfigError, match="has no revision 'nope'"):
            hub.resolve("huggingface", "model", "org/tiny", "nope", endpoint=server.url, token="t0k", what="m")
        with pytest.raises(ConfigError, match="org/absent is not on"):
            hub.resolve("huggingface", "model", "org/absent", "main", endpoint=server.url, token="t0k", what="m")
        with pytest.raises(ConfigError, match="HF_TOKEN"):
            hub.resolve("huggingface", "model", "org/tiny", "main", endpoint=server.url, token=None, what="m")
    with pytest.raises(ConfigError, match="cannot reach the hub"):  # the server is gone
        hub.resolve("huggingface", "model", "org/tiny", "main", endpoint=server.url, token=None, what="m")
    pinned = hub.resolve("huggingface", "model", "org/tiny", sha, endpoint=server.url, token=None, what="m")
    assert pinned.commit == sha and pinned.files == {}  # already a commit: the nodes can still fetch it


def test_the_hub_llamafactory_would_use(monkeypatch):
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    assert hub.hub_of({}) == "huggingface" and hub.hub_of({"USE_MODELSCOPE_HUB": "1"}) == "modelscope"
    with pytest.raises(ConfigError, match="USE_OPENMIND_HUB"):
        hub.hub_of({"USE_OPENMIND_HUB": "true"})
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert hub.endpoint_and_token({}) == ("https://mirror.example", None)
    assert hub.endpoint_and_token({"HF_ENDPOINT": "http://m2", "HF_TOKEN": "x"}) == ("http://m2", "x")


SURFACE = {"version": "0.9.5", "args": ["learning_rate", "lora_rank", "template", "stage"], "templates": ["qwen", "llama3"]}


def test_unknown_keys_and_templates_name_the_closest_valid_one():
    problems = trainconfig.check_arguments("x.yaml", ["learning_rat", "stage", "zzz"], "qwenn", SURFACE, "on node1")
    assert problems[0] == ("x.yaml: learning_rat: not an argument of LLaMA-Factory 0.9.5 (on node1); did you mean "
                           "learning_rate? fix or remove it (ALLOW_EXTRA_ARGS=1 in train_env passes it anyway)")
    assert problems[1].startswith("x.yaml: zzz: not an argument") and "did you mean" not in problems[1]
    assert "template: 'qwenn' is not a template of LLaMA-Factory 0.9.5 (on node1); did you mean qwen?" in problems[2]
    assert trainconfig.check_arguments("x.yaml", ["anything"], "q", {}, "on n") == []  # nothing known: no judgement


def test_precision_the_stack_would_refuse(tmp_path):
    def cfg(**data):
        return trainconfig.TrainingConfig(path="x.yaml", data=data, dataset_dir="", dataset_info_path=None, datasets=(),
                                          deepspeed_path=None, zero_stage=None,
                                          model=trainconfig.ModelRef(value="m", source="nodes"), warnings=())
    assert "both are true" in trainconfig.check_precision(cfg(fp16=True, bf16=True), cpu_only=False)[0]
    assert "fp16 mixed precision needs GPUs" in trainconfig.check_precision(cfg(fp16=True), cpu_only=True)[0]
    assert "unless use_cpu is true" in trainconfig.check_precision(cfg(bf16=True), cpu_only=True)[0]
    assert trainconfig.check_precision(cfg(bf16=True, use_cpu=True), cpu_only=True) == []
    assert trainconfig.check_precision(cfg(bf16=True), cpu_only=False) == []

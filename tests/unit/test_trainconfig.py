"""Checking a LLaMA-Factory training yaml on the controller, planning it, rewriting it for nodes."""

from __future__ import annotations

import json

import pytest
import yaml

from llamafleet.errors import ConfigError
from llamafleet.inventory import validate
from llamafleet import trainconfig
from llamafleet.trainconfig import node_dataset_info, node_files, plan, rewrite_for_node

RECORDS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(10)]
CHAT = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}] * 4


def load_training(path, **kw):
    """As llamafactory-cli run from the job's directory: relative paths start there."""
    kw.setdefault("workdir", path.parent)
    return trainconfig.load_training(path, **kw)


def write_job(root, *, yaml_text=None, info=None, records=RECORDS, ds_json=None, **overrides):
    """A valid job under ``root`` (yaml, data/, model/), then ``overrides`` applied to the yaml."""
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "data" / "chat.json").write_text(json.dumps(CHAT))
    info = info if info is not None else {
        "train": {"file_name": "train.jsonl"},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt"},
    }
    (root / "data" / "dataset_info.json").write_text(json.dumps(info))
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    if ds_json is not None:
        (root / "ds.json").write_text(ds_json)
    config = {
        "model_name_or_path": "model", "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "train", "template": "qwen", "cutoff_len": 64, "output_dir": "saves/run",
        "per_device_train_batch_size": 2, "learning_rate": 1.0e-4, "num_train_epochs": 1.0,
    }
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    path = root / "train.yaml"
    path.write_text(yaml_text if yaml_text is not None else yaml.safe_dump(config))
    return path


def only_problem(path, **kw):
    """The single problem load_training reports; it must name the file it is about."""
    with pytest.raises(ConfigError) as err:
        load_training(path, **kw)
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


def test_good_config(tmp_path):
    cfg = load_training(write_job(tmp_path, ds_json="{}", deepspeed="ds.json", eval_dataset="chat"))
    assert cfg.path == str(tmp_path / "train.yaml")
    assert cfg.data["template"] == "qwen"
    assert cfg.model_dir == str(tmp_path / "model")
    assert cfg.dataset_info_path == str(tmp_path / "data" / "dataset_info.json")
    assert [(d.name, d.split, d.samples) for d in cfg.datasets] == [("train", "train", 10), ("chat", "eval", 4)]
    assert cfg.train_samples == 10
    assert cfg.deepspeed_path == str(tmp_path / "ds.json") and cfg.zero_stage == 0
    assert set(cfg.files) == {str(tmp_path / p) for p in
                              ("data/dataset_info.json", "data/train.jsonl", "data/chat.json", "ds.json", "model")}
    assert cfg.warnings == ()


def test_deepspeed_zero_stage_is_reported(tmp_path):
    cfg = load_training(write_job(tmp_path, ds_json='{"zero_optimization": {"stage": 3}}', deepspeed="ds.json"))
    assert cfg.zero_stage == 3


def test_unknown_dataset(tmp_path):
    msg = only_problem(write_job(tmp_path, dataset="train,missing"))
    assert "train.yaml: dataset:" in msg and "'missing' is not defined in" in msg and "dataset_info.json" in msg


def test_missing_data_file(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "data" / "train.jsonl").unlink()
    msg = only_problem(path)
    assert "dataset_info.json: dataset 'train': file_name:" in msg and "train.jsonl does not exist" in msg


def test_wrong_column_name(tmp_path):
    info = {"train": {"file_name": "train.jsonl", "columns": {"prompt": "question", "response": "output"}}}
    msg = only_problem(write_job(tmp_path, info=info))
    assert "dataset_info.json: dataset 'train': columns:" in msg and "'question'" in msg and "columns.prompt" in msg


def test_default_columns_must_exist_when_columns_is_absent(tmp_path):
    records = [{"instruction": "a", "output": "b"}]  # no "input": LLaMA-Factory would fail with KeyError
    msg = only_problem(write_job(tmp_path, records=records))
    assert "'input'" in msg and "no \"columns\"" in msg


def test_invalid_deepspeed_json(tmp_path):
    msg = only_problem(write_job(tmp_path, ds_json="{not json", deepspeed="ds.json"))
    assert "train.yaml: deepspeed:" in msg and "ds.json is not valid JSON" in msg


def test_deepspeed_file_missing(tmp_path):
    msg = only_problem(write_job(tmp_path, deepspeed="nowhere.json"))
    assert "train.yaml: deepspeed: cannot read" in msg


def test_batch_size_zero(tmp_path):
    msg = only_problem(write_job(tmp_path, per_device_train_batch_size=0))
    assert "train.yaml: per_device_train_batch_size: is 0" in msg and ">= 1" in msg


def test_missing_model_dir(tmp_path):
    msg = only_problem(write_job(tmp_path, model_name_or_path="./models/absent"))
    assert "train.yaml: model_name_or_path:" in msg and "models/absent does not exist" in msg


def test_model_dir_without_config_json(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "model" / "config.json").unlink()
    assert "has no config.json" in only_problem(path)


def test_model_sources(tmp_path):
    """auto: a directory here is synced, an absolute path elsewhere is on the nodes, org/name is a hub id."""
    cfg = load_training(write_job(tmp_path))
    assert (cfg.model.source, cfg.model.path, cfg.model_dir) == ("controller", str(tmp_path / "model"), str(tmp_path / "model"))
    cfg = load_training(write_job(tmp_path, model_name_or_path="/data/models/Qwen3-32B"))
    assert (cfg.model.source, cfg.model.path, cfg.model_dir) == ("nodes", "/data/models/Qwen3-32B", None)
    cfg = load_training(write_job(tmp_path, model_name_or_path="Qwen/Qwen3-0.6B", model_revision="v1"))
    assert (cfg.model.source, cfg.model.repo_id, cfg.model.revision, cfg.model.hub) == ("hub", "Qwen/Qwen3-0.6B", "v1",
                                                                                      "huggingface")
    cfg = load_training(write_job(tmp_path, model_name_or_path="Qwen/Qwen3-0.6B"), hub="modelscope")
    assert (cfg.model.hub, cfg.model.revision) == ("modelscope", "main")
    # a directory that exists here is still the nodes' with model_source nodes (a mount both see)
    cfg = load_training(write_job(tmp_path), model_source="nodes")
    assert (cfg.model.source, cfg.model.path) == ("nodes", str(tmp_path / "model"))


def test_model_source_mistakes(tmp_path):
    assert "not a hub id" in only_problem(write_job(tmp_path, model_name_or_path="/x/y"), model_source="hub")
    assert "relative path" in only_problem(write_job(tmp_path, model_name_or_path="absent/dir/x"), model_source="nodes")
    assert "does not exist on the controller" in only_problem(write_job(tmp_path, model_name_or_path="/nope"),
                                                              model_source="controller")
    with pytest.raises(ConfigError, match="train_model_source"):
        load_training(write_job(tmp_path), model_source="cloud")


def test_relative_paths_start_at_the_working_directory(tmp_path):
    """As llamafactory-cli: examples/x.yaml run from a checkout reads data/ and examples/deepspeed/ of the checkout."""
    write_job(tmp_path, ds_json="{}")
    (tmp_path / "examples").mkdir()
    yaml_path = tmp_path / "examples" / "x.yaml"
    yaml_path.write_text((tmp_path / "train.yaml").read_text() + "deepspeed: ds.json\n")
    cfg = load_training(yaml_path, workdir=tmp_path)
    assert cfg.dataset_dir == str(tmp_path / "data") and cfg.deepspeed_path == str(tmp_path / "ds.json")
    assert cfg.model_dir == str(tmp_path / "model") and cfg.workdir == str(tmp_path)
    with pytest.raises(ConfigError) as err:  # run from elsewhere: model, deepspeed and data not found, each said where
        load_training(yaml_path, workdir=tmp_path / "examples")
    assert len(err.value.problems) == 3
    assert all("relative to the working directory " + str(tmp_path / "examples") in p for p in err.value.problems)


def test_unknown_stage(tmp_path):
    msg = only_problem(write_job(tmp_path, stage="grpo"))
    assert "train.yaml: stage: 'grpo'" in msg and "sft" in msg


def test_unknown_template_when_the_names_are_known(tmp_path):
    msg = only_problem(write_job(tmp_path, template="qwenn"), templates={"qwen", "llama3"})
    assert "train.yaml: template: 'qwenn'" in msg


def test_missing_dataset_info(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "data" / "dataset_info.json").unlink()
    msg = only_problem(path)
    assert "train.yaml: dataset_dir:" in msg and "dataset_info.json cannot be read" in msg


def test_malformed_yaml(tmp_path):
    msg = only_problem(write_job(tmp_path, yaml_text="stage: sft\n  do_train: [true\n"))
    assert "train.yaml: not valid YAML" in msg and "line" in msg


def test_yaml_not_a_mapping(tmp_path):
    msg = only_problem(write_job(tmp_path, yaml_text="- stage: sft\n- do_train: true\n"))
    assert "train.yaml: the training yaml must be a mapping" in msg and "list" in msg


def test_duplicate_keys_are_an_error_like_omegaconf(tmp_path):
    assert "duplicate key" in only_problem(write_job(tmp_path, yaml_text="stage: sft\nstage: pt\n"))


def test_exponent_floats_parse_like_omegaconf(tmp_path):
    text = write_job(tmp_path).read_text().replace("learning_rate: 0.0001", "learning_rate: 1e-4")
    cfg = load_training(write_job(tmp_path, yaml_text=text))
    assert cfg.data["learning_rate"] == 1e-4


def test_sharegpt_wrong_tag_key(tmp_path):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info = {"chat": {"file_name": "chat.json", "formatting": "sharegpt", "tags": tags}}
    msg = only_problem(write_job(tmp_path, info=info, dataset="chat"))
    assert "dataset_info.json: dataset 'chat': tags: role_tag is 'role'" in msg and "from, value" in msg


def test_sharegpt_role_values_must_match_tags(tmp_path):
    info = {"chat": {"file_name": "chat.json", "formatting": "sharegpt", "tags": {
        "role_tag": "from", "content_tag": "value", "user_tag": "user", "assistant_tag": "assistant"}}}
    msg = only_problem(write_job(tmp_path, info=info, dataset="chat"))
    assert "has role 'human'" in msg


def test_epochs_zero(tmp_path):
    msg = only_problem(write_job(tmp_path, num_train_epochs=0))
    assert "train.yaml: num_train_epochs: is 0" in msg and "max_steps" in msg
    load_training(write_job(tmp_path, num_train_epochs=0, max_steps=5))  # max_steps alone is enough


def test_hub_datasets(tmp_path):
    info = {"train": {"file_name": "train.jsonl"}, "web": {"hf_hub_url": "org/data", "ms_hub_url": "ms/data"},
            "ms": {"ms_hub_url": "ms/only"}, "cloud": {"cloud_file_name": "s3://b/x.json"}}
    cfg = load_training(write_job(tmp_path, info=info, dataset="train,web,ms"))
    hubs = {d.name: (d.hub, d.repo_id) for d in cfg.datasets if d.hub}
    assert hubs == {"web": ("huggingface", "org/data"), "ms": ("modelscope", "ms/only")}  # LLaMA-Factory's choice
    assert cfg.train_samples is None
    cfg = load_training(write_job(tmp_path, info=info, dataset="web"), hub="modelscope")
    assert (cfg.datasets[0].hub, cfg.datasets[0].repo_id) == ("modelscope", "ms/data")
    assert "cloud_file_name: is not fetched" in only_problem(write_job(tmp_path, info=info, dataset="cloud"))
    info = node_dataset_info(load_training(write_job(tmp_path, info=info, dataset="train,web")), {"web": "../../w"})
    assert info["web"] == {"hf_hub_url": "../../w"} and info["train"]["file_name"] == "train.jsonl"


def test_adapters_and_tokenized_path(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "saves" / "a1").mkdir(parents=True)
    cfg = load_training(write_job(tmp_path, adapter_name_or_path="saves/a1,/nodes/a2", tokenized_path="tok"))
    assert [(a.source, a.path) for a in cfg.adapters] == [("controller", str(tmp_path / "saves" / "a1")),
                                                          ("nodes", "/nodes/a2")]
    assert cfg.tokenized.source == "run"
    node = rewrite_for_node(cfg, "/j", run_dir="/r")
    assert node["adapter_name_or_path"] == "/j/adapters/0-a1,/nodes/a2" and node["tokenized_path"] == "/r/tokenized"
    assert (str(tmp_path / "saves" / "a1"), "adapters/0-a1") in node_files(cfg)
    assert "does not exist" in only_problem(write_job(tmp_path, adapter_name_or_path="org/hub-adapter"))
    del path


def test_ranking_must_match_the_stage(tmp_path):
    msg = only_problem(write_job(tmp_path, stage="dpo"))
    assert "dataset 'train': ranking:" in msg and "ranking: true" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_training(write_job(tmp_path, stage="x", do_train=False, learning_rate=-1, dataset="nope"))
    assert len(err.value.problems) == 4


def test_csv_columns_and_max_samples_and_val_size(tmp_path):
    path = write_job(tmp_path, max_samples=7, val_size=0.2,
                     info={"train": {"file_name": "t.csv", "columns": {"prompt": "q", "response": "a"}}})
    (tmp_path / "data" / "t.csv").write_text("q,a\n" + "".join(f"x{i},y{i}\n" for i in range(9)))
    cfg = load_training(path)
    assert cfg.datasets[0].samples == 7
    assert cfg.train_samples == 5  # train_test_split puts ceil(0.2 * 7) = 2 records in validation


def test_plan_arithmetic(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}] * 1000
    cfg = load_training(write_job(tmp_path, records=records, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=4, num_train_epochs=3.0))
    cluster = validate(["w", "m"], {
        "w": {"llamafleet_root": "/r", "llamafleet_gpus": 4, "llamafleet_train_addr": "10.1.0.2"},
        "m": {"llamafleet_root": "/r", "llamafleet_gpus": 8, "llamafleet_master": True,
              "llamafleet_train_addr": "10.1.0.1"},
    })
    p = plan(cfg, cluster, cpu_only=False)
    assert [(n["name"], n["node_rank"], n["nproc"]) for n in p.nodes] == [("m", 0, 8), ("w", 1, 4)]
    assert (p.master, p.master_addr, p.world_size) == ("m", "10.1.0.1", 12)
    assert p.effective_batch == 2 * 12 * 4 == 96
    assert p.steps_per_epoch == 11  # ceil(1000 / 96)
    assert p.total_steps == 33
    cpu = plan(cfg, cluster, cpu_only=True)
    assert (cpu.world_size, cpu.effective_batch, cpu.steps_per_epoch) == (2, 16, 63)
    assert p.to_dict()["nodes"][0]["name"] == "m"


def test_plan_uses_max_steps_when_set(tmp_path):
    cfg = load_training(write_job(tmp_path, max_steps=7))
    cluster = validate(["a"], {"a": {"llamafleet_root": "/r", "llamafleet_gpus": 1, "llamafleet_master": True}})
    assert plan(cfg, cluster, cpu_only=True).total_steps == 7


def test_node_files_and_rewrite(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(json.dumps(RECORDS[0]) + "\n")
    info = {"train": {"file_name": "train.jsonl"}, "extra": {"file_name": str(outside)}, "unused": {"file_name": "x"}}
    cfg = load_training(write_job(tmp_path, info=info, dataset=["train", "extra"], ds_json="{}",
                                  deepspeed="ds.json"))
    assert node_files(cfg) == [
        (str(tmp_path / "data" / "train.jsonl"), "data/train.jsonl"),
        (str(outside), "data/external/extra/elsewhere.jsonl"),
        (str(tmp_path / "ds.json"), "deepspeed/ds.json"),
        (str(tmp_path / "model"), "model"),
    ]
    assert node_dataset_info(cfg) == {
        "train": {"file_name": "train.jsonl"}, "extra": {"file_name": "external/extra/elsewhere.jsonl"},
    }
    node = rewrite_for_node(cfg, "/srv/lf/jobs/7", run_dir="/srv/lf/runs/r7")
    assert node["dataset_dir"] == "/srv/lf/jobs/7/data"
    assert node["deepspeed"] == "/srv/lf/jobs/7/deepspeed/ds.json"
    assert node["model_name_or_path"] == "/srv/lf/jobs/7/model"
    assert node["output_dir"] == "/srv/lf/runs/r7/output"
    assert node["template"] == "qwen" and cfg.data["output_dir"] == "saves/run"


def test_a_model_not_synced_is_not_copied(tmp_path):
    cfg = load_training(write_job(tmp_path, model_name_or_path="/data/m"))
    assert rewrite_for_node(cfg, "/j", run_dir="/r")["model_name_or_path"] == "/data/m"
    assert all(rel != "model" for _, rel in node_files(cfg))
    cfg = load_training(write_job(tmp_path, model_name_or_path="org/model"))
    assert rewrite_for_node(cfg, "/j", run_dir="/r", model_path="/c/snap")["model_name_or_path"] == "/c/snap"

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llamafleet import inventory, launchplan, lock
from llamafleet.errors import ConfigError

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def job(tmp_path):
    """The built-in job, laid out as in this repository: its yaml's paths are relative to tmp_path."""
    job = tmp_path / "examples" / "tiny"
    shutil.copytree(PROJECT / "examples" / "tiny", job, ignore=shutil.ignore_patterns("model", "saves"))
    (job / "model").mkdir()
    (job / "model" / "config.json").write_text('{"model_type": "qwen2"}')
    return job


@pytest.fixture
def cluster():
    hv = {"a": {"ansible_host": "10.0.0.1", "llamafleet_gpus": 1, "llamafleet_root": "/srv/a", "llamafleet_master": True,
                "llamafleet_train_addr": "192.168.0.1"},
          "b": {"ansible_host": "10.0.0.2", "llamafleet_gpus": 1, "llamafleet_root": "/srv/b"}}
    return inventory.validate(["b", "a"], hv)


def test_plan_stages_by_hard_link_and_renders_each_node(job, cluster, tmp_path):
    stack = lock.load_stack(None, "cpu")
    plan = launchplan.make_plan(job / "sft_lora.yaml", cluster, stack, state_dir=tmp_path / "state", workdir=job.parents[1], run_id="r1")
    assert set(plan.manifest) == {"data/tiny_alpaca.jsonl", "data/dataset_info.json", "model/config.json"}
    staged = Path(plan.stage_dir) / "data" / "tiny_alpaca.jsonl"
    assert staged.stat().st_ino == (job / "data" / "tiny_alpaca.jsonl").stat().st_ino  # a link, not a copy
    a, b = plan.nodes["a"], plan.nodes["b"]
    assert (a.node_rank, b.node_rank) == (0, 1) and a.master
    assert a.env["MASTER_ADDR"] == b.env["MASTER_ADDR"] == "192.168.0.1"
    assert b.env["NODE_RANK"] == "1" and b.env["NNODES"] == "2" and b.env["LLAMAFLEET_RUN_ID"] == "r1"
    node_yaml = yaml.safe_load(b.files["train.yaml"])
    assert node_yaml["dataset_dir"] == "/srv/b/inputs/sft_lora/data"
    assert node_yaml["model_name_or_path"] == "/srv/b/inputs/sft_lora/model"
    assert node_yaml["output_dir"] == "/srv/b/runs/r1/output"
    assert b.command == [f"/srv/b/stacks/{stack.venv_name}/bin/llamafactory-cli", "train", "/srv/b/runs/r1/train.yaml"]
    assert "export NODE_RANK=1" in b.files["node.env"]
    assert plan.plan["world_size"] == 2 and plan.plan["effective_batch"] == 4


def test_replanning_an_unchanged_job_gives_the_same_files_and_times(job, cluster, tmp_path):
    stack = lock.load_stack(None, "cpu")
    p1 = launchplan.make_plan(job / "sft_lora.yaml", cluster, stack, state_dir=tmp_path / "s", workdir=job.parents[1])
    info = Path(p1.stage_dir) / "data" / "dataset_info.json"
    t1 = info.stat().st_mtime_ns
    p2 = launchplan.make_plan(job / "sft_lora.yaml", cluster, stack, state_dir=tmp_path / "s", workdir=job.parents[1])
    assert p1.manifest == p2.manifest and info.stat().st_mtime_ns == t1
    assert p1.run_id != p2.run_id  # a new run each time


def test_shared_inputs_verify_in_place(job, cluster, tmp_path):
    plan = launchplan.make_plan(job / "sft_lora.yaml", cluster, lock.load_stack(None, "cpu"),
                                state_dir=tmp_path / "s", workdir=job.parents[1], shared_inputs=True)
    assert plan.stage_dir is None
    assert str(job / "data" / "tiny_alpaca.jsonl").lstrip("/") in plan.manifest
    node_yaml = yaml.safe_load(plan.nodes["b"].files["train.yaml"])
    assert node_yaml["data_shared_file_system"] is True and node_yaml["dataset_dir"] == str(job / "data")


def test_deepspeed_launcher_command_and_hostfile(job, cluster, tmp_path):
    stack = lock.load_stack(None, "cpu")
    plan = launchplan.make_plan(job / "sft_lora.yaml", cluster, stack, state_dir=tmp_path / "s", workdir=job.parents[1], launcher="deepspeed",
                                run_id="r2")
    cmd = plan.nodes["b"].command
    assert cmd[cmd.index("--node_rank") + 1] == "1" and cmd[cmd.index("--master_addr") + 1] == "192.168.0.1"
    assert cmd[-1] == "/srv/b/runs/r2/train.yaml" and "--no_local_rank" in cmd
    assert [line for line in plan.hostfile.splitlines() if not line.startswith("#")] == ["a slots=1", "b slots=1"]


def test_sample_inventory_is_a_valid_cluster():
    """inventory/sample, as users copy it, passes the same validation every playbook runs."""
    out = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(PROJECT / "inventory" / "sample"),
                          "--list"], capture_output=True, text=True, check=True, cwd=PROJECT).stdout
    data = json.loads(out)
    hosts = data["nodes"]["hosts"]
    cluster = inventory.validate(hosts, {h: data["_meta"]["hostvars"][h] for h in hosts})
    assert cluster.master.name == "gpu-a" and cluster.node("gpu-c").nproc(cpu_only=False) == 4


def test_secret_looking_environment_is_not_printed(job, cluster, tmp_path):
    plan = launchplan.make_plan(job / "sft_lora.yaml", cluster, lock.load_stack(None, "cpu"), state_dir=tmp_path / "s", workdir=job.parents[1],
                                extra_env={"WANDB_API_KEY": "s3cr3t-value", "HF_TOKEN": "hf_s3cr3t", "NCCL_P2P_DISABLE": "1"})
    text = plan.format(detail=True)
    assert "s3cr3t-value" not in text and "WANDB_API_KEY=***" in text and "NCCL_P2P_DISABLE=1" in text
    assert "hf_s3cr3t" not in text and "HF_TOKEN=***" in text
    assert "TOKENIZERS_PARALLELISM=false" in text  # a setting, not a token
    # the values travel apart, to the train module's no_log option: the plan holds *** or nothing
    dumped = json.dumps(plan.to_dict())
    assert "s3cr3t" not in dumped and plan.nodes["a"].env["HF_TOKEN"] == "***"
    assert "HF_TOKEN" not in plan.nodes["a"].files["node.env"] and "NCCL_P2P_DISABLE=1" in plan.nodes["a"].files["node.env"]
    assert launchplan.split_secrets({"HF_TOKEN": "hf_s3cr3t", "TOKENIZERS_PARALLELISM": "false", "RETRIES": 3}) == (
        {"TOKENIZERS_PARALLELISM": "false", "RETRIES": 3}, {"HF_TOKEN": "hf_s3cr3t"})


@pytest.mark.parametrize("job_name", ["..", ".", "../x", "a/b", "---", ".hidden", "-rf", "a..b"])
def test_a_bad_job_name_is_one_error_and_touches_nothing(job, cluster, tmp_path, job_name):
    state = tmp_path / "s"
    (state / "stage").mkdir(parents=True)
    (state / "keep").write_text("x")
    with pytest.raises(ConfigError) as err:
        launchplan.make_plan(job / "sft_lora.yaml", cluster, lock.load_stack(None, "cpu"), state_dir=state, job=job_name)
    msg = str(err.value)
    assert msg.startswith("train_job") and "letters, digits" in msg, msg
    assert repr(job_name) in msg or "normalised" in msg, msg
    assert (state / "keep").read_text() == "x" and not list((state / "stage").iterdir())


@pytest.mark.parametrize("run_id", ["..", "a/../b", "/etc", ".x", "-x", "a b"])
def test_a_bad_run_id_is_one_error(job, cluster, tmp_path, run_id):
    with pytest.raises(ConfigError, match="run id"):
        launchplan.make_plan(job / "sft_lora.yaml", cluster, lock.load_stack(None, "cpu"), state_dir=tmp_path / "s",
                             run_id=run_id)
    assert not (tmp_path / "s" / "stage").exists()


def test_the_system_flavor_is_planned_as_a_gpu_stack(job, tmp_path):
    """The vetted-image flavor runs on the image's CUDA: every node runs llamafleet_gpus processes and the world
    counts GPUs (it used to be planned as a CPU stack: one process per node)."""
    hv = {"a": {"ansible_host": "10.0.0.1", "llamafleet_gpus": 8, "llamafleet_root": "/srv/a", "llamafleet_master": True},
          "b": {"ansible_host": "10.0.0.2", "llamafleet_gpus": 4, "llamafleet_root": "/srv/b"}}
    cluster = inventory.validate(["a", "b"], hv)
    stack = lock.load_stack(None, "system")
    assert stack.cuda == "system" and not stack.cpu_only
    plan = launchplan.make_plan(job / "sft_lora.yaml", cluster, stack, state_dir=tmp_path / "state", workdir=job.parents[1],
                                run_id="r1")
    assert plan.plan["world_size"] == 12
    assert plan.nodes["a"].env["NPROC_PER_NODE"] == "8" and plan.nodes["b"].env["NPROC_PER_NODE"] == "4"
    assert "slots=8" in plan.hostfile and "slots=4" in plan.hostfile

"""Per-node rendering: rank-specific environment, launch commands, DeepSpeed hostfile."""

from __future__ import annotations

import re
import subprocess

import pytest

from llamafleet.errors import ConfigError
from llamafleet.inventory import validate
from llamafleet.launch import hostfile_entries, node_command, node_env, render_env_file, render_hostfile

VENV = "/srv/lf/stack/venv"


def cluster_of(**hosts):
    """A validated cluster; hosts in inventory order, each given its own vars."""
    base = {"llamafleet_root": "/srv/lf", "llamafleet_gpus": 1}
    return validate(list(hosts), {name: {**base, **hv} for name, hv in hosts.items()})


def env_for(cluster, name, cpu_only=False, **kw):
    return node_env(
        cluster, cluster.node(name), master_port=29500, cpu_only=cpu_only, venv=VENV,
        hf_home="/srv/lf/hf", mplconfigdir="/srv/lf/mpl", **kw,
    )


@pytest.fixture
def mixed():
    """Master listed last, with different GPU counts and separate ssh/training addresses."""
    return cluster_of(
        worker1={"ansible_host": "10.0.0.11", "llamafleet_train_addr": "192.168.1.11", "llamafleet_gpus": 4},
        worker2={"ansible_host": "10.0.0.12", "llamafleet_train_addr": "192.168.1.12", "llamafleet_gpus": 2},
        boss={"ansible_host": "10.0.0.10", "llamafleet_train_addr": "192.168.1.10", "llamafleet_gpus": 8,
              "llamafleet_master": True},
    )


def test_ranks_unique_and_master_is_zero_regardless_of_order(mixed):
    envs = {n.name: env_for(mixed, n.name) for n in mixed.nodes}
    assert sorted(int(e["NODE_RANK"]) for e in envs.values()) == [0, 1, 2]
    assert envs["boss"]["NODE_RANK"] == "0"
    assert {e["NNODES"] for e in envs.values()} == {"3"}
    assert all("RANK" not in e for e in envs.values())


def test_master_addr_is_the_masters_training_address(mixed):
    for node in mixed.nodes:
        env = env_for(mixed, node.name)
        assert env["MASTER_ADDR"] == "192.168.1.10"
        assert env["MASTER_PORT"] == "29500"


def test_nproc_follows_each_nodes_gpus_and_world_size():
    cluster = cluster_of(a={"llamafleet_gpus": 8, "llamafleet_master": True}, b={"llamafleet_gpus": 4})
    assert env_for(cluster, "a")["NPROC_PER_NODE"] == "8"
    assert env_for(cluster, "b")["NPROC_PER_NODE"] == "4"
    assert cluster.world_size(False) == 12
    assert [e["slots"] for e in hostfile_entries(cluster, False)] == [8, 4]
    assert "a slots=8\nb slots=4\n" in render_hostfile(cluster, False)


def test_cpu_flavor_runs_one_process_per_node_with_one_thread(mixed):
    for node in mixed.nodes:
        env = env_for(mixed, node.name, cpu_only=True, cpus=16)
        assert env["NPROC_PER_NODE"] == "1"
        assert env["OMP_NUM_THREADS"] == "1"
        assert "CUDA_VISIBLE_DEVICES" not in env
    assert [e["slots"] for e in hostfile_entries(mixed, True)] == [1, 1, 1]


def test_omp_threads_share_the_cpus_between_gpu_processes(mixed):
    assert env_for(mixed, "boss", cpus=64)["OMP_NUM_THREADS"] == "8"
    assert env_for(mixed, "boss")["OMP_NUM_THREADS"] == "1"


def test_cuda_visible_devices_restriction():
    cluster = cluster_of(
        a={"llamafleet_gpus": 8, "llamafleet_master": True, "llamafleet_cuda_visible_devices": "4,5,6,7"},
        b={"llamafleet_gpus": 2},
    )
    env = env_for(cluster, "a")
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert env["NPROC_PER_NODE"] == "4"
    assert "CUDA_VISIBLE_DEVICES" not in env_for(cluster, "b")
    # DeepSpeed sets CUDA_VISIBLE_DEVICES to slot numbers: the slots must reach GPU 7, --include picks 4-7.
    assert [e["slots"] for e in hostfile_entries(cluster, False)] == [8, 2]
    cmd = node_command("deepspeed", cluster.node("b"), cluster, "/j/train.yaml", VENV, master_port=29500,
                       cpu_only=False, hostfile="/j/hostfile", site_packages="/sp")
    assert cmd[cmd.index("--include") + 1] == "a:4,5,6,7@b"


def test_env_has_offline_hub_path_and_nccl_settings():
    cluster = cluster_of(a={"llamafleet_master": True, "llamafleet_nccl_socket_ifname": "^docker0,lo",
                            "llamafleet_nccl_ib_disable": True})
    env = env_for(cluster, "a")
    assert env["FORCE_TORCHRUN"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["PATH"].startswith(f"{VENV}/bin:")
    assert env["NCCL_SOCKET_IFNAME"] == "^docker0,lo"
    assert env["NCCL_IB_DISABLE"] == "1"


def test_extra_cannot_change_the_rendezvous(mixed):
    assert env_for(mixed, "boss", extra={"NCCL_P2P_DISABLE": "1"})["NCCL_P2P_DISABLE"] == "1"
    with pytest.raises(ConfigError, match="RANK"):
        env_for(mixed, "boss", extra={"RANK": "0"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        env_for(mixed, "boss", extra={"MASTER_ADDR": "1.2.3.4"})


def test_env_file_round_trips_through_sh(mixed):
    env = env_for(mixed, "worker1", extra={"LF_TRICKY": "it's a \"test\" with $HOME, `ls` and \\ spaces\nnewline"})
    text = render_env_file(env)
    assert re.findall(r"^export ([A-Z_]+)=", text, re.M) == sorted(env)
    names = " ".join(sorted(env))
    script = f". /dev/stdin; for k in {names}; do printf '%s=%s\\0' \"$k\" \"$(printenv \"$k\")\"; done"
    out = subprocess.run(["sh", "-c", script], input=text, capture_output=True, text=True, check=True).stdout
    # printenv output loses only trailing newlines ($(...)); none of the values ends with one
    back = dict(item.split("=", 1) for item in out.split("\0") if item)
    assert back == env


def test_env_file_rejects_names_a_shell_cannot_export():
    with pytest.raises(ConfigError, match="not valid in a shell"):
        render_env_file({"BAD-NAME": "x"})


def test_torchrun_command_is_the_cli_with_the_yaml(mixed):
    cmd = node_command("torchrun", mixed.node("worker2"), mixed, "/j/train.yaml", VENV, master_port=29500,
                       cpu_only=False)
    assert cmd == [f"{VENV}/bin/llamafactory-cli", "train", "/j/train.yaml"]


def test_deepspeed_command_runs_per_node_without_ssh(mixed):
    cmd = node_command("deepspeed", mixed.node("worker2"), mixed, "/j/train.yaml", VENV, master_port=29501,
                       cpu_only=False, hostfile="/j/hostfile", site_packages="/sp")
    assert cmd == [
        f"{VENV}/bin/deepspeed", "--no_ssh", "--node_rank", "2", "--hostfile", "/j/hostfile",
        "--master_addr", "192.168.1.10", "--master_port", "29501", "--no_local_rank",
        "/sp/llamafactory/launcher.py", "/j/train.yaml",
    ]
    text = render_hostfile(mixed, False)
    assert text.startswith("#")
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "boss slots=8", "worker1 slots=4", "worker2 slots=2",
    ]


def test_command_rejects_whitespace_paths_and_unknown_launchers(mixed):
    node = mixed.node("boss")
    with pytest.raises(ConfigError, match="whitespace"):
        node_command("torchrun", node, mixed, "/j/my train.yaml", VENV, master_port=29500, cpu_only=False)
    with pytest.raises(ConfigError, match="not supported"):
        node_command("mpirun", node, mixed, "/j/train.yaml", VENV, master_port=29500, cpu_only=False)
    with pytest.raises(ConfigError, match="hostfile"):
        node_command("deepspeed", node, mixed, "/j/train.yaml", VENV, master_port=29500, cpu_only=False)


def test_accelerate_config_sets_the_machine_keys_per_node_and_keeps_the_users_fsdp_settings():
    from llamafleet.launch import accelerate_config

    cluster = cluster_of(a={"llamafleet_gpus": 4, "llamafleet_master": True, "llamafleet_train_addr": "192.168.1.10"},
                         b={"llamafleet_gpus": 4})
    user = {"distributed_type": "FSDP", "num_machines": 1, "machine_rank": 0, "main_process_ip": "127.0.0.1",
            "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_offload_params": True},
            "mixed_precision": "bf16"}
    cfg = accelerate_config(cluster, cluster.node("b"), master_port=29511, cpu_only=False, user=user)
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"] == user["fsdp_config"]
    assert (cfg["num_machines"], cfg["machine_rank"], cfg["num_processes"]) == (2, 1, 8)
    assert (cfg["main_process_ip"], cfg["main_process_port"], cfg["use_cpu"]) == ("192.168.1.10", 29511, False)
    assert cfg["mixed_precision"] == "bf16" and cfg["rdzv_backend"] == "static"
    assert user["num_machines"] == 1, "the user's config was changed"
    # without a config of the user's: DDP
    plain = accelerate_config(cluster, cluster.node("a"), master_port=29500, cpu_only=False)
    assert plain["distributed_type"] == "MULTI_GPU" and plain["machine_rank"] == 0


def test_accelerate_refuses_different_process_counts_and_gpu_only_engines_on_cpu(mixed):
    from llamafleet.launch import accelerate_config, accelerate_env

    with pytest.raises(ConfigError, match=r"same number of processes on every node.*boss: 8, worker1: 4, worker2: 2"
                                          r".*--launcher torchrun or deepspeed"):
        accelerate_config(mixed, mixed.node("boss"), master_port=29500, cpu_only=False)
    cpu = cluster_of(a={"llamafleet_master": True}, b={})
    with pytest.raises(ConfigError, match="distributed_type FSDP, which accelerate only runs on GPUs"):
        accelerate_config(cpu, cpu.node("a"), master_port=29500, cpu_only=True, user={"distributed_type": "fsdp"})
    cfg = accelerate_config(cpu, cpu.node("b"), master_port=29500, cpu_only=True)
    assert cfg["distributed_type"] == "MULTI_CPU" and cfg["use_cpu"] is True and cfg["num_processes"] == 2
    # on CPU accelerate starts one process per node itself: its place in the world comes from the environment
    assert accelerate_env(cpu, cpu.node("b"), True) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                                        "LOCAL_WORLD_SIZE": "1"}
    assert accelerate_env(cpu, cpu.node("b"), False) == {}


def test_accelerate_command_runs_llamafactorys_launcher_with_the_nodes_config():
    cluster = cluster_of(a={"llamafleet_master": True}, b={})
    cmd = node_command("accelerate", cluster.node("b"), cluster, "/srv/lf/runs/r1/train.yaml", VENV, master_port=29500,
                       cpu_only=True, site_packages=f"{VENV}/lib/python3.11/site-packages")
    assert cmd == [f"{VENV}/bin/accelerate", "launch", "--config_file", "/srv/lf/runs/r1/accelerate.yaml",
                   f"{VENV}/lib/python3.11/site-packages/llamafactory/launcher.py", "/srv/lf/runs/r1/train.yaml"]

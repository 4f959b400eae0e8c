"""Ascend NPU nodes, without an NPU: the npu flavor's rendering (ASCEND_RT_VISIBLE_DEVICES, HCCL_*), the probe's
reading of a recorded `npu-smi info` and of the CANN install info, and parity across nodes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import PROJECT
from llamafleet import inventory, lock, parity
from llamafleet.errors import LockError
from llamafleet.launch import node_env

sys.path.insert(0, str(PROJECT / "collections"))
from ansible_collections.llamafleet.cluster.plugins.module_utils import probe  # noqa: E402

DATA = Path(__file__).parent / "data"


def test_npu_smi_info_is_read_for_driver_names_memory_and_health():
    facts = probe.parse_npu_smi((DATA / "npu-smi-info.txt").read_text())
    assert facts["npu_driver"] == "24.1.rc2"
    assert [(n["name"], n["memory_mib"], n["health"]) for n in facts["npus"]] == [
        ("910B3", 65536, "OK"), ("910B3", 65536, "OK"), ("910B3", 65536, "Warning")]
    assert probe.parse_npu_smi("") == {"npu_driver": None, "npus": []}


def test_the_cann_version_is_read_from_the_toolkits_install_info():
    assert probe.parse_cann_version("package_name=Ascend-cann-toolkit\nversion=8.2.RC1\ninnerversion=V100R001C22\n") == "8.2.RC1"
    assert probe.parse_cann_version("Version=8.0.0\n") == "8.0.0"
    assert probe.parse_cann_version("nothing here") is None


def test_the_npu_flavor_renders_the_ascend_names_and_runs_one_process_per_npu():
    stack = lock.load_stack(None, "npu")
    assert stack.npu and not stack.cpu_only and stack.cuda is None and stack.packages["torch-npu"] == "2.13.0"
    cluster = inventory.validate(["a", "b"], {
        "a": {"llamafleet_root": "/srv", "llamafleet_gpus": 8, "llamafleet_master": True,
              "llamafleet_nccl_socket_ifname": "^docker,lo"},
        "b": {"llamafleet_root": "/srv", "llamafleet_gpus": 4, "llamafleet_cuda_visible_devices": "4,5,6,7"}})
    env = {n: node_env(cluster, cluster.node(n), master_port=29500, cpu_only=False, venv="/v", hf_home="/h",
                       mplconfigdir="/m", npu=True) for n in ("a", "b")}
    assert env["a"]["NPROC_PER_NODE"] == "8" and env["b"]["NPROC_PER_NODE"] == "4"
    assert env["b"]["ASCEND_RT_VISIBLE_DEVICES"] == "4,5,6,7" and "CUDA_VISIBLE_DEVICES" not in env["b"]
    assert env["a"]["HCCL_SOCKET_IFNAME"] == "^docker,lo" and "NCCL_SOCKET_IFNAME" not in env["a"]
    assert env["a"]["HCCL_CONNECT_TIMEOUT"] == "1800"
    longer = node_env(cluster, cluster.node("a"), master_port=29500, cpu_only=False, venv="/v", hf_home="/h",
                      mplconfigdir="/m", npu=True, extra={"HCCL_CONNECT_TIMEOUT": "7200"})
    assert longer["HCCL_CONNECT_TIMEOUT"] == "7200"


def test_parity_compares_the_ascend_driver_cann_and_npu_count(tmp_path):
    stack = lock.load_stack(None, "npu")
    npus = probe.parse_npu_smi((DATA / "npu-smi-info.txt").read_text())

    def node(driver="24.1.rc2", cann="8.2.RC1", count=3):
        pkgs = dict(stack.packages)
        return {"node": {"driver": None, "gpus": [], "nvcc": None, "npu_driver": driver, "cann": cann,
                         "npus": npus["npus"][:count]},
                "stack": {"status": "ok", "path": "/v", "probe": {"python": "3.11.7", "packages": pkgs}}}
    r = parity.compare(stack, {"a": node(), "b": node()}, gpus={"a": 3, "b": 3})
    assert r.ok, r.format()
    assert {x.component for x in r.rows} >= {"npu driver", "cann", "npus"}
    r = parity.compare(stack, {"a": node(), "b": node(driver="23.0.6", cann="8.0.0", count=2)}, gpus={"a": 3, "b": 3})
    assert [(x.component, x.bad) for x in r.rows if not x.ok] == [
        ("npu driver", ("b",)), ("cann", ("b",)), ("npus", ("b",))]


def test_a_bad_accelerator_in_a_lock_is_named(tmp_path):
    p = tmp_path / "lock.yml"
    p.write_text('schema: 1\npython: "3.11"\npackages: {six: "1.16.0"}\nflavors:\n  x: {accelerator: tpu}\n  y: {accelerator: npu, cuda: "12.8"}\n')
    with pytest.raises(LockError, match="accelerator is 'tpu'; use cuda, npu"):
        lock.load_stack(p, "x")
    with pytest.raises(LockError, match="an npu flavor has no cuda version"):
        lock.load_stack(p, "y")

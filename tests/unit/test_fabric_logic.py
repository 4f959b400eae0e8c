"""The fabric check's own logic: the plan every node runs (command, backend, world, timeouts), the judgement of
the figures, the NCCL INFO parser on recorded output, and the report a user reads."""

import json
from pathlib import Path

import pytest

from llamafleet import fabric, fabric_probe, inventory, lock
from llamafleet.errors import ConfigError

DATA = Path(__file__).parent / "data"
OPTIONS = {"sizes_mb": [1, 4, 16, 64, 256], "pair_mb": 64, "iters": 5, "timeout_s": 300, "min_gbps": 0,
           "min_ratio": 0.5}


def _cluster(gpus=(8, 4)):
    hv = {f"n{i}": {"ansible_host": f"10.0.0.{i + 1}", "llamafleet_gpus": g, "llamafleet_root": f"/srv/n{i}",
                    "llamafleet_train_addr": f"192.168.0.{i + 1}"} for i, g in enumerate(gpus)}
    hv["n0"]["llamafleet_master"] = True
    return inventory.validate(list(hv), hv)


def test_the_plan_runs_the_probe_under_the_stacks_torchrun_with_the_nodes_rendezvous():
    stack = lock.load_stack(None, "cu128")
    plan = fabric.make_plan(_cluster(), stack, fabric.FabricOptions.from_dict(OPTIONS), master_port=29600, run_id="f1")
    n0, n1 = plan.nodes["n0"], plan.nodes["n1"]
    venv = f"/srv/n1/stacks/{stack.venv_name}"
    assert n1.command[:13] == [f"{venv}/bin/torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4",
                               "--master_addr", "192.168.0.1", "--master_port", "29600",
                               "/srv/n1/runs/f1/fabric_probe.py", "--backend"]
    assert n1.command[13] == "nccl" and n0.command[6] == "8"
    assert plan.plan["world_size"] == 12 and plan.plan["backend"] == "nccl"
    # the same env as training renders; the probe is the packaged file, written into the run directory
    assert n1.env["NODE_RANK"] == "1" and n1.env["LLAMAFLEET_RUN_ID"] == "f1"
    assert "export NPROC_PER_NODE=4" in n1.files["node.env"]
    assert n1.files["fabric_probe.py"] == fabric.PROBE.read_text()
    assert plan.manifest == {} and plan.plan["start_timeout_s"] == plan.plan["stall_timeout_s"] == 300
    text = plan.format(detail=True)
    assert "fabric check over nccl, world size 12 on 2 nodes" in text and "1, 4, 16, 64, 256 MB" in text


@pytest.mark.parametrize("flavor,backend", [("cpu", "gloo"), ("cu128", "nccl"), ("npu", "hccl")])
def test_the_backend_is_the_one_training_uses(flavor, backend):
    assert fabric.backend(lock.load_stack(None, flavor)) == backend


def test_cpu_stacks_run_one_process_per_node():
    plan = fabric.make_plan(_cluster((8, 8, 8)), lock.load_stack(None, "cpu"), fabric.FabricOptions.from_dict(OPTIONS))
    assert plan.plan["world_size"] == 3 and plan.nodes["n2"].command[6] == "1"
    assert plan.run_id.split("-")[2] == "fabric"


@pytest.mark.parametrize("change,word", [({"sizes_mb": []}, "train_fabric_sizes_mb"),
                                         ({"sizes_mb": [0.5, 9000]}, "train_fabric_sizes_mb"),
                                         ({"iters": 0}, "train_fabric_iters"),
                                         ({"timeout_s": 0}, "train_fabric_timeout_s"),
                                         ({"min_ratio": 1.5}, "train_fabric_min_ratio"),
                                         ({"pair_mb": "x"}, "not numbers")])
def test_bad_settings_are_one_message_naming_the_setting(change, word):
    with pytest.raises(ConfigError, match=word):
        fabric.FabricOptions.from_dict({**OPTIONS, **change})


def _nodes(*figures):
    return [{"name": f"node{i + 1}", "link_gbps": f} for i, f in enumerate(figures)]


def test_a_node_below_half_the_median_fails_and_is_named_the_slowest():
    nodes = _nodes(1.2, 1.1, 0.05, 1.3)
    problems = fabric_probe.judge(nodes, 0, 0.5)
    assert len(problems) == 1 and problems[0].startswith("node3: its link carries 0.050 GB/s, below 50% of")
    assert fabric_probe.slowest(nodes) == "node3"
    assert fabric_probe.judge(nodes, 0, 0) == []  # ratio off


def test_the_floor_applies_to_every_node_and_the_ratio_needs_three_nodes():
    assert [p.split(":")[0] for p in fabric_probe.judge(_nodes(0.4, 2.0), 1.0, 0.5)] == ["node1"]
    assert fabric_probe.judge(_nodes(0.4, 2.0), 0, 0.5) == []  # two nodes share one link: no median to compare
    assert fabric_probe.slowest(_nodes(0.4, 2.0)) is None
    assert fabric_probe.judge(_nodes(None, 1.0, 1.0), 0, 0.5) == []  # not measured: nothing said


def test_the_ring_of_links_covers_every_node_twice():
    assert fabric_probe._pairs([0]) == []
    assert fabric_probe._pairs([0, 1]) == [(0, 1)]
    pairs = fabric_probe._pairs([0, 1, 2, 3])
    assert pairs == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert all(sum(n in p for p in pairs) == 2 for n in range(4))


def test_nccl_info_is_parsed_for_its_network_devices_and_transports():
    ib = fabric_probe.parse_nccl((DATA / "nccl-info-ib.txt").read_text())
    assert ib == {"version": "2.21.5+cuda12.4", "bootstrap": "eth0", "network": "IB",
                  "devices": ["mlx5_0:1/IB", "mlx5_1:1/IB"], "transports": ["NET/IB", "P2P/CUMEM", "P2P/IPC"]}
    sock = fabric_probe.parse_nccl((DATA / "nccl-info-socket.txt").read_text())
    assert sock["network"] == "Socket" and sock["devices"] == ["ens5:172.31.9.20"] and sock["bootstrap"] == "ens5"
    assert sock["transports"] == ["NET/Socket", "SHM"]
    assert fabric_probe.parse_nccl("") == {"version": None, "bootstrap": None, "network": None, "devices": [],
                                           "transports": []}


class _Done:
    def __init__(self, run_dir, ok=True, errors=(), state="succeeded"):
        self.run_dir, self.ok, self.errors, self.state = str(run_dir), ok, errors, state


def _collected(tmp_path, report):
    out = tmp_path / "nodes" / "node1" / "output"
    out.mkdir(parents=True)
    (out / "fabric.json").write_text(json.dumps(report))
    return tmp_path


def test_the_report_reads_rank_0s_figures_and_shows_the_table(tmp_path):
    nodes = [{"name": "node1", "link_gbps": 1.2, "interface": "eth0"}, {"name": "node2", "link_gbps": 1.1},
             {"name": "node3", "link_gbps": 0.005, "interface": "eth0",
              "nccl": {"network": "IB", "devices": ["mlx5_0:1/IB"], "transports": ["NET/IB"]}}]
    problems = fabric_probe.judge(nodes, 0, 0.5)
    found = {"ok": False, "backend": "nccl", "world_size": 3, "latency_us": 40.5, "slowest": "node3",
             "problems": problems, "nodes": nodes,
             "sizes": [{"bytes": 1 << 20, "time_us": 900.0, "algbw_gbps": 1.1651, "busbw_gbps": 1.5534}]}
    run_dir = _collected(tmp_path, found)
    rep = fabric._report(_Done(run_dir, ok=False, errors=("node1 exited with code 3",), state="failed"), "f1", None)
    assert not rep.ok and rep.slowest == "node3" and rep.problems == tuple(problems) and rep.errors == ()
    text = rep.format()
    assert text.startswith("fabric check: FAILED (run f1)")
    assert "1.0 MB" in text and "1.553 GB/s" in text and "latency 40.5 us" in text
    assert "node3: link 0.005 GB/s, interface eth0, NCCL IB mlx5_0:1/IB via NET/IB  <- slowest" in text
    assert json.loads(rep.to_json())["nodes"][2]["name"] == "node3"


def test_a_check_that_ended_without_figures_says_why(tmp_path):
    rep = fabric._report(_Done(tmp_path, ok=False, errors=("the run failed: no training step within 20 s",),
                               state="failed"), "f2", None)
    assert not rep.ok and rep.errors == ("the run failed: no training step within 20 s",) and rep.sizes == ()
    assert "FAILED" in rep.format() and "no training step within 20 s" in rep.format()

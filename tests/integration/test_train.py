"""Real multi-node LLaMA-Factory training over real SSH on the namespace testbed, with the default stack."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_processes, variant
from llamafleet import status, stop, train
from llamafleet.training import run_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_lora_sft_across_two_nodes_with_torchrun(two_nodes, job, default_stack):
    result = train(two_nodes, job / "sft_lora.yaml", workdir=job.parents[1], follow_run=True, poll_s=3)
    assert result.ok, result.format()
    assert result.plan["plan"]["world_size"] == 2
    assert {n.state for n in result.status.nodes} == {"exited"}
    out = Path(result.outputs["adapter"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert Path(result.outputs["loss plot"]).is_file()
    losses = [json.loads(line).get("loss") for line in Path(result.outputs["trainer log"]).read_text().splitlines()]
    assert [x for x in losses if x is not None], "no loss logged"
    assert "train_loss" in json.loads(Path(result.outputs["results"]).read_text())
    # one world of size 2: both ranks ran, each on its own node
    logs = {n: Path(result.outputs[f"log {n}"]).read_text() for n in ("node1", "node2")}
    assert "world size: 2" in logs["node1"] and "world size: 2" in logs["node2"]
    assert "Process rank: 0" in logs["node1"] and "Process rank: 1" in logs["node2"]
    assert not run_processes(result.run_id)


def test_deepspeed_launcher_with_zero2(two_nodes, job):
    cfg = variant(job, "zero2", deepspeed="examples/tiny/ds_zero2.json", max_steps=4, save_steps=2)
    result = train(two_nodes, cfg, workdir=job.parents[1], launcher="deepspeed", follow_run=True, poll_s=3)
    assert result.ok, result.format()
    assert (Path(result.outputs["adapter"]) / "adapter_model.safetensors").is_file()
    cmd = result.plan["nodes"]["node2"]["command"]
    assert cmd[0].endswith("/bin/deepspeed") and "--no_local_rank" in cmd and cmd[cmd.index("--node_rank") + 1] == "1"
    log2 = Path(result.outputs["log node2"]).read_text()
    assert "world size: 2" in log2


def _wait_for_step(inv, run_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status(inv, run_id)
        if st.progress:
            return st
        assert not st.failed_nodes, st.format_line()
        time.sleep(3)
    raise AssertionError("no training step in time")


def test_a_killed_worker_stops_every_rank_and_keeps_the_logs(two_nodes, job):
    cfg = variant(job, "long", max_steps=400, save_steps=1000)
    started = train(two_nodes, cfg, workdir=job.parents[1])
    assert started.ok and started.state == "started", started.format()
    run_id = started.run_id
    _wait_for_step(two_nodes, run_id)
    # the worker's training process (the torchrun child that runs LLaMA-Factory), killed from outside
    victims = [p for p in run_processes(run_id)
               if "launcher.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
               and "node2" in os.readlink(f"/proc/{p}/cwd")]
    assert victims, "no training process found on node2"
    for p in victims:
        os.kill(p, signal.SIGKILL)
    from llamafleet import follow

    result = follow(two_nodes, run_id, poll_s=2)
    assert not result.ok and result.state == "failed"
    assert "node2" in "\n".join(result.errors)
    assert not run_processes(run_id), "processes of the run are still alive"
    assert Path(result.outputs["log node1"]).is_file() and Path(result.outputs["log node2"]).is_file()


def test_a_second_run_is_refused_while_one_runs(two_nodes, job):
    cfg = variant(job, "long2", max_steps=400, save_steps=1000)
    first = train(two_nodes, cfg, workdir=job.parents[1])
    assert first.ok, first.format()
    try:
        second = train(two_nodes, job / "sft_lora.yaml", workdir=job.parents[1])
        assert not second.ok and second.state == "not-started"
        assert "still running" in "\n".join(second.errors)
        assert len({p for p in run_processes(first.run_id)}) > 0
        assert not run_processes(second.run_id)
    finally:
        stop(two_nodes, first.run_id)
    assert not run_processes(first.run_id)


def test_an_unreachable_node_at_launch_starts_nothing(testbed, default_stack, job, tmp_path):
    _, roots = default_stack
    inv = testbed.write_inventory(tmp_path / "hosts.yml", nodes=["node1", "node2"],
                                  extra_host_vars={"node1": {"llamafleet_root": str(roots / "node1")},
                                                   "node2": {"llamafleet_root": str(roots / "node2"),
                                                             "ansible_host": testbed.nodes[0].ip.rsplit(".", 1)[0] + ".99"}},
                                  extra_group_vars={"stack_offline": True, "ansible_ssh_timeout": 3})
    result = train(inv, job / "sft_lora.yaml", workdir=job.parents[1])
    assert not result.ok and result.state == "not-started"
    assert "node2" in "\n".join(result.errors)
    assert not (roots / "node1" / "runs" / result.run_id).exists()
    assert not run_processes(result.run_id)


BAD_CONFIGS = {
    "unknown dataset": ({"dataset": "no_such_data"}, "no_such_data"),
    "missing data file": ("missing_file", "does not exist"),
    "wrong column name": ("bad_column", "wrong_col"),
    "invalid DeepSpeed JSON": ({"deepspeed": "broken_ds.json"}, "broken_ds.json"),
    "batch size 0": ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    "missing model dir": ({"model_name_or_path": "no/such/model/dir"}, "model_name_or_path"),
    "unknown stage": ({"stage": "magic"}, "stage"),
    "unknown finetuning type": ({"finetuning_type": "hyper"}, "finetuning_type"),
    "zero epochs and no max_steps": ({"num_train_epochs": 0, "max_steps": -1}, "num_train_epochs"),
    "learning rate 0": ({"learning_rate": 0}, "learning_rate"),
    "no output_dir": ({"output_dir": None}, "output_dir"),
    # what the nodes' LLaMA-Factory (its argument names, from the probe) and transformers would refuse at start
    "misspelt key": ({"learning_rat": 1.0e-4}, "learning_rat: not an argument of LLaMA-Factory 0.9.5"),
    "fp16 and bf16": ({"fp16": True, "bf16": True}, "fp16 and bf16: both are true"),
    "fp16 on a CPU stack": ({"fp16": True}, "fp16 mixed precision needs GPUs"),
    # LLaMA-Factory's own example path, from a directory that is not a LLaMA-Factory checkout
    "deepspeed not under the working directory": ({"deepspeed": "examples/deepspeed/ds_z3_config.json"},
                                                  "relative to the working directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_refused_before_any_node_starts(case, two_nodes, job, default_stack, tmp_path, cli):
    _, roots = default_stack
    change, fragment = BAD_CONFIGS[case]
    work = tmp_path / "examples" / "tiny"
    shutil.copytree(job, work, symlinks=True, ignore=shutil.ignore_patterns("model"))
    (work / "model").symlink_to(job / "model")
    data = yaml.safe_load((work / "sft_lora.yaml").read_text())
    if change == "missing_file":
        (work / "data" / "tiny_alpaca.jsonl").unlink()
    elif change == "bad_column":
        info = json.loads((work / "data" / "dataset_info.json").read_text())
        info["tiny_alpaca"]["columns"] = {"prompt": "wrong_col", "response": "output"}
        (work / "data" / "dataset_info.json").write_text(json.dumps(info))
    else:
        data.update(change)
        data = {k: v for k, v in data.items() if v is not None}
    (tmp_path / "broken_ds.json").write_text("{ not json")
    (work / "sft_lora.yaml").write_text(yaml.safe_dump(data))
    before = {p.name for p in (roots / "node1" / "runs").glob("*")} if (roots / "node1" / "runs").exists() else set()
    proc = cli("train", "-i", str(two_nodes), str(work / "sft_lora.yaml"), "--workdir", str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert fragment in out, out
    after = {p.name for p in (roots / "node1" / "runs").glob("*")} if (roots / "node1" / "runs").exists() else set()
    assert after <= before | {"active"}, "a run directory was created"


def test_a_stopped_run_resumes_from_its_last_complete_checkpoint(two_nodes, job, default_stack):
    _, roots = default_stack
    cfg = variant(job, "resumable", max_steps=400, save_steps=2)
    first = train(two_nodes, cfg, workdir=job.parents[1])
    assert first.ok, first.format()
    run_id = first.run_id
    deadline = time.time() + 600
    while time.time() < deadline:
        st = status(two_nodes, run_id)
        if st.progress and st.progress.get("current_steps", 0) >= 3:
            break
        assert not st.failed_nodes, st.format_line()
        time.sleep(1)
    stop(two_nodes, run_id)
    assert not run_processes(run_id)
    master_out = roots / "node1" / "runs" / run_id / "output"
    done = sorted(int(p.name.split("-")[1]) for p in master_out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert done, "no complete checkpoint to resume from"
    # the worker's own checkpoint holds only its rank's state until llamafleet copies rank 0's in
    last = f"checkpoint-{done[-1]}"
    assert not (roots / "node2" / "runs" / run_id / "output" / last / "adapter_model.safetensors").exists()
    resumed = train(two_nodes, variant(job, "resumable", max_steps=done[-1] + 2, save_steps=2), workdir=job.parents[1], run_id=run_id,
                    follow_run=True, poll_s=3)
    # llamafleet's part: rank 0's last complete checkpoint reached the worker, every node resumes from it
    adapter = roots / "node2" / "runs" / run_id / "output" / last / "adapter_model.safetensors"
    assert adapter.exists()
    # node to node (the master's relay stream, recorded as verified in the worker's hash cache), not via the controller
    assert str(adapter) in json.loads((roots / "node2" / "cache" / "sha256.json").read_text())
    assert not (Path(run_dir(run_id, None, two_nodes)) / "resume").exists()  # no copy staged on the controller
    for node in ("node1", "node2"):
        node_yaml = (roots / node / "runs" / run_id / "train.yaml").read_text()
        assert f"resume_from_checkpoint: \"{roots / node / 'runs' / run_id / 'output' / last}\"" in node_yaml
    if not resumed.ok:
        log = Path(resumed.outputs["log node1"]).read_text()
        if "don't know how to restore data location of torch.storage.UntypedStorage (tagged with cpu:0)" in log:
            # transformers loads optimizer.pt with map_location=args.device, which is "cpu:0" under CPU DDP,
            # and torch cannot restore that location: an upstream CPU-only bug (GPU runs use cuda:N).
            pytest.xfail("upstream: transformers/torch cannot load a CPU-DDP optimizer state (cpu:0)")
    assert resumed.ok, resumed.format()
    steps = [json.loads(line)["current_steps"] for line in Path(resumed.outputs["trainer log"]).read_text().splitlines()]
    assert steps[-1] == done[-1] + 2


def test_only_the_nodes_whose_inputs_differ_are_synced(two_nodes, job, default_stack):
    """Also the one-wave launch: a relaunch of the judged job on unchanged nodes is one task per node (no check,
    no judgement); a node whose inputs differ makes it go the full way (check, judgement, sync, start)."""
    from llamafleet.runner import run_playbook

    _, roots = default_stack
    cfg = variant(job, "resync", max_steps=400)
    extravars = {"train_config": str(cfg), "train_follow": False, "train_workdir": str(job.parents[1])}
    first = train(two_nodes, cfg, workdir=job.parents[1])
    assert first.ok, first.format()
    stop(two_nodes, first.run_id)
    fast = run_playbook("train.yml", two_nodes, verb="train", extravars=extravars)
    fast_id = (next(iter((fast.results.get("train_plan") or {}).values()), {}).get("plan") or {}).get("run_id")
    try:
        assert fast.ok, fast.failure_messages()
        assert not fast.results.get("parity") and not fast.results.get("sync")  # no judgement, no check ran
        starts = fast.results["train_node"]  # the start (action/train_node.py), one per node
        assert sorted(starts) == ["node1", "node2"] and all(r["run"]["state"] == "running" and "fallback" not in r
                                                             for r in starts.values()), starts
        for name, r in starts.items():  # where the start's time went on the node, in order, kept with the run
            t = r["timings"]
            assert t["module"] <= t["checked"] <= t["agreed"] <= t["supervisor_up"], (name, t)
            assert json.loads((roots / name / "runs" / fast_id / "start_timings.json").read_text()) == t
    finally:
        if fast_id:
            stop(two_nodes, fast_id)
    # node2's copy of the data changed behind our back, and a stray file appeared there; node1 is intact
    inputs = roots / "node2" / "inputs" / "resync"
    planted = inputs / "data" / "tiny_alpaca.jsonl"
    planted.write_text(planted.read_text() + '{"instruction": "planted", "input": "", "output": "x"}\n')
    (inputs / "stray.txt").write_text("not an input")
    run = run_playbook("train.yml", two_nodes, verb="train", extravars=extravars)
    try:
        assert run.ok, run.failure_messages()
        assert run.results.get("parity")  # the one-wave start fell back: the full way judged the nodes
        synced = next(iter(run.results["sync"].values()))["nodes"]
        assert list(synced) == ["node2"], synced  # node1 already held the manifest's files: no rsync at all
        itemized = "\n".join(synced["node2"][0]["itemized"])
        assert "data/tiny_alpaca.jsonl" in itemized and "stray.txt" in itemized
        assert planted.read_bytes() == (job / "data" / "tiny_alpaca.jsonl").read_bytes()
        assert not (inputs / "stray.txt").exists()
    finally:
        planned = next(iter((run.results.get("train_plan") or {}).values()), {}).get("plan") or {}
        if planned.get("run_id"):
            stop(two_nodes, planned["run_id"])


def test_accelerate_launcher_trains_across_two_nodes_in_one_world(two_nodes, job):
    """accelerate launch on every node with its own rendered config; on this CPU stack that is MULTI_CPU DDP over
    gloo (accelerate's FSDP needs GPUs), one process per node, both in one world."""
    cfg = variant(job, "accel", max_steps=4, save_steps=100)
    result = train(two_nodes, cfg, workdir=job.parents[1], launcher="accelerate", follow_run=True, poll_s=3)
    assert result.ok, result.format()
    node2 = result.plan["nodes"]["node2"]
    assert node2["command"][0].endswith("/bin/accelerate") and node2["command"][1:3] == ["launch", "--config_file"]
    rendered = yaml.safe_load(node2["files"]["accelerate.yaml"])
    assert (rendered["machine_rank"], rendered["num_machines"], rendered["distributed_type"]) == (1, 2, "MULTI_CPU")
    logs = {n: Path(result.outputs[f"log {n}"]).read_text() for n in ("node1", "node2")}
    assert "world size: 2" in logs["node1"] and "world size: 2" in logs["node2"], logs["node2"][-3000:]
    assert (Path(result.outputs["adapter"]) / "adapter_model.safetensors").is_file()


def test_large_inputs_go_node_to_node_and_a_node_killed_in_the_fan_out_starts_nothing(testbed, default_stack, job):
    """train_fanout auto: inputs of 20 MB or more that two nodes or more lack cross the controller's uplink once and
    go node to node (roles/fanout). node3's relay killed mid-stream: named, no rank starts anywhere, no relay is left,
    only hidden part files holding the first bytes of their files (to resume from). The re-run sends only what node3 lacks, removes a stray file on node2, and starts all three."""
    from llamafleet.runner import run_playbook

    inv3, roots = default_stack
    fat = job / "model-fat"  # the tiny model with a 24 MB file beside it: a model worth fanning out
    shutil.copytree(job / "model", fat, dirs_exist_ok=True)
    (fat / "padding.bin").write_bytes(os.urandom(24 << 20))
    cfg = variant(job, "fanned", model_name_or_path="examples/tiny/model-fat", max_steps=400)
    ev = {"train_config": str(cfg), "train_follow": False, "train_workdir": str(job.parents[1]),
          "train_fanout_min_mb": 20}
    stop_killer = threading.Event()
    killer = threading.Thread(target=testbed.kill_relay_when_receiving, args=("node3", roots / "node3", stop_killer))
    killer.start()
    try:
        with testbed.shaped("node1", "40mbit"):  # node1 receives at 40 Mbit/s: the stream lasts a few seconds
            broken = run_playbook("train.yml", inv3, verb="train", extravars=ev)
    finally:
        stop_killer.set()
        killer.join()
    text = "\n".join(broken.failure_messages())
    assert not broken.ok and "node3: fan-out incomplete" in text, text
    plan = next(iter(broken.results["train_plan"].values()))["plan"]
    assert not run_processes(plan["run_id"])
    assert not broken.results.get("sync")  # no rsync from the controller: the fan-out carried the inputs
    assert not list((Path(run_dir(plan["run_id"], None, inv3)).parents[1] / "fanout").glob("*.key"))  # secret gone
    for n in ("node1", "node2", "node3"):
        base = roots / n / "inputs" / "fanned"
        for part in (base / "model").rglob("*.fanout-part"):  # hidden, kept to resume from: its file's first bytes
            assert (fat / part.name[1:].rsplit(".", 2)[0]).read_bytes().startswith(part.read_bytes()), part
        assert not list((roots / n / "fanout").glob("*")), n  # no relay, config or secret left
    stray = roots / "node2" / "inputs" / "fanned" / "stray.txt"
    stray.write_text("not an input")
    again = run_playbook("train.yml", inv3, verb="train", extravars=ev)
    run_id = (next(iter((again.results.get("train_plan") or {}).values()), {}).get("plan") or {}).get("run_id")
    try:
        assert again.ok, again.failure_messages()
        sent = next(iter(again.results["fanout_send"].values()))
        assert sent["chain"] == ["node3"], sent  # node1 and node2 finished the first time; node2 only lost a stray
        assert not stray.exists()
        manifest = next(iter(again.results["train_plan"].values()))["plan"]["manifest"]
        for n in ("node1", "node2", "node3"):
            base = roots / n / "inputs" / "fanned"
            assert {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()} == set(manifest), n
            assert hashlib.sha256((base / "model" / "padding.bin").read_bytes()).hexdigest() \
                == manifest["model/padding.bin"], n
        assert {n.name for n in status(inv3, run_id).nodes if n.state in ("running", "exited")} \
            == {"node1", "node2", "node3"}
    finally:
        if run_id:
            stop(inv3, run_id)

"""The collection's own logic that runs outside a playbook: sync transfers, rsync over Ansible's
connections, the node probe's cache, the rendezvous interface lookup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "collections"))

from ansible_collections.llamafleet.cluster.plugins.filter import train as train_filters  # noqa: E402
from ansible_collections.llamafleet.cluster.plugins.filter.transfer import rsync_argv  # noqa: E402
from ansible_collections.llamafleet.cluster.plugins.module_utils import probe, supervisor  # noqa: E402

PLAN = {"stage_dir": "/ctl/stage/job", "run_id": "r1",
        "nodes": {h: {"inputs_dir": f"/srv/{h}/inputs/job", "run_dir": f"/srv/{h}/runs/r1"} for h in ("a", "b", "c")}}


def test_only_nodes_whose_inputs_differ_are_synced():
    hostvars = {"a": {"__train_prepared": {"inputs_differ": []}},
                "b": {"__train_prepared": {"inputs_differ": ["data/x.jsonl (missing)"]}},
                "c": {}}  # no check result: synced, never skipped by mistake
    phases = train_filters.inputs_transfers(hostvars, PLAN, ["a", "b", "c"])
    assert phases == [[{"host": "b", "src": "/ctl/stage/job", "dest": "/srv/b/inputs/job"},
                       {"host": "c", "src": "/ctl/stage/job", "dest": "/srv/c/inputs/job"}]]


def test_failed_starts_names_each_node_that_did_not_start_and_nothing_when_the_start_ran_nowhere():
    ok = {"changed": True, "run": {"state": "running"}}
    hostvars = {"a": {"__train_start": ok}, "b": {"__train_start": {"failed": True, "msg": "b: port in use"}},
                "c": {"__train_start": {"unreachable": True, "msg": "ssh timed out"}}, "d": {}}
    assert train_filters.failed_starts(hostvars, ["a", "b", "c", "d"]) == [
        "b: b: port in use", "c: unreachable: ssh timed out", "d: not started (the node dropped out of the play)"]
    assert train_filters.failed_starts(hostvars, ["a"]) == []
    # the launch failed before the start (a check, a transfer): not_started.yml then only gives the lock back
    assert train_filters.failed_starts({"a": {}, "b": {"__train_prepared": {}}}, ["a", "b"]) == []


def test_the_transfers_are_included_when_some_node_lacks_a_hub_repository():
    hostvars = {"a": {"__train_prepared": {"hub_missing": []}}, "b": {"__train_prepared": {"hub_missing": ["m"]}},
                "c": {}}
    assert train_filters.lacking_hub(hostvars, ["a", "b", "c"]) == ["b"]
    assert train_filters.lacking_hub(hostvars, ["a", "c"]) == []


def test_a_node_sends_only_to_the_nodes_whose_relay_started_and_only_what_they_miss():
    """The master's checkpoint to the workers (roles/fanout with fanout_from): the route the master streams."""
    from ansible_collections.llamafleet.cluster.plugins.filter.transfer import fanout_route

    files = {"adapter.safetensors": {"size": 10, "sha256": "a" * 64}, "trainer_state.json": {"size": 2, "sha256": "b" * 64}}

    def relay(missing, port):
        return {"__fanout_recv": {"port": port, "addr": "10.0.0.%d" % port, "missing": missing, "relay": "/r", "python": "py"}}
    hostvars = {"w1": relay(["trainer_state.json"], 2), "w2": {"__fanout_recv": {"port": None, "missing": []}},
                "w3": relay(sorted(files), 4)}
    route = fanout_route(hostvars, files, ["w1", "w2", "w3"], "__fanout_recv")
    assert route["chain"] == [{"name": "w1", "addr": "10.0.0.2", "port": 2}, {"name": "w3", "addr": "10.0.0.4", "port": 4}]
    assert [(e["path"], e["to"]) for e in route["entries"]] == [("adapter.safetensors", ["w3"]),
                                                               ("trainer_state.json", ["w1", "w3"])]


def test_rsync_reaches_the_node_like_ansible_and_shares_its_connection():
    hv = {"inventory_hostname": "n1", "ansible_host": "10.0.0.5", "ansible_user": "root", "ansible_port": 2222,
          "ansible_ssh_private_key_file": "/k/id", "ansible_ssh_common_args": "-o UserKnownHostsFile='/k/known hosts'"}
    argv = rsync_argv(hv, "/src", "/dst", ssh_args=["-o", "ControlPath=/cp/%C"])
    ssh = argv[argv.index("-e") + 1]
    assert ssh.startswith("ssh -o ControlPath=/cp/%C -o BatchMode=yes -p 2222 -i /k/id")
    assert "'UserKnownHostsFile=/k/known hosts'" in ssh and "StrictHostKeyChecking=no" not in ssh
    assert argv[-2:] == ["/src/", "root@10.0.0.5:/dst/"]


def test_sync_uses_ansibles_control_path_for_ssh_nodes_only(tmp_path):
    from ansible_collections.llamafleet.cluster.plugins.action.sync import ssh_persistence_args

    hv = {"ansible_host": "10.0.0.5", "ansible_ssh_args": "-o ControlMaster=auto -o ControlPersist=60s",
          "ansible_control_path": "%(directory)s/%%C", "ansible_control_path_dir": str(tmp_path / "cp")}
    args = ssh_persistence_args(hv)
    assert args == ["-o", "ControlMaster=auto", "-o", "ControlPersist=60s", "-o", f"ControlPath={tmp_path}/cp/%C"]
    assert ssh_persistence_args({**hv, "ansible_connection": "local"}) == []
    # Ansible's default control path: a 10-character hash of address, port and user, as its ssh plugin makes it
    import hashlib
    default = {k: v for k, v in hv.items() if k != "ansible_control_path"}
    digest = hashlib.sha1(b"10.0.0.5-None-root").hexdigest()[:10]
    assert ssh_persistence_args({**default, "ansible_user": "root"})[-1] == f"ControlPath={tmp_path}/cp/{digest}"
    # without ControlPersist there is no connection to share
    assert ssh_persistence_args({**hv, "ansible_ssh_args": "-o ServerAliveInterval=5"}) == ["-o", "ServerAliveInterval=5"]


@pytest.fixture
def venv(tmp_path):
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


def _age(paths, seconds=60):
    past = time.time() - seconds
    for p in paths:
        os.utime(p, (past, past))


def test_the_probe_is_cached_until_a_package_changes(venv, monkeypatch):
    first = probe.probe_venv(str(venv), False)
    assert first["python"].startswith("%d.%d." % sys.version_info[:2]) and first["path_dirs"]
    # just written: a directory changed within its timestamp's granularity is not trusted yet
    assert not (venv / probe.PROBE_CACHE).exists()
    _age(first["path_dirs"])
    probe.probe_venv(str(venv), False)
    assert json.loads((venv / probe.PROBE_CACHE).read_text())["probe"]["python"] == first["python"]

    calls = []
    real_run = probe.run
    monkeypatch.setattr(probe, "run", lambda *a, **kw: calls.append(a) or real_run(*a, **kw))
    assert probe.probe_venv(str(venv), False)["packages"] == first["packages"]
    assert not calls, "an unchanged venv ran its Python again"

    # pip installing anything adds a *.dist-info directory to site-packages
    site = first["site_packages"]
    dist = os.path.join(site, "planted-1.0.dist-info")
    os.makedirs(dist)
    with open(os.path.join(dist, "METADATA"), "w") as fh:
        fh.write("Metadata-Version: 2.1\nName: planted\nVersion: 1.0\n")
    again = probe.probe_venv(str(venv), False)
    assert calls and again["packages"].get("planted") == "1.0"


def test_the_interface_that_reaches_an_address():
    assert probe_interface("127.0.0.1") == "lo"


def probe_interface(addr):
    code = (PROJECT / "collections/ansible_collections/llamafleet/cluster/plugins/modules/train.py").read_text()
    ns: dict = {}
    # the module's helpers, without running the module (main() needs Ansible's arguments)
    exec(compile(code.split("\ndef main():")[0], "train.py", "exec"), ns)
    return ns["_interface_to"](addr)


def module_helpers():
    code = (PROJECT / "collections/ansible_collections/llamafleet/cluster/plugins/modules/train.py").read_text()
    ns: dict = {}
    exec(compile(code.split("\ndef main():")[0], "train.py", "exec"), ns)
    return ns


@pytest.fixture
def sleeper():
    """A process of its own group that is not any run's (no LLAMAFLEET_RUN_ID): a pid a reboot could reuse."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _run_dir(tmp_path, run_id, pid, start):
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "pid").write_text(str(pid))
    if start is not None:
        (run_dir / "pid_start").write_text(start)
    return run_dir


@pytest.mark.parametrize("recorded", ["wrong", "", None], ids=["other start time", "empty", "none recorded"])
def test_a_pid_that_is_no_longer_the_run_is_never_signalled(tmp_path, sleeper, recorded):
    m = module_helpers()
    run_id = "r-%d" % sleeper.pid
    start = supervisor.identity(sleeper.pid)
    # what a reused pid looks like: the recorded start time is another process's (or there is none)
    _run_dir(tmp_path, run_id, sleeper.pid, None if recorded is None else (recorded and start.replace(
        start.split()[0], str(int(start.split()[0]) + 1), 1)))
    assert m["_stop"](str(tmp_path), run_id, 1) is False
    assert sleeper.poll() is None, "a process that is not the run's was signalled"
    assert m["_run_state"](str(tmp_path), run_id)["state"] == "lost"


def test_the_started_pid_is_stopped_while_its_start_time_matches(tmp_path, sleeper):
    m = module_helpers()
    run_id = "r-%d" % sleeper.pid
    start = supervisor.identity(sleeper.pid)
    assert start.split()[0] == open("/proc/%d/stat" % sleeper.pid).read().rsplit(")", 1)[1].split()[19]
    _run_dir(tmp_path, run_id, sleeper.pid, start)
    assert m["_run_state"](str(tmp_path), run_id)["state"] == "running"
    assert m["_stop"](str(tmp_path), run_id, 5) is True
    assert sleeper.wait(5) == -15  # TERM, via its process group
    assert m["_run_state"](str(tmp_path), run_id)["state"] == "stopped"


def test_secret_env_and_name_checks_use_the_packages_rules():
    env = {"HF_TOKEN": "hf_x", "WANDB_API_KEY": 123, "TOKENIZERS_PARALLELISM": "false", "NCCL_P2P_DISABLE": "1"}
    assert train_filters.secret_env(env) == {"HF_TOKEN": "hf_x", "WANDB_API_KEY": "123"}
    assert train_filters.secret_env(None) == {}
    assert train_filters.name_problems({"train_run_id": "", "train_job": "sft"}) == []
    assert "train_run_id is empty" in train_filters.name_problems({"train_run_id": ""}, required=["train_run_id"])[0]
    problems = train_filters.name_problems({"train_run_id": "..", "train_job": "a/b"})
    assert len(problems) == 2 and problems[0].startswith("train_run_id '..'") and "train_job 'a/b'" in problems[1]


@pytest.mark.parametrize("spec, selected", [
    ("eth", ["eth0", "eth1"]),  # a prefix, as NCCL reads it
    ("eth0", ["eth0"]),
    ("ib,eth1", ["eth1", "ib0"]),
    ("=eth", []),  # '=': exact names only
    ("=eth1", ["eth1"]),
    ("^eth", ["docker0", "ib0"]),  # '^': all but these prefixes
    ("^=eth0", ["docker0", "eth1", "ib0"]),
    ("^docker,eth", ["ib0"]),
])
def test_nccl_socket_ifname_is_matched_as_nccl_matches_it(spec, selected):
    assert sorted(probe.nccl_interfaces(spec, ["eth0", "eth1", "ib0", "docker0"])) == selected


def test_the_node_reports_its_rsync_version():
    assert probe.rsync_version().split(".")[0] == "3"

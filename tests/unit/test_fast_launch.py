"""The one-wave launch's own logic: the all-or-nothing decision over the rendezvous port (a master and two
workers in threads, over real loopback sockets), the judged digest and the record the next launch reads."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

from conftest import PROJECT
from test_plugins import module_helpers

sys.path.insert(0, str(PROJECT / "collections"))
from ansible_collections.llamafleet.cluster.plugins.filter import train as train_filters  # noqa: E402
from ansible_collections.llamafleet.cluster.plugins.module_utils import rules  # noqa: E402

SECRET = "0" * 64


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(port, master, name, secret=SECRET):
    return {"master": master, "master_addr": "127.0.0.1", "master_port": port, "workers": 2, "run_id": "r1",
            "supervisor_secret": secret, "fast_timeout_s": 5, "node_name": name}


def _decide(refusals, secrets=None):
    """Run the barrier on a master and two workers at once; each node's answer (None = go)."""
    ns, port, out = module_helpers(), _free_port(), {}
    secrets = secrets or {}
    threads = [threading.Thread(target=lambda n=n, m=m: out.__setitem__(n, ns["_fast_barrier"](
        _params(port, m, n, secrets.get(n, SECRET)), n, refusals.get(n))))
        for n, m in (("node1", True), ("node2", False), ("node3", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    return out


def test_every_node_goes_only_when_all_of_them_can():
    assert _decide({}) == {"node1": None, "node2": None, "node3": None}


def test_one_worker_that_cannot_start_stops_every_node_before_anything_starts():
    out = _decide({"node3": "it lacks inputs (data/x.jsonl (missing))"})
    assert out["node1"] == "node3: no: it lacks inputs (data/x.jsonl (missing))"
    assert out["node2"] == "the master or another node cannot start"
    assert out["node3"] == "it lacks inputs (data/x.jsonl (missing))"


def test_a_master_that_cannot_start_tells_every_worker():
    out = _decide({"node1": "run r0 is still running here"})
    assert out["node1"] == "run r0 is still running here"
    assert out["node2"] == out["node3"] == "the master or another node cannot start"


def test_a_peer_without_the_launch_secret_is_not_counted_and_nothing_goes():
    started = time.monotonic()
    out = _decide({}, secrets={"node3": "f" * 64})
    assert out["node1"] == "only 1 of 2 workers answered within 5s"
    assert out["node2"] is not None and out["node3"] is not None
    assert time.monotonic() - started < 12


def test_a_worker_does_not_talk_to_something_else_on_the_master_port():
    """An earlier run's rendezvous store on the port: the worker waits for the master's greeting, sends nothing."""
    ns = module_helpers()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(4)
    got = []
    threading.Thread(target=lambda: got.append(other.accept()[0].recv(100)), daemon=True).start()
    started = time.monotonic()
    why = ns["_fast_barrier"](_params(other.getsockname()[1], False, "node2"), "node2", None)
    other.close()
    # no greeting: it gives up within the greeting's 3 s, having sent nothing (it falls back, nothing starts)
    assert why == "the master did not answer" and got in ([], [b""]) and time.monotonic() - started < 5


def test_the_digest_ignores_the_clock_and_disk_and_sees_a_changed_package():
    a = {"node": {"hostname": "n1", "time": 1.0, "clock_offset_s": 0.2, "disk_free_gb": 50.0, "nvcc": None},
         "stack": {"status": "ok", "probe": {"packages": {"torch": "2.13.0"}}}, "model": {"files": 3}, "changed": False}
    b = json.loads(json.dumps(a))
    b["node"].update(time=99.0, clock_offset_s=1.5, disk_free_gb=10.0)
    b["inputs_differ"] = []
    assert rules.judged_digest(a) == rules.judged_digest(b)
    b["stack"]["probe"]["packages"]["torch"] = "2.12.0"
    assert rules.judged_digest(a) != rules.judged_digest(b)


def test_the_record_is_read_only_for_its_key_and_only_when_it_judged_every_node(tmp_path):
    path = tmp_path / "judged-launch.json"
    assert train_filters.judged(str(path), "k", ["a"]) == {}
    path.write_text(json.dumps({"key": "k", "nodes": {"a": "d1", "b": "d2"}}))
    assert train_filters.judged(str(path), "k", ["a", "b"]) == {"a": "d1", "b": "d2"}
    assert train_filters.judged(str(path), "other", ["a", "b"]) == {}
    assert train_filters.judged(str(path), "k", ["a", "b", "c"]) == {}


def _judged_launch(tmp_path, **plan):
    train = {"plan": {"arguments": {"stage": "sft"}, "model": {"label": "m", "source": "controller"}, **plan}}
    lf = {"stack": {"venv_name": "v1", "requirements": [["torch", "2.1"]]}, "gpus": 1,
          "cluster": {"nodes": [{"name": "a"}, {"name": "b"}], "master": "a"}}
    path = tmp_path / "judged-launch.json"
    path.write_text(json.dumps({"key": train_filters.judgment_key(train, lf, 5), "nodes": {"a": "d1", "b": "d2"}}))
    settings = {"train_fast": True, "train_run_id": "", "train_fabric": False, "preflight_max_clock_skew_s": 5}
    return train, lf, settings, str(path)


def test_a_launch_starts_in_one_wave_only_on_the_judged_key_and_when_nothing_needs_the_full_way(tmp_path):
    train, lf, settings, path = _judged_launch(tmp_path)
    assert train_filters.one_wave_digests(train, lf, settings, path, ["a", "b"]) == {"a": "d1", "b": "d2"}
    # the key: every part of it counts, and so does the order of nothing
    assert train_filters.one_wave_digests(train, lf, dict(settings, preflight_max_clock_skew_s=9), path, ["a"]) == {}
    other = json.loads(json.dumps(lf))
    other["stack"]["requirements"][0][1] = "2.2"
    assert train_filters.one_wave_digests(train, other, settings, path, ["a", "b"]) == {}
    assert train_filters.one_wave_digests(train, lf, settings, path, ["a", "b", "c"]) == {}
    for changed in ({"train_fast": "false"}, {"train_run_id": "r1"}, {"train_fabric": True}):
        assert train_filters.one_wave_digests(train, lf, dict(settings, **changed), path, ["a", "b"]) == {}, changed
    for plan in ({"model": {"label": "m", "source": "hub"}}, {"shared_output_dir": "/nfs/out"}):
        t = {"plan": dict(train["plan"], **plan)}
        assert train_filters.one_wave_digests(t, lf, settings, path, ["a", "b"]) == {}, plan


def test_a_wave_that_fell_back_everywhere_is_no_failure_but_one_that_started_somewhere_is():
    back = {"fallback": "node3: no: it lacks inputs", "changed": False}
    ran = {"changed": True, "run": {"state": "running"}}
    everywhere = {"a": {"__train_start": back}, "b": {"__train_start": back}}
    assert train_filters.fast_fell_back(everywhere, ["a", "b"]) and train_filters.failed_starts(everywhere, ["a", "b"]) == []
    mixed = {"a": {"__train_start": ran}, "b": {"__train_start": back}}
    assert not train_filters.fast_fell_back(mixed, ["a", "b"])
    assert train_filters.failed_starts(mixed, ["a", "b"]) == ["b: did not start while other nodes did "
                                                               "(node3: no: it lacks inputs)"]
    skipped = {"a": {"__train_start": {"skipped": True}}, "b": {"__train_start": {"skipped": True}}}
    assert not train_filters.fast_fell_back(skipped, ["a", "b"]) and train_filters.failed_starts(skipped, ["a", "b"]) == []

"""Node-to-node fan-out across four namespace nodes, for real (playbooks/fanout.yml, module_utils/fanout.py).

The controller streams a dataset and a model once, into the first node; the nodes pass it on to each other over
the training network. Every node's copy equals the controller's manifest; a re-run moves only what is missing;
a node killed mid-transfer is named, no half-copied file is left and the re-run resumes the file it was in; the relay refuses a peer without the
transfer's credential, and nothing listens once a transfer is over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import PROJECT
from testbed import Testbed

from llamafleet import fanout

sys.path.insert(0, str(PROJECT / "collections"))
from ansible_collections.llamafleet.cluster.plugins.module_utils import fanout as protocol  # noqa: E402

pytestmark = [pytest.mark.integration]
SLOT = 4
DEST = "inputs/fanout-test"


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    with Testbed(tmp_path_factory.mktemp("fanout-testbed"), nodes=4, slot=SLOT) as tb:
        yield tb


@pytest.fixture
def inv(four, tmp_path):
    return four.write_inventory(tmp_path / "inv" / "hosts.yml",
                                extra_host_vars={n.name: {"llamafleet_root": str(tmp_path / "roots" / n.name)}
                                                 for n in four.nodes},
                                extra_group_vars={"llamafleet_state_dir": str(tmp_path / "state")})


def _payload(root: Path) -> Path:
    """A dataset and a model, as a user's inputs look: a json dataset, dataset_info.json, two weight shards."""
    src = root / "src"
    (src / "data").mkdir(parents=True)
    (src / "model").mkdir()
    (src / "data" / "dataset_info.json").write_text(json.dumps({"demo": {"file_name": "demo.json"}}))
    (src / "data" / "demo.json").write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2000)]))
    for i, mb in enumerate((24, 16)):
        (src / "model" / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(os.urandom(mb << 20))
    (src / "model" / "config.json").write_text("{}")
    return src


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _listening(tb: Testbed, node) -> str:
    return tb.ssh(node, "ss -ltnp 2>/dev/null | grep -c fanout.py || true").stdout.strip()


def test_every_node_gets_the_controllers_manifest_and_a_rerun_moves_only_what_is_missing(four, inv, tmp_path):
    src = _payload(tmp_path)
    first = fanout.push(inv, src, DEST)
    assert first.ok, "\n".join(first.failure_messages())
    want = _tree(src)
    for n in four.nodes:
        assert _tree(tmp_path / "roots" / n.name / DEST) == want, n.name
        assert _listening(four, n) == "0" and not list((tmp_path / "roots" / n.name / "fanout").glob("*"))
    sent = next(iter(first.results["fanout_send"].values()))
    assert sent["first"] == "node1" and sent["chain"] == ["node1", "node2", "node3", "node4"]
    assert sent["bytes"] == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())  # once, not 4 times
    assert not list((tmp_path / "state" / "fanout").glob("*.key"))  # the transfer's secret is gone
    # every node answered complete at the end of the stream: no wait task ran on any node, and each node's
    # hash cache holds what its relay verified (the next check reads no file again)
    assert [(a["node"], a["complete"]) for a in sent["acks"]] == [(n, True) for n in ("node1", "node2", "node3", "node4")]
    assert not [h for h, r in first.results["fanout"].items() if "status" in r]
    for n in four.nodes:
        cache = json.loads((tmp_path / "roots" / n.name / "cache" / "sha256.json").read_text())
        assert {str(tmp_path / "roots" / n.name / DEST / rel) for rel in want} <= set(cache), n.name
    # node3 loses a shard: the re-run streams only that file, and only node3 is in the chain
    (tmp_path / "roots" / "node3" / DEST / "model" / "model-00002-of-00002.safetensors").unlink()
    again = fanout.push(inv, src, DEST)
    assert again.ok, "\n".join(again.failure_messages())
    sent = next(iter(again.results["fanout_send"].values()))
    assert sent["chain"] == ["node3"] and sent["bytes"] == 16 << 20
    assert _tree(tmp_path / "roots" / "node3" / DEST) == want
    # nothing missing anywhere: nothing is sent
    third = fanout.push(inv, src, DEST)
    assert third.ok and next(iter(third.results["fanout_send"].values()))["bytes"] == 0


def _parts(dest: Path, src: Path) -> dict[str, int]:
    """The part files a broken-off transfer left in dest (relative path of the file -> bytes held); each must be
    the first bytes of the controller's file."""
    held = {}
    for part in dest.rglob("*.fanout-part"):
        rel = (part.parent / part.name[1:].rsplit(".", 2)[0]).relative_to(dest).as_posix()
        data = part.read_bytes()
        assert (src / rel).read_bytes()[:len(data)] == data, part
        held[rel] = len(data)
    return held


def test_a_node_killed_mid_transfer_is_named_no_half_copied_file_is_left_and_the_rerun_resumes_it(four, inv, tmp_path):
    src = _payload(tmp_path)
    stop = threading.Event()
    # killed 8 MiB in: inside the first 24 MiB shard, so what node3 (and node4 after it) received of it is kept
    killer = threading.Thread(target=four.kill_relay_when_receiving,
                              args=("node3", tmp_path / "roots" / "node3", stop, 8 << 20))
    killer.start()
    # node1 receives at 80 Mbit/s: the transfer lasts a few seconds, long enough to kill node3's relay in it
    try:
        with four.shaped("node1", "80mbit"):
            result = fanout.push(inv, src, DEST)
    finally:
        stop.set()
        killer.join()
    text = "\n".join(result.failure_messages())
    assert not result.ok
    assert "node3: fan-out incomplete" in text, text
    assert "node4: fan-out incomplete" in text and "ended early" in text, text  # after node3: its stream ended
    assert "MiB received are kept for the next transfer to resume from" in text, text
    want, wanting, held = _tree(src), {}, {}
    for n in four.nodes:
        dest = tmp_path / "roots" / n.name / DEST
        have = _tree(dest)  # no half-copied file, anywhere: only verified files under their names
        assert all(have[rel] == want[rel] for rel in have), n.name
        for rel in set(want) - set(have):
            wanting.setdefault(rel, []).append(n.name)
        held[n.name] = _parts(dest, src)
        assert _listening(four, n) == "0", n.name
    assert held["node3"], held  # killed inside a file: its first bytes are kept
    # the re-run completes what is missing, and only that, each file from the least any wanting node holds
    resumes = sum(min(held[n].get(rel, 0) for n in nodes) for rel, nodes in wanting.items())
    again = fanout.push(inv, src, DEST)
    assert again.ok, "\n".join(again.failure_messages())
    sent = next(iter(again.results["fanout_send"].values()))
    assert sent["chain"] in (["node3", "node4"], ["node2", "node3", "node4"])
    assert sent["resumed_bytes"] == resumes and sent["bytes"] == sum((src / r).stat().st_size for r in wanting) - resumes
    for n in four.nodes:
        assert _tree(tmp_path / "roots" / n.name / DEST) == want
        assert not list((tmp_path / "roots" / n.name / DEST).rglob("*.fanout-part")), n.name


def test_the_relay_refuses_a_peer_without_the_transfers_credential(four, tmp_path):
    """A relay started as the fanout module starts it: a connection with a wrong proof gets NO and is counted;
    nothing is written; the relay exits at its deadline and its port is closed."""
    node = four.nodes[1]
    run_dir = tmp_path / "relay"
    run_dir.mkdir()
    (run_dir / "secret").write_text("the-real-secret")
    (run_dir / "config.json").write_text(json.dumps({"name": node.name, "dest": str(tmp_path / "dest"), "timeout_s": 4}))
    script = Path(protocol.__file__)
    start = (f"python3 -c 'import socket,subprocess,sys; s=socket.socket(); s.bind((\"{node.ip}\", 0)); s.listen(4); "
             f"print(s.getsockname()[1], flush=True); subprocess.Popen([sys.executable, \"{script}\", \"run\", "
             f"\"{run_dir}\", str(s.fileno())], pass_fds=[s.fileno()], start_new_session=True, stdin=subprocess.DEVNULL, "
             f"stdout=open(\"{run_dir}/relay.log\", \"ab\"), stderr=subprocess.STDOUT)'")
    port = int(four.ssh(node, start).stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline and not (run_dir / "status.json").exists():
        time.sleep(0.05)
    log = (run_dir / "relay.log").read_text() if (run_dir / "relay.log").exists() else ""
    assert not (run_dir / "secret").exists(), log  # read into memory and deleted when the relay started
    with socket.create_connection((node.ip, port), timeout=5) as sock:
        conn = protocol.Conn(sock)
        with pytest.raises(protocol.FanoutError, match="refused the transfer's credential"):
            protocol.client_handshake(conn, b"a-guess")
    deadline = time.time() + 15
    while time.time() < deadline and json.loads((run_dir / "status.json").read_text())["state"] not in protocol.FINAL:
        time.sleep(0.2)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["refused"] == 1 and status["state"] == "failed" and "no authenticated sender" in status["error"]
    assert status["written"] == [] and not (tmp_path / "dest").exists()
    with pytest.raises(OSError):
        socket.create_connection((node.ip, port), timeout=2).close()

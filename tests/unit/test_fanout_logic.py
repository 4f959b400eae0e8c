"""The fan-out's own logic: the manifest and its hash cache, the chain and what each node is sent, the relay's
protocol over real loopback sockets (three relays chained in this process), paths that leave the destination,
a bad hash, a wrong credential."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading

import pytest

from conftest import PROJECT
from llamafleet import fanout
from llamafleet.errors import LlamafleetError

sys.path.insert(0, str(PROJECT / "collections"))
from ansible_collections.llamafleet.cluster.plugins.module_utils import fanout as protocol  # noqa: E402
from ansible_collections.llamafleet.cluster.plugins.module_utils import rules  # noqa: E402


def _src(tmp_path):
    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "model" / "a.bin").write_bytes(os.urandom(3 << 20))
    (src / "data.json").write_text("[1, 2, 3]")
    (src / "model" / ".b.bin.0123456789abcdef.fanout-part").write_bytes(b"half")  # a part is never in a manifest
    return src


def test_the_manifest_hashes_every_file_once_and_reuses_the_cache(tmp_path, monkeypatch):
    src = _src(tmp_path)
    cache = tmp_path / "cache.json"
    first = fanout.manifest(src, cache)
    assert set(first) == {"model/a.bin", "data.json"}
    assert first["data.json"] == {"size": 9, "sha256": hashlib.sha256(b"[1, 2, 3]").hexdigest()}
    monkeypatch.setattr(fanout, "_sha256", lambda p: pytest.fail(f"{p} hashed again"))
    assert fanout.manifest(src, cache) == first  # size and mtime unchanged: from the cache
    with pytest.raises(LlamafleetError, match="not a directory"):
        fanout.manifest(tmp_path / "nope")


def test_the_chain_holds_only_nodes_that_miss_something_and_each_file_names_who_wants_it():
    files = {"a": {"size": 1, "sha256": "x"}, "b": {"size": 2, "sha256": "y"}}
    nodes = [{"name": "n1", "addr": "10.0.0.1", "port": 1, "missing": ["a"]},
             {"name": "n2", "addr": "10.0.0.2", "port": 2, "missing": []},
             {"name": "n3", "addr": "10.0.0.3", "port": 3, "missing": ["a", "b"]}]
    chain, entries = fanout.chain_and_files(nodes, files)
    assert [c["name"] for c in chain] == ["n1", "n3"]
    assert entries == [{"path": "a", "size": 1, "sha256": "x", "to": ["n1", "n3"]},
                       {"path": "b", "size": 2, "sha256": "y", "to": ["n3"]}]


@pytest.mark.parametrize("rel", ["../escape", "/etc/passwd", "a/../../b"])
def test_a_path_that_leaves_the_destination_is_refused(tmp_path, rel):
    with pytest.raises(protocol.FanoutError, match="leaves the destination"):
        protocol.safe_path(str(tmp_path), rel)


def _relay(tmp_path, name, secret=b"s3cret", timeout=20, **config):
    run_dir = tmp_path / f"relay-{name}"
    run_dir.mkdir()
    (run_dir / "secret").write_bytes(secret)
    (run_dir / "config.json").write_text(json.dumps(dict(config, name=name, dest=str(tmp_path / name), timeout_s=timeout)))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("rc", protocol.run(str(run_dir), listener.detach())))
    thread.start()
    return {"name": name, "addr": "127.0.0.1", "port": port, "thread": thread, "dir": run_dir, "out": out}


def _open(relay):
    """A plain connection to the relay: ``protocol.send`` proves the credential itself (as over the SSH pipe)."""
    return protocol.Conn(socket.create_connection((relay["addr"], relay["port"]), timeout=10))


def _status(relay):
    return json.loads((relay["dir"] / protocol.STATUS).read_text())


def test_three_chained_relays_each_write_what_they_miss_and_pass_everything_on(tmp_path):
    src = _src(tmp_path)
    files = fanout.manifest(src)
    relays = [_relay(tmp_path, n) for n in ("n1", "n2", "n3")]
    nodes = [dict(r, missing=sorted(files)) for r in relays]
    nodes[1]["missing"] = ["data.json"]  # n2 has the model already
    chain, entries = fanout.chain_and_files(nodes, files)
    conn = _open(relays[0])
    sent, acks = protocol.send(conn, b"s3cret", chain[1:], entries, str(src))
    conn.close()
    assert [a["node"] for a in acks] == ["n1", "n2", "n3"] and {a["state"] for a in acks} == {"done"}
    for r in relays:
        r["thread"].join(10)
        assert r["out"]["rc"] == 0 and _status(r)["state"] == "done"
        assert not (r["dir"] / "secret").exists()  # read, then deleted
    assert sent == sum(f["size"] for f in files.values())
    assert (tmp_path / "n1" / "model" / "a.bin").read_bytes() == (src / "model" / "a.bin").read_bytes()
    assert (tmp_path / "n3" / "data.json").read_text() == "[1, 2, 3]"
    assert not (tmp_path / "n2" / "model").exists() and (tmp_path / "n2" / "data.json").is_file()
    assert sorted(_status(relays[0])["written"]) == sorted(files) and _status(relays[1])["written"] == ["data.json"]
    hashed = _status(relays[2])["hashed"]  # what the fanout module records in the node's hash cache
    assert {k: v[2] for k, v in hashed.items()} == {k: f["sha256"] for k, f in files.items()}


def test_the_end_of_the_stream_brings_back_each_node_complete_its_hashes_cached_and_nothing_left(tmp_path):
    """What lets the controller skip the wait task: a node whose whole manifest is on its disk says so in its
    answer up the chain, has put what it verified in its hash cache, and has removed its relay directory."""
    src = _src(tmp_path)
    files = fanout.manifest(src)
    shutil.copytree(src / "model", tmp_path / "n2" / "model")  # n2 holds the model already: only data.json is sent
    relays = [_relay(tmp_path, n, root=str(tmp_path / f"root-{n}"), manifest=files, cleanup=True) for n in ("n1", "n2")]
    nodes = [dict(relays[0], missing=sorted(files)), dict(relays[1], missing=["data.json"])]
    chain, entries = fanout.chain_and_files(nodes, files)
    conn = _open(relays[0])
    _sent, acks = protocol.send(conn, b"s3cret", chain[1:], entries, str(src))
    conn.close()
    for r in relays:
        r["thread"].join(10)
        assert r["out"]["rc"] == 0 and not r["dir"].exists()  # nothing of the transfer is left on the node
    assert [(a["node"], a["state"], a["complete"], a["bad"]) for a in acks] == [("n1", "done", True, []),
                                                                                 ("n2", "done", True, [])]
    cache = json.loads((tmp_path / "root-n1" / rules.NODE_HASH_CACHE).read_text())
    assert {os.path.relpath(k, tmp_path / "n1"): v[2] for k, v in cache.items()} == {k: f["sha256"] for k, f in files.items()}


def test_a_node_missing_a_file_at_the_end_is_not_complete_and_keeps_its_status_for_the_wait_task(tmp_path):
    src = _src(tmp_path)
    files = fanout.manifest(src)
    relay = _relay(tmp_path, "n1", root=str(tmp_path / "root"), manifest=files, cleanup=True)
    # the chain sends n1 only data.json (as if it held the model), but its disk lacks the model
    chain, entries = fanout.chain_and_files([dict(relay, missing=["data.json"])], files)
    conn = _open(relay)
    _sent, acks = protocol.send(conn, b"s3cret", chain[1:], entries, str(src))
    conn.close()
    relay["thread"].join(10)
    assert acks[0]["complete"] is False and _status(relay)["state"] == "done"  # the wait task then names what is missing


def test_a_file_whose_bytes_do_not_match_the_manifest_is_not_kept(tmp_path):
    src = _src(tmp_path)
    files = fanout.manifest(src)
    files["data.json"] = dict(files["data.json"], sha256="0" * 64)
    relay = _relay(tmp_path, "n1")
    chain, entries = fanout.chain_and_files([dict(relay, missing=sorted(files))], files)
    conn = _open(relay)
    _sent, acks = protocol.send(conn, b"s3cret", [], entries, str(src))
    relay["thread"].join(10)
    assert acks[0]["bad"] == ["data.json"] and not acks[0]["complete"]
    assert _status(relay)["bad"] == ["data.json"] and not (tmp_path / "n1" / "data.json").exists()
    assert not list((tmp_path / "n1").glob(".*.fanout-part"))


def test_the_stream_resumes_each_file_from_the_least_any_wanting_node_holds_of_it():
    files = {"a": {"size": 100, "sha256": "x"}, "b": {"size": 50, "sha256": "y"}}
    nodes = [{"name": "n1", "addr": "10.0.0.1", "port": 1, "missing": ["a", "b"], "partial": {"a": 60, "b": 50}},
             {"name": "n2", "addr": "10.0.0.2", "port": 2, "missing": ["a"], "partial": {"a": 40}},
             {"name": "n3", "addr": "10.0.0.3", "port": 3, "missing": ["b"]}]
    _chain, entries = fanout.chain_and_files(nodes, files)
    assert entries == [{"path": "a", "size": 100, "sha256": "x", "to": ["n1", "n2"], "offset": 40},
                       {"path": "b", "size": 50, "sha256": "y", "to": ["n1", "n3"]}]  # n3 holds none of b


def _break_off(relay, entry, src, nbytes):
    """A sender that streams ``nbytes`` of one file, then drops the connection (a cut link, a killed sender)."""
    conn = _open(relay)
    protocol.client_handshake(conn, b"s3cret")
    protocol.send_frame(conn, {"chain": []})
    protocol.send_frame(conn, entry)
    conn.write((src / entry["path"]).read_bytes()[:nbytes])
    conn.close()
    relay["thread"].join(10)


def test_a_file_a_broken_off_stream_left_is_resumed_where_its_part_ends_and_verified_whole(tmp_path):
    src = _src(tmp_path)
    files = fanout.manifest(src)
    (entry,) = [e for e in fanout.chain_and_files([{"name": "n1", "addr": "", "port": 0, "missing": ["model/a.bin"]}],
                                                  files)[1]]
    first = _relay(tmp_path, "n1")
    _break_off(first, entry, src, 1 << 20)
    assert _status(first)["state"] == "failed" and "ended early" in _status(first)["error"]
    dest = tmp_path / "n1"
    assert not (dest / "model" / "a.bin").exists()  # never a half-copied file: only the hidden part
    held = protocol.resumable_parts(str(dest), files)
    assert 0 < held["model/a.bin"] <= 1 << 20 and set(held) == {"model/a.bin"}
    # the next transfer sends only the rest; the relay hashes the part's bytes first, then appends
    again = _relay(tmp_path, "n1b", root=str(tmp_path / "root"), manifest=files)
    shutil.move(str(dest), str(tmp_path / "n1b"))
    nodes = [dict(again, missing=sorted(files), partial=held)]
    chain, entries = fanout.chain_and_files(nodes, files)
    sent, acks = protocol.send(_open(again), b"s3cret", chain[1:], entries, str(src))
    again["thread"].join(10)
    assert sent == sum(f["size"] for f in files.values()) - held["model/a.bin"]
    assert acks[0]["resumed"] == {"model/a.bin": held["model/a.bin"]} and acks[0]["complete"] and not acks[0]["bad"]
    assert (tmp_path / "n1b" / "model" / "a.bin").read_bytes() == (src / "model" / "a.bin").read_bytes()
    assert not list((tmp_path / "n1b").rglob("*.fanout-part"))


def test_a_part_whose_bytes_are_wrong_fails_the_file_whole_and_is_dropped(tmp_path):
    src = _src(tmp_path)
    files = fanout.manifest(src)
    dest = tmp_path / "n1"
    full = dest / "model" / "a.bin"
    full.parent.mkdir(parents=True)
    part = protocol.part_path(str(full), files["model/a.bin"]["sha256"])
    open(part, "wb").write(b"\0" * 4096)  # not the file's first bytes
    stale = protocol.part_path(str(dest / "data.json"), "f" * 64)  # a part of other content
    open(stale, "wb").write(b"old")
    held = protocol.resumable_parts(str(dest), files)
    assert held == {"model/a.bin": 4096} and not os.path.exists(stale)
    relay = _relay(tmp_path, "n1")
    chain, entries = fanout.chain_and_files([dict(relay, missing=sorted(files), partial=held)], files)
    _sent, acks = protocol.send(_open(relay), b"s3cret", chain[1:], entries, str(src))
    relay["thread"].join(10)
    assert acks[0]["bad"] == ["model/a.bin"] and not full.exists() and not os.path.exists(part)
    assert (dest / "data.json").read_text() == "[1, 2, 3]"  # the other file is unaffected


def test_a_wrong_credential_is_refused_and_counted_then_the_right_one_is_served(tmp_path):
    relay = _relay(tmp_path, "n1")
    with pytest.raises(protocol.FanoutError, match="refused the transfer's credential"):
        protocol.connect(relay["addr"], relay["port"], b"a-guess")
    conn = _open(relay)
    protocol.send(conn, b"s3cret", [], [], str(tmp_path))
    relay["thread"].join(10)
    assert _status(relay)["refused"] == 1 and _status(relay)["state"] == "done"
    with pytest.raises(OSError):  # one sender per transfer: nothing listens afterwards
        socket.create_connection((relay["addr"], relay["port"]), timeout=2).close()


def test_a_successor_that_cannot_be_reached_is_recorded_and_this_node_still_finishes(tmp_path):
    src = _src(tmp_path)
    files = fanout.manifest(src)
    relay = _relay(tmp_path, "n1")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    gone = {"name": "n2", "addr": "127.0.0.1", "port": dead.getsockname()[1]}
    dead.close()
    _chain, entries = fanout.chain_and_files([dict(relay, missing=sorted(files))], files)
    conn = _open(relay)
    protocol.send(conn, b"s3cret", [gone], entries, str(src))
    relay["thread"].join(10)
    status = _status(relay)
    assert status["state"] == "done" and sorted(status["written"]) == sorted(files)
    assert status["forward_error"].startswith("n2 (127.0.0.1:") and "cannot pass the stream on" in status["forward_error"]

"""A hub model and a hub dataset, pinned, fetched and trained offline, against a server that speaks the Hub's API.

No hub is reachable here, so ``tests/hubserver.py`` serves the tiny model and a tiny dataset over the
Hugging Face Hub's HTTP protocol on the testbed's bridge address, and the real ``huggingface_hub``
client does the rest: the controller pins the revision, the nodes fetch it (``HF_ENDPOINT`` pointing
at the server, with a token the server requires) and the ranks train with the hub offline.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import variant
from hubserver import HubRepos, ServerProcess, read_request_log
from llamafleet import stop, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "llamafleet-test/tiny-qwen"
DATASET = "llamafleet-test/tiny-alpaca"
TOKEN = "hf_test_" + secrets.token_hex(8)
# A file big enough that the server can be killed in the middle of it: the client keeps whole 10 MiB chunks.
BIG = 24 * 2**20
RATE = 3 * 2**20  # bytes per second per connection


@pytest.fixture(scope="module")
def hub(testbed, job, tmp_path_factory):
    """The hub on the bridge (the nodes reach it there): the tiny model (plus a large file) and the dataset."""
    root = tmp_path_factory.mktemp("hub")
    repos = HubRepos(root)
    files = {p.name: p for p in (job / "model").iterdir() if p.is_file()}
    files["extra/padding.bin"] = b"\0" * BIG
    commit = repos.commit(MODEL, files, message="tiny model")
    data = job / "data" / "tiny_alpaca.jsonl"
    repos.commit(DATASET, {"train.jsonl": data}, repo_type="dataset", message="tiny data")
    server = ServerProcess(root, host=f"{testbed.subnet}.1", rate_limit=RATE, token=TOKEN)
    state = {"server": server, "root": root, "repos": repos, "commit": commit}
    yield state
    state["server"].kill()


def hub_job(job: Path, name: str, **changes) -> Path:
    """The tiny job reading the model and its dataset from the hub."""
    info_path = job / "data" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    if "tiny_hub" not in info:
        info["tiny_hub"] = {"hf_hub_url": DATASET}
        info_path.write_text(json.dumps(info, indent=2))
    return variant(job, name, model_name_or_path=MODEL, dataset="tiny_hub", **changes)


def _kill_and_restart_mid_file(hub, roots, done):
    """When a node has 10 MiB of the large file on disk, SIGKILL the server and start it again on the same port."""
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        partial = [p for p in roots.glob("node*/cache/huggingface/hub/models--*/blobs/*.incomplete")
                   if p.stat().st_size > 10 * 2**20]
        if partial:
            port = hub["server"].port
            hub["server"].kill()
            time.sleep(1)
            hub["server"] = ServerProcess(hub["root"], host=hub["server"].url.split("//")[1].split(":")[0], port=port,
                                          rate_limit=RATE, token=TOKEN)
            hub["killed"] = True
            return
        time.sleep(0.2)


def test_a_hub_model_and_dataset_are_pinned_fetched_resumed_and_trained_offline(hub, two_nodes, job, default_stack):
    _, roots = default_stack
    for node in ("node1", "node2"):  # a cold cache on both nodes
        shutil.rmtree(roots / node / "cache" / "huggingface" / "hub", ignore_errors=True)
    cfg = hub_job(job, "from_hub")
    done = threading.Event()
    killer = threading.Thread(target=_kill_and_restart_mid_file, args=(hub, roots, done))
    killer.start()
    try:
        # the nodes reach the hub (the testbed's stack is offline, which would fetch on the controller)
        result = train(two_nodes, cfg, workdir=job.parents[1], follow_run=True, poll_s=3, hub_fetch="nodes",
                       env={"HF_ENDPOINT": hub["server"].url, "HF_TOKEN": TOKEN})
    finally:
        done.set()
        killer.join()
    assert result.ok, result.format()
    assert hub.get("killed"), "the server was never killed mid-file"
    # resumed where the dropped connection left it (the client keeps whole 10 MiB chunks)
    ranges = [r.range for r in read_request_log(hub["root"]) if r.is_file_download and r.range]
    assert any(int(r.split("=")[1].split("-")[0]) > 0 for r in ranges), ranges
    model = result.plan["model"]
    assert model["source"] == "hub" and model["hub"]["commit"] == hub["commit"]
    assert model["hub"]["files"]["extra/padding.bin"] == BIG
    node_yaml = yaml.safe_load((roots / "node2" / "runs" / result.run_id / "train.yaml").read_text())
    snapshot = roots / "node2" / "cache" / "huggingface" / "hub" / "models--llamafleet-test--tiny-qwen" / "snapshots" \
        / hub["commit"]
    assert node_yaml["model_name_or_path"] == str(snapshot) and (snapshot / "extra" / "padding.bin").stat().st_size == BIG
    env = (roots / "node2" / "runs" / result.run_id / "node.env").read_text()
    assert "HF_HUB_OFFLINE='1'" in env or "HF_HUB_OFFLINE=1" in env
    log = Path(result.outputs["log node2"]).read_text()
    assert "world size: 2" in log


def test_a_second_run_downloads_nothing_and_a_moved_branch_is_pinned_anew(hub, two_nodes, job, default_stack):
    _, roots = default_stack
    cfg = hub_job(job, "from_hub_again", max_steps=400)
    env = {"HF_ENDPOINT": hub["server"].url, "HF_TOKEN": TOKEN}
    before = len(read_request_log(hub["root"]))
    again = train(two_nodes, cfg, workdir=job.parents[1], env=env, hub_fetch="nodes")
    try:
        assert again.ok, again.format()
    finally:
        stop(two_nodes, again.run_id)
    fetched = [r for r in read_request_log(hub["root"])[before:] if r.is_file_download]
    assert fetched == [], fetched  # the nodes' copies were complete: not one file was asked for again
    # the branch moves: the next run pins (and the nodes fetch) the new commit, the old one stays as it was
    moved = hub["repos"].commit(MODEL, {"generation_config.json": b'{"max_new_tokens": 7}'}, message="moved")
    planned = train(two_nodes, cfg, workdir=job.parents[1], env=env, dry_run=True, hub_fetch="nodes")
    assert planned.ok and planned.plan["model"]["hub"]["commit"] == moved != hub["commit"]
    pinned = train(two_nodes, variant(job, "from_hub_pinned", model_name_or_path=MODEL, dataset="tiny_hub",
                                      model_revision=hub["commit"]), workdir=job.parents[1], env=env, dry_run=True,
                   hub_fetch="nodes")
    assert pinned.ok and pinned.plan["model"]["hub"]["commit"] == hub["commit"]


def test_hub_mistakes_are_one_clear_message(hub, two_nodes, job, cli, tmp_path):
    env = {"HF_ENDPOINT": hub["server"].url, "HF_TOKEN": TOKEN}
    missing = train(two_nodes, variant(job, "no_such_model", model_name_or_path="llamafleet-test/absent"),
                    workdir=job.parents[1], env=env, dry_run=True)
    assert not missing.ok and "llamafleet-test/absent is not on" in "\n".join(missing.errors)
    bad_rev = train(two_nodes, hub_job(job, "bad_rev", model_revision="no-such-branch"), workdir=job.parents[1],
                    env=env, dry_run=True)
    assert not bad_rev.ok and "has no revision 'no-such-branch'" in "\n".join(bad_rev.errors)
    no_token = train(two_nodes, hub_job(job, "no_token"), workdir=job.parents[1],
                     env={"HF_ENDPOINT": hub["server"].url}, dry_run=True)
    assert not no_token.ok and "HF_TOKEN" in "\n".join(no_token.errors)


def test_nodes_without_hub_access_get_it_once_from_the_controller(hub, two_nodes, job, default_stack):
    """stack_offline nodes: the controller fetches the commit once and syncs it like a local model."""
    _, roots = default_stack
    cfg = hub_job(job, "from_hub_offline", max_steps=400)
    result = train(two_nodes, cfg, workdir=job.parents[1], env={"HF_ENDPOINT": hub["server"].url, "HF_TOKEN": TOKEN})
    try:
        assert result.ok, result.format()
    finally:
        stop(two_nodes, result.run_id)
    assert result.plan["model"]["fetch"] == "controller"
    assert "model/extra/padding.bin" in result.plan["manifest"] and "hubdata/tiny_hub/train.jsonl" in result.plan["manifest"]
    node_yaml = yaml.safe_load((roots / "node2" / "runs" / result.run_id / "train.yaml").read_text())
    assert node_yaml["model_name_or_path"] == str(roots / "node2" / "inputs" / "from_hub_offline" / "model")
    copy = roots / "node2" / "inputs" / "from_hub_offline" / "model" / "extra" / "padding.bin"
    assert copy.stat().st_size == BIG and not copy.is_symlink()


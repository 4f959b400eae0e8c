"""After training: the run's LoRA adapter merged into its base model on a namespace node with the run's own stack
(`llamafleet export`), checked, copied to the controller, and generating text with transformers; the adapter and
the export served behind an OpenAI-compatible API (`llamafleet serve`, llamafactory-cli api) that answers a real
chat completion from the controller, only with its key."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import stack, variant
from llamafleet import export, serve, serve_status, serve_stop, stop, train
from llamafleet.paths import state_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d)
ids = tok("Hello", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(out.shape[1] - ids["input_ids"].shape[1])
"""


@pytest.fixture(scope="module")
def trained(two_nodes, job):
    result = train(two_nodes, variant(job, "toexport", max_steps=4, save_steps=100), workdir=job.parents[1],
                   follow_run=True, poll_s=2)
    assert result.ok, result.format()
    return result


@pytest.fixture(scope="module")
def exported(two_nodes, trained):
    return export(two_nodes, trained.run_id, fetch=True)


def test_the_adapter_is_merged_checked_fetched_and_generates(two_nodes, trained, exported, default_stack, cli):
    _, roots = default_stack
    result = exported
    assert result.ok, result.format()
    assert result.node == "node1" and result.export_dir == str(roots / "node1" / "runs" / trained.run_id / "export")
    assert result.load_check["missing"] == [] and result.load_check["wrong_shape"] == []
    assert result.load_check["parameters"] > 0 and "model.safetensors" in result.files
    assert result.adapter.endswith("/output") and result.base_model.endswith("/model")
    here = Path(result.controller_dir)
    assert (here / "config.json").is_file() and (here / "model.safetensors").stat().st_size == result.files["model.safetensors"]
    record = json.loads((here.parent / "export.json").read_text())
    assert record["base_model"] == result.base_model and record["export_dir"] == result.export_dir
    # the merged model loads and generates, with the stack that trained it
    python = roots / "node1" / "stacks" / stack().venv_name / "bin" / "python"
    gen = subprocess.run([str(python), "-c", GENERATE, str(here)], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0 and gen.stdout.strip().splitlines()[-1] == "4", gen.stderr[-2000:]
    # the CLI says the same, on the worker this time, and a second export replaces the first
    proc = cli("export", trained.run_id, "-i", str(two_nodes), "--node", "node2", "--json")
    assert proc.returncode == 1, proc.stdout  # node2 holds no adapter: rank 0 writes it
    assert "node2: run %s has no adapter" % trained.run_id in proc.stdout
    again = cli("export", trained.run_id, "-i", str(two_nodes))
    assert again.returncode == 0 and f"export of run {trained.run_id}: merged on node1" in again.stdout, again.stdout


def test_bad_exports_are_one_clear_message_and_change_nothing(two_nodes, job, trained, cli):
    proc = cli("export", "no-such-run", "-i", str(two_nodes))
    assert proc.returncode == 1 and "run no-such-run is not on this node" in proc.stdout, proc.stdout + proc.stderr
    proc = cli("export", trained.run_id, "-i", str(two_nodes), "--node", "node9")
    assert proc.returncode == 1 and "train_export_node node9 is not a node of this inventory" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    running = train(two_nodes, variant(job, "busyexport", max_steps=3000, save_steps=100000), workdir=job.parents[1])
    assert running.ok, running.format()
    try:
        busy = export(two_nodes, running.run_id)
        assert not busy.ok and f"run {running.run_id} is still running" in "\n".join(busy.errors)
    finally:
        stop(two_nodes, running.run_id)


def _ask(endpoint: str, key: str | None, model: str) -> tuple[int, dict | None]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}).encode()
    req = urllib.request.Request(endpoint + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _server_processes(run_id: str) -> list[int]:
    marker = f"LLAMAFLEET_SERVER={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_the_adapter_and_the_export_are_served_with_a_key_and_answer(testbed, two_nodes, trained, exported, cli):
    assert exported.ok, exported.format()
    result = serve(two_nodes, trained.run_id, port=18000)
    try:
        assert result.ok, result.format()
        (server,) = result.servers
        node1 = next(n for n in testbed.nodes if n.name == "node1")
        assert server.node == "node1" and server.endpoint == f"http://{node1.ip}:18000/v1"
        assert server.first_answer is not None and server.model_name == trained.run_id
        assert server.backend == "api"  # auto on a CPU stack
        key_file = Path(result.api_key_file)
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        key = key_file.read_text().strip()
        # a real request from the controller, over the training network
        status, answer = _ask(server.endpoint, key, trained.run_id)
        assert status == 200 and isinstance(answer["choices"][0]["message"]["content"], str), answer
        assert _ask(server.endpoint, None, trained.run_id)[0] == 401
        assert _ask(server.endpoint, key + "x", trained.run_id)[0] == 401
        text = result.format()
        assert "curl " in text and key_file.as_posix() in text and key not in text and key not in result.to_json()
        # the same run again, or a busy port: one message each, nothing else started
        again = serve(two_nodes, trained.run_id, port=18000)
        assert not again.ok and "is already served here" in "\n".join(again.errors)
        st = serve_status(two_nodes, trained.run_id)
        assert {s.node: s.state for s in st.servers} == {"node1": "running", "node2": "absent"}
        # the key is in no log of the controller
        logs = list((state_dir() / "logs").glob("serve-*.log"))
        assert logs and not [p for p in logs if key in p.read_text(errors="replace")]
    finally:
        stopped = serve_stop(two_nodes, trained.run_id)
    assert stopped.ok and not _server_processes(trained.run_id)
    # a busy port is refused, nothing starts; the merged model of the first test is served the same way
    testbed.ssh("node1", f"setsid python3 -c 'import socket,time; s=socket.socket(); s.bind((\"{node1.ip}\", 18002)); "
                         "s.listen(); time.sleep(60)' >/dev/null 2>&1 < /dev/null &")
    time.sleep(1)
    busy = serve(two_nodes, trained.run_id, model="export", port=18002)
    assert not busy.ok and f"cannot listen on {node1.ip}:18002" in "\n".join(busy.errors), busy.format()
    assert not _server_processes(trained.run_id)
    merged = serve(two_nodes, trained.run_id, model="export", port=18003)
    try:
        assert merged.ok, merged.format()
        key = Path(merged.api_key_file).read_text().strip()
        assert _ask(merged.servers[0].endpoint, key, trained.run_id)[0] == 200
    finally:
        proc = cli("serve", trained.run_id, "-i", str(two_nodes), "--stop")
    assert proc.returncode == 0 and not _server_processes(trained.run_id), proc.stdout + proc.stderr


def test_a_run_without_an_adapter_is_not_served(default_stack, two_nodes, trained, cli):
    proc = cli("serve", "no-such-run", "-i", str(two_nodes))
    assert proc.returncode == 1 and "run no-such-run is not on this node" in proc.stdout, proc.stdout + proc.stderr
    assert not _server_processes("no-such-run")
    # a run that exists but saved no adapter (stopped before its first save): one message naming the directory
    output = default_stack[1] / "node1" / "runs" / trained.run_id / "output"
    config = output / "adapter_config.json"
    config.rename(output / "adapter_config.json.away")
    try:
        proc = cli("serve", trained.run_id, "-i", str(two_nodes))
    finally:
        (output / "adapter_config.json.away").rename(config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert f"run {trained.run_id} has no adapter in {output} (no adapter_config.json, and no config.json" in out, out
    assert not _server_processes(trained.run_id)


def test_vllm_on_a_cpu_stack_is_one_message_naming_the_api_backend(two_nodes, trained, cli):
    proc = cli("serve", trained.run_id, "-i", str(two_nodes), "--backend", "vllm")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert "no vllm serving stack for flavor cpu" in out and "--backend api" in out and "nothing was started" in out, out
    assert not _server_processes(trained.run_id)


def test_a_full_fine_tuning_run_serves_the_model_it_saved(two_nodes, job):
    """No adapter: a full fine-tuning run saved a whole model, and that model is what is served."""
    full = train(two_nodes, variant(job, "fullft", finetuning_type="full", max_steps=2, save_steps=100),
                 workdir=job.parents[1], follow_run=True, poll_s=2)
    assert full.ok, full.format()
    result = serve(two_nodes, full.run_id, port=18004)
    try:
        assert result.ok, result.format()
        (server,) = result.servers
        key = Path(result.api_key_file).read_text().strip()
        status, answer = _ask(server.endpoint, key, full.run_id)
        assert status == 200 and isinstance(answer["choices"][0]["message"]["content"], str), answer
    finally:
        stopped = serve_stop(two_nodes, full.run_id)
    assert stopped.ok and not _server_processes(full.run_id)

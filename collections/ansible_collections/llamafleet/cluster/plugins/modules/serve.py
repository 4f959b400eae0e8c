#!/usr/bin/python
# -*- coding: utf-8 -*-
# A run's adapter (or its export) served on this node behind an OpenAI-compatible API: start, report, stop.

from __future__ import annotations

DOCUMENTATION = r"""
module: serve
short_description: Serve a llamafleet run's adapter or export on this node with llamafactory-cli api
description:
  - C(started) writes the server's directory C(<root>/servers/<run_id>) (mode 0700, with C(api.yaml), C(serve.env)
    holding the API key in mode 0600, and the log) and starts C(llamafactory-cli api) from the run's own stack, detached from the SSH
    session, bound to C(host):C(port) (the node's own address unless told otherwise), with the hub offline. It is
    ready only when C(/v1/models) lists the model and a real chat completion comes back, both with the key; a key
    is always required. A busy port, a run without an adapter or export, a server of the run already running are
    one message each, and nothing starts.
  - C(status) says whether the server runs and answers; C(stopped) stops it (TERM, then KILL), only while its pid is
    still the process started.
version_added: "0.1.0"
author: llamafleet developers
options:
  state:
    description: What to do.
    type: str
    choices: [started, status, stopped]
    required: true
  root:
    description: The node's llamafleet root directory.
    type: path
    required: true
  run_id:
    description: The run whose adapter (or export) to serve.
    type: str
    required: true
  model:
    description: C(adapter) (the base model with the run's LoRA adapter; for a full or freeze fine-tuning run,
      the whole model it saved) or C(export) (the merged model of C(llamafleet export)).
    type: str
    choices: [adapter, export]
    default: adapter
  host:
    description: The address to listen on (the node's own, not 0.0.0.0 unless asked).
    type: str
    default: ""
  port:
    description: The port to listen on.
    type: int
    default: 8000
  name:
    description: The model name the API serves it under; empty = the run id.
    type: str
    default: ""
  api_key:
    description: The key every request must carry (Authorization Bearer). Written only to C(serve.env) (0600); never
      logged.
    type: str
    default: ""
  ready_timeout_s:
    description: Seconds the server may take to load the model and answer.
    type: int
    default: 900
  grace_s:
    description: Seconds between TERM and KILL when stopping.
    type: int
    default: 10
  backend:
    description: C(api) (C(llamafactory-cli api), huggingface backend, from the run's stack) or C(vllm) (C(vllm serve)
      from the serving venv C(venv), with C(--enable-lora), the adapter's rank rounded up to vLLM's allowed values and
      tensor parallel over the node's GPUs; the key in C(VLLM_API_KEY)).
    type: str
    choices: [api, vllm]
    default: api
  venv:
    description: With C(backend=vllm), the serving stack's venv on this node (provisioned with
      C(llamafleet provision --serving vllm)).
    type: path
    default: ""
  gpus:
    description: The node's GPUs (C(llamafleet_gpus)); the tensor parallel size is at most this.
    type: int
    default: 1
  tensor_parallel:
    description: vLLM's tensor parallel size; 0 = the largest the model's heads and the node's GPUs allow.
    type: int
    default: 0
  vllm_args:
    description: More arguments for C(vllm serve) (e.g. C(--max-model-len=4096)); never the API key.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Serve the adapter
  llamafleet.cluster.serve:
    state: started
    root: /srv/llamafleet
    run_id: 20261202-132625-sft_lora-bf0b
    host: 10.0.0.11
    api_key: "{{ lookup('file', key_file) }}"
"""

RETURN = r"""
server:
  description: State, endpoint, model name, pid, the answer of the readiness check, the log's last lines.
  returned: always
  type: dict
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamafleet.cluster.plugins.module_utils import supervisor, vllm

SERVER_VAR = "LLAMAFLEET_SERVER"
UNSET = ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")
READ_YAML = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"


def _processes(server_dir, tag):
    leader = supervisor.vouched(server_dir, "pid")
    marker = ("%s=%s" % (SERVER_VAR, tag)).encode()
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            try:
                with open("/proc/%d/environ" % pid, "rb") as fh:
                    hit = marker in fh.read().split(b"\0")
                if hit or (leader and os.getpgid(pid) == leader):
                    if supervisor.alive(pid):
                        found[pid] = supervisor.identity(pid)
            except (OSError, ProcessLookupError):
                continue
    found.pop(os.getpid(), None)
    return leader, found


def _request(url, key, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return None, None


def _state(p, server_dir, log_lines=20):
    tag = p["run_id"]
    if not os.path.isdir(server_dir):
        return {"run_id": tag, "state": "absent"}
    info = json.loads(supervisor.read(os.path.join(server_dir, "server.json"), "{}") or "{}")
    _leader, procs = _processes(server_dir, tag)
    log = (supervisor.read(os.path.join(server_dir, "serve.log"), "") or "").splitlines()
    out = dict(info, run_id=tag, state="running" if procs else "stopped", log_tail=log[-log_lines:] if log_lines else [])
    return out


def _stop(server_dir, tag, grace):
    leader, procs = _processes(server_dir, tag)
    if not procs:
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        supervisor.signal_processes(leader, procs, sig)
        deadline = time.time() + wait
        while time.time() < deadline:
            leader, procs = _processes(server_dir, tag)
            if not procs:
                return True
            time.sleep(0.2)
    return True


def _check_servable(module, p, host, server_dir, run_dir):
    """Fails unless the run is on this node, not served here yet, and an API key is given."""
    tag = p["run_id"]
    if not os.path.isdir(run_dir):
        module.fail_json(msg="%s: run %s is not on this node (no %s); serve a run of this cluster from the node that "
                             "holds its adapter (the master)" % (host, tag, run_dir))
    if _processes(server_dir, tag)[1]:
        module.fail_json(msg="%s: run %s is already served here (llamafleet serve %s --stop first)" % (host, tag, tag))
    if not p["api_key"]:
        module.fail_json(msg="%s: no API key: a server never listens without one" % host)


def _venv_bin(node_env):
    """The run's stack venv bin directory: the head of the last PATH export in node.env that has llamafactory-cli."""
    vbin = None
    for line in node_env.splitlines():
        if line.startswith("export PATH="):
            first = shlex.split(line[len("export PATH="):])[0].split(os.pathsep)[0]
            if os.path.isfile(os.path.join(first, "llamafactory-cli")):
                vbin = first
    return vbin


def _read_trained(module, host, run_dir, vbin):
    """The run's train.yaml as this node trained it, read with the stack venv's Python."""
    rc = subprocess.run([os.path.join(vbin, "python"), "-c", READ_YAML, os.path.join(run_dir, "train.yaml")],
                        capture_output=True, text=True, timeout=120)
    if rc.returncode != 0:
        module.fail_json(msg="%s: cannot read %s/train.yaml: %s" % (host, run_dir, rc.stderr.strip()[-300:]))
    return json.loads(rc.stdout)


def _api_spec(module, p, host, run_dir, trained):
    """llamafactory-cli api's arguments: the run's export, or its base model with its LoRA adapter."""
    tag = p["run_id"]
    spec = {"template": trained.get("template") or "default", "infer_backend": "huggingface"}
    if p["model"] == "export":
        export_dir = os.path.join(run_dir, "export")
        if not os.path.isfile(os.path.join(export_dir, "config.json")):
            module.fail_json(msg="%s: run %s has no export in %s: merge it first (llamafleet export %s)"
                                 % (host, tag, export_dir, tag))
        spec["model_name_or_path"] = export_dir
    else:
        output = os.path.join(run_dir, "output")
        if os.path.isfile(os.path.join(output, "adapter_config.json")):
            spec.update(model_name_or_path=trained["model_name_or_path"], adapter_name_or_path=output,
                        finetuning_type="lora")
        elif os.path.isfile(os.path.join(output, "config.json")):
            # a full or freeze fine-tuning run saved a whole model: that model is what is served
            spec["model_name_or_path"] = output
        else:
            module.fail_json(msg="%s: run %s has no adapter in %s (no adapter_config.json, and no config.json of a "
                                 "full fine-tuning): it saved nothing yet; continue it (llamafleet train JOB.yaml --run-id %s) "
                                 "or serve another run" % (host, tag, output, tag))
    for key in ("trust_remote_code",):
        if trained.get(key) is not None:
            spec[key] = trained[key]
    return spec


def _check_port_free(module, p, host, bind):
    """Fails when the server could not listen on bind:port (tried by binding it, then closing it at once)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind, p["port"]))
    except OSError as exc:
        module.fail_json(msg="%s: cannot listen on %s:%d (%s); pick a free port (--port)" % (host, bind, p["port"], exc.strerror))
    finally:
        s.close()


def _write_server_files(p, server_dir, spec, node_env, bind, name, command):
    """api.yaml, serve.env (the run's environment without its rendezvous, plus the server's and its key) and
    serve.sh (``command``, every word quoted; the key is never in it)."""
    os.makedirs(server_dir, mode=0o700, exist_ok=True)
    os.chmod(server_dir, 0o700)  # serve.env holds the key
    supervisor.write(os.path.join(server_dir, "api.yaml"), json.dumps(spec, indent=1, sort_keys=True) + "\n")
    env_lines = [line for line in node_env.splitlines() if line.startswith("export ") and
                 line.split("=", 1)[0][7:] not in UNSET + ("LLAMAFLEET_RUN_ID",)]
    if p["backend"] == "vllm":
        env_lines += ["export PATH=%s:\"$PATH\"" % shlex.quote(os.path.join(p["venv"], "bin")),
                      "export VLLM_NO_USAGE_STATS=1", "export %s=%s" % (vllm.KEY_ENV, shlex.quote(p["api_key"]))]
    else:
        env_lines += ["export API_HOST=%s" % shlex.quote(bind), "export API_PORT=%d" % p["port"],
                      "export API_MODEL_NAME=%s" % shlex.quote(name), "export API_KEY=%s" % shlex.quote(p["api_key"])]
    supervisor.write(os.path.join(server_dir, "serve.env"), "\n".join(env_lines) + "\n", 0o600)
    script = "#!/bin/sh\ncd %s || exit 97\n. ./serve.env\nexec %s\n" % (
        shlex.quote(server_dir), " ".join(shlex.quote(a) for a in command))
    supervisor.write(os.path.join(server_dir, "serve.sh"), script, 0o755)


def _vllm_command(module, p, host, spec, bind, name):
    """``vllm serve`` from the serving venv for this spec (the base with its adapter, or the export)."""
    vbin = os.path.join(p["venv"], "bin", "vllm")
    if not p["venv"] or not os.access(vbin, os.X_OK):
        module.fail_json(msg="%s: no vLLM serving stack here (%s missing): provision it on the nodes that serve "
                             "(llamafleet provision --serving vllm --limit %s), or serve with --backend api"
                             % (host, vbin, host))
    adapter = spec.get("adapter_name_or_path")
    served = adapter or spec["model_name_or_path"]
    r = None
    if adapter:
        r = (vllm.read_json(os.path.join(adapter, "adapter_config.json")) or {}).get("r")
    heads, kv_heads = vllm.model_heads(spec["model_name_or_path"])
    try:
        return vllm.argv(vbin, model=spec["model_name_or_path"], name=name, host=bind, port=p["port"], gpus=p["gpus"],
                         adapter=adapter, lora_r=r, heads=heads, kv_heads=kv_heads,
                         tensor_parallel_size=p["tensor_parallel"], trust_remote_code=bool(spec.get("trust_remote_code")),
                         tokenizer=served if vllm.has_chat_template(served) else None, extra=p["vllm_args"])
    except vllm.VllmError as exc:
        module.fail_json(msg="%s: run %s: %s" % (host, p["run_id"], exc))


def _launch_server(server_dir, tag):
    """Start serve.sh detached, marked with SERVER_VAR (how _processes finds it); record its pid."""
    env = {k: v for k, v in os.environ.items() if k in supervisor.KEEP_ENV}
    env[SERVER_VAR] = tag
    with open(os.path.join(server_dir, "serve.log"), "ab") as log:
        proc = subprocess.Popen(["/bin/sh", os.path.join(server_dir, "serve.sh")], cwd=server_dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    supervisor.write(os.path.join(server_dir, "pid_start"), supervisor.identity(proc.pid) or "")
    supervisor.write(os.path.join(server_dir, "pid"), str(proc.pid))
    return proc


def _wait_until_listed(module, p, host, server_dir, proc, url, name):
    """Wait until the server lists the model (with the key); returns the readiness deadline. Fails (and stops
    the server) when it exits first or does not list it in time."""
    tag = p["run_id"]
    deadline = time.time() + p["ready_timeout_s"]
    status, listed = None, None
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = (supervisor.read(os.path.join(server_dir, "serve.log"), "") or "").splitlines()[-12:]
            module.fail_json(msg="%s: the server of run %s exited (code %s) before it was ready:\n%s"
                                 % (host, tag, proc.returncode, "\n".join(tail)), server=_state(p, server_dir))
        status, listed = _request(url + "/models", p["api_key"], timeout=5)
        if status == 200:
            break
        time.sleep(0.2)  # polled as often as a user polling by hand would
    if status != 200 or name not in [m.get("id") for m in (listed or {}).get("data", [])]:
        _stop(server_dir, tag, p["grace_s"])
        module.fail_json(msg="%s: the server of run %s did not list model %s within %d s (last answer: %s); it was "
                             "stopped; see %s/serve.log" % (host, tag, name, p["ready_timeout_s"], status, server_dir))
    return deadline


def _first_completion(module, p, host, server_dir, url, name, deadline):
    """A real chat completion, with the key: returns when it was asked for and its answer. Fails (and stops the
    server) when none comes back."""
    tag = p["run_id"]
    t0 = time.time()
    status, answer = _request(url + "/chat/completions", p["api_key"], {
        "model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0},
        timeout=max(60, int(deadline - time.time())))
    content = None
    try:
        content = answer["choices"][0]["message"]["content"]
    except (TypeError, KeyError, IndexError):
        pass
    if status != 200 or content is None:
        _stop(server_dir, tag, p["grace_s"])
        module.fail_json(msg="%s: the server of run %s listed %s but no chat completion came back (HTTP %s); it was "
                             "stopped; see %s/serve.log" % (host, tag, name, status, server_dir))
    return t0, content


def _check_key_required(module, p, host, server_dir, url):
    """Fails (and stops the server) when it answers a request without the key."""
    tag = p["run_id"]
    unauthenticated, _ = _request(url + "/models", None, timeout=10)
    if unauthenticated != 401:
        _stop(server_dir, tag, p["grace_s"])
        module.fail_json(msg="%s: the server of run %s answered a request without the key (HTTP %s); it was stopped"
                             % (host, tag, unauthenticated))


def _start(module, p, host, server_dir):
    run_dir = os.path.join(p["root"], "runs", p["run_id"])
    tag = p["run_id"]
    _check_servable(module, p, host, server_dir, run_dir)
    node_env = supervisor.read(os.path.join(run_dir, "node.env"), "") or ""
    vbin = _venv_bin(node_env)
    if not vbin:
        module.fail_json(msg="%s: cannot tell run %s's stack venv from its node.env; provision the node again" % (host, tag))
    trained = _read_trained(module, host, run_dir, vbin)
    spec = _api_spec(module, p, host, run_dir, trained)
    bind = p["host"] or "127.0.0.1"
    _check_port_free(module, p, host, bind)
    name = p["name"] or tag
    command = _vllm_command(module, p, host, spec, bind, name) if p["backend"] == "vllm" else \
        ["llamafactory-cli", "api", "api.yaml"]
    _write_server_files(p, server_dir, spec, node_env, bind, name, command)
    proc = _launch_server(server_dir, tag)
    url = "http://%s:%d/v1" % (bind, p["port"])
    info = {"endpoint": url, "model_name": name, "model": p["model"], "node": host, "pid": proc.pid, "backend": p["backend"],
            "started_at": time.time(), "serves": spec["model_name_or_path"], "adapter": spec.get("adapter_name_or_path")}
    supervisor.write(os.path.join(server_dir, "server.json"), json.dumps(info))
    # ready: the model is listed and a real completion comes back, both with the key
    deadline = _wait_until_listed(module, p, host, server_dir, proc, url, name)
    t0, content = _first_completion(module, p, host, server_dir, url, name, deadline)
    _check_key_required(module, p, host, server_dir, url)
    info.update(ready_s=round(time.time() - info["started_at"], 1), first_completion_s=round(time.time() - t0, 2),
                first_answer=content)
    supervisor.write(os.path.join(server_dir, "server.json"), json.dumps(info))
    module.exit_json(changed=True, server=_state(p, server_dir, log_lines=0))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", required=True, choices=["started", "status", "stopped"]),
            root=dict(type="path", required=True),
            run_id=dict(type="str", required=True),
            model=dict(type="str", default="adapter", choices=["adapter", "export"]),
            host=dict(type="str", default=""),
            port=dict(type="int", default=8000),
            name=dict(type="str", default=""),
            api_key=dict(type="str", default="", no_log=True),
            ready_timeout_s=dict(type="int", default=900),
            grace_s=dict(type="int", default=10),
            backend=dict(type="str", default="api", choices=["api", "vllm"]),
            venv=dict(type="path", default=""),
            gpus=dict(type="int", default=1),
            tensor_parallel=dict(type="int", default=0),
            vllm_args=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=False,
    )
    p = module.params
    host = socket.gethostname()
    server_dir = os.path.join(p["root"], "servers", p["run_id"])
    if p["state"] == "started":
        _start(module, p, host, server_dir)
    if p["state"] == "stopped":
        changed = _stop(server_dir, p["run_id"], p["grace_s"])
        module.exit_json(changed=changed, server=_state(p, server_dir))
    module.exit_json(changed=False, server=_state(p, server_dir))


if __name__ == "__main__":
    main()

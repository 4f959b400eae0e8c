#!/usr/bin/python
# -*- coding: utf-8 -*-
# A run's adapter merged into its base model on one node, with the run's own stack, then checked.

from __future__ import annotations

DOCUMENTATION = r"""
module: export
short_description: Merge a llamafleet run's LoRA adapter into its base model on this node (llamafactory-cli export)
description:
  - Reads the run's node yaml (C(train.yaml): the base model and template as this node trained them) and its
    environment, writes C(export.yaml) beside them and runs C(llamafactory-cli export) from the run's own stack venv
    (the one in the run's PATH), with the hub offline. The merged model goes to C(export_dir) (default
    C(<run dir>/export)).
  - Then checks that it loads, without loading its weights: its config and tokenizer load with transformers, the
    model built from the config on the meta device has every parameter in the safetensors files with the same
    shape, and every safetensors file is complete (its size against its own header).
  - A run without an adapter (full fine-tuning: its output already is the model), a run that is still running or
    not on this node fail with one message; nothing is written then.
version_added: "0.1.0"
author: llamafleet developers
options:
  root:
    description: The node's llamafleet root directory.
    type: path
    required: true
  run_id:
    description: The run whose adapter to export.
    type: str
    required: true
  export_dir:
    description: Where the merged model goes; empty = C(<root>/runs/<run_id>/export). Replaced when it exists.
    type: str
    default: ""
  export_size:
    description: Largest shard, in GB (LLaMA-Factory's C(export_size)).
    type: int
    default: 5
  export_device:
    description: Where the merge runs (LLaMA-Factory's C(export_device)).
    type: str
    choices: [cpu, auto]
    default: cpu
  timeout_s:
    description: Seconds the export may take.
    type: int
    default: 7200
"""

EXAMPLES = r"""
- name: Merge the adapter
  llamafleet.cluster.export:
    root: /srv/llamafleet
    run_id: 20261202-132625-sft_lora-bf0b
"""

RETURN = r"""
export:
  description: Base model, adapter and export paths, the export's files and bytes, seconds taken, the load check.
  returned: success
  type: dict
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamafleet.cluster.plugins.module_utils import supervisor
from ansible_collections.llamafleet.cluster.plugins.module_utils.modelcheck import fingerprint

# the rendezvous of training: not the export's business (LLaMA-Factory would read FORCE_TORCHRUN for train only)
UNSET = ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")

READ_YAML = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"

# Run by the stack's Python: does the export load as the model it claims to be?
LOAD_CHECK = r"""
import glob, json, os, struct, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
cfg = AutoConfig.from_pretrained(d)
AutoTokenizer.from_pretrained(d)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(cfg)
want = {k: list(v.shape) for k, v in model.state_dict().items()}
have = {}
for f in glob.glob(os.path.join(d, "*.safetensors")):
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        for k, v in json.loads(fh.read(n)).items():
            if k != "__metadata__":
                have[k] = v["shape"]
tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(getattr(cfg, "text_config", None), "tie_word_embeddings", False))
missing = [k for k in want if k not in have and not (tied and k.endswith("lm_head.weight"))]
shapes = [k for k in want if k in have and have[k] != want[k]]
print(json.dumps({"architecture": type(model).__name__, "parameters": len(want), "missing": missing[:20],
                  "wrong_shape": shapes[:20], "tensors_in_files": len(have)}))
"""


def _venv_bin(node_env):
    """The bin directory of the run's stack venv: the first PATH entry of its node.env."""
    m = re.search(r"^export PATH=(.+)$", node_env, re.M)
    if not m:
        return None
    first = shlex.split(m.group(1))[0].split(os.pathsep)[0]
    return first if os.path.isfile(os.path.join(first, "llamafactory-cli")) else None


def _run(argv, cwd, timeout, log=None):
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", "timed out after %d s" % timeout
    if log:
        with open(log, "a") as fh:
            fh.write(p.stdout + p.stderr)
    return p.returncode, p.stdout, p.stderr


def _check_exportable(module, p, host, run_dir):
    """The run's adapter directory; fails unless the run is on this node, has ended and has a LoRA adapter."""
    if not os.path.isdir(run_dir):
        module.fail_json(msg="%s: run %s is not on this node (no %s); pass the run id of a run of this cluster "
                             "(llamafleet status)" % (host, p["run_id"], run_dir))
    leader = supervisor.leader(run_dir)
    if (leader and supervisor.alive(leader)) or supervisor.run_processes(p["run_id"], pgid=leader or None):
        module.fail_json(msg="%s: run %s is still running; export it when it has ended (llamafleet follow %s)"
                             % (host, p["run_id"], p["run_id"]))
    adapter = os.path.join(run_dir, "output")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        module.fail_json(msg="%s: run %s has no adapter in %s (no adapter_config.json): only a LoRA run's adapter "
                             "is merged; a full fine-tuning run's output already is the model" % (host, p["run_id"], adapter))
    return adapter


def _read_trained(module, p, host, run_dir):
    """The run's stack venv bin directory and its train.yaml as this node trained it (read with that venv's
    Python); fails unless it was a LoRA run."""
    node_env = supervisor.read(os.path.join(run_dir, "node.env"), "") or ""
    vbin = _venv_bin(node_env)
    if not vbin:
        module.fail_json(msg="%s: cannot tell run %s's stack venv from its node.env (no llamafactory-cli at the head "
                             "of its PATH): provision the node again (llamafleet provision)" % (host, p["run_id"]))
    rc, out, err = _run([os.path.join(vbin, "python"), "-c", READ_YAML, os.path.join(run_dir, "train.yaml")], run_dir, 120)
    if rc != 0:
        module.fail_json(msg="%s: cannot read %s/train.yaml: %s" % (host, run_dir, (err or out).strip()[-500:]))
    trained = json.loads(out)
    if trained.get("finetuning_type", "lora") != "lora":
        module.fail_json(msg="%s: run %s is a %s fine-tuning run: only a LoRA adapter is merged"
                             % (host, p["run_id"], trained.get("finetuning_type")))
    return vbin, trained


def _export_spec(p, trained, adapter, export_dir):
    """LLaMA-Factory's export arguments: the base model and template the run trained with, plus its adapter."""
    spec = {"model_name_or_path": trained["model_name_or_path"], "adapter_name_or_path": adapter,
            "template": trained.get("template") or "default", "finetuning_type": "lora", "export_dir": export_dir,
            "export_size": p["export_size"], "export_device": p["export_device"], "export_legacy_format": False}
    for key in ("trust_remote_code", "model_revision", "cache_dir"):
        if trained.get(key) is not None:
            spec[key] = trained[key]
    return spec


def _merge(module, p, host, run_dir, spec, export_dir):
    """Write export.yaml, replace export_dir and run llamafactory-cli export; returns its log and seconds taken."""
    # JSON is YAML: LLaMA-Factory reads it as any .yaml
    supervisor.write(os.path.join(run_dir, "export.yaml"), json.dumps(spec, indent=1, sort_keys=True) + "\n")
    if os.path.isdir(export_dir):
        shutil.rmtree(export_dir)
    log = os.path.join(run_dir, "export.log")
    t0 = time.time()
    script = ". ./node.env && unset %s && exec llamafactory-cli export export.yaml" % " ".join(UNSET)
    rc, out, err = _run(["/bin/sh", "-c", script], run_dir, p["timeout_s"], log=log)
    took = time.time() - t0
    if rc != 0:
        tail = ((out or "") + (err or "")).strip().splitlines()[-12:]
        module.fail_json(msg="%s: llamafactory-cli export of run %s failed (exit %s); its last lines (all in %s):\n%s"
                             % (host, p["run_id"], rc, log, "\n".join(tail)))
    return log, took


def _check_export(module, p, host, run_dir, vbin, export_dir):
    """The load check's result (LOAD_CHECK, by the stack's Python); fails when the export is not a complete model."""
    found = fingerprint(export_dir, None, model=True)
    rc, out, err = _run([os.path.join(vbin, "python"), "-c", LOAD_CHECK, export_dir], run_dir, 900)
    check = json.loads(out.strip().splitlines()[-1]) if rc == 0 and out.strip() else None
    problems = list(found.get("problems") or [])
    if check is None:
        problems.append("it does not load: %s" % (err or out).strip().splitlines()[-1:])
    else:
        if check["missing"]:
            problems.append("parameters missing from its files: %s" % ", ".join(check["missing"]))
        if check["wrong_shape"]:
            problems.append("parameters of the wrong shape: %s" % ", ".join(check["wrong_shape"]))
    if problems:
        module.fail_json(msg="%s: the export of run %s in %s is not a complete model: %s"
                             % (host, p["run_id"], export_dir, "; ".join(problems)))
    return check


def _file_sizes(export_dir):
    """The export's plain files by name with their sizes, and their total bytes."""
    files, total = {}, 0
    for name in sorted(os.listdir(export_dir)):
        path = os.path.join(export_dir, name)
        if os.path.isfile(path):
            files[name] = os.path.getsize(path)
            total += files[name]
    return files, total


def main():
    module = AnsibleModule(
        argument_spec=dict(
            root=dict(type="path", required=True),
            run_id=dict(type="str", required=True),
            export_dir=dict(type="str", default=""),
            export_size=dict(type="int", default=5),
            export_device=dict(type="str", default="cpu", choices=["cpu", "auto"]),
            timeout_s=dict(type="int", default=7200),
        ),
        supports_check_mode=False,
    )
    p = module.params
    host = socket.gethostname()
    run_dir = os.path.join(p["root"], "runs", p["run_id"])
    adapter = _check_exportable(module, p, host, run_dir)
    vbin, trained = _read_trained(module, p, host, run_dir)
    export_dir = p["export_dir"] or os.path.join(run_dir, "export")
    if not os.path.isabs(export_dir):
        module.fail_json(msg="export_dir %s is not an absolute path on the node" % export_dir)
    spec = _export_spec(p, trained, adapter, export_dir)
    log, took = _merge(module, p, host, run_dir, spec, export_dir)
    check = _check_export(module, p, host, run_dir, vbin, export_dir)
    files, total = _file_sizes(export_dir)
    module.exit_json(changed=True, export={"run_id": p["run_id"], "node": host, "base_model": trained["model_name_or_path"],
                                           "adapter": adapter, "export_dir": export_dir, "files": files, "bytes": total,
                                           "seconds": round(took, 1), "load_check": check, "log": log})


if __name__ == "__main__":
    main()

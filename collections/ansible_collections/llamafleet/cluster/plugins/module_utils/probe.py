# -*- coding: utf-8 -*-
# Node-side facts for llamafleet: what a node is and what its stack venv holds.
# Runs on the node under the module's interpreter; standard library only.

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

# Run by the venv's own Python: the versions it reports are the ones training will import.
# Package versions come from distribution metadata (no `import torch`: a probe must cost
# milliseconds); torch's CUDA version is read from torch/version.py for the same reason.
# On a GPU node, torch.cuda.nccl.version() needs the import; the caller caches that answer.
PROBE_SCRIPT = r"""
import json, os, re, sys, importlib.metadata as md
out = {"python": "%d.%d.%d" % sys.version_info[:3], "implementation": sys.implementation.name,
       "executable": sys.executable, "packages": {}, "local_packages": []}
prefix = os.path.realpath(sys.prefix) + os.sep
for d in md.distributions():
    name = d.metadata["Name"]
    if name:
        name = re.sub(r"[-_.]+", "-", name).lower()
        out["packages"].setdefault(name, d.version)
        # installed in this venv, as opposed to seen through --system-site-packages
        if os.path.realpath(str(d.locate_file(""))).startswith(prefix):
            out["local_packages"].append(name)
import sysconfig
purelib = sysconfig.get_paths()["purelib"]
out["site_packages"] = purelib
tv = None
for base in sys.path:
    p = os.path.join(base, "torch", "version.py")
    if base and os.path.isfile(p):
        tv = p
        break
if tv:
    src = open(tv).read()
    m = re.search(r"^cuda(?:: Optional\[str\])?\s*=\s*['\"]([^'\"]+)['\"]", src, re.M)
    out["torch_cuda"] = m.group(1) if m else None
    out["torch_location"] = os.path.dirname(os.path.dirname(tv))
if os.environ.get("LLAMAFLEET_PROBE_NCCL") == "1":
    try:
        import torch
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            out["nccl_torch"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception as exc:  # a broken torch is a finding, not a probe crash
        out["nccl_torch_error"] = repr(exc)[:300]
print(json.dumps(out))
"""

_NVCC = re.compile(r"release ([0-9]+\.[0-9]+)")


def run(argv, timeout=60, env=None):
    """(rc, stdout, stderr) of a command, never raising for a missing binary."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout, p.stderr
    except FileNotFoundError as exc:
        return 127, "", str(exc)
    except subprocess.TimeoutExpired:
        return 124, "", "timed out after %ss" % timeout


def gpu_facts():
    """Driver, GPU model/count/memory from nvidia-smi; empty on a node without NVIDIA GPUs."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"driver": None, "gpus": []}
    rc, out, err = run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"], timeout=30)
    if rc != 0:
        return {"driver": None, "gpus": [], "error": (err or out).strip()[-300:]}
    gpus, driver = [], None
    for line in out.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "memory_mib": int(float(parts[1]))})
            driver = parts[2]
    return {"driver": driver, "gpus": gpus}


def nvcc_version():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            rc, out, _ = run([cand, "--version"], timeout=30)
            m = _NVCC.search(out or "")
            if rc == 0 and m:
                return m.group(1)
    return None


def probe_venv(venv, gpu_node):
    """The venv Python's own report. NCCL through torch is asked only on GPU nodes and cached
    in the venv, keyed by the torch install's modification time (a reinstall invalidates it)."""
    python = os.path.join(venv, "bin", "python")
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    rc, out, err = run([python, "-I", "-c", PROBE_SCRIPT], timeout=120, env=env)
    if rc != 0:
        return {"error": "the venv's Python failed to run the probe: " + (err or out).strip()[-500:]}
    probe = json.loads(out)
    if gpu_node and probe.get("torch_location"):
        torch_dir = os.path.join(probe["torch_location"], "torch")
        key = "%s:%s" % (probe["packages"].get("torch"), os.stat(torch_dir).st_mtime_ns)
        cache = os.path.join(venv, ".llamafleet-nccl.json")
        cached = None
        try:
            with open(cache) as fh:
                cached = json.load(fh)
        except (OSError, ValueError):
            pass
        if cached and cached.get("key") == key:
            probe.update(cached["value"])
        else:
            env["LLAMAFLEET_PROBE_NCCL"] = "1"
            rc, out, err = run([python, "-I", "-c", PROBE_SCRIPT], timeout=300, env=env)
            if rc == 0:
                full = json.loads(out)
                value = {k: full[k] for k in ("nccl_torch", "nccl_torch_error") if k in full}
                probe.update(value)
                try:
                    with open(cache, "w") as fh:
                        json.dump({"key": key, "value": value}, fh)
                except OSError:
                    pass
    return probe

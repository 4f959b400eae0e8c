# -*- coding: utf-8 -*-
# Node-side facts for llamafleet: what a node is and what its stack venv holds (used by the node
# module to inspect and build, and by the train module to check a node before a launch).
# Runs on the node under the module's interpreter; standard library only.

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import time

from ansible_collections.llamafleet.cluster.plugins.module_utils.rules import (
    CANON,
    MARKER,  # noqa: F401  (the node module marks venvs with it)
    canon,
    extras,
    package_drift,
    read_marker,
)

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
        name = re.sub(CANON, "-", name).lower()
        out["packages"].setdefault(name, d.version)
        # installed in this venv, as opposed to seen through --system-site-packages
        if os.path.realpath(str(d.locate_file(""))).startswith(prefix):
            out["local_packages"].append(name)
import sysconfig
purelib = sysconfig.get_paths()["purelib"]
# where the distributions above were found: the probe's cache is valid while none of them changes
out["path_dirs"] = [p for p in sys.path if p and os.path.isdir(p)]
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
""".replace("CANON", repr(CANON))

# the probe's cache, in the venv (beside the NCCL answer's)
PROBE_CACHE = ".llamafleet-probe.json"
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


_NPU_VERSION = re.compile(r"Version:\s*(\S+)")
_NPU_ROW = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*(\S+)\s*\|")
_HBM = re.compile(r"(\d+)\s*/\s*(\d+)\s*\|?\s*$")
CANN_INFO = ("/usr/local/Ascend/ascend-toolkit/latest/{arch}-linux/ascend_toolkit_install.info",
             "/usr/local/Ascend/ascend-toolkit/latest/version.cfg",
             "/usr/local/Ascend/ascend-toolkit/latest/compiler/version.info")


def parse_npu_smi(text):
    """Driver version and NPUs (name, HBM MiB, health) from ``npu-smi info``: one two-line row per NPU, the
    first with its id, name and health, the second ending with HBM used / total."""
    m = _NPU_VERSION.search(text or "")
    npus, current = [], None
    for line in (text or "").splitlines():
        row = _NPU_ROW.match(line)
        if row and not line.lstrip("| ").startswith("NPU"):
            current = {"name": row.group(2), "health": row.group(3), "memory_mib": None}
            npus.append(current)
            continue
        if current is not None and current["memory_mib"] is None and "0000:" in line:
            hbm = _HBM.search(line.rstrip())
            if hbm:
                current["memory_mib"] = int(hbm.group(2))
            current = None
    return {"npu_driver": m.group(1) if m else None, "npus": npus}


def parse_cann_version(text):
    """The CANN version from the toolkit's install info (``version=8.2.RC1`` or ``Version=...``)."""
    m = re.search(r"^\s*(?:package_)?version\s*=\s*([^\s#]+)", text or "", re.I | re.M)
    return m.group(1).strip("\"'") if m else None


def npu_facts():
    """Ascend NPUs: empty on a node without npu-smi."""
    smi = shutil.which("npu-smi")
    if not smi:
        return {}
    rc, out, err = run([smi, "info"], timeout=30)
    facts = parse_npu_smi(out) if rc == 0 else {"npu_driver": None, "npus": [], "npu_error": (err or out).strip()[-300:]}
    cann = None
    for cand in CANN_INFO:
        text = None
        try:
            with open(cand.format(arch=os.uname().machine)) as fh:
                text = fh.read()
        except OSError:
            continue
        cann = parse_cann_version(text)
        if cann:
            break
    facts["cann"] = cann
    return facts


def nvcc_version():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            rc, out, _ = run([cand, "--version"], timeout=30)
            m = _NVCC.search(out or "")
            if rc == 0 and m:
                return m.group(1)
    return None


def _stamp(path):
    st = os.stat(path)
    return "%d:%d:%d" % (st.st_ino, st.st_size, st.st_mtime_ns)


def _cached_probe(venv, python):
    """The last probe of this venv, while its interpreter and every directory its distributions were found
    in are unchanged (pip adds or removes a *.dist-info directory for every install, upgrade or removal)."""
    try:
        with open(os.path.join(venv, PROBE_CACHE)) as fh:
            cached = json.load(fh)
        if cached["python"] != _stamp(os.path.realpath(python)):
            return None
        if any(_stamp(d) != stamp for d, stamp in cached["dirs"].items()):
            return None
        return cached["probe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_probe(venv, python, probe):
    try:
        dirs = {d: _stamp(d) for d in probe.get("path_dirs", [])}
        # a directory changed within the last two seconds could change again within its timestamp's
        # granularity: not cached (the next probe runs the venv's Python again)
        if any(time.time() - os.stat(d).st_mtime < 2 for d in dirs):
            return
        tmp = os.path.join(venv, PROBE_CACHE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"python": _stamp(os.path.realpath(python)), "dirs": dirs, "probe": probe}, fh)
        os.replace(tmp, os.path.join(venv, PROBE_CACHE))
    except OSError:
        pass


def probe_venv(venv, gpu_node):
    """The venv Python's own report, cached in the venv while nothing in it changed. NCCL through torch is
    asked only on GPU nodes and cached in the venv, keyed by the torch install's modification time (a
    reinstall invalidates it)."""
    python = os.path.join(venv, "bin", "python")
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    probe = _cached_probe(venv, python)
    if probe is None:
        rc, out, err = run([python, "-I", "-c", PROBE_SCRIPT], timeout=120, env=env)
        if rc != 0:
            return {"error": "the venv's Python failed to run the probe: " + (err or out).strip()[-500:]}
        probe = json.loads(out)
        _save_probe(venv, python, probe)
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
                try:  # a new file, renamed over the old: never written through a hard link into another venv
                    with open(cache + ".tmp", "w") as fh:
                        json.dump({"key": key, "value": value}, fh)
                    os.replace(cache + ".tmp", cache)
                except OSError:
                    pass
    return probe


# What the venv's LLaMA-Factory accepts: the fields of the dataclasses its HfArgumentParser parses a
# training yaml into, and its chat templates. Importing it costs seconds (transformers, torch), so the
# answer is cached in the venv, keyed by the versions it depends on.
LLAMAFACTORY_SCRIPT = r"""
import dataclasses, json
from importlib.metadata import version
from llamafactory.hparams.parser import _TRAIN_ARGS
from llamafactory.data.template import TEMPLATES
print(json.dumps({"version": version("llamafactory"), "templates": sorted(TEMPLATES),
                  "args": sorted({f.name for dc in _TRAIN_ARGS for f in dataclasses.fields(dc)})}))
"""
LLAMAFACTORY_CACHE = ".llamafleet-llamafactory.json"
_LLAMAFACTORY_KEY = ("llamafactory", "transformers", "peft", "trl", "accelerate", "datasets")


def llamafactory_surface(venv, probe):
    """{version, args, templates} of the venv's LLaMA-Factory (None when it has none), cached in the venv."""
    packages = probe.get("packages") or {}
    if "llamafactory" not in packages:
        return None
    key = ",".join("%s=%s" % (n, packages.get(n)) for n in _LLAMAFACTORY_KEY)
    cache = os.path.join(venv, LLAMAFACTORY_CACHE)
    try:
        with open(cache) as fh:
            cached = json.load(fh)
        if cached.get("key") == key:
            return cached["value"]
    except (OSError, ValueError, KeyError):
        pass
    env = dict(os.environ, PYTHONNOUSERSITE="1", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    rc, out, err = run([os.path.join(venv, "bin", "python"), "-I", "-c", LLAMAFACTORY_SCRIPT], timeout=300, env=env)
    if rc != 0:
        return {"error": "the venv's LLaMA-Factory cannot be imported: " + (err or out).strip()[-300:]}
    value = json.loads(out.strip().splitlines()[-1])
    try:
        with open(cache + ".tmp", "w") as fh:
            json.dump({"key": key, "value": value}, fh)
        os.replace(cache + ".tmp", cache)
    except OSError:
        pass
    return value


_CRED = re.compile(r"(://)[^/@\s]+@")


def redact(text):
    return _CRED.sub(r"\1***@", text)


def _interpreter(name):
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/bin", "/usr/bin", "/bin"])
    return shutil.which(name, path=search)


def _disk_free_gb(path):
    p = path
    while not os.path.exists(p):
        p = os.path.dirname(p)
    st = os.statvfs(p)
    return round(st.f_bavail * st.f_frsize / 2**30, 2), p


def _expected(requirements):
    pins = {}
    for phase in requirements:
        for req in phase:
            name, _, ver = req.partition("==")
            pins[canon(name)] = ver
    return pins


def stack_state(p, venv):
    """absent | incomplete | drift | ok, with the probe and what differs."""
    state = {"path": venv, "status": "absent", "probe": None, "drift": [], "extras": [], "stripped_present": []}
    if not os.path.isdir(venv):
        return state
    built = read_marker(venv)
    if built is None or not os.access(os.path.join(venv, "bin", "python"), os.X_OK):
        state["status"] = "incomplete"
        return state
    probe = probe_venv(venv, p["gpu_expected"])
    state["probe"] = probe
    if "error" in probe:
        state["status"] = "incomplete"
        return state
    if ".".join(probe["python"].split(".")[:2]) != p["python_minor"]:
        # Another interpreter: the venv cannot be repaired in place, only rebuilt.
        state["status"] = "wrong-python"
        state["drift"].append("python %s (lock: %s)" % (probe["python"], p["python_minor"]))
        return state
    expected = _expected(p["requirements"])
    installed = probe["packages"]
    state["built"] = built.get("packages") or {}
    state["drift"] = ["%s==%s" % (name, expected[name]) for name in package_drift(expected, installed, state["built"])]
    state["extras"] = extras(expected, set(probe.get("local_packages", installed)))
    for pkg, patterns in p["strip"].items():
        for pattern in patterns:
            state["stripped_present"] += glob.glob(os.path.join(probe["site_packages"], pattern))
    if state["drift"] or state["extras"] or state["stripped_present"]:
        state["status"] = "drift"
    else:
        state["status"] = "ok"
        state["llamafactory"] = llamafactory_surface(venv, probe)
    return state


def rsync_version():
    """The node's rsync version ("3.2.7"), or None when there is none."""
    try:
        rc, out, _ = run(["rsync", "--version"], timeout=10)
    except OSError:
        return None
    m = re.search(r"version\s+v?(\d+(?:\.\d+)+)", out or "")
    return m.group(1) if rc == 0 and m else None


def nccl_interfaces(spec, names):
    """The interfaces of ``names`` that NCCL_SOCKET_IFNAME ``spec`` selects, as NCCL reads it: a comma-separated
    list of name prefixes; ``=`` first: exact names; ``^`` first: every interface but those (``^=``: but
    exactly those)."""
    exclude = spec.startswith("^")
    rest = spec[1:] if exclude else spec
    exact = rest.startswith("=")
    rest = rest[1:] if exact else rest
    wanted = [w for w in rest.split(",") if w]

    def hit(name):
        return any(name == w if exact else name.startswith(w) for w in wanted)
    return [n for n in names if hit(n) != exclude]


def platform_facts():
    """The node's machine and glibc: which wheels its pip takes (the controller builds offline wheelhouses for them)."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""  # musl and others: no glibc
    return {"machine": os.uname()[4], "glibc": libc.split()[-1] if libc.startswith("glibc ") else None}


def node_facts(p, venv):
    """(node, stack state): what preflight and parity judge. ``p`` holds the inspection options of
    the node module (root, python, python_minor, requirements, strip, gpu_expected, controller_time)."""
    started = time.time()
    state = stack_state(p, venv)
    interpreter = _interpreter(p["python"])
    interp_version = None
    if interpreter and state["status"] != "ok":  # only a node that builds a venv needs its interpreter checked
        rc, out, _ = run([interpreter, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], timeout=30)
        interp_version = out.strip() if rc == 0 else None
    free_gb, disk_path = _disk_free_gb(p["root"])
    node = {
        "hostname": socket.gethostname(),
        "time": started,
        # >= the true offset: the task's trip from the controller is in it (never negative for a good clock)
        "clock_offset_s": round(started - p["controller_time"], 3) if p.get("controller_time") else None,
        "interpreter": {"name": p["python"], "path": interpreter, "version": interp_version},
        "disk_free_gb": free_gb,
        "disk_path": disk_path,
        "nvcc": nvcc_version(),
        "rsync": rsync_version(),
        "platform": platform_facts(),
    }
    node.update(gpu_facts())
    node.update(npu_facts())
    return node, state

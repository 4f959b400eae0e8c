"""The stack lock: what every node's training environment is made of, as data in one file.

The lock (``python/llamafleet/locks/default.yml`` unless the inventory sets ``llamafleet_lock_file``)
is read here and only here. Ansible reaches this module through the ``llamafleet.cluster.validate``
action, so the playbooks and the Python library agree on the content hash, the venv path, the
install order and the expected versions by construction.

Lock format (schema 1)::

    schema: 1
    python: "3.11"                 # major.minor every node's venv is built with
    components: [torch, ...]       # the packages the parity table always shows, in this order
    smoke_imports: [torch, ...]    # imported once after an install: the venv is kept only if they import
    build_with_torch: [deepspeed]  # sdists built against the installed torch (--no-build-isolation)
    packages: {name: version}      # the whole closure, installed with --no-deps: nothing is resolved on a node
    flavors:
      cpu:
        description: ...
        cuda: null                 # CUDA version the flavor's torch is built for; "system": the base image's
                                   # (read from each node's torch, the same on every node); null: CPU only
        torch_mode: pip            # pip: installed from the lock; system: the node's own torch, verified
        packages: {torch: "2.13.0"}      # added to / overriding the common packages
        without: [torchvision]     # common packages this flavor leaves out
        strip: {torchaudio: ["lib/*.so"]}  # files deleted after install (the one documented workaround)
        pip: {index_url: null, extra_index_urls: [], find_links: []}
        nvcc: null                 # CUDA toolkit version required on the node (DeepSpeed ops), if any
        driver_min: null           # lowest NVIDIA driver that runs this CUDA, checked, never installed
        accelerator: npu           # Ascend NPUs (torch_npu): cuda null, ASCEND_RT_VISIBLE_DEVICES/HCCL_* rendered
        cann: "8.2.RC1"            # npu: the CANN toolkit every node must have (checked, never installed)
    serving:                       # stacks of their own for servers that pin their own torch (vLLM)
      vllm:
        description: ...
        flavors: [cu128, system]   # the training flavors whose nodes can run it
        cuda: "12.8"
        packages: {name: version}  # its whole closure (nothing of the training packages is shared)
        components: [vllm, torch]  # parity table; smoke_imports, strip, pip, driver_min as for a flavor

A serving stack is a venv of its own beside the training one (``stack-<hash>``, its own content hash),
provisioned and parity-checked the same way, only on the nodes that serve (``llamafleet provision
--serving vllm --limit NODES``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import LockError
from .rules import canon

LOCKS_DIR = Path(__file__).resolve().parent / "locks"
DEFAULT_LOCK = LOCKS_DIR / "default.yml"
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.!+_-]*$")
_PYTHON = re.compile(r"^3\.[0-9]{1,2}$")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


# PEP 503 normalized project name: ``Jinja2`` and ``jinja2``, ``typing_extensions`` and ``typing-extensions`` are one.
canonical_name = canon


@dataclasses.dataclass(frozen=True)
class PipSource:
    index_url: str | None
    extra_index_urls: tuple[str, ...]
    find_links: tuple[str, ...]

    def args(self) -> list[str]:
        out: list[str] = []
        if self.index_url:
            out += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            out += ["--extra-index-url", url]
        for link in self.find_links:
            out += ["--find-links", link]
        return out


@dataclasses.dataclass(frozen=True)
class Stack:
    """One flavor of the lock, resolved: everything a node install and a parity check need."""

    lock_file: str
    flavor: str
    description: str
    python: str
    cuda: str | None
    torch_mode: str
    nvcc: str | None
    driver_min: str | None
    packages: dict[str, str]  # canonical name -> exact version, what the venv must hold
    components: tuple[str, ...]
    smoke_imports: tuple[str, ...]
    build_with_torch: tuple[str, ...]
    strip: dict[str, tuple[str, ...]]
    pip: PipSource
    hash: str
    system_provided: tuple[str, ...] = ()  # torch_mode system: verified in the base image, not installed
    accelerator: str | None = None  # cuda | npu | None (CPU only)
    cann: str | None = None  # npu: the CANN version every node must have (checked, never installed); None: the same
    serving: str | None = None  # the lock's serving stack this is (vllm), None: the training stack

    @property
    def venv_name(self) -> str:
        return f"stack-{self.hash}"

    @property
    def cpu_only(self) -> bool:
        """No accelerator: ``cuda`` is null and the flavor is not an NPU one. A flavor naming a CUDA version, or
        ``system`` (the base image's CUDA), or ``accelerator: npu`` runs ``llamafleet_gpus`` processes per node."""
        return self.accelerator is None

    @property
    def npu(self) -> bool:
        return self.accelerator == "npu"

    @property
    def cuda_label(self) -> str:
        return "the base image's CUDA" if self.cuda == "system" else f"CUDA {self.cuda}"

    def requirements(self) -> list[list[str]]:
        """Install phases, each a list of ``name==version``: first everything torch-independent
        and torch itself, then the sdists that compile against the installed torch."""
        later = set(self.build_with_torch)
        mine = {n: v for n, v in self.packages.items() if n not in self.system_provided}
        first = [f"{n}=={v}" for n, v in sorted(mine.items()) if n not in later]
        second = [f"{n}=={v}" for n, v in sorted(mine.items()) if n in later]
        return [p for p in (first, second) if p]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["venv_name"] = self.venv_name
        d["requirements"] = self.requirements()
        d["pip_args"] = self.pip.args()
        return d


def _problem(path: Path, key: str, msg: str) -> str:
    return f"{path}: {key}: {msg}"


def load(path: str | Path | None = None) -> dict[str, Any]:
    """Read and check a lock file; every problem names the file and the key."""
    p = Path(path) if path else DEFAULT_LOCK
    if not p.is_file():
        raise LockError(f"stack lock {p} does not exist: set llamafleet_lock_file to an existing lock file "
                        f"(the default is {DEFAULT_LOCK})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise LockError(f"{p}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise LockError(f"{p}: the lock must be a YAML mapping with keys schema, python, packages, flavors")
    problems: list[str] = []
    if data.get("schema") != 1:
        problems.append(_problem(p, "schema", f"is {data.get('schema')!r}; this llamafleet reads schema 1"))
    if not isinstance(data.get("python"), str) or not _PYTHON.match(data["python"]):
        problems.append(_problem(p, "python", f"is {data.get('python')!r}; write the major.minor as a string, e.g. \"3.11\""))
    for key in ("packages",):
        pkgs = data.get(key)
        if not isinstance(pkgs, dict) or not pkgs:
            problems.append(_problem(p, key, "must be a mapping of package name to exact version"))
    problems += _check_pins(p, "packages", data.get("packages"))
    flavors = data.get("flavors")
    if not isinstance(flavors, dict) or not flavors:
        problems.append(_problem(p, "flavors", "must map each flavor name (cpu, cu126, system, ...) to its settings"))
        flavors = {}
    for name, fl in flavors.items():
        key = f"flavors.{name}"
        if not isinstance(fl, dict):
            problems.append(_problem(p, key, "must be a mapping"))
            continue
        if fl.get("torch_mode", "pip") not in ("pip", "system"):
            problems.append(_problem(p, f"{key}.torch_mode", f"is {fl.get('torch_mode')!r}; use pip or system"))
        problems += _check_pins(p, f"{key}.packages", fl.get("packages") or {})
        for drop in fl.get("without") or []:
            if canonical_name(drop) not in {canonical_name(n) for n in (data.get("packages") or {})}:
                problems.append(_problem(p, f"{key}.without", f"{drop!r} is not in packages; remove it from without"))
    problems += _check_serving(p, data.get("serving"), flavors)
    for listkey in ("components", "smoke_imports", "build_with_torch"):
        val = data.get(listkey, [])
        if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
            problems.append(_problem(p, listkey, "must be a list of names"))
    if problems:
        raise LockError(problems)
    data["_path"] = str(p.resolve())
    return data


def _check_serving(path: Path, serving: Any, flavors: Mapping[str, Any]) -> list[str]:
    if serving is None:
        return []
    if not isinstance(serving, dict):
        return [_problem(path, "serving", "must map each serving stack's name (vllm) to its settings")]
    out = []
    for name, sv in serving.items():
        key = f"serving.{name}"
        if not isinstance(sv, dict):
            out.append(_problem(path, key, "must be a mapping"))
            continue
        if not isinstance(sv.get("packages"), dict) or not sv["packages"]:
            out.append(_problem(path, f"{key}.packages", "must be the stack's whole closure: package name to exact version"))
        else:
            out += _check_pins(path, f"{key}.packages", sv["packages"])
        for fl in sv.get("flavors") or []:
            if fl not in flavors:
                out.append(_problem(path, f"{key}.flavors", f"names {fl!r}, which is not a flavor of this lock"))
        if not sv.get("flavors"):
            out.append(_problem(path, f"{key}.flavors", "must list the training flavors whose nodes can run it"))
    return out


def _check_pins(path: Path, key: str, pins: Any) -> list[str]:
    if not isinstance(pins, dict):
        return [_problem(path, key, "must be a mapping of package name to exact version")]
    out = []
    for name, ver in pins.items():
        if not isinstance(name, str) or not _NAME.match(name):
            out.append(_problem(path, f"{key}.{name}", "is not a valid package name"))
        if not isinstance(ver, str) or not _VERSION.match(ver):
            out.append(_problem(path, f"{key}.{name}", f"is {ver!r}; pin an exact version as a quoted string, e.g. \"1.2.3\""))
    return out


def resolve(lock: Mapping[str, Any], flavor: str, pip_override: Mapping[str, Any] | None = None) -> Stack:
    """The stack one flavor of the lock asks for. ``pip_override`` (inventory ``stack_pip_*``) only
    changes where packages come from, which is part of the hash: a new source is a new venv."""
    flavors = lock["flavors"]
    if flavor not in flavors:
        raise LockError(f"llamafleet_flavor is {flavor!r}, which {lock['_path']} does not define; "
                        f"use one of: {', '.join(sorted(flavors))}")
    fl = flavors[flavor]
    torch_mode = fl.get("torch_mode", "pip")
    without = {canonical_name(n) for n in fl.get("without") or []}
    packages = {canonical_name(n): str(v) for n, v in lock["packages"].items() if canonical_name(n) not in without}
    for n, v in (fl.get("packages") or {}).items():
        packages[canonical_name(n)] = str(v)
    system_provided = tuple(sorted(canonical_name(n) for n in fl.get("packages") or {})) if torch_mode == "system" else ()
    pipcfg = dict(fl.get("pip") or {})
    for k, v in (pip_override or {}).items():
        if v not in (None, "", []):
            pipcfg[k] = v
    source = PipSource(
        index_url=pipcfg.get("index_url") or None,
        extra_index_urls=tuple(pipcfg.get("extra_index_urls") or ()),
        find_links=tuple(pipcfg.get("find_links") or ()),
    )
    strip = {canonical_name(k): tuple(v) for k, v in (fl.get("strip") or {}).items()}
    identity = {
        "python": lock["python"],
        "flavor": flavor,
        "torch_mode": torch_mode,
        "packages": packages,
        "strip": strip,
        "build_with_torch": sorted(canonical_name(n) for n in lock.get("build_with_torch") or []),
        "pip": dataclasses.asdict(source),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Stack(
        lock_file=lock["_path"],
        flavor=flavor,
        description=str(fl.get("description", "")).strip(),
        python=lock["python"],
        cuda=str(fl["cuda"]) if fl.get("cuda") else None,
        torch_mode=torch_mode,
        nvcc=str(fl["nvcc"]) if fl.get("nvcc") else None,
        driver_min=str(fl["driver_min"]) if fl.get("driver_min") else None,
        packages=packages,
        components=tuple(canonical_name(c) for c in lock.get("components") or []),
        smoke_imports=tuple(lock.get("smoke_imports") or []),
        build_with_torch=tuple(canonical_name(n) for n in lock.get("build_with_torch") or []),
        strip=strip,
        pip=source,
        hash=digest,
        system_provided=system_provided,
        accelerator=_accelerator(fl, flavor, lock["_path"]),
        cann=str(fl["cann"]) if fl.get("cann") else None,
    )


def _accelerator(fl: Mapping[str, Any], flavor: str, path: str) -> str | None:
    kind = fl.get("accelerator") or ("cuda" if fl.get("cuda") else None)
    if kind not in (None, "cuda", "npu"):
        raise LockError(f"flavor {flavor} of {path}: accelerator is {kind!r}; use cuda, npu, or leave it out (CPU)")
    if kind == "npu" and fl.get("cuda"):
        raise LockError(f"flavor {flavor} of {path}: an npu flavor has no cuda version; remove cuda")
    return kind


def load_stack(path: str | Path | None, flavor: str, pip_override: Mapping[str, Any] | None = None) -> Stack:
    return resolve(load(path), flavor, pip_override)


def serving_names(lock: Mapping[str, Any], flavor: str) -> list[str]:
    """The serving stacks of the lock that run on nodes of this training flavor."""
    return sorted(n for n, sv in (lock.get("serving") or {}).items() if flavor in (sv.get("flavors") or ()))


def resolve_serving(lock: Mapping[str, Any], name: str, flavor: str,
                    pip_override: Mapping[str, Any] | None = None) -> Stack:
    """The serving stack ``name`` for nodes of training flavor ``flavor``: a venv of its own (its own closure,
    torch included, its own hash), never mixed with the training stack."""
    serving = lock.get("serving") or {}
    if name not in serving:
        known = ", ".join(sorted(serving)) or "none"
        raise LockError(f"serving stack {name!r} is not in {lock['_path']} (its serving stacks: {known}); "
                        f"add it under serving:, or serve with the api backend (--backend api)")
    sv = serving[name]
    if flavor not in (sv.get("flavors") or ()):
        raise LockError(f"the {name} serving stack of {lock['_path']} runs on nodes of flavor "
                        f"{', '.join(sv.get('flavors') or ())}; these nodes are llamafleet_flavor {flavor}: "
                        f"serve with the api backend (--backend api), which runs on every flavor")
    as_flavor = dict(sv, torch_mode="pip", without=[])
    view = {"_path": lock["_path"], "python": str(sv.get("python") or lock["python"]),
            "packages": {}, "flavors": {f"serve-{name}": as_flavor},
            "components": sv.get("components") or [name, "torch"], "smoke_imports": sv.get("smoke_imports") or [name],
            "build_with_torch": []}
    stack = resolve(view, f"serve-{name}", pip_override)
    return dataclasses.replace(stack, serving=name)


def load_serving(path: str | Path | None, name: str, flavor: str,
                 pip_override: Mapping[str, Any] | None = None) -> Stack:
    return resolve_serving(load(path), name, flavor, pip_override)


def resolve_dict(data: Mapping[str, Any]) -> Stack:
    """The ``Stack`` that ``Stack.to_dict()`` described (it travels through Ansible as plain data)."""
    fields = {f.name for f in dataclasses.fields(Stack)}
    d = {k: v for k, v in data.items() if k in fields}
    pip = d["pip"]
    d["pip"] = PipSource(pip.get("index_url"), tuple(pip.get("extra_index_urls") or ()), tuple(pip.get("find_links") or ()))
    for k in ("components", "smoke_imports", "build_with_torch", "system_provided"):
        d[k] = tuple(d.get(k) or ())
    d["strip"] = {k: tuple(v) for k, v in (d.get("strip") or {}).items()}
    d["packages"] = dict(d["packages"])
    return Stack(**d)

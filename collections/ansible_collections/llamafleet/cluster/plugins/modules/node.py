#!/usr/bin/python
# -*- coding: utf-8 -*-
# One task per node per phase: inspect everything preflight and parity need, or build the stack venv.

from __future__ import annotations

DOCUMENTATION = r"""
module: node
short_description: Inspect a llamafleet node, or build or repair its stack venv
description:
  - C(state=inspect) reads, and changes nothing. It reports the node's interpreter for the lock's Python,
    free disk, clock, NVIDIA driver and GPUs, nvcc, and the stack venv's state with a probe run by the
    venv's own Python.
  - C(state=present) makes the venv at C(root)/stacks/C(venv_name) hold exactly the requirements. It
    builds a missing or incomplete venv from scratch and removes it again when any step fails, so no
    half-built venv is left. It repairs drift in a complete venv (reinstalls drifted pins, removes
    packages the lock does not list). It does nothing when the venv already matches.
version_added: "0.1.0"
author: llamafleet developers
options:
  state:
    description: C(inspect) or C(present).
    type: str
    choices: [inspect, present]
    default: inspect
  force:
    description: With C(present), change the venv even while a running run's ranks use it (otherwise refused,
      naming the run).
    type: bool
    default: false
  root:
    description: The node's llamafleet root directory.
    type: path
    required: true
  venv_name:
    description: Name of the venv directory under C(root)/stacks; it holds the lock's content hash.
    type: str
    required: true
  python:
    description: Interpreter that builds the venv (a name looked up on PATH, or a path).
    type: str
    required: true
  python_minor:
    description: The major.minor version the lock asks for.
    type: str
    required: true
  requirements:
    description: Install phases, each a list of C(name==version). Later phases are built against earlier ones.
    type: list
    elements: list
    default: []
  pip_args:
    description: Extra pip arguments that select the package sources.
    type: list
    elements: str
    default: []
  wheelhouse:
    description: Directory of wheels on the node; when set, pip installs with C(--no-index) from it.
    type: path
  strip:
    description: Site-packages globs to delete after install, per package.
    type: dict
    default: {}
  smoke_imports:
    description: Modules the new venv must import before it is kept.
    type: list
    elements: str
    default: []
  system_site_packages:
    description: Let the venv see the interpreter's site-packages (torch_mode system).
    type: bool
    default: false
  gpu_expected:
    description: The stack is a CUDA one; ask torch for its NCCL version.
    type: bool
    default: false
  controller_time:
    description: The controller's clock (epoch seconds) when it sent this task; the node reports its offset.
    type: float
  link:
    description: The link in C(stacks/) that points at the venv once it is built (C(current) for the training stack,
      C(serving-<name>) for a serving stack, so that one never moves the other).
    type: str
    default: current
"""

EXAMPLES = r"""
- name: Inspect the node
  llamafleet.cluster.node:
    root: /srv/llamafleet
    venv_name: stack-0123456789ab
    python: python3.11
    python_minor: "3.11"
"""

RETURN = r"""
node:
  description: Interpreter, disk, clock, driver, GPUs and nvcc of the node.
  returned: always
  type: dict
stack:
  description: The venv's path, status (absent, incomplete, drift, ok), probe, drift and extras.
  returned: always
  type: dict
"""

import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamafleet.cluster.plugins.module_utils.probe import (
    node_facts,
    probe_venv,
    redact as _redact,
    run,
    stack_state as _stack_state,
)
from ansible_collections.llamafleet.cluster.plugins.module_utils import supervisor
from ansible_collections.llamafleet.cluster.plugins.module_utils.rules import read_marker, write_marker

_NETWORK = re.compile(r"Network is unreachable|Temporary failure in name resolution|Name or service not known|"
                      r"Failed to establish a new connection|Connection refused|No route to host")


class InstallError(Exception):
    pass


def _pip(module, venv, args, what):
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    rc, out, err = run(pip + args, timeout=3600)
    if rc != 0:
        text = _redact((out or "") + (err or ""))
        if _NETWORK.search(text) and "--no-index" not in args:
            raise InstallError("%s: this node cannot reach its package index (%s). Use offline mode "
                               "(stack_offline: true, or llamafleet provision --offline) to install from a wheelhouse "
                               "pushed from the controller, or fix the node's network/proxy."
                               % (what, _NETWORK.search(text).group(0)))
        missing = re.findall(r"No matching distribution found for (\S+)", text)
        if missing:
            raise InstallError("%s: %s is not available from this node's package source (%s). Fix the pin in "
                               "the stack lock, or the index settings (stack_pip_index_url / the node's pip.conf)."
                               % (what, ", ".join(missing), "offline wheelhouse" if "--no-index" in args else "pip index"))
        tail = "\n".join(line for line in text.strip().splitlines()[-15:])
        raise InstallError("%s failed (pip exit %s):\n%s" % (what, rc, tail))


def _source_args(p):
    if p["wheelhouse"]:
        return ["--no-index", "--find-links", p["wheelhouse"]]
    return list(p["pip_args"])


def _install_phases(module, p, venv, reqs_list, force=False):
    for i, phase in enumerate(reqs_list):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=venv, delete=False) as fh:
            fh.write("\n".join(phase) + "\n")
            reqfile = fh.name
        args = ["install", "--no-deps", "--no-warn-script-location"] + _source_args(p) + ["-r", reqfile]
        if i > 0:
            args.insert(2, "--no-build-isolation")
        if force:
            args.insert(2, "--force-reinstall")
        try:
            _pip(module, venv, args, "installing phase %d of the stack (%d packages)" % (i + 1, len(phase)))
        finally:
            os.unlink(reqfile)


def _strip(p, venv):
    probe = probe_venv(venv, False)
    removed = []
    for pkg, patterns in p["strip"].items():
        for pattern in patterns:
            for f in glob.glob(os.path.join(probe["site_packages"], pattern)):
                os.unlink(f)
                removed.append(f)
    return removed


def _smoke(p, venv):
    if not p["smoke_imports"]:
        return
    code = "; ".join("import %s" % m for m in p["smoke_imports"])
    env = dict(os.environ, PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MPLCONFIGDIR=os.path.join(venv, ".mplconfig"))
    rc, out, err = run([os.path.join(venv, "bin", "python"), "-I", "-c", code], timeout=600, env=env)
    if rc != 0:
        raise InstallError("the new stack venv cannot import its own packages (%s):\n%s"
                           % (", ".join(p["smoke_imports"]), "\n".join((err or out).strip().splitlines()[-8:])))


def _point_current(stacks, venv_name, link="current"):
    """stacks/<link> (current: the training stack; serving-<name>: a serving stack) -> the venv, replaced atomically
    so readers never see a missing link."""
    tmp = os.path.join(stacks, ".%s.%d" % (link, os.getpid()))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(venv_name, tmp)
    os.replace(tmp, os.path.join(stacks, link))


def _build(module, p, venv, interpreter):
    if os.path.lexists(venv):
        shutil.rmtree(venv)
    args = [interpreter, "-m", "venv"]
    if p["system_site_packages"]:
        args.append("--system-site-packages")
    rc, out, err = run(args + [venv], timeout=600)
    if rc != 0:
        raise InstallError("creating the venv with %s failed: %s" % (interpreter, (err or out).strip()[-400:]))
    if p["system_site_packages"]:
        _see_base_venv(interpreter, venv)
    _install_phases(module, p, venv, p["requirements"])
    _strip(p, venv)
    _smoke(p, venv)
    write_marker(venv, p["venv_name"], probe_venv(venv, False)["packages"], time.time())


BASE_SITE = r"""
import json, site, sys
print(json.dumps({"venv": sys.prefix != sys.base_prefix, "site": site.getsitepackages()}))
"""


def _see_base_venv(interpreter, venv):
    """``--system-site-packages`` shows the new venv the *base* interpreter's site-packages. When llamafleet_python
    is itself a venv's Python (an image whose torch lives in /opt/torch/.venv, as uv builds them), that torch is in
    the interpreter's venv, not in its base: a .pth in the new venv adds the interpreter's site-packages after the
    venv's own, with the precedence --system-site-packages gives, so the image's torch is the one verified and used."""
    rc, out, err = run([interpreter, "-I", "-c", BASE_SITE], timeout=60)
    if rc != 0:
        raise InstallError("asking %s for its site-packages failed: %s" % (interpreter, (err or out).strip()[-400:]))
    info = json.loads(out)
    if not info["venv"]:
        return
    rc, out, err = run([os.path.join(venv, "bin", "python"), "-I", "-c",
                        "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60)
    if rc != 0:
        raise InstallError("the new venv's Python failed: %s" % (err or out).strip()[-400:])
    with open(os.path.join(out.strip(), "_llamafleet_base_venv.pth"), "w") as fh:
        fh.write("".join(path + "\n" for path in info["site"]))


def _record_build(p, venv, state):
    """A venv marked complete before markers recorded the build gets its record now, from a state that matches
    the lock: from then on a package changed to another build of its pinned version is drift."""
    built = read_marker(venv)
    if state["status"] == "ok" and built is not None and "packages" not in built:
        write_marker(venv, p["venv_name"], state["probe"]["packages"], built.get("built") or time.time())


def _run_using(root, venv):
    """The id of the node's active run when it is running and its ranks use ``venv`` (None otherwise)."""
    runs = os.path.join(root, "runs")
    try:
        with open(os.path.join(runs, "active")) as fh:
            run_id = fh.read().strip()
    except OSError:
        return None
    run_dir = os.path.join(runs, run_id)
    if not run_id or not (supervisor.leader(run_dir) or supervisor.run_processes(run_id)):
        return None
    env = supervisor.read(os.path.join(run_dir, "node.env"), "") or ""
    return run_id if (venv.rstrip("/") + "/") in env else None


def _repair(module, p, venv, state):
    if state["drift"]:
        _install_phases(module, p, venv, [state["drift"]], force=True)
    if state["extras"]:
        _pip(module, venv, ["uninstall", "-y"] + state["extras"], "removing packages the lock does not list")
    _strip(p, venv)
    _smoke(p, venv)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="inspect", choices=["inspect", "present"]),
            force=dict(type="bool", default=False),
            root=dict(type="path", required=True),
            venv_name=dict(type="str", required=True),
            python=dict(type="str", required=True),
            python_minor=dict(type="str", required=True),
            requirements=dict(type="list", elements="list", default=[]),
            pip_args=dict(type="list", elements="str", default=[]),
            wheelhouse=dict(type="path"),
            strip=dict(type="dict", default={}),
            smoke_imports=dict(type="list", elements="str", default=[]),
            system_site_packages=dict(type="bool", default=False),
            gpu_expected=dict(type="bool", default=False),
            controller_time=dict(type="float"),
            link=dict(type="str", default="current"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    stacks = os.path.join(p["root"], "stacks")
    venv = os.path.join(stacks, p["venv_name"])
    node, state = node_facts(p, venv)
    interpreter = node["interpreter"]["path"]

    if p["state"] == "inspect":
        module.exit_json(changed=False, node=node, stack=state)
    if state["status"] == "ok":
        if not module.check_mode:
            _record_build(p, venv, state)
        module.exit_json(changed=False, node=node, stack=state)
    if module.check_mode:
        module.exit_json(changed=True, node=node, stack=state)
    if not interpreter:
        module.fail_json(msg="no %s on this node: install Python %s (or set llamafleet_python to its path)"
                         % (p["python"], p["python_minor"]), node=node, stack=state)
    busy = _run_using(p["root"], venv)
    if busy and not p["force"]:
        module.fail_json(msg="%s: run %s is running with the stack venv %s, which provisioning would change (%s) "
                             "under its ranks; stop the run first (llamafleet stop %s), or pass --force "
                             "(stack_force) to change it anyway" % (node["hostname"], busy, venv, state["status"], busy),
                         node=node, stack=state)
    _provision(module, p, node, stacks, venv, interpreter)


def _provision(module, p, node, stacks, venv, interpreter):
    """Build or repair the venv (under the node's stacks lock), point stacks/current at it, prove it matches."""
    os.makedirs(stacks, exist_ok=True)
    with open(os.path.join(stacks, ".lock"), "w") as lockfh:
        # Two provisions of one node at once would build one venv twice: the second waits.
        fcntl.flock(lockfh, fcntl.LOCK_EX)
        state = _stack_state(p, venv)
        action = "none"
        try:
            if state["status"] == "drift":
                action = "repaired"
                _repair(module, p, venv, state)
            elif state["status"] != "ok":
                action = "built"
                _build(module, p, venv, interpreter)
        except InstallError as exc:
            if action == "built" and os.path.lexists(venv):
                shutil.rmtree(venv, ignore_errors=True)  # never leave a half-built venv behind
            module.fail_json(msg="%s: %s" % (node["hostname"], exc), node=node, stack=state, action=action)
        _point_current(stacks, p["venv_name"], p["link"])
        before = state
        state = _stack_state(p, venv)
        if state["status"] != "ok":
            module.fail_json(msg="the stack venv still differs from the lock after %s: %s"
                             % (action, ", ".join(state["drift"] + state["extras"] + state["stripped_present"])),
                             node=node, stack=state, action=action)
        module.exit_json(changed=action != "none", node=node, stack=state, action=action,
                         repaired={"drift": before["drift"], "extras": before["extras"]})


if __name__ == "__main__":
    main()

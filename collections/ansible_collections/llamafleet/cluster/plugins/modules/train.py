#!/usr/bin/python
# -*- coding: utf-8 -*-
# A node's part of a training run: check, start detached, report, stop. One task per node per step.

from __future__ import annotations

DOCUMENTATION = r"""
module: train
short_description: Prepare, start, report on or stop a node's part of a llamafleet training run
description:
  - C(prepared) checks the node before anything starts, in one pass. It inspects the node and its stack venv
    as the node module does (the controller then judges parity and preflight for all nodes together). The
    synced inputs must match the controller's manifest, no other run may be active, the NCCL interface must
    exist, there must be disk, and on the master the rendezvous port must be free. It reports the run's last
    complete checkpoint on this node (for a resume), the fingerprint of the model directory the run reads
    (C(model_check)), and which of the run's hub repositories this node's cache still lacks (C(hub_items)).
  - C(started) writes the run directory (mode 0700: yaml, environment, hostfile, launch script) and starts training
    detached from the SSH session. It records the launcher's pid and the process's start time beside it; a stop
    signals that pid only while it is still that process (pids are reused, and after a reboot). First a real TCP
    check of the rendezvous port between the nodes. The master listens on it until every worker has connected.
    A worker connects to the master's training address. Nothing starts on a node whose check fails.
  - C(status) reports whether the run is running, its exit code, the log's last lines and rank 0's progress.
  - C(stopped) stops every process of the run (its process group and any process carrying its run id), TERM then KILL.
  - C(prepared) on the master takes the cluster's launch lock (C(runs/launch.lock)) for the run: a second launch
    is refused, naming the holder, until this one started or failed; C(started) and C(released) give it back.
version_added: "0.1.0"
author: llamafleet developers
options:
  state:
    description: What to do.
    type: str
    choices: [prepared, started, status, stopped, released]
    required: true
  launched_by:
    description: With C(prepared) on the master, who launches (user@host of the controller), recorded in the launch lock.
    type: str
    default: ""
  root:
    description: The node's llamafleet root directory.
    type: path
    required: true
  run_id:
    description: The run's id; empty with C(status) or C(stopped) means the node's active run.
    type: str
    default: ""
  inputs_dir:
    description: Directory holding the run's inputs on this node.
    type: path
  manifest:
    description: Relative path to sha256 of every input file, as the controller computed them. C(prepared) reports the
      files that differ (C(inputs_differ)), C(started) refuses to start when any does.
    type: dict
    default: {}
  files:
    description: Run directory files to write (name to content).
    type: dict
    default: {}
  secret_env:
    description: With C(started), secret environment variables (name to value, e.g. HF_TOKEN). They are appended to
      C(node.env) (mode 0600) and go nowhere else; never logged.
    type: dict
    default: {}
  command:
    description: Argv that starts training, run with the environment of C(node.env).
    type: list
    elements: str
    default: []
  master:
    description: This node is the master (node rank 0).
    type: bool
    default: false
  master_addr:
    description: The master's training-network address.
    type: str
    default: ""
  master_port:
    description: The rendezvous port.
    type: int
    default: 29500
  workers:
    description: How many worker nodes must reach the master's port.
    type: int
    default: 0
  nccl_socket_ifname:
    description: NCCL_SOCKET_IFNAME of this node, checked against its interfaces.
    type: str
  min_disk_gb:
    description: Free disk (GiB) needed at the root.
    type: float
    default: 1
  replace:
    description: Stop an active run on the node instead of refusing to start.
    type: bool
    default: false
  grace_s:
    description: Seconds between TERM and KILL when stopping.
    type: int
    default: 20
  log_lines:
    description: Log lines to return with C(status).
    type: int
    default: 20
  progress_file:
    description: Relative path (in the run directory) of rank 0's trainer_log.jsonl.
    type: str
    default: output/trainer_log.jsonl
  resume_checkpoint:
    description: Name of the checkpoint (in the run's output directory) to continue from, with C(started).
    type: str
    default: ""
  shared_inputs:
    description: With C(prepared), the inputs are on a shared filesystem, verified in place (a difference is an error, not
      something to sync).
    type: bool
    default: false
  connect_timeout_s:
    description: With C(started), seconds to wait for the rendezvous port check between master and workers.
    type: int
    default: 60
  venv_name:
    description: With C(prepared), the stack venv's directory name under C(root)/stacks (inspected as by the node module).
    type: str
  python:
    description: With C(prepared), the interpreter a venv would be built with (reported, as by the node module).
    type: str
    default: python3
  python_minor:
    description: With C(prepared), the major.minor version the lock asks for.
    type: str
  requirements:
    description: With C(prepared), the lock's install phases, each a list of C(name==version).
    type: list
    elements: list
    default: []
  strip:
    description: With C(prepared), site-packages globs the lock strips, per package.
    type: dict
    default: {}
  gpu_expected:
    description: With C(prepared), the stack is a CUDA one; ask torch for its NCCL version.
    type: bool
    default: false
  controller_time:
    description: With C(prepared), the controller's clock (epoch seconds) when it sent this task.
    type: float
  model_check:
    description: With C(prepared), the model directory on this node to fingerprint (C(path)), with the sizes the hub
      listed for its commit (C(files)), if any. Compared across nodes by the controller.
    type: dict
  hub_items:
    description: With C(prepared), the run's hub repositories (as for llamafleet.cluster.fetch); reported in
      C(hub_missing) when this node's copy under C(hub_cache_dir) is not complete.
    type: list
    elements: dict
    default: []
  hub_cache_dir:
    description: With C(prepared), this node's hub cache directory.
    type: path
  shared_output_dir:
    description: With C(started), the run's output directory on storage every node shares; the run directory's
      C(output) points at it. The master writes a marker there (C(output_token)) that every worker must see
      during the rendezvous check, or nothing starts.
    type: path
  output_token:
    description: With C(started) and C(shared_output_dir), the launch's marker content.
    type: str
    default: ""
  node_name:
    description: With C(started), this node's inventory name (how its supervisor names itself to its peers).
    type: str
    default: ""
  peers:
    description: With C(started), the names of the nodes this node's supervisor keeps a heartbeat with (the master
      with every worker, a worker with the master).
    type: list
    elements: str
    default: []
  supervisor_secret:
    description: With C(started), the launch's secret (hex) that signs the supervisors' heartbeats; written only to
      C(supervise.json) (mode 0600); never logged.
    type: str
    default: ""
  peer_timeout_s:
    description: With C(started), seconds without a peer's heartbeat before the supervisors stop every rank.
    type: float
    default: 30
  stall_timeout_s:
    description: With C(started), seconds without progress after the first step before the master's supervisor
      stops every rank (0 = never).
    type: float
    default: 1800
  activity:
    description: With C(started), what the ranks run, for the supervisors' messages: C(training) (the yaml) or
      C(fabric) (the fabric check, held to train_fabric_timeout_s).
    type: str
    choices: [training, fabric]
    default: training
  start_timeout_s:
    description: With C(started), seconds without a first training step before the master's supervisor stops
      every rank (0 = never).
    type: float
    default: 900
  fail_grace_s:
    description: With C(started), seconds between TERM and KILL when the supervisors stop a failed run.
    type: float
    default: 1
  fast_digest:
    description: With C(started), the one-wave launch - this node's digest as the last launch judged good on the
      same key judged it (C(rules.judged_digest)). The node runs the C(prepared) check itself (so it takes all of
      its options too), every node tells the master over the rendezvous port whether it can start, and nothing
      starts anywhere unless all can; otherwise the result carries C(fallback) and nothing has started.
    type: str
    default: ''
  clock_bounds:
    description: With C(fast_digest), the allowed clock offset from the controller, low and high, in seconds.
    type: list
    elements: float
    default: []
  fast_timeout_s:
    description: With C(fast_digest), seconds the master waits for every worker's answer (then it falls back).
    type: float
    default: 10
"""

EXAMPLES = r"""
- name: Report on the active run
  llamafleet.cluster.train:
    state: status
    root: /srv/llamafleet
"""

RETURN = r"""
run:
  description: Run id, state (running, exited, stopped, absent), pid, exit code, log tail, progress.
  returned: always
  type: dict
fallback:
  description: With C(fast_digest), why the one-wave launch did not start (this node's or another's reason);
    nothing started on any node.
  returned: when it did not start
  type: str
timings:
  description: Where a start's time went on the node, epoch seconds; module (the module running), checked
    and agreed (the one-wave launch's check and all-or-nothing answer), written (the run's files written),
    supervisor_up (the supervisor, spawned before the decision, told go: the ranks start from it).
  returned: state started
  type: dict
"""

import fcntl
import hashlib
import hmac
import json
import os
import re
import select
import shlex
import socket
import struct
import subprocess
import sys
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamafleet.cluster.plugins.module_utils.modelcheck import fingerprint
from ansible_collections.llamafleet.cluster.plugins.module_utils.probe import nccl_interfaces, node_facts
from ansible_collections.llamafleet.cluster.plugins.module_utils.rules import HashCache, judged_digest
from ansible_collections.llamafleet.cluster.plugins.module_utils import supervisor

# where a start's time goes on the node (epoch seconds, returned as ``timings``): this module running, its
# check done, the all-or-nothing answer, the run's files written, the supervisor up (the ranks start from it)
TIMES = {"module": time.time()}

ACTIVE = "active"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_read, _write = supervisor.read, supervisor.write


def _active_run(root):
    return (_read(os.path.join(root, "runs", ACTIVE), "") or "").strip() or None


def _mtime(run_dir, name):
    try:
        return os.stat(os.path.join(run_dir, name)).st_mtime
    except OSError:
        return 0.0


def _run_state(root, run_id, log_lines=20, progress_file=None):
    run_dir = os.path.join(root, "runs", run_id)
    if not os.path.isdir(run_dir):
        return {"run_id": run_id, "state": "absent"}
    pid = int((_read(os.path.join(run_dir, "pid"), "0") or "0").strip() or 0)
    rc_text = _read(os.path.join(run_dir, "rc"))
    stopped = _read(os.path.join(run_dir, "stopped"))
    leader = supervisor.leader(run_dir)
    # a pid that is no longer the process started (reused, rebooted) is not the run
    running = bool(pid) and ((bool(leader) and supervisor.alive(leader))
                             or bool(supervisor.run_processes(run_id, pgid=leader or None)))
    try:
        watch = json.loads(_read(os.path.join(run_dir, supervisor.STATE), "") or "null")
    except ValueError:
        watch = None
    if running:
        state = "running"
    elif rc_text is not None and (stopped is None or _mtime(run_dir, "rc") <= _mtime(run_dir, "stopped")):
        state = "exited"  # it ended by itself (before any stop)
    elif stopped is not None:
        state = "stopped"
    elif pid:
        state = "lost"  # gone without writing its exit code: killed from outside
    else:
        state = "prepared"
    out = {"run_id": run_id, "state": state, "pid": pid or None, "run_dir": run_dir,
           "rc": int(rc_text.strip()) if rc_text and rc_text.strip().lstrip("-").isdigit() else None,
           "started_at": float(_read(os.path.join(run_dir, "started_at"), "0") or 0) or None,
           # the node's supervisor: its state, and why the run ended when it did not succeed
           "supervisor": dict(watch, alive=bool(supervisor.vouched(run_dir, "supervisor.pid")))
           if isinstance(watch, dict) else None}
    log = _read(os.path.join(run_dir, "train.log"), "") or ""
    out["log_tail"] = log.splitlines()[-log_lines:] if log_lines else []
    out["checkpoint"] = _last_checkpoint(os.path.join(run_dir, "output"))
    if progress_file:
        last = None
        for line in (_read(os.path.join(run_dir, progress_file), "") or "").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "current_steps" in rec:
                if "loss" not in rec and last:  # the closing line has no loss: keep the last one
                    rec = dict(last, current_steps=rec["current_steps"], percentage=rec.get("percentage"))
                last = rec
        out["progress"] = last
    return out


def _last_checkpoint(output_dir):
    """Name of the newest checkpoint-N that rank 0 finished writing (trainer_state.json is written last)."""
    best = None
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None
    for name in names:
        if name.startswith("checkpoint-") and name[11:].isdigit():
            if os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
                if best is None or int(name[11:]) > int(best[11:]):
                    best = name
    return best


def _stop(root, run_id, grace):
    """TERM, then KILL, to the run's processes (``supervisor.stop_run``); its supervisor tells the peers and exits."""
    return supervisor.stop_run(os.path.join(root, "runs", run_id), run_id, grace)


def _check_inputs(p, extras=False):
    """Input files that differ from the controller's manifest (missing, other content), as "path (why)";
    with ``extras``, also files in the inputs directory the manifest does not list (a sync deletes them).
    A file's sha256 comes from the node's hash cache (``rules.HashCache``): an unchanged input is not read again."""
    base = p["inputs_dir"]
    cache = HashCache(p["root"])
    bad = []
    for rel, want in sorted(p["manifest"].items()):
        path = os.path.join(base, rel)
        try:
            st = os.stat(path)
        except OSError:
            bad.append("%s (missing)" % rel)
            continue
        if cache.sha256(path, st) != want:
            bad.append("%s (sha256 differs)" % rel)
    if extras and os.path.isdir(base):
        for top, _dirs, names in os.walk(base):
            for name in names:
                rel = os.path.relpath(os.path.join(top, name), base)
                if rel not in p["manifest"]:
                    bad.append("%s (not an input of this run)" % rel)
    cache.save()
    return bad


def _replaced_run(p):
    """The run still running on this node that --replace will stop (none without --replace)."""
    active = _active_run(p["root"]) if p["replace"] else None
    if active and active != p["run_id"] and _run_state(p["root"], active, log_lines=0)["state"] == "running":
        return active
    return None


LAUNCH_LOCK = "launch.lock"


def _take_launch_lock(p):
    """On the master: the cluster's launch lock (``runs/launch.lock``, created atomically), for this run from
    its check to its start. A problem (naming the holder) when another launch holds it: one whose ranks run, or
    one that has not started yet (it syncs or starts now, or its controller died: ``replace`` takes it over).
    A lock whose run ran and ended is stale and taken."""
    runs = os.path.join(p["root"], "runs")
    os.makedirs(runs, exist_ok=True)
    path = os.path.join(runs, LAUNCH_LOCK)
    mine = json.dumps({"run_id": p["run_id"], "by": p["launched_by"], "at": time.time()})
    for _attempt in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                held = json.loads(_read(path, "") or "{}")
            except ValueError:
                held = {}
            other = held.get("run_id")
            if other and other != p["run_id"] and not p["replace"]:
                other_dir = os.path.join(runs, other)
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("at") or 0))
                if _run_state(p["root"], other, log_lines=0)["state"] == "running":
                    return ("run %s (launched by %s at %s) is still running here; stop it first (llamafleet stop) "
                            "or start this one with --replace" % (other, held.get("by") or "?", when))
                if not os.path.exists(os.path.join(other_dir, "pid")):
                    return ("a launch of run %s by %s began at %s and has not started yet (it is syncing or starting "
                            "now, or its controller died); wait for it, or pass --replace to take over"
                            % (other, held.get("by") or "?", when))
            try:
                os.unlink(path)  # ours already, stale, or taken over with --replace
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(mine)
        return None
    return "cannot take the launch lock %s (another launch takes it at this moment); retry" % path


def _release_launch_lock(root, run_id):
    path = os.path.join(root, "runs", LAUNCH_LOCK)
    try:
        if json.loads(_read(path, "") or "{}").get("run_id") == run_id:
            os.unlink(path)
            return True
    except (ValueError, OSError):
        pass
    return False


def _master_port_problems(p):
    """Why the master could not take its rendezvous port (TCP) and its heartbeat port (UDP, the same number);
    empty when both bind."""
    problems = []
    s = socket.socket()
    # as torch's TCPStore binds it: connections of an earlier run in TIME_WAIT do not hold the port
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", p["master_port"]))
    except OSError as exc:
        problems.append("the rendezvous port %d is already in use on the master (%s); set train_master_port "
                        "to a free port" % (p["master_port"], exc.strerror))
    finally:
        s.close()
    # the supervisors' heartbeat uses the same port number over UDP
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("", p["master_port"]))
    except OSError as exc:
        problems.append("UDP port %d (the run's heartbeat, on the rendezvous port number) is already in use on "
                        "the master (%s); set train_master_port to a port free for TCP and UDP"
                        % (p["master_port"], exc.strerror))
    finally:
        u.close()
    return problems


def _prepare(module, p, host):
    if p["master"] and p["run_id"]:
        held = _take_launch_lock(p)
        if held:  # nothing else is looked at: the other launch's state is not this one's to judge
            module.fail_json(msg="%s: %s" % (host, held), problems=[held], inputs_differ=[])
    problems, out = _inspect(p)
    if problems:
        module.fail_json(msg="%s: %s" % (host, "; ".join(problems)), problems=problems, **out)
    module.exit_json(changed=False, **out)


def _inspect(p):
    """The node's check before a launch: problems that stop it here, and what the controller judges (node facts,
    stack state, model fingerprint, hub repositories missing, inputs that differ, the last checkpoint)."""
    problems = []
    root = p["root"]
    replacing = _replaced_run(p)
    active = _active_run(root)
    if active and not replacing and _run_state(root, active, log_lines=0)["state"] == "running":
        problems.append("run %s is still running here; stop it first (llamafleet stop) or start this one "
                        "with --replace" % active)
    out = {"inputs_differ": []}
    if p["manifest"]:
        differ = _check_inputs(p, extras=not p["shared_inputs"])
        if p["shared_inputs"] and differ:
            problems.append("inputs on the shared filesystem differ from the controller's: %s; fix the shared "
                            "filesystem or sync the inputs (no --shared-inputs)" % ", ".join(differ[:10]))
        # what differs is synced next, to this node only, and checked again before anything starts
        out["inputs_differ"] = differ[:200]
    ifname = p.get("nccl_socket_ifname")
    if ifname:
        have = sorted(os.listdir("/sys/class/net"))
        if not nccl_interfaces(ifname, [n for n in have if n != "lo"] or have):
            problems.append("NCCL_SOCKET_IFNAME=%s selects none of this node's interfaces (it has: %s; NCCL reads it "
                            "as name prefixes, '=' for exact names, '^' to exclude); fix llamafleet_nccl_socket_ifname"
                            % (ifname, ", ".join(have)))
    os.makedirs(os.path.join(root, "runs"), exist_ok=True)
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize / 2**30
    if free < p["min_disk_gb"]:
        problems.append("only %.1f GiB free at %s; outputs need %.1f GiB (train_min_disk_gb)" % (free, root, p["min_disk_gb"]))
    # a run being replaced still holds the port: it is stopped, and the port bound, only when starting
    if p["master"] and not problems and not replacing:
        problems.extend(_master_port_problems(p))
    if p["venv_name"]:
        out["node"], out["stack"] = node_facts(p, os.path.join(root, "stacks", p["venv_name"]))
    out.update(_hub_and_model(p))
    # a resume continues from the master's last complete checkpoint of this run
    out["checkpoint"] = _last_checkpoint(os.path.join(root, "runs", p["run_id"], "output")) if p["run_id"] else None
    return problems, out


def _hub_and_model(p):
    """The model's fingerprint on this node, and the hub repositories its cache lacks (fetched next)."""
    out, seen = {}, {}
    for item in p["hub_items"]:
        path = os.path.join(p["hub_cache_dir"], item["cache_subdir"])
        seen[path] = fingerprint(path, item.get("files") or None, model=item.get("model", False))
        if not seen[path]["present"] or seen[path]["problems"]:
            out.setdefault("hub_missing", []).append(item["name"])
    check = p.get("model_check")
    if check:
        out["model"] = seen.get(check["path"]) or fingerprint(check["path"], check.get("files") or None)
    return out


def _rendezvous_check(module, p, host):
    """A real TCP connection between every worker and the master's rendezvous address, before anything starts:
    the master listens on the port until every worker has connected, each worker connects from its own network."""
    deadline = time.time() + p["connect_timeout_s"]
    if p["master"]:
        _master_check(module, p, host, deadline)
    else:
        _worker_check(module, p, host, deadline)


def _master_check(module, p, host, deadline):
    """Listen on the rendezvous port until every worker connected and said it can start."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    while True:  # a replaced run's processes may take a moment to release the port
        try:
            s.bind(("", p["master_port"]))
            break
        except OSError as exc:
            if time.time() > deadline - p["connect_timeout_s"] / 2:
                s.close()
                module.fail_json(msg="%s: the rendezvous port %d is already in use on the master (%s); set "
                                     "train_master_port to a free port" % (host, p["master_port"], exc.strerror))
            time.sleep(0.2)
    s.listen(max(64, p["workers"]))
    s.settimeout(0.2)
    peers, refusals = [], []
    try:
        while len(peers) < p["workers"] and time.time() < deadline:
            try:
                conn, addr = s.accept()
            except socket.timeout:
                continue
            peers.append(addr[0])
            # each worker says whether it can start (e.g. it sees the shared output directory)
            conn.settimeout(max(1.0, deadline - time.time()))
            try:
                answer = conn.makefile("rb").readline(4096).decode("utf-8", "replace").strip()
            except OSError:
                answer = "no: %s did not answer the rendezvous check" % addr[0]
            finally:
                conn.close()
            if answer != "ok":
                refusals.append(answer[len("no: "):] if answer.startswith("no: ") else answer or addr[0])
    finally:
        s.close()
    if refusals:
        module.fail_json(msg="%s: workers cannot start: %s; nothing was started" % (host, "; ".join(refusals)))
    if len(peers) < p["workers"]:
        module.fail_json(msg="%s: only %d of %d workers reached the rendezvous port %d within %ds (from: %s); "
                             "check llamafleet_train_addr of the master and the firewall between the nodes"
                             % (host, len(peers), p["workers"], p["master_port"], p["connect_timeout_s"],
                                ", ".join(peers) or "none"))


def _worker_check(module, p, host, deadline):
    """Connect to the master's rendezvous address from this node's network; tell it whether this node can start."""
    err = None
    while time.time() < deadline:
        try:
            conn = socket.create_connection((p["master_addr"], p["master_port"]), timeout=3)
        except OSError as exc:
            err = exc
            time.sleep(0.05)
            continue
        refusal = _worker_refusal(p, host, deadline)
        try:
            conn.sendall(("no: %s\n" % refusal if refusal else "ok\n").encode())
        except OSError:
            pass
        finally:
            conn.close()
        if refusal:
            module.fail_json(msg=refusal + "; nothing was started")
        return
    module.fail_json(msg="%s: cannot reach the master's rendezvous address %s:%d (%s); check "
                         "llamafleet_train_addr of the master and the firewall between the nodes"
                         % (host, p["master_addr"], p["master_port"], err))


def _fast_refusal(p):
    """Why this node cannot start in the one-wave launch (None: it can): the launch lock (master), any problem of
    its check, inputs or hub repositories it lacks, facts that differ from those the last judged launch judged
    (``rules.judged_digest``), a clock outside the allowance. The launch then goes the full way (check, judge,
    transfers, start), which names the problem."""
    if p["master"] and p["run_id"]:
        held = _take_launch_lock(p)
        if held:
            return held
    problems, out = _inspect(p)
    if problems:
        return "; ".join(problems)
    if out["inputs_differ"] or out.get("hub_missing"):
        return "it lacks inputs (%s)" % ", ".join((out["inputs_differ"] or out.get("hub_missing"))[:3])
    if judged_digest(out) != p["fast_digest"]:
        return "its facts differ from those the last judged launch judged"
    offset = (out.get("node") or {}).get("clock_offset_s")
    low, high = p["clock_bounds"] or (None, None)
    if offset is not None and low is not None and not low <= offset <= high:
        return "its clock is %+.1f s off the controller's" % offset
    return None


def _sign(p, *parts):
    return hmac.new(p["supervisor_secret"].encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _fast_barrier(p, host, refusal):
    """The one-wave launch's all-or-nothing decision, before anything starts: every worker tells the master (over
    the rendezvous port, signed with the launch's secret) whether it can start; the master answers each ``go``
    only when all can and it can too. Returns None (go) or why not."""
    deadline = time.time() + p["fast_timeout_s"]
    return (_fast_master if p["master"] else _fast_worker)(p, host, refusal, deadline)


def _fast_master(p, host, refusal, deadline):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", p["master_port"]))
    except OSError as exc:
        s.close()
        return refusal or "the rendezvous port %d is in use (%s)" % (p["master_port"], exc.strerror)
    s.listen(max(64, p["workers"]))
    s.settimeout(0.2)
    nonce, answers = os.urandom(16).hex(), {}
    conns = []
    try:
        while len(answers) < p["workers"] and time.time() < deadline:
            try:
                conn, _addr = s.accept()
            except socket.timeout:
                continue
            conn.settimeout(max(0.5, deadline - time.time()))
            try:
                conn.sendall(("LLAMAFLEET-FAST %s %s\n" % (p["run_id"], nonce)).encode())
                name, answer, mac = conn.makefile("rb").readline(4096).decode("utf-8", "replace").rstrip("\n").split("\t")
            except (OSError, ValueError):
                conn.close()
                continue
            if not hmac.compare_digest(mac, _sign(p, "worker", nonce, name, answer)) or name in answers:
                conn.close()  # not a worker of this launch: not counted
                continue
            answers[name] = answer
            conns.append((name, conn))
        why = refusal or next(("%s: %s" % (n, a) for n, a in sorted(answers.items()) if a != "ok"), None)
        if why is None and len(answers) < p["workers"]:
            why = "only %d of %d workers answered within %gs" % (len(answers), p["workers"], p["fast_timeout_s"])
        verdict = "go" if why is None else "no"
        for name, conn in conns:
            try:
                conn.sendall(("%s\t%s\n" % (verdict, _sign(p, "master", nonce, name, verdict))).encode())
            except OSError:
                why = why or "%s did not get the answer" % name
    finally:
        for _name, conn in conns:
            conn.close()
        s.close()
    return why


def _fast_worker(p, host, refusal, deadline):
    if refusal:  # told to the master, which then starts no one; a master that does not listen is not waited for
        deadline = min(deadline, time.time() + 2)
    name, answer = p["node_name"] or host, ("no: " + refusal) if refusal else "ok"
    while time.time() < deadline:
        try:
            conn = socket.create_connection((p["master_addr"], p["master_port"]), timeout=1)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            conn.settimeout(min(3.0, max(0.5, deadline - time.time())))  # the master greets at once
            rfile = conn.makefile("rb")
            greeting = rfile.readline(4096).decode("utf-8", "replace").split()
            if len(greeting) != 3 or greeting[:2] != ["LLAMAFLEET-FAST", p["run_id"]]:
                return refusal or "something else answers on the master's rendezvous port"
            nonce = greeting[2]
            conn.sendall(("%s\t%s\t%s\n" % (name, answer, _sign(p, "worker", nonce, name, answer))).encode())
            conn.settimeout(max(1.0, deadline - time.time()) + 5)
            verdict, mac = rfile.readline(4096).decode("utf-8", "replace").rstrip("\n").split("\t")
        except (OSError, ValueError):
            return refusal or "the master did not answer"
        finally:
            conn.close()
        if verdict == "go" and hmac.compare_digest(mac, _sign(p, "master", nonce, name, verdict)) and not refusal:
            return None
        return refusal or "the master or another node cannot start"
    return refusal or "the master's rendezvous port did not answer within %gs" % p["fast_timeout_s"]


def _fast_start(module, p, host):
    """One task per node: the check, the all-or-nothing decision at the rendezvous port, the start. Nothing
    starts anywhere unless every node can; then the result says ``fallback`` and the launch goes the full way."""
    sup = _Supervisor(p, os.path.join(p["root"], "runs", p["run_id"]))  # it starts while this node checks and waits
    refusal = _fast_refusal(p)
    TIMES["checked"] = time.time()
    why = _fast_barrier(p, host, refusal)
    TIMES["agreed"] = time.time()
    if why:
        module.exit_json(changed=False, fallback=why, timings=TIMES)  # its supervisor ends: no go was told
    _start(module, p, host, rendezvous=False, sup=sup)


def _output_marker(p):
    return os.path.join(p["shared_output_dir"], ".llamafleet-run-%s" % p["run_id"])


def _worker_refusal(p, host, deadline):
    """Why this worker cannot start, told to the master over the rendezvous check (None: it can). With a
    shared output directory, the worker must see the marker the master wrote there before it listened
    (a network filesystem may show it a moment late)."""
    if not p["shared_output_dir"]:
        return None
    marker = _output_marker(p)
    limit = min(deadline, time.time() + 10)
    while True:
        if (_read(marker, "") or "").strip() == p["output_token"]:
            return None
        if time.time() > limit:
            break
        time.sleep(0.2)
    return ("%s: the output directory %s is not the master's (it does not see the marker the master wrote there): "
            "it is not on storage every node shares; give a shared path, or leave shared output off"
            % (host, p["shared_output_dir"]))


def _prepare_output(module, p, host, run_dir):
    """With a shared output directory: create it, point the run directory's output at it, and on the master
    write the marker every worker must see (before the rendezvous check: workers look for it during it)."""
    target = p["shared_output_dir"]
    link = os.path.join(run_dir, "output")
    try:
        os.makedirs(target, exist_ok=True)
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        if os.path.islink(link) or not os.path.exists(link):
            if os.path.islink(link):
                os.unlink(link)
            os.symlink(target, link)
        elif os.path.realpath(link) != os.path.realpath(target):
            module.fail_json(msg="%s: %s already holds this run's output; resume it without shared output"
                                 % (host, link))
        if p["master"]:
            _write(_output_marker(p), p["output_token"] + "\n", 0o600)
    except OSError as exc:
        module.fail_json(msg="%s: cannot use the shared output directory %s (%s); nothing was started"
                             % (host, target, exc.strerror))


def _interface_to(addr):
    """The interface this node uses for ``addr``: the one holding it when it is local (the master's own
    training address), else the one the route to it leaves by. None when it cannot be told."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((addr, 9))  # UDP: no packet is sent, the kernel only picks the route and source address
        source = probe.getsockname()[0]
        for _index, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == source:
                return name
    finally:
        probe.close()
    return None


def _run_files(module, p, host, run_dir):
    """The run's files as this node writes them: the controller's, with the resume checkpoint in train.yaml and,
    in node.env, the interface that reaches the master and the secret environment."""
    files = dict(p["files"])
    if p["resume_checkpoint"]:
        ckpt = os.path.join(p["shared_output_dir"] or os.path.join(run_dir, "output"), p["resume_checkpoint"])
        if not os.path.isfile(os.path.join(ckpt, "trainer_state.json")):
            module.fail_json(msg="%s: checkpoint %s is not complete on this node; nothing was started" % (host, ckpt))
        files["train.yaml"] = files.get("train.yaml", "") + "resume_from_checkpoint: %s\n" % json.dumps(ckpt)
    env_text = files.get("node.env", "")
    if p["master_addr"] and "GLOO_SOCKET_IFNAME=" not in env_text:
        # gloo (CPU training, and torch's own bootstrap) binds the address its hostname resolves to,
        # loopback when it does not resolve: name the interface that reaches the master instead.
        try:
            ifname = _interface_to(p["master_addr"])
        except OSError:
            ifname = None
        if ifname:
            files["node.env"] = env_text + "# found on this node: the interface that reaches the master\n" \
                "export GLOO_SOCKET_IFNAME=%s\n" % shlex.quote(ifname)
    if p["secret_env"]:
        # only here: the plan, the logs and what is collected hold *** or nothing for them
        files["node.env"] = files.get("node.env", "") + "# secrets of train_env: in this file only\n" + "".join(
            "export %s=%s\n" % (k, shlex.quote(str(v))) for k, v in sorted(p["secret_env"].items()))
    return files


def _launch_script(p, run_dir):
    """launch.sh: runs this node's command in the run directory with node.env, and records its exit code."""
    return "\n".join([
        "#!/bin/sh",
        "# Generated by llamafleet: starts this node's part of run %s." % p["run_id"],
        "cd %s || exit 97" % shlex.quote(run_dir),
        ". ./node.env",
        "%s" % " ".join(shlex.quote(a) for a in p["command"]),
        "rc=$?",
        'echo "$rc" > rc.tmp && mv rc.tmp rc',
        'exit "$rc"',
        "",
    ])


def _start(module, p, host, rendezvous=True, sup=None):
    """Start this node's ranks (after the check and the all-or-nothing decision: the full way's rendezvous
    check here, the one-wave start's barrier before). ``sup``: the supervisor already spawned."""
    root, run_id = p["root"], p["run_id"]
    run_dir = os.path.join(root, "runs", run_id)
    if rendezvous:
        sup = _Supervisor(p, run_dir)  # its interpreter starts while this node checks and waits for the others
    if p["manifest"]:
        differ = _check_inputs(p)
        if differ:
            module.fail_json(msg="%s: inputs on this node differ from the controller's after the sync: %s; nothing was "
                                 "started, rerun train" % (host, ", ".join(differ[:10])))
    replaced = _replaced_run(p)
    if replaced:
        _stop(root, replaced, p["grace_s"])
    bad = [k for k in p["secret_env"] if not ENV_NAME.match(k)]
    if bad:
        module.fail_json(msg="%s: secret environment variable name %r is not valid in a shell; use letters, digits "
                             "and _ (train_env)" % (host, bad[0]))
    if p["shared_output_dir"]:
        _prepare_output(module, p, host, run_dir)
    if rendezvous and p["workers"] and p["master_addr"]:
        _rendezvous_check(module, p, host)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)  # it holds node.env with the run's secrets
    files = _run_files(module, p, host, run_dir)
    for name, content in files.items():
        if "/" in name or name.startswith("."):
            module.fail_json(msg="bad run file name %r" % name)
        _write(os.path.join(run_dir, name), content, 0o600 if name == "node.env" else 0o644)
    _write(os.path.join(run_dir, "launch.sh"), _launch_script(p, run_dir), 0o755)
    TIMES["written"] = time.time()
    (sup or _Supervisor(p, run_dir)).go(module, p, host, run_dir)
    time.sleep(0.5)
    rc = _read(os.path.join(run_dir, "rc"))
    if rc is not None:
        tail = (_read(os.path.join(run_dir, "train.log"), "") or "").splitlines()[-10:]
        module.fail_json(msg="%s: training exited at once (exit %s):\n%s" % (host, rc.strip(), "\n".join(tail)),
                         run=_run_state(p["root"], p["run_id"]))
    _write(os.path.join(root, "runs", ACTIVE), run_id)
    if p["master"]:
        _release_launch_lock(root, run_id)  # the running run holds the cluster from here
    _write(os.path.join(run_dir, "start_timings.json"), json.dumps(TIMES))  # kept with the run, for a look later
    module.exit_json(changed=True, run=_run_state(root, run_id, log_lines=0), timings=TIMES)


def _supervisor_source():
    loader = getattr(supervisor, "__loader__", None)
    source = loader.get_source(supervisor.__name__) if loader is not None and hasattr(loader, "get_source") else None
    return source or _read(supervisor.__file__)


class _Supervisor:
    """The run's supervisor (module_utils/supervisor.py), spawned before the all-or-nothing decision so that its
    interpreter starts while the node waits for the slowest one; it starts nothing until told ``go`` (closing
    its control pipe instead, as this module's exit does, ends it). Detached from the SSH session; the ranks
    start from it."""

    def __init__(self, p, run_dir):
        source = _supervisor_source()
        # code only, named by its content: written once per version, shared by the runs
        script = os.path.join(p["root"], "supervisor", "supervise-%s.py" % hashlib.sha256(source.encode()).hexdigest()[:16])
        if _read(script) != source:
            os.makedirs(os.path.dirname(script), exist_ok=True)
            _write(script, source, 0o644)
        self.go_r, self.go_w = os.pipe()
        self.up_r, self.up_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k in supervisor.KEEP_ENV}
        # -S: the supervisor is standard library only; no site-packages scan (~5 ms of each node's CPU per launch)
        self.proc = subprocess.Popen([sys.executable, "-S", script, run_dir, "%d,%d" % (self.go_r, self.up_w)],
                                     cwd=p["root"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(self.go_r, self.up_w),
                                     start_new_session=True)  # survives the SSH session
        os.close(self.go_r)
        os.close(self.up_w)

    def go(self, module, p, host, run_dir):
        """Start the ranks: the supervisor's config written, ``go`` told, its answer read. Fails when it could
        not bind its heartbeat socket or the ranks exited at once."""
        if not p["supervisor_secret"]:
            module.fail_json(msg="%s: no supervisor secret: the train role passes one per launch" % host)
        config = {"run_id": p["run_id"], "node": p["node_name"] or host, "master": p["master"],
                  "master_addr": p["master_addr"] or "127.0.0.1", "port": p["master_port"], "peers": p["peers"],
                  "secret": p["supervisor_secret"], "peer_timeout_s": p["peer_timeout_s"],
                  "stall_timeout_s": p["stall_timeout_s"], "start_timeout_s": p["start_timeout_s"],
                  "fail_grace_s": p["fail_grace_s"], "progress_file": p["progress_file"], "activity": p["activity"]}
        _write(os.path.join(run_dir, supervisor.CONFIG), json.dumps(config), 0o600)  # it holds the run's secret
        for stale in ("rc", "stopped", "pid", "pid_start", supervisor.STATE):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.unlink(os.path.join(run_dir, stale))
        pid = self.proc.pid
        _write(os.path.join(run_dir, "supervisor.pid_start"), supervisor.identity(pid) or "")
        _write(os.path.join(run_dir, "supervisor.pid"), str(pid))
        _write(os.path.join(run_dir, "started_at"), str(time.time()))
        try:
            os.write(self.go_w, b"go\n")
        except OSError:
            pass  # it is gone: its answer below says so
        os.close(self.go_w)
        answer = self._answer(15)
        if answer != "up":
            try:
                why = json.loads(_read(os.path.join(run_dir, supervisor.STATE), "{}") or "{}").get("reason")
            except ValueError:
                why = None
            tail = (_read(os.path.join(run_dir, "supervisor.log"), "") or "").splitlines()[-5:]
            module.fail_json(msg="%s: the run's supervisor did not start (exit %s): %s; nothing was started"
                                 % (host, self.proc.poll(), why or " | ".join(tail) or answer or "no output"))
        TIMES["supervisor_up"] = time.time()

    def _answer(self, timeout):
        """Its first line on the answer pipe: ``up`` once the ranks started, else why not ('' when it exited)."""
        data, deadline = b"", time.time() + timeout
        try:
            while b"\n" not in data and time.time() < deadline:
                ready, _w, _x = select.select([self.up_r], [], [], max(0.0, deadline - time.time()))
                chunk = os.read(self.up_r, 4096) if ready else b""
                if ready and not chunk:
                    break
                data += chunk
        finally:
            os.close(self.up_r)
        return data.decode("utf-8", "replace").split("\n", 1)[0].strip()


def _stop_or_report(module, p):
    """States stopped and status: of the run given, else of the active one (absent when there is none)."""
    run_id = p["run_id"] or _active_run(p["root"])
    if not run_id:
        module.exit_json(changed=False, run={"run_id": None, "state": "absent"})
    if p["state"] == "stopped":
        changed = _stop(p["root"], run_id, p["grace_s"])
        if _active_run(p["root"]) == run_id:
            os.unlink(os.path.join(p["root"], "runs", ACTIVE))
        module.exit_json(changed=changed, run=_run_state(p["root"], run_id, log_lines=p["log_lines"]))
    module.exit_json(changed=False, run=_run_state(p["root"], run_id, log_lines=p["log_lines"],
                                                   progress_file=p["progress_file"] if p["master"] else None))


ARGUMENT_SPEC = dict(
    state=dict(type="str", required=True, choices=["prepared", "started", "status", "stopped", "released"]),
    launched_by=dict(type="str", default=""),
    root=dict(type="path", required=True),
    run_id=dict(type="str", default=""),
    inputs_dir=dict(type="path"),
    manifest=dict(type="dict", default={}),
    files=dict(type="dict", default={}),
    secret_env=dict(type="dict", default={}, no_log=True),
    command=dict(type="list", elements="str", default=[]),
    master=dict(type="bool", default=False),
    master_addr=dict(type="str", default=""),
    master_port=dict(type="int", default=29500),
    workers=dict(type="int", default=0),
    nccl_socket_ifname=dict(type="str"),
    min_disk_gb=dict(type="float", default=1.0),
    replace=dict(type="bool", default=False),
    grace_s=dict(type="int", default=20),
    log_lines=dict(type="int", default=20),
    progress_file=dict(type="str", default="output/trainer_log.jsonl"),
    resume_checkpoint=dict(type="str", default=""),
    connect_timeout_s=dict(type="int", default=60),
    shared_inputs=dict(type="bool", default=False),
    venv_name=dict(type="str"),
    python=dict(type="str", default="python3"),
    python_minor=dict(type="str"),
    requirements=dict(type="list", elements="list", default=[]),
    strip=dict(type="dict", default={}),
    gpu_expected=dict(type="bool", default=False),
    controller_time=dict(type="float"),
    model_check=dict(type="dict"),
    hub_items=dict(type="list", elements="dict", default=[]),
    hub_cache_dir=dict(type="path"),
    shared_output_dir=dict(type="path"),
    output_token=dict(type="str", default=""),
    node_name=dict(type="str", default=""),
    peers=dict(type="list", elements="str", default=[]),
    supervisor_secret=dict(type="str", default="", no_log=True),
    peer_timeout_s=dict(type="float", default=30),
    stall_timeout_s=dict(type="float", default=1800),
    activity=dict(type="str", default="training", choices=["training", "fabric"]),
    start_timeout_s=dict(type="float", default=900),
    fail_grace_s=dict(type="float", default=1),
    fast_digest=dict(type="str", default=""),
    clock_bounds=dict(type="list", elements="float", default=[]),
    fast_timeout_s=dict(type="float", default=10),
)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=False,
    )
    p = module.params
    host = socket.gethostname()
    if p["state"] == "prepared":
        _prepare(module, p, host)
    if p["state"] == "started" and p["fast_digest"]:
        _fast_start(module, p, host)
    if p["state"] == "started":
        _start(module, p, host)
    if p["state"] == "released":
        module.exit_json(changed=_release_launch_lock(p["root"], p["run_id"]))
    _stop_or_report(module, p)


if __name__ == "__main__":
    main()

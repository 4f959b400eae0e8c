#!/usr/bin/python
# -*- coding: utf-8 -*-
# A node's part of a training run: check, start detached, report, stop. One task per node per step.

from __future__ import annotations

DOCUMENTATION = r"""
module: train
short_description: Prepare, start, report on or stop a node's part of a llamafleet training run
description:
  - C(prepared) checks the node before anything starts. The synced inputs must match the controller's
    manifest, no other run may be active, the NCCL interface must exist, there must be disk. On the master,
    the rendezvous port must be free, and a short-lived listener is opened on it for the workers to reach.
  - C(started) writes the run directory (yaml, environment, hostfile, launch script), checks that the master's
    rendezvous port is reachable from this node, and starts training detached from the SSH session.
  - C(status) reports whether the run is running, its exit code, the log's last lines and rank 0's progress.
  - C(stopped) stops every process of the run (its process group and any process carrying its run id), TERM then KILL.
version_added: "0.1.0"
author: llamafleet developers
options:
  state:
    description: What to do.
    type: str
    choices: [prepared, started, status, stopped]
    required: true
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
    description: Relative path to sha256 of every input file, as the controller computed them.
    type: dict
    default: {}
  files:
    description: Run directory files to write (name to content).
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
"""

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from ansible.module_utils.basic import AnsibleModule

ACTIVE = "active"
RUN_ID_VAR = "LLAMAFLEET_RUN_ID"

# The master's reachability listener: accepts the workers' test connections, then gets out of the way.
LISTENER = r"""
import json, socket, sys, time
host, port, expect, deadline, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(64)
peers = []
s.settimeout(0.5)
while len(peers) < expect and time.time() < deadline:
    try:
        c, addr = s.accept(); peers.append(addr[0]); c.close()
    except socket.timeout:
        pass
s.close()
open(out + ".tmp", "w").write(json.dumps({"peers": peers}))
import os; os.replace(out + ".tmp", out)
"""


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _read(path, default=None):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return default


def _write(path, text, mode=0o644):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_processes(run_id, pgid=None):
    """Pids of the run: its process group, and any process whose environment carries its run id
    (a launcher that started a new session cannot escape the stop)."""
    marker = ("%s=%s" % (RUN_ID_VAR, run_id)).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if pgid and os.getpgid(pid) == pgid:
                found.add(pid)
                continue
            with open("/proc/%d/environ" % pid, "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    found.add(pid)
        except (OSError, ProcessLookupError):
            continue
    found.discard(os.getpid())
    return {p for p in found if _alive(p)}


def _active_run(root):
    return (_read(os.path.join(root, "runs", ACTIVE), "") or "").strip() or None


def _run_state(root, run_id, log_lines=20, progress_file=None):
    run_dir = os.path.join(root, "runs", run_id)
    if not os.path.isdir(run_dir):
        return {"run_id": run_id, "state": "absent"}
    pid = int((_read(os.path.join(run_dir, "pid"), "0") or "0").strip() or 0)
    rc_text = _read(os.path.join(run_dir, "rc"))
    stopped = os.path.exists(os.path.join(run_dir, "stopped"))
    running = bool(pid) and (_alive(pid) or bool(_run_processes(run_id, pgid=pid)))
    if running:
        state = "running"
    elif stopped:
        state = "stopped"
    elif rc_text is not None:
        state = "exited"
    elif pid:
        state = "lost"  # gone without writing its exit code: killed from outside
    else:
        state = "prepared"
    out = {"run_id": run_id, "state": state, "pid": pid or None, "run_dir": run_dir,
           "rc": int(rc_text.strip()) if rc_text and rc_text.strip().lstrip("-").isdigit() else None,
           "started_at": float(_read(os.path.join(run_dir, "started_at"), "0") or 0) or None}
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
    run_dir = os.path.join(root, "runs", run_id)
    pid = int((_read(os.path.join(run_dir, "pid"), "0") or "0").strip() or 0)
    procs = _run_processes(run_id, pgid=pid or None)
    if not procs:
        return False
    _write(os.path.join(run_dir, "stopped"), str(time.time()))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if pid:
            try:
                os.killpg(pid, sig)
            except OSError:
                pass
        for p in procs:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline:
            procs = _run_processes(run_id, pgid=pid or None)
            if not procs:
                return True
            time.sleep(0.2)
    return True


def _check_inputs(module, p, problems):
    base = p["inputs_dir"]
    # beside the inputs, not among them: a sync with --delete would remove it
    cache_path = os.path.join(p["root"], "cache", "inputs-sha256.json")
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    cache = {}
    if cache_path:
        try:
            cache = json.loads(_read(cache_path, "{}") or "{}")
        except ValueError:
            cache = {}
    fresh = {}
    bad = []
    for rel, want in sorted(p["manifest"].items()):
        path = os.path.join(base, rel)
        try:
            st = os.stat(path)
        except OSError:
            bad.append("%s (missing)" % rel)
            continue
        key = "%d:%d" % (st.st_size, st.st_mtime_ns)
        got = cache.get(path, {}).get(key) or _sha256(path)
        fresh[path] = {key: got}
        if got != want:
            bad.append("%s (sha256 differs)" % rel)
    if os.path.isdir(base):
        try:
            cache.update(fresh)
            _write(cache_path, json.dumps({k: v for k, v in cache.items() if os.path.exists(k)}))
        except OSError:
            pass
    if bad:
        problems.append("inputs on this node differ from the controller's: %s; rerun train to sync them, "
                        "or fix the shared filesystem" % ", ".join(bad[:10]))


def _prepare(module, p, host):
    problems = []
    root = p["root"]
    active = _active_run(root)
    if active:
        st = _run_state(root, active, log_lines=0)
        if st["state"] == "running":
            if p["replace"]:
                _stop(root, active, p["grace_s"])
            else:
                problems.append("run %s is still running here; stop it first (llamafleet stop) or start this one "
                                "with --replace" % active)
    if p["manifest"]:
        _check_inputs(module, p, problems)
    ifname = p.get("nccl_socket_ifname")
    if ifname:
        names = [n.lstrip("^") for n in ifname.split(",")]
        wanted = [n for n in names if not ifname.startswith("^")]
        missing = [n for n in wanted if not os.path.exists("/sys/class/net/%s" % n)]
        if missing:
            problems.append("NCCL_SOCKET_IFNAME names %s, which this node does not have (it has: %s); fix "
                            "llamafleet_nccl_socket_ifname" % (", ".join(missing), ", ".join(sorted(os.listdir("/sys/class/net")))))
    os.makedirs(os.path.join(root, "runs"), exist_ok=True)
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize / 2**30
    if free < p["min_disk_gb"]:
        problems.append("only %.1f GiB free at %s; outputs need %.1f GiB (train_min_disk_gb)" % (free, root, p["min_disk_gb"]))
    listener = None
    if p["master"] and not problems:
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
        if not problems and p["workers"]:
            run_dir = os.path.join(root, "runs", p["run_id"])
            os.makedirs(run_dir, exist_ok=True)
            out = os.path.join(run_dir, "listener.json")
            if os.path.exists(out):
                os.unlink(out)
            subprocess.Popen([sys.executable, "-c", LISTENER, "", str(p["master_port"]), str(p["workers"]),
                              str(time.time() + 120), out], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            listener = out
    if problems:
        module.fail_json(msg="%s: %s" % (host, "; ".join(problems)), problems=problems)
    module.exit_json(changed=False, listener=listener)


def _interface_to(addr):
    """The interface this node uses for ``addr``: the one holding it when it is local (the master's own
    training address), else the one the route to it leaves by. None when it cannot be told."""
    rc_out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    for line in rc_out.stdout.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].split("/")[0] == addr:
            return parts[1]
    route = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True).stdout.split()
    return route[route.index("dev") + 1] if "dev" in route else None


def _start(module, p, host):
    root, run_id = p["root"], p["run_id"]
    run_dir = os.path.join(root, "runs", run_id)
    if not p["master"] and p["master_addr"]:
        # A real TCP connection to the master's rendezvous port, from this node's network.
        deadline, err = time.time() + 60, None
        while time.time() < deadline:
            try:
                socket.create_connection((p["master_addr"], p["master_port"]), timeout=3).close()
                err = None
                break
            except OSError as exc:
                err = exc
                time.sleep(0.3)
        if err is not None:
            module.fail_json(msg="%s: cannot reach the master's rendezvous address %s:%d (%s); check "
                                 "llamafleet_train_addr of the master and the firewall between the nodes"
                                 % (host, p["master_addr"], p["master_port"], err))
    if p["master"] and p["workers"]:
        out = os.path.join(run_dir, "listener.json")
        deadline = time.time() + 110
        while not os.path.exists(out) and time.time() < deadline:
            time.sleep(0.1)
        peers = json.loads(_read(out, '{"peers": []}') or '{"peers": []}')["peers"]
        if len(peers) < p["workers"]:
            module.fail_json(msg="%s: only %d of %d workers reached the rendezvous port %d"
                                 % (host, len(peers), p["workers"], p["master_port"]))
    os.makedirs(run_dir, exist_ok=True)
    files = dict(p["files"])
    if p["resume_checkpoint"]:
        ckpt = os.path.join(run_dir, "output", p["resume_checkpoint"])
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
    for name, content in files.items():
        if "/" in name or name.startswith("."):
            module.fail_json(msg="bad run file name %r" % name)
        _write(os.path.join(run_dir, name), content)
    script = "\n".join([
        "#!/bin/sh",
        "# Generated by llamafleet: starts this node's part of run %s." % run_id,
        "cd %s || exit 97" % shlex.quote(run_dir),
        ". ./node.env",
        "%s" % " ".join(shlex.quote(a) for a in p["command"]),
        "rc=$?",
        'echo "$rc" > rc.tmp && mv rc.tmp rc',
        'exit "$rc"',
        "",
    ])
    _write(os.path.join(run_dir, "launch.sh"), script, 0o755)
    for stale in ("rc", "stopped", "pid"):
        if os.path.exists(os.path.join(run_dir, stale)):
            os.unlink(os.path.join(run_dir, stale))
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "USER", "LANG", "LC_ALL", "TERM")}
    env[RUN_ID_VAR] = run_id
    with open(os.path.join(run_dir, "train.log"), "ab") as log:
        proc = subprocess.Popen(["/bin/sh", os.path.join(run_dir, "launch.sh")], cwd=run_dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # survives the SSH session; its pid is the group id
    _write(os.path.join(run_dir, "pid"), str(proc.pid))
    _write(os.path.join(run_dir, "started_at"), str(time.time()))
    _write(os.path.join(root, "runs", ACTIVE), run_id)
    time.sleep(0.5)
    if proc.poll() is not None:
        tail = (_read(os.path.join(run_dir, "train.log"), "") or "").splitlines()[-10:]
        module.fail_json(msg="%s: training exited at once (exit %s):\n%s" % (host, proc.returncode, "\n".join(tail)),
                         run=_run_state(root, run_id))
    module.exit_json(changed=True, run=_run_state(root, run_id, log_lines=0))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", required=True, choices=["prepared", "started", "status", "stopped"]),
            root=dict(type="path", required=True),
            run_id=dict(type="str", default=""),
            inputs_dir=dict(type="path"),
            manifest=dict(type="dict", default={}),
            files=dict(type="dict", default={}),
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
        ),
        supports_check_mode=False,
    )
    p = module.params
    host = socket.gethostname()
    if p["state"] == "prepared":
        _prepare(module, p, host)
    if p["state"] == "started":
        _start(module, p, host)
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


if __name__ == "__main__":
    main()

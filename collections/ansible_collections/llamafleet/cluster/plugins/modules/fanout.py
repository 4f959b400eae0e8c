#!/usr/bin/python
# -*- coding: utf-8 -*-
# One node's part of a node-to-node fan-out: say what it misses and start its relay, then wait and verify.

from __future__ import annotations

DOCUMENTATION = r"""
module: fanout
short_description: Receive a fan-out transfer on this node and pass it on to the next node
description:
  - C(receive) compares C(dest) with the controller's C(manifest) (size and SHA-256; a file's hash is cached by
    size and mtime in the node's hash cache, C(<root>/cache/sha256.json), which the input check shares) and, when
    files are missing or differ, starts the
    transfer's relay (module_utils/fanout.py) detached from the SSH session, listening on C(addr) on a port the
    kernel picks, accepting only a peer that proves it holds C(secret). Returns the port and what is missing.
  - C(offer) and C(send) are the sending node's, when a node holds the files (a master's checkpoint): C(offer)
    hashes C(dest) into the manifest the receivers compare with; C(send) streams C(route) (the chain and the
    files, from the receivers' answers) from C(dest) into the chain's first relay over the training network.
    A stream that breaks off is returned as C(error), not a failure: the receivers are waited for first.
  - C(wait) waits for the relay to finish, then verifies every file of the manifest in C(dest); the relay is
    stopped if it still runs, and its directory (config, status) is removed. Fails naming this node and what
    is missing, and where the stream stopped.
version_added: "0.1.0"
author: llamafleet developers
options:
  state:
    description: What to do.
    type: str
    choices: [receive, wait]
    required: true
  root:
    description: The node's llamafleet root (the relay's directory is C(<root>/fanout/<transfer_id>)).
    type: path
    required: true
  transfer_id:
    description: The transfer's id (the controller's).
    type: str
    required: true
  dest:
    description: The directory the files go to on this node (with C(offer) and C(send), the one they come from).
    type: path
    required: true
  manifest:
    description: The controller's files, relative path to C(size) and C(sha256).
    type: dict
    default: {}
  addr:
    description: With C(receive), this node's training address, where the relay listens.
    type: str
    default: ""
  secret:
    description: With C(receive), the transfer's secret (written 0600 for the relay, which deletes it on start); with
      C(send), what this node proves to the first relay.
    type: str
    default: ""
  timeout_s:
    description: Seconds the relay waits for its sender, and C(wait) for the relay.
    type: int
    default: 900
  node_name:
    description: The node's inventory name, as the chain names it.
    type: str
    default: ""
  abort:
    description: With C(wait), stop the relay at once (the controller's stream broke off).
    type: bool
    default: false
  route:
    description: With C(send), C(chain) (the receiving nodes, each C(name), C(addr), C(port)) and C(entries) (the
      manifest's files some node misses, each with C(to), the nodes that want it).
    type: dict
    default: {}
  prune:
    description: With C(receive), first remove the files in C(dest) that the manifest does not list (a run's inputs
      directory holds exactly the run's inputs, as a sync with C(--delete) leaves it).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Start the relay
  llamafleet.cluster.fanout:
    state: receive
    root: /srv/llamafleet
    transfer_id: "{{ plan.transfer_id }}"
    dest: /srv/llamafleet/wheelhouse/stack-abc
    manifest: "{{ plan.manifest }}"
    addr: 10.0.0.12
    secret: "{{ lookup('file', plan.secret_file) }}"
"""

RETURN = r"""
missing:
  description: The manifest's files this node lacks (C(receive)).
  returned: always
  type: list
partial:
  description: Of the missing files, those a broken-off earlier transfer left a part of (relative path -> bytes
    held); the stream resumes each where the least of the wanting nodes' parts ends (C(receive)).
  returned: when a relay started
  type: dict
port:
  description: The relay's port, or null when nothing is missing (C(receive)).
  returned: always
  type: int
status:
  description: The relay's final status (C(wait)).
  returned: always
  type: dict
acks:
  description: With C(send), every reached node's outcome at the end of the stream (C(node), C(state), C(complete)
    when its whole manifest is on its disk and verified, C(error), C(forward_error), C(bad)); C(wait) is needed only
    on the nodes without a complete one.
  returned: when the stream ended
  type: list
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamafleet.cluster.plugins.module_utils import fanout, rules

def _have(root, dest, manifest):
    """The manifest's files present in dest with its size and hash (from the node's hash cache, rules.HashCache)."""
    cache = rules.HashCache(root)
    have = rules.verified_files(cache, dest, manifest)
    cache.save()
    return have


def _prune(dest, manifest):
    """Files in dest the manifest does not list (an earlier run's inputs): removed, as a sync with --delete does."""
    gone = []
    for base, _dirs, files in os.walk(dest):
        for name in files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, dest)
            if rel not in manifest and not fanout.is_part(name):  # part files: fanout.resumable_parts
                os.unlink(full)
                gone.append(rel)
    return sorted(gone)


def _source(mod):
    loader = getattr(mod, "__loader__", None)
    source = loader.get_source(mod.__name__) if loader is not None and hasattr(loader, "get_source") else None
    if source:
        return source
    with open(mod.__file__) as fh:
        return fh.read()


def _write(path, text, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _receive(module, p, host, run_dir):
    pruned = _prune(p["dest"], p["manifest"]) if p["prune"] and os.path.isdir(p["dest"]) else []
    missing = sorted(set(p["manifest"]) - _have(p["root"], p["dest"], p["manifest"]))
    # what a broken-off stream left of a missing file is resumed; any other part file is removed
    held = fanout.resumable_parts(p["dest"], p["manifest"]) if os.path.isdir(p["dest"]) else {}
    partial = {rel: held[rel] for rel in missing if held.get(rel)}
    if not missing:
        module.exit_json(changed=bool(pruned), missing=[], port=None, pruned=pruned)
    if not p["secret"]:
        module.fail_json(msg="%s: no transfer secret: a relay never listens without one" % host)
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt's leftovers
    os.makedirs(run_dir, mode=0o700)
    os.makedirs(p["dest"], exist_ok=True)
    _write(os.path.join(run_dir, "secret"), p["secret"], 0o600)
    # with root and manifest the relay records what it verified in the node's hash cache and, once the whole
    # manifest is here, says so in its answer up the chain and removes this directory (cleanup)
    _write(os.path.join(run_dir, "config.json"), json.dumps({
        "name": module.params["node_name"] or host, "dest": p["dest"], "timeout_s": p["timeout_s"],
        "root": p["root"], "manifest": p["manifest"], "cleanup": True}), 0o600)
    _write(os.path.join(run_dir, "fanout.py"), _source(fanout), 0o644)
    _write(os.path.join(run_dir, "rules.py"), _source(rules), 0o644)
    listener = socket.socket(socket.AF_INET6 if ":" in p["addr"] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((p["addr"], 0))
    except OSError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        module.fail_json(msg="%s: cannot listen on its training address %s (%s)" % (host, p["addr"], exc.strerror))
    listener.listen(4)
    port = listener.getsockname()[1]
    with open(os.path.join(run_dir, "relay.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(run_dir, "fanout.py"), "run", run_dir,
                                 str(listener.fileno())], pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run_dir)
    listener.close()
    _write(os.path.join(run_dir, "pid"), str(proc.pid), 0o600)
    module.exit_json(changed=True, missing=missing, partial=partial, port=port, pid=proc.pid, addr=p["addr"], node=host,
                     pruned=pruned, relay=os.path.join(run_dir, "fanout.py"), python=sys.executable)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie of this session is not alive
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _status(run_dir):
    try:
        with open(os.path.join(run_dir, fanout.STATUS)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _wait_relay(p, run_dir):
    """The relay's final status; a relay still running at the deadline is killed."""
    try:
        with open(os.path.join(run_dir, "pid")) as fh:
            pid = int(fh.read())
    except (OSError, ValueError):
        return _status(run_dir)
    deadline = time.time() + (2 if p["abort"] else p["timeout_s"])
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    status = _status(run_dir)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        status = dict(status, state="failed", error="stopped: the controller's stream broke off" if p["abort"]
                      else "still receiving after %d s" % p["timeout_s"])
    if status.get("state") not in fanout.FINAL:
        status = dict(status, state="failed", error=status.get("error") or "the relay exited without a result")
    return status


def _wait(module, p, host, run_dir):
    status = _wait_relay(p, run_dir) if os.path.isdir(run_dir) else {}
    shutil.rmtree(run_dir, ignore_errors=True)  # config and status gone with the relay: nothing is left
    cache = rules.HashCache(p["root"])
    for rel, (size, mtime_ns, digest) in (status.get("hashed") or {}).items():
        full = os.path.join(p["dest"], rel)
        try:
            st = os.stat(full)
        except OSError:
            continue
        if [st.st_size, st.st_mtime_ns] == [size, mtime_ns]:  # verified by the relay as it arrived, untouched since
            cache.record(full, digest, st)
    cache.save()
    status.pop("hashed", None)
    missing = sorted(set(p["manifest"]) - _have(p["root"], p["dest"], p["manifest"]))
    if missing:
        why = status.get("error") or "no relay ran here"
        # a part is never an input (hidden, not in any manifest): it is where the next transfer of it resumes
        held = sum(fanout.resumable_parts(p["dest"], p["manifest"], prune=False).values()) if os.path.isdir(p["dest"]) else 0
        kept = "; %.1f MiB received are kept for the next transfer to resume from" % (held / 2**20) if held else ""
        module.fail_json(msg="%s: fan-out incomplete: %d of %d file(s) missing or not verified in %s (first: %s): %s%s"
                             % (host, len(missing), len(p["manifest"]), p["dest"], missing[0], why, kept),
                         missing=missing, status=status)
    module.exit_json(changed=bool(status.get("written")), missing=[], status=status)


def _offer(module, p, host):
    """The files of dest (this node sends them): relative path -> size and sha256, from the node's hash cache."""
    if not os.path.isdir(p["dest"]):
        module.fail_json(msg="%s: %s is not a directory: nothing to send" % (host, p["dest"]))
    cache = rules.HashCache(p["root"])
    files = {}
    for base, _dirs, names in os.walk(p["dest"]):
        for name in names:
            full = os.path.join(base, name)
            if fanout.is_part(name) or os.path.islink(full):
                continue
            st = os.stat(full)
            files[os.path.relpath(full, p["dest"])] = {"size": st.st_size, "sha256": cache.sha256(full, st)}
    cache.save()
    module.exit_json(changed=False, manifest=files, bytes=sum(f["size"] for f in files.values()), files=len(files))


def _send(module, p, host):
    """Stream the route's files from dest into the chain's first relay over the training network."""
    chain, entries = p["route"].get("chain") or [], p["route"].get("entries") or []
    if not chain:
        module.exit_json(changed=False, bytes=0, chain=[])
    first = chain[0]
    t0 = time.time()
    try:
        sock = socket.create_connection((first["addr"], int(first["port"])), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(120)
        conn = fanout.Conn(sock)
        sent, acks = fanout.send(conn, p["secret"].strip().encode(), chain[1:], entries, p["dest"])
        conn.close()
    except (OSError, EOFError, fanout.FanoutError) as exc:
        # judged after every node's relay has stopped: the play's next task waits for them, then fails
        module.exit_json(changed=False, error="%s: the fan-out stream to %s (%s:%s) broke off (%s)"
                                              % (host, first["name"], first["addr"], first["port"], exc))
    module.exit_json(changed=True, bytes=sent, seconds=round(time.time() - t0, 3), first=first["name"],
                     chain=[n["name"] for n in chain], files=len(entries), acks=acks,
                     resumed_bytes=sum(int(e.get("offset") or 0) for e in entries))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", required=True, choices=["receive", "wait", "offer", "send"]),
            root=dict(type="path", required=True),
            transfer_id=dict(type="str", required=True),
            dest=dict(type="path", required=True),
            manifest=dict(type="dict", default={}),
            addr=dict(type="str", default=""),
            secret=dict(type="str", default="", no_log=True),
            timeout_s=dict(type="int", default=900),
            node_name=dict(type="str", default=""),
            abort=dict(type="bool", default=False),
            prune=dict(type="bool", default=False),
            route=dict(type="dict", default={}),
        ),
        supports_check_mode=False,
    )
    p = module.params
    host = p["node_name"] or socket.gethostname()
    if not p["transfer_id"].replace("-", "").isalnum():
        module.fail_json(msg="transfer_id %r: letters, digits and dashes only" % p["transfer_id"])
    run_dir = os.path.join(p["root"], "fanout", p["transfer_id"])
    if p["state"] == "receive":
        _receive(module, p, host, run_dir)
    if p["state"] == "offer":
        _offer(module, p, host)
    if p["state"] == "send":
        _send(module, p, host)
    _wait(module, p, host, run_dir)


if __name__ == "__main__":
    main()

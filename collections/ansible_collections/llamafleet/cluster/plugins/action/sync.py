# -*- coding: utf-8 -*-
"""Controller: rsync to (or from) many nodes at once, in one task.

One ``rsync`` per node, all running in parallel from this one task, each over the SSH connection
Ansible keeps open to that node (same ControlPath, key and known_hosts): no worker process, module
run or new SSH handshake per node. A node's transfer is "changed" when rsync itemized a change.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.plugins.connection.ssh import Connection as SSHConnection
from ansible.plugins.loader import connection_loader
from ansible.utils.path import unfrackpath

import ansible.constants as C

from ansible_collections.llamafleet.cluster.plugins.filter.transfer import rsync_argv

# rsync processes at once; more nodes wait for a free slot
MAX_PARALLEL = 32


def ssh_persistence_args(hostvars):
    """Ansible's own ssh_args for this node plus the ControlPath Ansible uses for it, so rsync travels over the
    connection Ansible keeps open to the node (or opens one Ansible then reuses). Were the path to differ
    from Ansible's, rsync would only open a connection of its own."""
    if hostvars.get("ansible_connection", "ssh") not in ("ssh", "ansible.builtin.ssh", "smart"):
        return []
    connection_loader.get("ssh", class_only=True)  # loads the plugin's option definitions

    def opt(name):
        return C.config.get_config_value(name, plugin_type="connection", plugin_name="ssh", variables=hostvars)

    args = shlex.split(opt("ssh_args") or "")
    if "ControlPersist" in " ".join(args) and "ControlPath" not in " ".join(args):
        directory = unfrackpath(opt("control_path_dir"))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        control_path = opt("control_path")
        if not control_path:
            # Ansible's own default: a short hash of the address, port and user it connects with (a path
            # that fits a Unix socket's limit even under a deep control_path_dir)
            host = hostvars.get("ansible_host") or hostvars.get("ansible_ssh_host") or hostvars["inventory_hostname"]
            control_path = SSHConnection._create_control_path(host, opt("port"), opt("remote_user"))
        args += ["-o", "ControlPath=" + control_path % {"directory": directory}]
    return args


def _run_one(argv):
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        return p.returncode, p.stdout, p.stderr, round(time.monotonic() - t0, 3)
    except OSError as exc:
        return 127, "", str(exc), 0.0


def run_parallel(jobs):
    """jobs: {name: argv}. Returns {name: (rc, stdout, stderr, seconds)}, at most MAX_PARALLEL at once."""
    if not jobs:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(jobs))) as pool:
        futures = {name: pool.submit(_run_one, argv) for name, argv in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        hostvars = task_vars["hostvars"]
        result["nodes"] = {}
        # phases run one after the other (e.g. pull a checkpoint from the master, then push it to the workers)
        for phase in args.get("phases") or []:
            jobs = {}
            for t in phase:
                hv = dict(hostvars[t["host"]])
                hv.setdefault("inventory_hostname", t["host"])
                jobs[t["host"]] = rsync_argv(hv, t["src"], t["dest"], delete=t.get("delete", True),
                                             pull=t.get("pull", False), excludes=t.get("excludes", ()),
                                             copy_unsafe_links=t.get("copy_unsafe_links", False),
                                             ssh_args=ssh_persistence_args(hv))
            done = run_parallel(jobs)
            failed = []
            for host in jobs:
                rc, out, err, secs = done[host]
                lines = [ln for ln in out.splitlines() if ln.strip()]
                result["nodes"].setdefault(host, []).append(
                    {"rc": rc, "changed": bool(lines), "itemized": lines[:200], "seconds": secs})
                if rc != 0:
                    failed.append("%s: rsync exited %d: %s" % (host, rc, (err or out).strip()[-600:]))
            if failed and args.get("partial_ok"):
                # e.g. collecting logs: what the reachable nodes hold is still worth having
                result.setdefault("warnings", []).extend(failed)
                result["failed_nodes"] = sorted(set(result.get("failed_nodes", [])) | {f.split(":", 1)[0] for f in failed})
            elif failed:
                raise AnsibleActionFail("%s failed on %d node(s), nothing was started:\n%s"
                                        % (args.get("what", "the transfer"), len(failed), "\n".join(failed)),
                                        result=result)
        result["changed"] = any(r["changed"] for runs in result["nodes"].values() for r in runs)
        return result

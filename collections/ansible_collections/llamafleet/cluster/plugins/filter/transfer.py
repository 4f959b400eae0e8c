# -*- coding: utf-8 -*-
"""rsync command lines that reach a node the way Ansible does (same key, known_hosts, port, user)."""

from __future__ import annotations

import shlex

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401

from llamafleet import fanout


def rsync_argv(hostvars, src, dest, delete=True, pull=False, excludes=(), ssh_args=(), copy_unsafe_links=False):
    """argv for `rsync` from the controller to the node described by ``hostvars`` (``pull``: the other way).

    Host keys are checked exactly as Ansible's connection checks them: the node's
    ansible_ssh_common_args (e.g. its UserKnownHostsFile) are passed to ssh unchanged.
    ``ssh_args``: options placed first, e.g. Ansible's own ControlMaster/ControlPath, so that rsync
    travels over the connection Ansible keeps open to the node (and leaves it open for Ansible).
    --itemize-changes prints one line per file transferred: no output means nothing changed.
    ``copy_unsafe_links``: a symlink that leads out of ``src`` (a shared output directory) is copied as
    what it points at.
    """
    # --omit-dir-times: the controller's staging tree is rebuilt (hard links) for every run, so its
    # directories are always new; only file content and times decide what is transferred and "changed".
    argv = ["rsync", "-a", "--omit-dir-times", "--mkpath", "--itemize-changes"]
    if delete:
        argv.append("--delete")
    if copy_unsafe_links:
        argv.append("--copy-unsafe-links")
    argv += [f"--exclude={e}" for e in excludes]
    src = src.rstrip("/") + "/"
    if hostvars.get("ansible_connection") == "local":
        return argv + [src, dest.rstrip("/") + "/"]
    ssh, target = ssh_command(hostvars, ssh_args)
    if pull:
        return argv + ["-e", shlex.join(ssh), f"{target}:{src}", dest.rstrip("/") + "/"]
    return argv + ["-e", shlex.join(ssh), src, f"{target}:{dest.rstrip('/')}/"]


def ssh_command(hostvars, ssh_args=()):
    """(ssh argv without the target, target): the node reached as Ansible reaches it (key, port, user, the
    inventory's ssh options: its known_hosts, host keys checked)."""
    ssh = ["ssh", *ssh_args, "-o", "BatchMode=yes"]
    if hostvars.get("ansible_port"):
        ssh += ["-p", str(hostvars["ansible_port"])]
    if hostvars.get("ansible_ssh_private_key_file"):
        ssh += ["-i", str(hostvars["ansible_ssh_private_key_file"])]
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hostvars.get(key):
            ssh += shlex.split(str(hostvars[key]))
    user = hostvars.get("ansible_user")
    host = hostvars.get("ansible_host") or hostvars["inventory_hostname"]
    return ssh, (f"{user}@{host}" if user else host)


def fanout_route(hostvars, manifest, hosts, register):
    """The route a sending node streams (``fanout.route``): the chain of nodes whose relay started, and the files."""
    return fanout.route(hostvars, manifest, hosts, register)


class FilterModule:
    def filters(self):
        return {"rsync_argv": rsync_argv, "fanout_route": fanout_route}

# -*- coding: utf-8 -*-
"""Controller side of a node's check and start (roles/train check.yml, launch.yml): the train module's arguments
made from the run's plan and the train role's settings, here in Python, then the train module on the node.

Why not the task's own arguments: Ansible 2.19 compiles every template string where it renders it, in each
host's worker. As ~45 templated arguments and the role variables behind them, the start cost ~0.2 s of
controller CPU per node (~60 Jinja compiles, lazy containers of the plan and the stack), spent on every node
before the module could run: on 8 nodes more CPU than a whole one-task ansible-playbook. Built here, it is a few
milliseconds per node, and the task keeps no argument list that could drift from this one.

The one-wave start (``one_wave: true``, launch_all.yml) is skipped, without contacting the node, when the last
launch judged good does not hold for this one (``one_wave_digests``): the launch then goes the full way.
"""

from __future__ import annotations

import time

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.filter.train import (clock_bounds, judgment_key,
                                                                         one_wave_digests, secret_env)

STATES = ("prepared", "started")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("state", "one_wave"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        state = self._task.args.get("state")
        if state not in STATES:
            result.update(failed=True, msg="the train node action: state must be one of %s, not %r" % (", ".join(STATES), state))
            return result
        var = _Vars(self._templar, task_vars)
        one_wave = boolean(self._task.args.get("one_wave", False), strict=False)
        args = check_args(var)
        if state == "started":
            digest = ""
            if one_wave:
                digests = one_wave_digests(var.raw("__train"), var.raw("__llamafleet"), settings=var.settings(
                    "train_fast", "train_run_id", "train_fabric", "preflight_max_clock_skew_s"),
                    path=var("__train_judged_file"), hosts=list(var.raw("ansible_play_hosts_all")))
                if not digests:
                    result.update(skipped=True, changed=False,
                                  msg="no one-wave start: the last launch judged good does not hold for this one")
                    return result
                digest = digests[var.host]
            args.update(start_args(var), fast_digest=digest)
        result.update(self._execute_module(module_name="llamafleet.cluster.train", module_args=dict(args, state=state),
                                           task_vars=task_vars))
        self._remove_tmp_path(self._connection._shell.tmpdir)  # without pipelining only (as the normal action)
        return result


class _Vars:
    """The task's variables: raw (registered results, the plan) or templated (settings, role variables)."""

    def __init__(self, templar, task_vars):
        self._templar, self._vars = templar, task_vars
        self.host = task_vars["inventory_hostname"]

    def raw(self, name, default=None):
        return self._vars.get(name, default)

    def __call__(self, name, default=None):
        return self._templar.template(self._vars[name]) if name in self._vars else default

    def defined(self, name):
        return name in self._vars

    def settings(self, *names):
        return {n: self(n) for n in names}


def _node(var):
    return var.raw("__train")["plan"]["nodes"][var.host]


def check_args(var):
    """The check's arguments (state prepared); the start checks the same again."""
    train, lf, node = var.raw("__train"), var.raw("__llamafleet"), _node(var)
    plan, stack = train["plan"], lf["stack"]
    args = dict(root=var("llamafleet_root"), run_id=plan["run_id"], inputs_dir=node["inputs_dir"],
                manifest=plan["manifest"], master=boolean(var("__train_master"), strict=False),
                master_port=var("train_master_port"), launched_by=train["launched_by"],
                min_disk_gb=var("train_min_disk_gb"), replace=var("train_replace"),
                shared_inputs=var("train_shared_inputs"), venv_name=stack["venv_name"], python=lf["python"],
                python_minor=stack["python"], requirements=stack["requirements"], strip=stack["strip"],
                gpu_expected=stack.get("cuda") is not None, controller_time=time.time(), hub_items=plan["hub"],
                hub_cache_dir=node["hub_cache_dir"])
    if var.defined("llamafleet_nccl_socket_ifname"):
        args["nccl_socket_ifname"] = var("llamafleet_nccl_socket_ifname")
    if node.get("model_check"):
        args["model_check"] = node["model_check"]
    return args


def start_args(var):
    """What the start adds: the run's files and command, the rendezvous, the supervisors, the secrets."""
    train, cluster = var.raw("__train"), var.raw("__llamafleet")["cluster"]
    plan, node, run = train["plan"], _node(var), train["plan"].get("plan") or {}
    master = boolean(var("__train_master"), strict=False)
    with open(train["supervisor_key"]) as fh:
        supervisor_secret = fh.read().strip()
    args = dict(files=node["files"], command=node["command"], master_addr=plan["master_addr"],
                workers=len(cluster["nodes"]) - 1, grace_s=var("train_stop_grace_s"),
                # a resumed run: the master's last complete checkpoint, as its check reported it
                resume_checkpoint=var("__train_checkpoint") if var("train_run_id") else "",
                output_token=plan["output_token"], node_name=var.host,
                peers=[n["name"] for n in cluster["nodes"] if n["name"] != var.host] if master else [cluster["master"]],
                # the values of train_env's secrets: never in the plan, never logged (no_log options of the module)
                secret_env=secret_env(var("train_env", {})), supervisor_secret=supervisor_secret,
                peer_timeout_s=var("train_peer_timeout_s"),
                stall_timeout_s=run["stall_timeout_s"] if "stall_timeout_s" in run else var("train_stall_timeout_s"),
                start_timeout_s=run["start_timeout_s"] if "start_timeout_s" in run else var("train_start_timeout_s"),
                fail_grace_s=var("train_fail_grace_s"),
                activity="fabric" if boolean(var("train_fabric", False), strict=False) else "training",
                clock_bounds=list(clock_bounds(var("preflight_max_clock_skew_s"))))
    if plan.get("shared_output_dir"):
        args["shared_output_dir"] = plan["shared_output_dir"]
    return args

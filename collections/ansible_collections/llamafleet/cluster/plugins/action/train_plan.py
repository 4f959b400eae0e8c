# -*- coding: utf-8 -*-
"""Controller: validate the training yaml and plan the run (ranks, files, commands) before any node starts."""

from __future__ import annotations

import getpass
import os
import secrets
import socket

from ansible import constants as C
from ansible import context
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import state_dir
from ansible_collections.llamafleet.cluster.plugins.plugin_utils.rolespec import role_spec_failure

from llamafleet import fabric, launchplan
from llamafleet.errors import LlamafleetError
from llamafleet.inventory import Cluster
from llamafleet.lock import resolve_dict
from llamafleet.names import name_problem


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        # the train role's settings first (its argument spec; plan.yml is imported without the extra task)
        failure = role_spec_failure(self._templar, task_vars, "train", "plan")
        if failure:
            result.update(failure)
            return result
        a = self._task.args
        # the run id and the job name become directories on every node and on the controller (the rule of
        # roles/train/tasks/names.yml, which the other verbs run as a task of its own)
        names = [p for p in (name_problem(a.get(k), "train_" + k) for k in ("run_id", "job") if a.get(k)) if p]
        if names:
            result.update(failed=True, msg="; ".join(names) + "; nothing was touched")
            return result
        if not a.get("config") and not a.get("fabric"):
            result.update(failed=True, msg="no training config: pass -e train_config=path/to/llamafactory.yaml")
            return result
        nodes = len(a["cluster"]["nodes"])
        forks = int(context.CLIARGS.get("forks") or C.DEFAULT_FORKS)
        if nodes > forks:
            # every node's start must run at once: the master's rendezvous check waits for every worker
            result.update(failed=True, msg="the cluster has %d nodes but Ansible runs %d at once (forks); every node "
                                           "must start at the same time: set ANSIBLE_FORKS=%d (llamafleet's CLI does)"
                                           % (nodes, forks, nodes))
            return result
        try:
            plan = self._fabric_plan(a) if a.get("fabric") else launchplan.make_plan(
                a["config"], Cluster.from_dict(a["cluster"]), resolve_dict(a["stack"]), state_dir=state_dir(a["state_dir"]),
                workdir=a.get("workdir") or None, launcher=a.get("launcher") or "torchrun",
                master_port=int(a.get("master_port") or 29500), run_id=a.get("run_id") or None, job=a.get("job") or None,
                shared_inputs=boolean(a.get("shared_inputs", False)),
                shared_output=boolean(a.get("shared_output", False)), sync_model=boolean(a.get("sync_model", True)),
                model_source=a.get("model_source") or "auto",
                hub_fetch=a.get("hub_fetch") or ("controller" if boolean(a.get("offline", False)) else "nodes"),
                fetch_now=not boolean(a.get("detail", False)), extra_env=a.get("extra_env") or None,
                accelerate_config=a.get("accelerate_config") or None)
        except LlamafleetError as exc:
            result.update(failed=True, problems=exc.problems,
                          msg=("the fabric check" if a.get("fabric") else "the training configuration")
                          + " cannot run; no node was started:\n"
                              + "\n".join(f"- {p}" for p in exc.problems))
            return result
        result.update(changed=False, plan=plan.to_dict(), summary=plan.format(detail=bool(a.get("detail"))))
        # the plan in the run's log and on the terminal of ansible-playbook (no task of its own: a launch pays each)
        Display().display(result["summary"])
        if not boolean(a.get("detail", False)):
            result["supervisor_key"] = _new_key(state_dir(a["state_dir"]), plan.run_id)
            result["launched_by"] = "%s@%s" % (getpass.getuser(), socket.gethostname())
        return result


    @staticmethod
    def _fabric_plan(a):
        """The fabric check's plan: fabric_probe.py instead of the yaml, everything else as for training."""
        return fabric.make_plan(Cluster.from_dict(a["cluster"]), resolve_dict(a["stack"]),
                                fabric.FabricOptions.from_dict(a["fabric"]),
                                master_port=int(a.get("master_port") or 29500), run_id=a.get("run_id") or None,
                                extra_env=a.get("extra_env") or None)


def _new_key(base, run_id):
    """A fresh secret for this launch's supervisors (they sign their heartbeats with it), in a file only the
    controller's user can read: the start task reads it into a no_log option, so it is in no log or result."""
    path = os.path.join(str(base), "runs", run_id, "supervisor.key")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(secrets.token_hex(32))
    os.replace(tmp, path)
    return path

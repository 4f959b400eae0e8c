# -*- coding: utf-8 -*-
"""Controller: the inventory's nodes and the stack lock, checked together before any node is touched."""

from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import state_dir
from ansible_collections.llamafleet.cluster.plugins.plugin_utils.rolespec import role_spec_failure

from llamafleet import inventory, lock
from llamafleet.errors import LlamafleetError


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        # the llamafleet role's variables first (its argument spec; the role is imported without the extra task)
        failure = role_spec_failure(self._templar, task_vars, "llamafleet", "main")
        if failure:
            result.update(failure)
            return result
        args = self._task.args
        group = args.get("group", inventory.NODES_GROUP)
        hosts = list(task_vars["groups"].get(group, []))
        hostvars = {}
        wanted = ("ansible_host", "ansible_port", "llamafleet_train_addr", "llamafleet_gpus", "llamafleet_master",
                  "llamafleet_root", "llamafleet_cuda_visible_devices", "llamafleet_nccl_socket_ifname",
                  "llamafleet_nccl_ib_disable")
        for h in hosts:
            hv = task_vars["hostvars"][h]
            hostvars[h] = {k: self._templar.template(hv[k]) for k in wanted if k in hv}
        problems = []
        cluster = stack = None
        servings = {}
        try:
            cluster = inventory.validate(hosts, hostvars)
        except LlamafleetError as exc:
            problems += exc.problems
        try:
            stack, servings = self._stacks(args)
        except LlamafleetError as exc:
            problems += exc.problems
        if problems:
            result.update(failed=True, msg="invalid cluster definition:\n" + "\n".join(f"- {p}" for p in problems),
                          problems=problems)
            return result
        python = args.get("python") or f"python{stack.python}"
        result.update(changed=False, cluster=cluster.to_dict(), stack=stack.to_dict(), python=python, servings=servings,
                      # run from the CLI the variable is always set; by ansible-playbook, state goes beside the inventory
                      state_dir=str(state_dir(args.get("state_dir"), task_vars.get("inventory_dir"))),
                      gpus={n.name: n.gpus for n in cluster.nodes})
        return result

    @staticmethod
    def _stacks(args):
        """The stack this run provisions or checks (the training one, or with ``serving`` set, that serving
        stack for the training flavor's nodes), and every serving stack those nodes can run, by name."""
        data = lock.load(args.get("lock_file") or None)
        # a name whatever the inventory holds (a list there gets the lock's "no such flavor" message, not a crash)
        flavor = str(args.get("flavor") or "cpu")
        training = lock.resolve(data, flavor)
        servings = {n: lock.resolve_serving(data, n, flavor).to_dict() for n in lock.serving_names(data, flavor)}
        serving = str(args.get("serving") or "")
        return (lock.resolve_serving(data, serving, flavor) if serving else training), servings

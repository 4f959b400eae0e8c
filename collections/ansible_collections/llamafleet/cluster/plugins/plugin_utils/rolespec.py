# -*- coding: utf-8 -*-
"""A role's argument spec (its meta/argument_specs.yml, the one copy of its interface), checked by the action
that needs it instead of by the task Ansible prepends to the role: on a launch every task costs a worker, events
and ~0.05 s, and the check itself is the same (ansible.builtin.validate_argument_spec's rules and messages)."""

from __future__ import annotations

import functools

import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR


@functools.lru_cache(maxsize=None)
def _options(role: str, entry: str) -> dict:
    path = PROJECT_DIR / "roles" / role / "meta" / "argument_specs.yml"
    return yaml.safe_load(path.read_text())["argument_specs"][entry].get("options", {})


def role_spec_failure(templar, task_vars: dict, role: str, entry: str) -> dict | None:
    """None when the variables the role's ``entry`` point takes are valid; else the result the implicit
    validation task would fail with (``msg`` naming each variable and what is wrong with it)."""
    options = _options(role, entry)
    provided = templar.template({k: task_vars[k] for k in options if k in task_vars})
    errors = ArgumentSpecValidator(options).validate(provided, validate_role_argument_spec=True).error_messages
    if not errors:
        return None
    return {"failed": True, "msg": "Validation of arguments failed:\n%s" % "\n".join(errors),
            "argument_errors": errors,
            "validate_args_context": {"type": "role", "name": role, "argument_spec_name": entry}}

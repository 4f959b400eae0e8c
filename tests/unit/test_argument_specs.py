"""Each role's meta/argument_specs.yml is its interface and must mirror defaults/main.yml exactly."""

from pathlib import Path

import pytest
import yaml

ROLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "roles").iterdir() if (p / "defaults/main.yml").is_file())
TYPES = {"str": str, "bool": bool, "int": int, "float": (int, float), "list": list, "dict": dict}


def test_every_role_has_defaults_and_specs():
    assert ROLES, "no roles found"
    for role in ROLES:
        assert (role / "meta/argument_specs.yml").is_file(), f"{role.name} has no meta/argument_specs.yml"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_specs_mirror_defaults(role):
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    options = yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options), f"{role.name}: defaults and argument_specs list different variables"
    for name, spec in options.items():
        assert name.startswith(f"{role.name}_"), f"{role.name}: {name} is not prefixed with the role name"
        assert spec.get("description"), f"{role.name}: {name} has no description"
        assert spec.get("default") == defaults[name], f"{role.name}: {name} default differs from defaults/main.yml"
        assert isinstance(defaults[name], TYPES[spec["type"]]), f"{role.name}: {name} is not of type {spec['type']}"

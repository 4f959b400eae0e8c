"""The code stays easy to change: short functions, messages that name settings which exist, entry points
that describe their own verb."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

import llamafleet.inventory

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "python/llamafleet").rglob("*.py"), *(ROOT / "collections").rglob("*.py")])
LONGEST = 60
# A setting's name in prose: role variables (stack_*, train_*, ...) and inventory host variables (llamafleet_*).
SETTING = re.compile(r"(?<![\w.$/-])((?:stack|train|serve|parity|preflight|llamafleet)_[a-z0-9_]*[a-z0-9])(?![\w/(.-])")


def _settings() -> set[str]:
    """Every name a user can set: each role's defaults and argument specs (all entry points), and the host
    variables the inventory module documents."""
    names = set(re.findall(r"``(llamafleet_\w+)``", llamafleet.inventory.__doc__))
    for role in (ROOT / "roles").iterdir():
        if (role / "defaults/main.yml").is_file():
            names |= set(yaml.safe_load((role / "defaults/main.yml").read_text()) or {})
        if (role / "meta/argument_specs.yml").is_file():
            for entry in yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"].values():
                names |= set(entry.get("options") or {})
    return names


def _python_messages(path: Path):
    """The prose string constants of a Python file (with a space; not docstrings), with their line."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and " " in n.value.strip() \
                and id(n) not in docstrings:
            yield n.lineno, n.value


def _task_messages(path: Path):
    """The fail_msg / msg texts of a task file."""
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("fail_msg", "msg", "success_msg") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
    yield from walk(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})"
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > LONGEST]
    assert not long, f"{path.relative_to(ROOT)}: split {', '.join(long)} (at most {LONGEST} lines)"


def test_every_setting_a_message_names_exists():
    settings = _settings()
    wrong = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in SOURCES for line, text in _python_messages(p)
             for name in SETTING.findall(text) if name not in settings]
    for path in sorted((ROOT / "roles").rglob("tasks/*.yml")):
        wrong += [f"{path.relative_to(ROOT)}: {name}" for text in _task_messages(path)
                  for name in SETTING.findall(text) if name not in settings]
    assert not wrong, "messages name settings that do not exist:\n" + "\n".join(wrong)


def test_the_check_of_message_settings_can_fail():
    assert SETTING.findall("use offline mode (llamafleet_offline: true)") == ["llamafleet_offline"]
    assert "llamafleet_offline" not in _settings() and "stack_offline" in _settings()


@pytest.mark.parametrize("verb", ["status", "stop", "collect"])
def test_the_entry_points_of_status_stop_and_collect_describe_their_verb(verb):
    specs = yaml.safe_load((ROOT / "roles/train/meta/argument_specs.yml").read_text())["argument_specs"]
    entry = specs[verb]
    tasks = (ROOT / f"roles/train/tasks/{verb}.yml").read_text()
    used = set(re.findall(r"\b(train_[a-z0-9_]+)\b", tasks))
    assert set(entry["options"]) == used, f"{verb}: the options are {sorted(entry['options'])}, its tasks use {sorted(used)}"
    if verb == "collect":  # status and stop without one ask each node for its active run
        assert "required" in entry["options"]["train_run_id"]["description"]  # names.yml refuses an empty one
    for name, option in entry["options"].items():
        assert option["description"] != specs["main"]["options"].get(name, {}).get("description"), \
            f"{verb}: {name} is described as for train"

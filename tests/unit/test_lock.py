import textwrap

import pytest

from llamafleet import lock
from llamafleet.errors import LockError


def write(tmp_path, text):
    p = tmp_path / "lock.yml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """
schema: 1
python: "3.11"
components: [torch, six]
build_with_torch: [deepspeed]
flavors:
  cpu: {packages: {torch: "2.13.0"}, strip: {torchaudio: ["torchaudio/lib/*.so"]}}
  sys: {torch_mode: system, packages: {torch: "2.11.0"}}
packages: {six: "1.16.0", deepspeed: "0.19.8", Typing_Extensions: "4.12.2"}
"""


def test_default_lock_resolves_every_flavor():
    data = lock.load(None)
    for flavor in data["flavors"]:
        stack = lock.resolve(data, flavor)
        assert stack.packages["deepspeed"] and stack.packages["llamafactory"] and stack.packages["transformers"]
    cpu = lock.resolve(data, "cpu")
    assert "torchvision" not in cpu.packages  # the trap: CPU torch cannot import PyPI's torchvision
    assert cpu.strip == {"torchaudio": ("torchaudio/lib/*.so",)}


def test_phases_build_deepspeed_after_torch_and_names_are_canonical(tmp_path):
    stack = lock.load_stack(write(tmp_path, GOOD), "cpu")
    first, second = stack.requirements()
    assert "torch==2.13.0" in first and "typing-extensions==4.12.2" in first
    assert second == ["deepspeed==0.19.8"]


def test_system_mode_verifies_torch_but_does_not_install_it(tmp_path):
    stack = lock.load_stack(write(tmp_path, GOOD), "sys")
    assert stack.packages["torch"] == "2.11.0"
    assert not any(r.startswith("torch==") for phase in stack.requirements() for r in phase)


def test_hash_changes_with_content_and_is_stable(tmp_path):
    a = lock.load_stack(write(tmp_path, GOOD), "cpu")
    b = lock.load_stack(write(tmp_path, GOOD), "cpu")
    c = lock.load_stack(write(tmp_path, GOOD.replace('six: "1.16.0"', 'six: "1.17.0"')), "cpu")
    assert a.hash == b.hash != c.hash
    assert a.venv_name == f"stack-{a.hash}"


def test_round_trip_through_plain_data(tmp_path):
    stack = lock.load_stack(write(tmp_path, GOOD), "cpu")
    assert lock.resolve_dict(stack.to_dict()) == stack


@pytest.mark.parametrize("text, fragment", [
    ("schema: 1\npython: 3.11\n", "python: is 3.11"),
    (GOOD.replace('six: "1.16.0"', "six: 1.16"), "packages.six: is 1.16"),
    (GOOD.replace("torch_mode: system", "torch_mode: conda"), "torch_mode: is 'conda'"),
    ("[unclosed", "not valid YAML"),
    ("- a list", "must be a YAML mapping"),
])
def test_bad_locks_name_file_and_key(tmp_path, text, fragment):
    with pytest.raises(LockError) as err:
        lock.load(write(tmp_path, text))
    assert fragment in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_unknown_flavor_lists_the_known_ones(tmp_path):
    with pytest.raises(LockError, match="llamafleet_flavor is 'rocm'.*use one of: cpu, sys"):
        lock.load_stack(write(tmp_path, GOOD), "rocm")


def test_missing_lock_file(tmp_path):
    with pytest.raises(LockError, match="does not exist"):
        lock.load(tmp_path / "nope.yml")

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


SERVING = GOOD + """
serving:
  vllm:
    description: vLLM with its own torch
    flavors: [sys]
    cuda: "12.8"
    components: [vllm, torch]
    smoke_imports: [vllm]
    packages: {vllm: "0.11.0", torch: "2.8.0", Six: "1.17.0"}
"""


def test_a_serving_stack_is_a_venv_of_its_own_with_only_its_closure(tmp_path):
    path = write(tmp_path, SERVING)
    data = lock.load(path)
    training = lock.resolve(data, "sys")
    served = lock.resolve_serving(data, "vllm", "sys")
    assert served.serving == "vllm" and training.serving is None
    assert served.venv_name != training.venv_name and served.venv_name.startswith("stack-")
    assert served.packages == {"vllm": "0.11.0", "torch": "2.8.0", "six": "1.17.0"}  # nothing of the training packages
    assert served.torch_mode == "pip" and served.system_provided == () and served.build_with_torch == ()
    assert served.cuda == "12.8" and served.accelerator == "cuda" and not served.cpu_only
    assert served.components == ("vllm", "torch") and served.smoke_imports == ("vllm",)
    assert lock.serving_names(data, "sys") == ["vllm"] and lock.serving_names(data, "cpu") == []
    assert lock.resolve_dict(served.to_dict()) == served
    bumped = lock.resolve_serving(lock.load(write(tmp_path, SERVING.replace('vllm: "0.11.0"', 'vllm: "0.11.1"'))), "vllm", "sys")
    assert bumped.venv_name != served.venv_name


def test_a_serving_stack_on_a_flavor_it_does_not_run_on_says_to_use_the_api(tmp_path):
    data = lock.load(write(tmp_path, SERVING))
    with pytest.raises(LockError, match=r"the vllm serving stack of .* runs on nodes of flavor sys; these nodes are "
                                         r"llamafleet_flavor cpu: serve with the api backend \(--backend api\)"):
        lock.resolve_serving(data, "vllm", "cpu")
    with pytest.raises(LockError, match=r"serving stack 'sglang' is not in .*its serving stacks: vllm"):
        lock.resolve_serving(data, "sglang", "sys")


@pytest.mark.parametrize("section,fragment", [
    ("serving: [vllm]", "serving: must map each serving stack's name"),
    ("serving: {vllm: {flavors: [sys]}}", "serving.vllm.packages: must be the stack's whole closure"),
    ("serving: {vllm: {flavors: [rocm], packages: {vllm: '0.11.0'}}}", "serving.vllm.flavors: names 'rocm'"),
    ("serving: {vllm: {packages: {vllm: '0.11.0'}}}", "serving.vllm.flavors: must list the training flavors"),
    ("serving: {vllm: {flavors: [sys], packages: {vllm: 0.11}}}", "serving.vllm.packages.vllm: is 0.11; pin an exact"),
])
def test_bad_serving_sections_name_the_key(tmp_path, section, fragment):
    with pytest.raises(LockError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        lock.load(write(tmp_path, GOOD + section + "\n"))


def test_wheel_tags_are_the_ones_a_node_of_that_machine_and_glibc_takes():
    from llamafleet import pins

    tags = pins.linux_platforms("aarch64", "2.28")
    assert tags[0] == "manylinux_2_28_aarch64" and tags[-1] == "linux_aarch64"
    assert tags.index("manylinux_2_17_aarch64") + 1 == tags.index("manylinux2014_aarch64")  # legacy alias beside its glibc
    assert "manylinux_2_29_aarch64" not in tags and not any("x86_64" in t for t in tags)
    assert pins.linux_platforms("x86_64", None)[0] == "manylinux_2_17_x86_64"  # unknown glibc: the lowest wheels target


def test_wheelhouse_downloads_choose_the_nodes_files_and_carry_deepspeed_as_an_sdist():
    from llamafleet import pins

    stack = lock.load_stack(None, "cpu")
    wheels, sdists = pins.download_argvs(stack, "py", "/wh", ("manylinux_2_28_aarch64",), [], ("fire",))
    assert wheels[wheels.index("--python-version") + 1] == stack.python
    assert wheels[wheels.index("--abi") + 1] == "cp" + stack.python.replace(".", "")
    assert "--only-binary=:all:" in wheels and wheels[wheels.index("--platform") + 1] == "manylinux_2_28_aarch64"
    assert f"torch=={stack.packages['torch']}" in wheels and not any(a.startswith(("deepspeed", "fire")) for a in wheels)
    assert set(sdists[-2:]) == {f"deepspeed=={stack.packages['deepspeed']}", f"fire=={stack.packages['fire']}"}
    assert "--no-binary=:all:" in sdists and "--platform" not in sdists

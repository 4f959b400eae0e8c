import textwrap

import pytest

from llamafleet import lock, parity


@pytest.fixture
def stack(tmp_path):
    p = tmp_path / "lock.yml"
    p.write_text(textwrap.dedent("""
        schema: 1
        python: "3.11"
        components: [torch, deepspeed, transformers]
        flavors:
          cpu: {packages: {torch: "2.13.0"}}
          cu128: {cuda: "12.8", driver_min: "570.26", packages: {torch: "2.9.1", nvidia-nccl-cu12: "2.27.5"}}
          system: {cuda: system, torch_mode: system, packages: {torch: "2.11.0"}}
        packages: {deepspeed: "0.19.8", transformers: "5.6.0"}
    """))
    return lambda flavor="cpu": lock.load_stack(p, flavor)


def insp(python="3.11.7", gpus=(), driver=None, **pkgs):
    packages = {"torch": "2.13.0+cpu", "deepspeed": "0.19.8", "transformers": "5.6.0", "pip": "23.2"}
    packages.update({k.replace("_", "-"): v for k, v in pkgs.items() if v is not None})
    for k, v in pkgs.items():
        if v is None:
            packages.pop(k.replace("_", "-"))
    return {"node": {"driver": driver, "gpus": list(gpus), "nvcc": None},
            "stack": {"status": "ok", "path": "/v", "probe": {"python": python, "packages": packages}}}


def test_identical_nodes_pass_and_local_label_matches_the_pin(stack):
    r = parity.compare(stack(), {"a": insp(), "b": insp()})
    assert r.ok, r.format()
    torch_row = next(x for x in r.rows if x.component == "torch")
    assert torch_row.found == {"a": "2.13.0+cpu", "b": "2.13.0+cpu"}


@pytest.mark.parametrize("bad, component", [
    (insp(torch="2.14.1"), "torch"),
    (insp(deepspeed="0.19.7"), "deepspeed"),
    (insp(transformers="5.5.0"), "transformers"),
    (insp(python="3.9.16"), "python"),
    (insp(tomli="2.0.1"), "tomli"),
    (insp(transformers=None), "transformers"),
])
def test_drift_names_node_and_component(stack, bad, component):
    r = parity.compare(stack(), {"a": insp(), "b": bad, "c": insp()})
    assert not r.ok
    row = next(x for x in r.rows if x.component == component)
    assert row.bad == ("b",)
    assert any(p.startswith(f"b: {component} is") for p in r.problems), r.problems
    assert component in r.table(only_problems=True) and " !" in r.table(only_problems=True)


def test_same_pin_different_local_builds_differ_between_nodes(stack):
    r = parity.compare(stack(), {"a": insp(), "b": insp(torch="2.13.0+cu126")})
    assert not r.ok
    assert "nodes differ" in " ".join(r.problems)


def test_missing_venv_is_a_problem_with_the_fix(stack):
    missing = {"node": {}, "stack": {"status": "absent", "path": "/x/stacks/stack-1"}}
    r = parity.compare(stack(), {"a": insp(), "b": missing})
    assert not r.ok and "b: no complete stack venv" in r.problems[0] and "run provision" in r.problems[0]


def test_cuda_flavor_checks_driver_gpus_and_nccl(stack):
    gpu = [{"name": "NVIDIA H100", "memory_mib": 81559}]
    good = insp(gpus=gpu * 8, driver="580.159.04", torch="2.9.1", nvidia_nccl_cu12="2.27.5")
    good["stack"]["probe"]["torch_cuda"] = "12.8"
    old = insp(gpus=gpu * 8, driver="550.54.15", torch="2.9.1", nvidia_nccl_cu12="2.27.5")
    old["stack"]["probe"]["torch_cuda"] = "12.8"
    r = parity.compare(stack("cu128"), {"a": good, "b": old}, gpus={"a": 8, "b": 8})
    assert [x.component for x in r.rows if not x.ok] == ["nvidia driver"]
    few = insp(gpus=gpu * 4, driver="580.159.04", torch="2.9.1", nvidia_nccl_cu12="2.27.5")
    few["stack"]["probe"]["torch_cuda"] = "12.8"
    r = parity.compare(stack("cu128"), {"a": good, "b": few}, gpus={"a": 8, "b": 8})
    assert [x.component for x in r.rows if not x.ok] == ["gpus"]


def test_report_round_trips_through_json(stack):
    r = parity.compare(stack(), {"a": insp(), "b": insp(torch="2.14.1")})
    again = parity.ParityReport.from_dict(r.to_dict())
    assert again.table() == r.table() and again.problems == r.problems


def test_system_flavor_takes_the_images_cuda_and_requires_it_to_agree(stack):
    """The image's torch: its CUDA version is not in the lock, so it is read from every node and compared; a CPU
    build or a different CUDA on one node is named. The plan treats the flavor as a GPU one."""
    gpu = [{"name": "NVIDIA H100", "memory_mib": 81559}]

    def node(cuda):
        i = insp(gpus=gpu * 8, driver="580.159.04", torch="2.11.0")
        i["stack"]["probe"]["torch_cuda"] = cuda
        return i
    system = stack("system")
    assert not system.cpu_only and system.cuda_label == "the base image's CUDA"
    r = parity.compare(system, {"a": node("13.0"), "b": node("13.0")}, gpus={"a": 8, "b": 8})
    assert r.ok, r.format()
    row = next(x for x in r.rows if x.component == "torch.version.cuda")
    assert row.expected == "13.0 on every node (the image's)"
    r = parity.compare(system, {"a": node("13.0"), "b": node("13.0"), "c": node("12.8")}, gpus={"a": 8, "b": 8, "c": 8})
    assert [(x.component, x.bad) for x in r.rows if not x.ok] == [("torch.version.cuda", ("c",))]
    r = parity.compare(system, {"a": node("13.0"), "b": node(None)}, gpus={"a": 8, "b": 8})
    assert [(x.component, x.bad) for x in r.rows if not x.ok] == [("torch.version.cuda", ("b",))]
    assert stack("cpu").cpu_only


def test_a_system_flavor_allows_the_images_unlisted_packages_only_when_every_node_has_the_same(stack):
    """An NGC-style image carries hundreds of packages the lock does not list (apex, flash-attn): seen through
    the venv, they must be the same on every node; one installed into the venv itself is an extra."""
    def node(local=(), **image):
        i = insp(driver="580.159.04", torch="2.11.0", **image)
        i["node"]["gpus"] = [{"name": "NVIDIA H100", "memory_mib": 81559}]
        probe = i["stack"]["probe"]
        probe["torch_cuda"] = "13.0"
        probe["local_packages"] = ["deepspeed", "transformers", *local]
        return i
    system = stack("system")
    same = {"a": node(flash_attn="2.8.3"), "b": node(flash_attn="2.8.3")}
    assert parity.compare(system, same, gpus={"a": 1, "b": 1}).ok
    r = parity.compare(system, {"a": node(flash_attn="2.8.3"), "b": node(flash_attn="2.7.4"), "c": node(flash_attn="2.8.3")},
                       gpus={"a": 1, "b": 1, "c": 1})
    assert [(x.component, x.bad) for x in r.rows if not x.ok] == [("flash-attn", ("b",))]
    r = parity.compare(system, {"a": node(local=["tomli"], tomli="2.0.1"), "b": node(local=["tomli"], tomli="2.0.1")},
                       gpus={"a": 1, "b": 1})
    assert [(x.component, x.bad) for x in r.rows if not x.ok] == [("tomli", ("a", "b"))]
    assert not parity.compare(stack(), {"a": insp(tomli="2.0.1"), "b": insp(tomli="2.0.1")}).ok  # pip flavor: any extra

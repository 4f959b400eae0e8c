"""provision and check over real SSH on the network-namespace testbed, with the light lock."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LIGHT_LOCK
from llamafleet import check, lock, provision

pytestmark = pytest.mark.integration
STACK = lock.load_stack(LIGHT_LOCK, "cpu")


@pytest.fixture
def inv(testbed, tmp_path):
    """An inventory of the testbed whose node roots are fresh for this test."""

    def make(nodes=None, **group_vars):
        # The namespace nodes have no route to a package index, like many intranet clusters:
        # they install from the wheelhouse the controller builds and pushes.
        group_vars.setdefault("stack_offline", True)
        names = nodes or [n.name for n in testbed.nodes]
        host_vars = {n: {"llamafleet_root": str(tmp_path / "roots" / n)} for n in names}
        return testbed.write_inventory(tmp_path / f"inv-{len(list(tmp_path.glob('inv-*')))}" / "hosts.yml",
                                       extra_host_vars=host_vars, extra_group_vars=group_vars, nodes=names)

    make.root = lambda n: tmp_path / "roots" / n
    return make


def venv(root: Path) -> Path:
    return root / "stacks" / STACK.venv_name


def test_provision_builds_every_node_then_a_rerun_changes_nothing(testbed, inv):
    path = inv()
    first = provision(path, lock_file=LIGHT_LOCK)
    assert first.ok, first.format()
    assert [n.action for n in first.nodes] == ["built"] * 3
    for n in testbed.nodes:
        # the node's own view, over ssh: the venv is complete and `current` points at it
        out = testbed.ssh(n, f"cat {shlex.quote(str(venv(inv.root(n.name))))}/.llamafleet-complete && "
                             f"readlink {shlex.quote(str(inv.root(n.name)))}/stacks/current").stdout
        assert STACK.venv_name in out
    again = provision(path, lock_file=LIGHT_LOCK)
    assert again.ok, again.format()
    assert again.changed == 0 and all(n.changed == 0 for n in again.nodes)
    checked = check(path, lock_file=LIGHT_LOCK)
    assert checked.ok and checked.parity.ok
    report = json.loads(Path(checked.report_path).read_text())
    assert report["ok"] and report["nodes"] == ["node1", "node2", "node3"]
    assert {r["component"] for r in report["rows"]} >= {"python", "six", "idna"}


def test_limit_installs_only_the_new_node_and_compares_it_with_all(testbed, inv):
    two = inv(nodes=["node1", "node2"])
    assert provision(two, lock_file=LIGHT_LOCK).ok
    three = inv()
    result = provision(three, lock_file=LIGHT_LOCK, limit="node3")
    assert result.ok, result.format()
    actions = {n.name: n.action for n in result.nodes}
    assert actions["node3"] == "built"
    assert [n.changed for n in result.nodes if n.name != "node3"] == [0, 0]
    assert result.parity.nodes == ("node1", "node2", "node3")


def test_offline_mode_installs_from_a_pushed_wheelhouse(testbed, inv):
    path = inv(nodes=["node1", "node2"])
    result = provision(path, lock_file=LIGHT_LOCK, offline=True)
    assert result.ok, result.format()
    for name in ("node1", "node2"):
        files = testbed.ssh(name, f"ls {shlex.quote(str(inv.root(name)))}/wheelhouse/{STACK.venv_name}").stdout.split()
        assert any(f.startswith("six-1.16.0") for f in files), files


def test_online_mode_on_nodes_without_an_index_fails_clearly_and_leaves_nothing(testbed, inv):
    path = inv(nodes=["node1", "node2"], stack_offline=False)
    result = provision(path, lock_file=LIGHT_LOCK)
    assert not result.ok
    assert "cannot reach its package index" in "\n".join(result.errors) and "offline" in "\n".join(result.errors)
    for name in ("node1", "node2"):
        assert not venv(inv.root(name)).exists()


def plant(testbed, node, python, *pins, wheels):
    """Install pins into a node's environment by hand, as drift happens: the node has no index, so the
    wheels are downloaded here and installed there from the (shared) directory."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *pins],
                   check=True, capture_output=True)
    testbed.ssh(node, f"{shlex.quote(str(python))} -m pip -q --disable-pip-version-check install --no-deps "
                      f"--no-index --find-links {shlex.quote(str(wheels))} {' '.join(pins)}", timeout=300)


def test_drift_of_a_pin_and_of_an_unpinned_package_is_reported_then_repaired(testbed, inv, tmp_path):
    path = inv()
    assert provision(path, lock_file=LIGHT_LOCK).ok
    plant(testbed, "node2", venv(inv.root("node2")) / "bin/python", "six==1.17.0", wheels=tmp_path / "w")
    plant(testbed, "node3", venv(inv.root("node3")) / "bin/python", "tomli==2.0.1", wheels=tmp_path / "w")
    bad = check(path, lock_file=LIGHT_LOCK)
    assert not bad.ok
    problems = "\n".join(bad.parity.problems)
    assert "node2: six is 1.17.0, expected 1.16.0" in problems
    assert "node3: tomli is 2.0.1" in problems and "does not list" in problems
    fixed = provision(path, lock_file=LIGHT_LOCK)
    assert fixed.ok, fixed.format()
    assert {n.name: n.action for n in fixed.nodes} == {"node1": "unchanged", "node2": "repaired", "node3": "repaired"}
    assert check(path, lock_file=LIGHT_LOCK).ok


def test_another_python_minor_on_one_node_fails_the_check(testbed, inv, tmp_path):
    """node3's venv rebuilt by hand with PyPy (Python 3.9): the probe, run by that venv's own
    interpreter, reports 3.9 and the check names node3 and python."""
    path = inv()
    assert provision(path, lock_file=LIGHT_LOCK).ok
    v = venv(inv.root("node3"))
    marker = (v / ".llamafleet-complete").read_text()
    testbed.ssh("node3", f"rm -rf {shlex.quote(str(v))} && pypy3 -m venv {shlex.quote(str(v))}", timeout=300)
    plant(testbed, "node3", v / "bin/python", *(f"{n}=={ver}" for n, ver in STACK.packages.items()), wheels=tmp_path / "w")
    (v / ".llamafleet-complete").write_text(marker)
    bad = check(path, lock_file=LIGHT_LOCK)
    assert not bad.ok
    row = next(r for r in bad.parity.rows if r.component == "python")
    assert row.bad == ("node3",) and row.found["node3"].startswith("3.9")
    assert any(p.startswith("node3: python is 3.9") for p in bad.parity.problems)
    fixed = provision(path, lock_file=LIGHT_LOCK)
    assert fixed.ok and {n.name: n.action for n in fixed.nodes}["node3"] == "built"


def test_a_serving_stack_is_built_beside_the_training_one_only_on_the_nodes_that_serve(testbed, inv):
    path = inv(nodes=["node1", "node2"])
    assert provision(path, lock_file=LIGHT_LOCK).ok
    serving = lock.load_serving(LIGHT_LOCK, "light", "cpu")
    result = provision(path, lock_file=LIGHT_LOCK, serving="light", limit="node2")
    assert result.ok, result.format()
    assert {n.name: n.action for n in result.nodes} == {"node1": "not in --limit", "node2": "built"}
    assert result.parity.nodes == ("node2",)  # compared among the nodes that serve, not with node1's training stack
    root2, root1 = inv.root("node2"), inv.root("node1")
    links = testbed.ssh("node2", f"cd {shlex.quote(str(root2))}/stacks && readlink current serving-light && "
                                 f"{serving.venv_name}/bin/python -c 'import six; print(six.__version__)' && "
                                 f"current/bin/python -c 'import six; print(six.__version__)'").stdout.split()
    assert links == [STACK.venv_name, serving.venv_name, "1.17.0", "1.16.0"]  # the training stack is untouched
    assert not (root1 / "stacks" / serving.venv_name).exists()
    again = provision(path, lock_file=LIGHT_LOCK, serving="light", limit="node2")
    assert again.ok and again.changed == 0, again.format()
    checked = check(path, lock_file=LIGHT_LOCK, serving="light", limit="node2")
    assert checked.ok and checked.parity.ok, checked.format()
    assert check(path, lock_file=LIGHT_LOCK).ok  # the training stack's parity over both nodes still holds


def test_the_offline_wheelhouse_reaches_three_nodes_by_fan_out_and_they_install_from_it(testbed, inv):
    path = inv(stack_fanout="always")
    result = provision(path, lock_file=LIGHT_LOCK, offline=True)
    assert result.ok, result.format()
    assert [n.action for n in result.nodes] == ["built"] * 3
    log = Path(result.log_path).read_text()
    assert "Stream it from the controller into the first node" in log  # the fan-out ran, not one rsync per node
    for name in ("node1", "node2", "node3"):
        wheelhouse = inv.root(name) / "wheelhouse" / STACK.venv_name
        # the relay's verified hashes, recorded in the node's hash cache: these files came node to node
        verified = json.loads((inv.root(name) / "cache" / "sha256.json").read_text())
        assert any(f.startswith(str(wheelhouse / "six-1.16.0")) for f in verified), verified
        assert not list((inv.root(name) / "fanout").glob("*"))  # no relay, config or secret left
    again = provision(path, lock_file=LIGHT_LOCK, offline=True)
    assert again.ok and again.changed == 0, again.format()  # nothing installs: nothing is sent


def test_the_system_flavor_uses_the_packages_of_an_image_whose_python_is_a_venv(testbed, inv, tmp_path):
    # an image as uv builds them: its torch (here six) lives in /opt/<x>/.venv, whose Python is llamafleet_python
    base = tmp_path / "image" / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(next(base.glob("lib/python3*/site-packages"))), "six==1.16.0"], check=True)
    path = inv(llamafleet_python=str(base / "bin" / "python"))
    result = provision(path, lock_file=LIGHT_LOCK, flavor="image", offline=True)
    assert result.ok, result.format()
    assert [n.action for n in result.nodes] == ["built"] * 3
    image = lock.load_stack(LIGHT_LOCK, "image")
    for name in ("node1", "node2", "node3"):
        seen = testbed.ssh(name, f"{shlex.quote(str(inv.root(name)))}/stacks/{image.venv_name}/bin/python -I -c "
                                 "'import six, idna; print(six.__file__, six.__version__)'").stdout.split()
        assert seen[0].startswith(str(base)) and seen[1] == "1.16.0", seen  # the image's, not installed in the stack
    again = provision(path, lock_file=LIGHT_LOCK, flavor="image", offline=True)
    assert again.ok and again.changed == 0, again.format()  # the image's packages are no drift, nothing to remove

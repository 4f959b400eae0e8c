"""Where llamafleet's files are found and where a cluster's state goes (python/llamafleet/paths.py)."""

from __future__ import annotations

from pathlib import Path

from llamafleet import paths


def test_state_goes_beside_the_inventory_unless_named(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.STATE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "clusters" / "a", tmp_path / "clusters" / "b"
    a.mkdir(parents=True)
    (a / "hosts.yml").write_text("all: {}\n")
    b.mkdir()
    # an inventory file or its directory: the same state; two clusters: two states; nothing in the cwd
    assert paths.state_dir(None, a / "hosts.yml") == paths.state_dir(None, a) == a / ".llamafleet"
    assert paths.state_dir(None, b) == b / ".llamafleet"
    assert not (tmp_path / ".llamafleet").exists()
    # the environment, then an explicit value, win over the inventory
    monkeypatch.setenv(paths.STATE_ENV, str(tmp_path / "env-state"))
    assert paths.state_dir(None, a) == tmp_path / "env-state"
    assert paths.state_dir(tmp_path / "given", a) == tmp_path / "given"
    assert all(p.is_dir() for p in (a / ".llamafleet", tmp_path / "env-state", tmp_path / "given"))
    # no inventory at all (a library call without one): the working directory
    monkeypatch.delenv(paths.STATE_ENV)
    assert paths.state_dir() == tmp_path / ".llamafleet"


def test_the_checkout_is_the_project_when_no_wheel_share_is_there():
    root = Path(paths.PROJECT_DIR)
    for name in ("ansible.cfg", "playbooks/train.yml", "roles/train", "templates/node.env.j2",
                 "collections/ansible_collections/llamafleet/cluster/plugins/module_utils/rules.py"):
        assert (root / name).exists(), name

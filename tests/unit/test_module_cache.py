"""The callback that keeps built modules (AnsiballZ payloads) between runs: its key follows every file a payload is
built from, it never uses a directory others can write, and a real ansible-playbook reuses what the last built."""

from __future__ import annotations

import os
import subprocess
import sys
import types

from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "collections"))

from ansible_collections.llamafleet.cluster.plugins.callback import module_cache  # noqa: E402


def _constants(tmp_path, **kw):
    colls = tmp_path / "colls"
    mods = colls / "ansible_collections" / "acme" / "tools" / "plugins" / "modules"
    mods.mkdir(parents=True, exist_ok=True)
    (mods / "hello.py").write_text("print('hi')\n")
    (tmp_path / "localtmp").mkdir(exist_ok=True)
    c = dict(COLLECTIONS_PATHS=[str(colls)], DEFAULT_MODULE_PATH=[], DEFAULT_MODULE_UTILS_PATH=[], DEFAULT_ROLES_PATH=[],
             DEFAULT_LOCAL_TMP=str(tmp_path / "localtmp"))
    c.update(kw)
    return types.SimpleNamespace(**c), mods / "hello.py"


def test_the_key_changes_with_any_module_file_and_with_the_ansible_version(tmp_path):
    const, hello = _constants(tmp_path)
    key = module_cache.cache_key(const, "2.19.14", "/a")
    assert module_cache.cache_key(const, "2.19.14", "/a") == key
    assert module_cache.cache_key(const, "2.19.15", "/a") != key
    assert module_cache.cache_key(const, "2.19.14", "/b") != key
    hello.write_text("print('hello')\n")  # another size
    edited = module_cache.cache_key(const, "2.19.14", "/a")
    assert edited != key
    os.utime(hello, ns=(1, 1))  # same size, another mtime
    assert module_cache.cache_key(const, "2.19.14", "/a") != edited
    (hello.parent.parent / "module_utils").mkdir()
    (hello.parent.parent / "module_utils" / "util.py").write_text("")
    assert module_cache.cache_key(const, "2.19.14", "/a") not in (key, edited)


def test_link_points_the_runs_cache_at_a_private_directory_and_keeps_a_few_keys(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(module_cache.CACHE_ENV, str(root))
    for i in range(6):
        (root / f"old{i}").mkdir(parents=True)
        os.utime(root / f"old{i}", (i, i))
    (root / "recent").mkdir()  # used by another run within the day: kept, even beyond the newest KEEP
    const, _ = _constants(tmp_path)
    target = module_cache.link(const, "v", "/a")
    local = tmp_path / "localtmp" / "ansiballz_cache"
    assert os.readlink(local) == target and os.path.dirname(target) == str(root)
    assert oct(os.stat(target).st_mode & 0o777) == "0o700"
    kept = {p.name for p in root.iterdir()}
    assert kept == {"recent", "old4", "old5", os.path.basename(target)}
    assert module_cache.link(const, "v", "/a") is None  # this run's cache is already there: left alone


def test_a_cache_directory_others_can_write_is_never_used(tmp_path, monkeypatch):
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    monkeypatch.setenv(module_cache.CACHE_ENV, str(root))
    const, _ = _constants(tmp_path)
    assert module_cache.link(const, "v", "/a") is None
    assert not (tmp_path / "localtmp" / "ansiballz_cache").exists() and list(root.iterdir()) == []


def _play(tmp_path, env):
    play = tmp_path / "play.yml"
    play.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                    "    - llamafleet.cluster.serve: {state: status, root: %s, run_id: r1}\n" % tmp_path)
    return subprocess.run([str(PROJECT / ".venv" / "bin" / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", "ansible_python_interpreter=" + sys.executable,
                           str(play)], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=120)


def test_a_second_ansible_playbook_reuses_the_module_the_first_built(tmp_path):
    root = tmp_path / "cache"
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT / "ansible.cfg"), **{module_cache.CACHE_ENV: str(root)})
    first = _play(tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    (entry,) = [p for p in root.glob("*/*serve-ZIP_DEFLATED-*") if not p.name.endswith(".lock")]
    built = entry.stat()
    second = _play(tmp_path, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert entry.stat().st_ino == built.st_ino and entry.stat().st_mtime_ns == built.st_mtime_ns  # read, not rebuilt
    assert len(list(root.iterdir())) == 1

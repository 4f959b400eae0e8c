"""Keeps the modules Ansible builds (AnsiballZ payloads) from one run to the next.

Every ``ansible-playbook`` builds each module it runs afresh: it walks the module's imports and compiles some
170 ``module_utils`` sources, ~0.3 s of controller CPU per module per run (measured on the 2-core dev machine),
before the first host gets it. Ansible caches the result only for the run, in ``ansiballz_cache`` under its
per-process local temp directory. This callback points that directory at a persistent one, named by a key of
everything a payload is built from: the Ansible version and its path, the Python version, and the path, size and
mtime of every file under the module and module_utils directories Ansible may load (the collection paths, the
collections on ``sys.path``, the configured library paths, ``library/`` and ``module_utils/`` of the roles path).
A change to any of them is a new key and so a fresh build; nothing is ever reused across a change. The cache
holds code only (a task's arguments are added after it is read), in a directory of mode 0700 that must be the
user's own (the entries are pickles): otherwise it is not used and the run builds as before.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import time

DOCUMENTATION = r"""
name: module_cache
type: aggregate
short_description: keep the built modules (AnsiballZ payloads) between runs
description:
  - Points Ansible's per-run AnsiballZ cache at a persistent directory named by a key of every input a payload is
    built from, so a module is built once per change instead of once per run.
  - The directory is C($LLAMAFLEET_MODULE_CACHE), else C($XDG_CACHE_HOME/llamafleet/ansiballz) (default
    C(~/.cache/llamafleet/ansiballz)). It must be owned by the user and not writable by others.
requirements:
  - enabled in callbacks_enabled (llamafleet's ansible.cfg does)
"""

CACHE_ENV = "LLAMAFLEET_MODULE_CACHE"
KEEP = 4  # key directories kept (the newest by use); older ones are removed once unused for IDLE_S
IDLE_S = 86400  # never one another run may still be using (each run touches its own)
CODE_DIRS = (("plugins", "modules"), ("plugins", "module_utils"))

from ansible.plugins.callback import CallbackBase  # noqa: E402


def cache_root() -> str:
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llamafleet", "ansiballz")


def _collection_dirs(paths):
    """Every collection's module and module_utils directory under the given collection roots."""
    for root in paths:
        top = os.path.join(root, "ansible_collections")
        if os.path.basename(root) == "ansible_collections":
            top = root
        for ns in sorted(os.listdir(top)) if os.path.isdir(top) else ():
            nsdir = os.path.join(top, ns)
            for coll in sorted(os.listdir(nsdir)) if os.path.isdir(nsdir) else ():
                for parts in CODE_DIRS:
                    yield os.path.join(nsdir, coll, *parts)


def code_dirs(constants) -> list[str]:
    """The directories whose files a module payload can be built from."""
    dirs = list(_collection_dirs(list(constants.COLLECTIONS_PATHS) + [p for p in sys.path if p]))
    dirs += list(constants.DEFAULT_MODULE_PATH or []) + list(constants.DEFAULT_MODULE_UTILS_PATH or [])
    for roles in constants.DEFAULT_ROLES_PATH or []:
        for role in sorted(os.listdir(roles)) if os.path.isdir(roles) else ():
            dirs += [os.path.join(roles, role, "library"), os.path.join(roles, role, "module_utils")]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def cache_key(constants, ansible_version: str, ansible_dir: str) -> str:
    """A digest of everything an AnsiballZ payload is built from (files by path, size and mtime)."""
    h = hashlib.sha256()
    h.update(("%s\0%s\0%s\0" % (ansible_version, ansible_dir, sys.version)).encode())
    for top in code_dirs(constants):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                h.update(("%s\0%d\0%d\0" % (path, st.st_size, st.st_mtime_ns)).encode())
    return h.hexdigest()[:32]


def _private_dir(path: str) -> bool:
    """Created if missing; True when it is a real directory of this user that nobody else can write."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _prune(root: str, keep: str) -> None:
    """Removes the key directories beyond the KEEP most recently used that no run has used for IDLE_S
    (``keep`` is in use now)."""
    entries = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name != keep and os.path.isdir(path) and not os.path.islink(path):
            entries.append((os.stat(path).st_mtime, path))
    for mtime, path in sorted(entries, reverse=True)[KEEP - 1:]:
        if time.time() - mtime > IDLE_S:
            shutil.rmtree(path, ignore_errors=True)


def link(constants, ansible_version: str, ansible_dir: str) -> str | None:
    """Points ``<local tmp>/ansiballz_cache`` at the persistent directory of this key; returns that directory,
    or None when it was not used (an unsafe root, a cache already there)."""
    local = os.path.join(constants.DEFAULT_LOCAL_TMP, "ansiballz_cache")
    root = cache_root()
    if os.path.lexists(local) or not _private_dir(root):
        return None
    key = cache_key(constants, ansible_version, ansible_dir)
    target = os.path.join(root, key)
    if not _private_dir(target):
        return None
    now = time.time()
    os.utime(target, (now, now))
    _prune(root, key)
    os.symlink(target, local)
    return target


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "llamafleet.cluster.module_cache"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import ansible
        from ansible import constants

        try:
            where = link(constants, ansible.__version__, os.path.dirname(ansible.__file__))
        except OSError as exc:  # a cache is never a reason to fail a run
            where = None
            self._display.vvv("module cache not used: %s" % exc)
        if where:
            self._display.vvv("module cache: %s" % where)

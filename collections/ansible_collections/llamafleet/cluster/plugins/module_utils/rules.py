# -*- coding: utf-8 -*-
# The rules the controller and the nodes both apply, in one file. Ansible bundles it into the node-side
# modules (as module_utils); the controller's package loads this same file (python/llamafleet/rules.py).
# Standard library only, and Python 3.6+ syntax: it runs under a node's own interpreter.

from __future__ import annotations

import hashlib
import json
import os
import re

# A stack venv is complete (installed, stripped, smoke-imported) when this file exists in it; it records what
# the build installed, so that a package changed later (even to another build of the same version) is drift.
MARKER = ".llamafleet-complete"
# Installed by venv/ensurepip, not by the lock: never reported as extras.
BASELINE = frozenset(("pip", "setuptools", "wheel", "distribute"))
CANON = r"[-_.]+"


def canon(name):
    """A package name as PEP 503 normalises it (Torch_NPU -> torch-npu)."""
    return re.sub(CANON, "-", name).lower()


def version_matches(pin, found):
    """PEP 440 ==: a pin without a local label (2.13.0) matches 2.13.0+cpu; one with a label matches it exactly."""
    if found is None:
        return False
    return found == pin or ("+" not in pin and found.split("+", 1)[0] == pin)


def package_drift(expected, installed, built=None):
    """The pinned packages (canonical names, sorted) a venv must have reinstalled: installed at a version its pin
    does not match, or, where ``built`` (the marker's record) knows it, at another build than the one the
    venv was built with (2.13.0+cu130 where the build installed 2.13.0+cpu: the pin alone matches both)."""
    out = []
    for name, pin in sorted(expected.items()):
        found = installed.get(name)
        if not version_matches(pin, found) or (built and built.get(name) and found != built[name]):
            out.append(name)
    return out


def extras(expected, installed_here):
    """Packages installed in the venv itself that the lock does not list (the baseline aside)."""
    return sorted(n for n in installed_here if n not in expected and n not in BASELINE)


def write_marker(venv, venv_name, packages, built_at):
    """Mark ``venv`` complete, recording every package version the build left in it."""
    with open(os.path.join(venv, MARKER), "w") as fh:
        json.dump({"venv_name": venv_name, "built": built_at, "packages": dict(sorted(packages.items()))}, fh)


def read_marker(venv):
    """The marker's record ({} for a marker from before records, None when the venv is not complete)."""
    try:
        with open(os.path.join(venv, MARKER)) as fh:
            text = fh.read()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def sha256_file(path, limit=None):
    """Hex sha256 of a file's content (of its first ``limit`` bytes when given), read in 1 MiB chunks."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


# A node's one cache of file hashes (<root>/cache/sha256.json): the input check and the fan-out both read and
# fill it, so a file verified once is not read again until its size or mtime changes.
NODE_HASH_CACHE = os.path.join("cache", "sha256.json")


class HashCache(object):
    """sha256 of files by absolute path, cached by size and mtime (``[size, mtime_ns, sha256]`` per path)."""

    def __init__(self, root):
        self.path = os.path.join(root, NODE_HASH_CACHE)
        try:
            with open(self.path) as fh:
                self.data = json.load(fh)
        except (OSError, ValueError):
            self.data = {}
        if not isinstance(self.data, dict):
            self.data = {}
        self.dirty = False

    def sha256(self, path, st=None):
        """The file's sha256: from the cache when its size and mtime are those recorded, else read (and recorded)."""
        st = st or os.stat(path)
        hit = self.data.get(path)
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        digest = sha256_file(path)
        self.record(path, digest, st)
        return digest

    def record(self, path, digest, st=None):
        """Record a hash already verified (e.g. computed while the file was received)."""
        st = st or os.stat(path)
        self.data[path] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True

    def save(self):
        """Write the cache when it changed, without the entries of files that are gone; never fails the caller."""
        if not self.dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = "%s.%d.tmp" % (self.path, os.getpid())
            with open(tmp, "w") as fh:
                json.dump(dict((k, v) for k, v in self.data.items() if os.path.exists(k)), fh)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass


def verified_files(cache, dest, manifest):
    """The files of ``manifest`` (relative path -> ``{"size", "sha256"}``) present in ``dest`` with that size and
    hash, by ``cache`` (a HashCache: an unchanged file is not read again)."""
    have = set()
    for rel, want in manifest.items():
        full = os.path.join(dest, rel)
        try:
            st = os.stat(full)
        except OSError:
            continue
        if st.st_size == int(want["size"]) and cache.sha256(full, st) == want["sha256"]:
            have.add(rel)
    return have


# What a node's launch check reports that changes from one launch to the next without changing the judgement
# of the cluster (the clock is judged anew at every launch, the disk by the node's own check).
VOLATILE_FACTS = ("time", "clock_offset_s", "disk_free_gb")


def judged_digest(result):
    """A digest of what the launch judgement compares across nodes in a node's check ``result`` (its node
    facts but the volatile ones, its stack state, its model's fingerprint): equal digests, equal judgement."""
    node = dict((k, v) for k, v in (result.get("node") or {}).items() if k not in VOLATILE_FACTS)
    body = json.dumps({"node": node, "stack": result.get("stack"), "model": result.get("model")}, sort_keys=True,
                      default=str)
    return hashlib.sha256(body.encode()).hexdigest()

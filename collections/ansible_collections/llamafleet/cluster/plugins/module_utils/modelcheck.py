# -*- coding: utf-8 -*-
# A model directory on a node, checked and fingerprinted: is it complete, and is it the same model
# every other node has? Read by the train module's launch check and by the fetch module after a
# download; the controller compares the fingerprints (llamafleet.parity.compare_model).
# Standard library only: it runs on the node under the module's interpreter.

from __future__ import annotations

import hashlib
import json
import os
import struct

from ansible_collections.llamafleet.cluster.plugins.module_utils.rules import sha256_file

# Files up to this size are hashed whole (config, tokenizer, generation config, chat template):
# they are what differs between two revisions that keep their weight sizes.
SMALL_FILE = 32 * 2**20
# One of these must be there for the tokenizer to load (fast tokenizer, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model", "qwen.tiktoken")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# a safetensors header is a JSON object of at most 100 MB (the format's own limit)
_MAX_HEADER = 100 * 2**20


def _safetensors(path, size):
    """(digest of its header, problem or None). The header says where every tensor's bytes end, so a
    file cut short by an interrupted copy is caught without reading its data."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return "", "is not a safetensors file (%d bytes)" % size
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER or 8 + length > size:
                return "", "is truncated or not a safetensors file (header of %d bytes in a file of %d)" % (length, size)
            header = fh.read(length)
        tensors = json.loads(header.decode("utf-8"))
    except (OSError, ValueError) as exc:
        return "", "cannot be read as safetensors (%s)" % exc
    end = 0
    for name, spec in tensors.items():
        if name != "__metadata__" and isinstance(spec, dict):
            end = max(end, int((spec.get("data_offsets") or [0, 0])[1]))
    want = 8 + length + end
    digest = "header:" + hashlib.sha256(header).hexdigest()[:16]
    if size != want:
        return digest, "is truncated: %d of %d bytes" % (size, want) if size < want else \
            "has %d bytes after its last tensor" % (size - want)
    return digest, None


def _files(path):
    """Every regular file under ``path`` (symlinks followed: a hub cache snapshot is links to blobs),
    relative path -> absolute path, hidden files and directories left out."""
    out = {}
    for top, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                full = os.path.join(top, name)
                out[os.path.relpath(full, path)] = full
    return out


def _index_problems(files):
    problems = []
    for index in INDEXES:
        if index not in files:
            continue
        try:
            with open(files[index]) as fh:
                weight_map = json.load(fh).get("weight_map") or {}
        except (OSError, ValueError) as exc:
            problems.append("%s cannot be read (%s)" % (index, exc))
            continue
        for name in sorted(set(weight_map.values())):
            if name not in files:
                problems.append("%s names %s, which is missing" % (index, name))
    return problems


def _hidden(rel):
    return any(part.startswith(".") for part in rel.split("/"))


def fingerprint(path, expect_sizes=None, model=True):
    """What a node holds at ``path``: ``present``, ``files`` (relative path -> "size digest", the digest
    being the sha256 of a small file or of a safetensors header), ``bytes`` and ``problems`` (a file
    missing, truncated, or of another size than ``expect_sizes`` says, e.g. the hub's commit).
    ``model``: also check it is a loadable model directory (config, tokenizer, every indexed weight)."""
    out = {"path": path, "present": os.path.isdir(path), "files": {}, "bytes": 0, "problems": []}
    if not out["present"]:
        out["problems"].append("%s does not exist" % path)
        return out
    problems = out["problems"]
    for rel, full in _files(path).items():
        try:
            size = os.path.getsize(full)
        except OSError as exc:
            problems.append("%s cannot be read (%s)" % (rel, exc.strerror))
            continue
        out["bytes"] += size
        if rel.endswith(".safetensors"):
            digest, problem = _safetensors(full, size)
            if problem:
                problems.append("%s %s" % (rel, problem))
        else:
            digest = "sha256:" + sha256_file(full)[:16] if size <= SMALL_FILE else ""
        out["files"][rel] = ("%d %s" % (size, digest)).strip()
    names = set(out["files"])
    if not model:
        names = set()
    elif "config.json" not in names:
        problems.append("config.json is missing: not a saved model directory")
    if model and not names & set(TOKENIZER_FILES):
        problems.append("no tokenizer file (%s)" % ", ".join(TOKENIZER_FILES[:3]))
    if model and not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        problems.append("no weight file (*.safetensors, *.bin)")
    problems += _index_problems({rel: os.path.join(path, rel) for rel in names})
    for rel, size in sorted((expect_sizes or {}).items()):
        if _hidden(rel):  # .gitattributes: repository plumbing, not read by training
            continue
        have = out["files"].get(rel)
        if have is None:
            problems.append("%s is missing" % rel)
        elif int(have.split()[0]) != int(size):
            problems.append("%s has %s bytes, the hub's commit has %d" % (rel, have.split()[0], size))
    return out

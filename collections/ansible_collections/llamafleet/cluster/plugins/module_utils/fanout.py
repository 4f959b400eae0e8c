# -*- coding: utf-8 -*-
"""Node-to-node fan-out: every byte crosses the controller's uplink once.

The controller streams the files one node misses into the first node of a chain (over SSH, through this
script's ``pipe`` mode on that node); every node writes what it misses and passes the stream on to the next
node over the training network at the same time (a pipelined chain: the whole cluster is filled in about the
time of one copy). Each node runs one relay per transfer (``run`` mode), started by the fanout module:

- it listens on the node's training address, on a port the kernel picked, and accepts only a peer that proves
  it holds the transfer's secret (HMAC-SHA256 of a fresh nonce, compared in constant time); any other
  connection is refused and counted. The secret is read and its file deleted when the relay starts; it
  exits when the stream ends or at its deadline: nothing listens after the transfer;
- a file is written to a hidden part file named after its expected SHA-256, its hash computed on the way,
  and renamed into place only when it matches the controller's manifest: a file is there whole and verified,
  or not at all. A stream that breaks off leaves the part file: the next transfer starts that file where the
  part ends (the frame's ``offset``, the least of what the nodes wanting it hold), the relay hashing the part's
  bytes before it appends; the whole file is verified all the same, so a resumed file is never trusted on its
  part's word;
- a successor that cannot be reached or breaks off is recorded (``forward_error``) and this node still
  finishes; a predecessor that breaks off fails this node (``stream ended early``), and the nodes after it
  see their stream end the same way: each names where it stopped.

Stream: 4-byte big-endian length + JSON frames. First ``{"chain": [{"name","addr","port"},...]}`` (the nodes
after the receiver), then per file ``{"path","size","sha256","to":[names],"offset"}`` + ``size - offset`` raw
bytes (``offset`` 0 when absent), then
``{"end": true}``. The answer flows back up the chain once the last node has everything: ``{"acks": [...]}``,
one outcome per node (``ack``), each node's put before its successors'. A relay whose whole manifest is then on
its disk, verified (``complete``), has recorded the hashes in the node's hash cache and removed its run
directory itself (config ``cleanup``): the controller needs no further task on that node.
Pure standard library (and ``rules.py``, written beside it): the same file is the relay on every node and the
sender on the controller.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time

try:  # a module_util of the fanout module; the relay script imports the copy written beside it
    from ansible_collections.llamafleet.cluster.plugins.module_utils import rules
except ImportError:  # pragma: no cover - the relay on a node
    import rules

MAGIC = b"llamafleet-fanout/1\n"
CHUNK = 1 << 20
NONCE = 32
STATUS = "status.json"
FINAL = ("done", "failed")


class FanoutError(Exception):
    pass


def proof(secret, nonce):
    return hmac.new(secret, MAGIC + nonce, hashlib.sha256).digest()


class Conn:
    """A byte stream over a socket, or over a pair of pipes (the controller's SSH to the first node)."""

    def __init__(self, sock=None, rfile=None, wfile=None):
        self.sock = sock
        self.rfile = rfile if rfile is not None else sock.makefile("rb", buffering=CHUNK)
        self.wfile = wfile

    def read(self, n):
        first = self.rfile.read(n)
        if len(first) == n:  # the common case: no copy
            return first
        if not first:
            raise EOFError("the stream ended early")
        out = bytearray(first)
        while len(out) < n:
            chunk = self.rfile.read(n - len(out))
            if not chunk:
                raise EOFError("the stream ended early")
            out += chunk
        return bytes(out)

    def write(self, data):
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            self.wfile.write(data)

    def flush(self):
        if self.wfile is not None:
            self.wfile.flush()

    def close(self):
        try:
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.close()
            elif self.wfile is not None:
                self.wfile.close()
        except OSError:
            pass


def send_frame(conn, obj):
    data = json.dumps(obj, sort_keys=True).encode()
    conn.write(struct.pack(">I", len(data)) + data)


def read_frame(conn):
    (n,) = struct.unpack(">I", conn.read(4))
    if n > 16 << 20:
        raise FanoutError("a frame of %d bytes: not a llamafleet fan-out stream" % n)
    return json.loads(conn.read(n).decode())


def client_handshake(conn, secret):
    """Prove to the receiver that this peer holds the transfer's secret."""
    nonce = conn.read(NONCE)
    conn.write(proof(secret, nonce))
    conn.flush()
    if conn.read(2) != b"OK":
        raise FanoutError("the receiver refused the transfer's credential")


def server_handshake(conn, secret):
    nonce = os.urandom(NONCE)
    conn.write(nonce)
    ok = hmac.compare_digest(conn.read(NONCE), proof(secret, nonce))
    conn.write(b"OK" if ok else b"NO")
    return ok


def connect(addr, port, secret, timeout=30, idle=120):
    """An authenticated connection to a node's relay; a peer silent for ``idle`` seconds breaks it."""
    sock = socket.create_connection((addr, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Conn(sock)
    client_handshake(conn, secret)
    sock.settimeout(idle)
    return conn


def safe_path(dest, rel):
    """``dest/rel`` when rel stays inside dest; a path that leaves it is refused."""
    full = os.path.normpath(os.path.join(dest, rel))
    if os.path.isabs(rel) or not full.startswith(os.path.normpath(dest) + os.sep):
        raise FanoutError("the path %r leaves the destination" % rel)
    return full


PART_SUFFIX = ".fanout-part"


def part_path(full, sha256):
    """Where ``full`` is written until it is verified: hidden, and named after the content it must end as (a
    part of other content is never resumed)."""
    return os.path.join(os.path.dirname(full), ".%s.%s%s" % (os.path.basename(full), sha256[:16], PART_SUFFIX))


def is_part(name):
    return name.endswith(PART_SUFFIX)


def resumable_parts(dest, manifest, prune=True):
    """Relative path -> bytes held in its part file, for manifest files missing from ``dest`` whose part file is
    there and no larger than the file; every other part file (other content, a file now complete, too large) is
    removed when ``prune``."""
    held = {}
    wanted = {}
    for rel, entry in manifest.items():
        full = os.path.join(dest, rel)
        wanted[part_path(full, entry["sha256"])] = (rel, int(entry["size"]))
    for base, _dirs, names in os.walk(dest):
        for name in names:
            if not is_part(name):
                continue
            full = os.path.join(base, name)
            rel, size = wanted.get(full, (None, -1))
            try:
                have = os.path.getsize(full)
            except OSError:
                continue
            if rel is not None and have <= size:
                held[rel] = have
            elif prune:
                os.unlink(full)
    return held


def write_status(run_dir, status):
    tmp = os.path.join(run_dir, STATUS + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(status, fh)
    os.replace(tmp, os.path.join(run_dir, STATUS))


class Relay:
    """One node's receiver (and forwarder) of one transfer."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        with open(os.path.join(run_dir, "config.json")) as fh:
            self.cfg = json.load(fh)
        secret_file = os.path.join(run_dir, "secret")
        with open(secret_file, "rb") as fh:
            self.secret = fh.read().strip()
        os.unlink(secret_file)  # in memory only from here on
        self.name = self.cfg["name"]
        self.dest = self.cfg["dest"]
        self.status = {"state": "listening", "node": self.name, "refused": 0, "written": [], "bad": [],
                       "forward_error": None, "next": None, "bytes": 0, "pid": os.getpid(), "error": None,
                       # path -> [size, mtime_ns, sha256] of what this relay verified: the fanout module records
                       # them in the node's hash cache, so nothing it wrote is read again to be verified
                       "hashed": {},
                       # path -> bytes of its part file this relay resumed from (not received again)
                       "resumed": {}}
        self.nxt = None
        self.last_write = 0.0
        write_status(run_dir, self.status)

    def accept(self, listener):
        """The first peer that proves it holds the secret; others are refused and counted."""
        deadline = time.time() + float(self.cfg.get("timeout_s") or 600)
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise FanoutError("no authenticated sender within %s s" % self.cfg.get("timeout_s"))
            listener.settimeout(left)
            try:
                sock, _peer = listener.accept()
            except socket.timeout:
                continue
            sock.settimeout(30)
            conn = Conn(sock)
            try:
                if server_handshake(conn, self.secret):
                    sock.settimeout(float(self.cfg.get("idle_s") or 120))
                    return conn
            except (OSError, EOFError):
                pass
            self.status["refused"] += 1
            write_status(self.run_dir, self.status)
            sock.close()

    def _progress(self, n):
        """Bytes through this node so far, in the status file about twice a second (progress, and the tests)."""
        self.status["bytes"] += n
        now = time.time()
        if now - self.last_write >= 0.5:
            self.last_write = now
            write_status(self.run_dir, self.status)

    def _forward(self, data):
        if self.nxt is None:
            return
        try:
            self.nxt.write(data)
        except OSError as exc:
            self.status["forward_error"] = "%s: the connection broke off (%s)" % (self.status["next"], exc)
            self.nxt = None

    def _open_next(self, chain):
        if not chain:
            return
        first = chain[0]
        self.status["next"] = first["name"]
        try:
            self.nxt = connect(first["addr"], first["port"], self.secret, idle=float(self.cfg.get("idle_s") or 120))
            send_frame(self.nxt, {"chain": chain[1:]})
        except (OSError, EOFError, FanoutError) as exc:
            self.status["forward_error"] = "%s (%s:%s): cannot pass the stream on (%s)" % (
                first["name"], first["addr"], first["port"], exc)
            self.nxt = None

    def _open_part(self, frame, offset):
        """The part file to append the stream to, its first ``offset`` bytes already hashed into the digest;
        (None, None) when this node does not want the file or its part no longer holds ``offset`` bytes."""
        if self.name not in frame.get("to", ()):
            return None, None
        full = safe_path(self.dest, frame["path"])
        part = part_path(full, frame["sha256"])
        os.makedirs(os.path.dirname(full), exist_ok=True)
        digest = hashlib.sha256()
        if not offset:
            return open(part, "wb"), digest
        try:
            out = open(part, "r+b")
        except OSError:
            return None, None
        left = offset
        while left:  # the bytes a broken-off stream left: hashed, so the whole file is verified at the end
            chunk = out.read(min(CHUNK, left))
            if not chunk:
                out.close()
                return None, None
            digest.update(chunk)
            left -= len(chunk)
        out.truncate(offset)
        self.status["resumed"][frame["path"]] = offset
        return out, digest

    def _receive_file(self, conn, frame):
        want = self.name in frame.get("to", ())
        offset = int(frame.get("offset") or 0)
        out, digest = self._open_part(frame, offset)
        left = int(frame["size"]) - offset
        try:
            while left:
                chunk = conn.read(min(CHUNK, left))
                left -= len(chunk)
                self._forward(chunk)
                if out is not None:
                    out.write(chunk)
                    digest.update(chunk)
                self._progress(len(chunk))
        finally:
            if out is not None:
                out.close()  # a stream that breaks off leaves the part: the next transfer resumes it
        if not want:
            return
        full = safe_path(self.dest, frame["path"])
        part = part_path(full, frame["sha256"])
        if out is None or digest.hexdigest() != frame["sha256"]:
            if os.path.exists(part):
                os.unlink(part)  # not this content: never kept, never resumed
            self.status["bad"].append(frame["path"])
            return
        os.replace(part, full)
        st = os.stat(full)
        self.status["hashed"][frame["path"]] = [st.st_size, st.st_mtime_ns, frame["sha256"]]
        self.status["written"].append(frame["path"])

    def serve(self, conn):
        self.status["state"] = "receiving"
        write_status(self.run_dir, self.status)
        self._open_next(read_frame(conn).get("chain") or [])
        while True:
            frame = read_frame(conn)
            if frame.get("end"):
                break
            if self.nxt is not None:
                try:
                    send_frame(self.nxt, frame)
                except OSError as exc:
                    self.status["forward_error"] = "%s: the connection broke off (%s)" % (self.status["next"], exc)
                    self.nxt = None
            self._receive_file(conn, frame)
        later = []
        if self.nxt is not None:
            try:
                send_frame(self.nxt, {"end": True})
                later = read_frame(self.nxt).get("acks") or []  # once the successors have everything: in order
            except (OSError, EOFError, ValueError, FanoutError) as exc:
                self.status["forward_error"] = "%s: broke off at the end (%s)" % (self.status["next"], exc)
            self.nxt.close()
        self.status["state"] = "done"
        self.finish()
        send_frame(conn, {"acks": [self.ack()] + later})
        conn.close()

    def finish(self):
        """The verified hashes into the node's hash cache, and whether the whole manifest is now here (files
        this node held before the transfer included)."""
        root, manifest = self.cfg.get("root"), self.cfg.get("manifest")
        if not root or manifest is None:
            return
        cache = rules.HashCache(root)
        for rel, (_size, _mtime_ns, digest) in self.status["hashed"].items():
            full = os.path.join(self.dest, rel)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if [st.st_size, st.st_mtime_ns] == self.status["hashed"][rel][:2]:
                cache.record(full, digest, st)
        self.status["complete"] = not self.status["bad"] and len(
            rules.verified_files(cache, self.dest, manifest)) == len(manifest)
        cache.save()

    def ack(self):
        """This node's outcome, as the controller receives it at the end of the stream."""
        out = {k: self.status.get(k) for k in ("node", "state", "complete", "error", "forward_error", "bad", "bytes",
                                                "refused", "resumed")}
        times = os.times()
        out["cpu_s"] = round(times.user + times.system, 3)  # where a transfer's time goes (bench/fanout.py)
        return out


def run(run_dir, fd):
    relay = Relay(run_dir)
    listener = socket.socket(fileno=fd)
    try:
        conn = relay.accept(listener)
        listener.close()  # one sender per transfer: nothing listens once it is here
        relay.serve(conn)
    except (OSError, EOFError, ValueError, FanoutError) as exc:
        relay.status.update(state="failed", error=str(exc) or type(exc).__name__)
        if relay.nxt is not None:
            relay.nxt.close()  # the next node sees its stream end at once, not at its idle timeout
    finally:
        listener.close()
        times = os.times()
        relay.status["cpu_s"] = round(times.user + times.system, 3)  # where a transfer's time goes (bench/fanout.py)
        write_status(run_dir, relay.status)
    if relay.status.get("complete") and relay.cfg.get("cleanup"):
        shutil.rmtree(run_dir, ignore_errors=True)  # done and verified: nothing of the transfer is left here
    return 0 if relay.status["state"] == "done" else 1


def pipe(addr, port):
    """On the first node: join the controller's SSH stdin/stdout to this node's relay, byte for byte."""
    sock = socket.create_connection((addr, int(port)), timeout=30)
    sock.settimeout(None)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def upstream():
        while True:
            data = stdin.read1(CHUNK) if hasattr(stdin, "read1") else stdin.read(CHUNK)
            if not data:
                break
            sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=upstream, daemon=True)
    t.start()
    while True:
        data = sock.recv(CHUNK)
        if not data:
            break
        stdout.write(data)
        stdout.flush()
    t.join(timeout=5)
    return 0


def send(conn, secret, chain, files, src, on_progress=None):
    """The controller's side: prove the credential, then stream ``files`` (manifest entries with ``to``) from
    ``src`` into the first node; returns the bytes sent and every reached node's outcome (``Relay.ack``), once
    the whole chain has acknowledged the end."""
    client_handshake(conn, secret)
    send_frame(conn, {"chain": chain})
    sent = 0
    for entry in files:
        send_frame(conn, entry)
        with open(os.path.join(src, entry["path"]), "rb") as fh:
            offset = int(entry.get("offset") or 0)
            fh.seek(offset)
            left = int(entry["size"]) - offset
            while left:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise FanoutError("%s changed while it was sent" % entry["path"])
                conn.write(chunk)
                left -= len(chunk)
                sent += len(chunk)
        if on_progress:
            on_progress(sent)
    send_frame(conn, {"end": True})
    conn.flush()
    try:
        acks = read_frame(conn).get("acks")
    except ValueError:
        acks = None
    if not isinstance(acks, list):
        raise FanoutError("the first node did not acknowledge the end")
    return sent, acks


if __name__ == "__main__":
    if sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], int(sys.argv[3])))
    if sys.argv[1] == "pipe":
        sys.exit(pipe(sys.argv[2], sys.argv[3]))
    sys.exit(2)

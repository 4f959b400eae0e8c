# -*- coding: utf-8 -*-
"""A run's processes on one node, and the run's supervisor: what keeps the cluster safe without the controller.

Standard library only. The train module imports it (the process rules: what a run's processes are, how they
are stopped), and writes this file under the node's root (``supervisor/supervise-<digest>.py``), where it runs as
``python3 supervise-<digest>.py RUN_DIR GO_R,UP_W``, detached from the SSH session, one per node per run: spawned
before the launch's all-or-nothing decision, it starts nothing until the module tells it ``go`` on its control
pipe, and answers ``up`` once the ranks started (run without the pipe fds, it starts at once). The supervisor starts the node's ranks (``launch.sh``)
and watches them and its peers:

- the master's supervisor and each worker's keep a heartbeat over the training network: UDP datagrams to and
  from the master's training address, on the rendezvous port number (torch's store uses that port over TCP;
  UDP is a port space of its own), once a second, each signed with HMAC-SHA256 under the run's secret (a
  fresh one per launch, in ``supervise.json``, mode 0600) and numbered, so that nothing else can stop or
  keep alive a run and an old datagram cannot be replayed;
- any rank that exits non-zero, a peer not heard from for ``peer_timeout_s``, no first training step within
  ``start_timeout_s``, or no progress for ``stall_timeout_s`` after it (rank 0's trainer log and the
  training log stop growing: a collective that hangs) is a failure: every rank on every node is stopped and
  the reason is written to every node's ``supervisor.json``;
- a short loss of the network (shorter than ``peer_timeout_s``) stops nothing.

The supervisor exits when the run has ended on its node and its peers know, and never listens beyond its run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

RUN_ID_VAR = "LLAMAFLEET_RUN_ID"
NODE_VAR = "LLAMAFLEET_NODE"  # which node's ranks these are: where several nodes share one process table
BOOT_ID = "/proc/sys/kernel/random/boot_id"
CONFIG = "supervise.json"
STATE = "supervisor.json"
HEARTBEAT_S = 1.0
TICK_S = 0.2
KEEP_ENV = ("HOME", "USER", "LANG", "LC_ALL", "TERM")


# -- files ---------------------------------------------------------------------------------------

def read(path, default=None):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return default


def write(path, text, mode=0o644):
    """Atomically, created with its mode: a secret is never readable by others, not even for a moment."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)


# -- processes -----------------------------------------------------------------------------------

def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def identity(pid):
    """What tells this process from a later one with its pid: its start time (field 22 of /proc/PID/stat,
    clock ticks since boot) and the boot's id. None when there is no such process."""
    stat = read("/proc/%d/stat" % pid)
    try:
        start = stat.rsplit(")", 1)[1].split()[19]
    except (AttributeError, IndexError):
        return None
    return "%s %s" % (start, (read(BOOT_ID, "") or "").strip())


def vouched(run_dir, name):
    """The pid recorded in ``run_dir/name`` while it is still that process: the start time recorded beside it
    (``name_start``) must match. 0 when it is gone, reused (after a reboot too), or was recorded without one."""
    pid = int((read(os.path.join(run_dir, name), "0") or "0").strip() or 0)
    recorded = (read(os.path.join(run_dir, name + "_start"), "") or "").strip()
    return pid if pid and recorded and identity(pid) == recorded else 0


def leader(run_dir):
    """The ranks' process group leader (``launch.sh``), vouched for."""
    return vouched(run_dir, "pid")


def run_processes(run_id, pgid=None, node=None):
    """The run's processes (pid to ``identity``): the ranks' process group (``pgid``: a leader ``leader``
    vouched for), and any process whose environment carries the run id (a launcher that started a new
    session cannot escape the stop), with ``node``, only those of that node's ranks. The supervisor does not
    carry it."""
    marker = ("%s=%s" % (RUN_ID_VAR, run_id)).encode()
    mine = ("%s=%s" % (NODE_VAR, node)).encode() if node else None
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if pgid and os.getpgid(pid) == pgid:
                found.add(pid)
                continue
            with open("/proc/%d/environ" % pid, "rb") as fh:
                env = fh.read().split(b"\0")
            if marker in env and (mine is None or mine in env):
                found.add(pid)
        except (OSError, ProcessLookupError):
            continue
    found.discard(os.getpid())
    return {p: identity(p) for p in found if alive(p)}


def signal_processes(group, procs, sig):
    """``sig`` to the process group ``group`` (a leader just vouched for, or 0) and to each process found, each
    checked again just before: still the same process. A stopped process (SIGSTOP, a debugger) gets SIGCONT
    too, or it would never act on a TERM."""
    for s in (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,):
        if group:
            try:
                os.killpg(group, s)
            except OSError:
                pass
        for p, ident in procs.items():
            if ident is not None and identity(p) == ident:
                try:
                    os.kill(p, s)
                except OSError:
                    pass


def mark_stopped(run_dir, why):
    write(os.path.join(run_dir, "stopped"), json.dumps({"at": time.time(), "why": why}))


class Stopper:
    """TERM, then KILL after ``grace`` seconds, to the run's processes on this node, one ``step`` at a time
    (the supervisor goes on talking to its peers meanwhile). ``done`` once none is left."""

    def __init__(self, run_dir, run_id, grace, node=None):
        self.run_dir, self.run_id, self.grace, self.node = run_dir, run_id, grace, node
        self.t0 = time.time()
        self.killed = False
        self.done = False
        self.step(signal.SIGTERM)

    def _procs(self):
        return run_processes(self.run_id, pgid=leader(self.run_dir) or None, node=self.node)

    def step(self, sig=None):
        if self.done:
            return True
        procs = self._procs()
        if not procs:
            self.done = True
            return True
        if sig is None and not self.killed and time.time() - self.t0 >= self.grace:
            sig, self.killed = signal.SIGKILL, True
        if sig is not None:
            signal_processes(leader(self.run_dir), procs, sig)
        return False


def stop_run(run_dir, run_id, grace, why="stopped by llamafleet stop"):
    """Stop the run's processes on this node and wait for them (TERM, KILL after ``grace``, then up to 10 s).
    False when there was nothing to stop. The supervisor, told by the marker why its ranks ended, tells its
    peers and exits; one that does not is stopped too."""
    procs = run_processes(run_id, pgid=leader(run_dir) or None)
    if procs:
        mark_stopped(run_dir, why)
        stopper = Stopper(run_dir, run_id, grace)
        deadline = time.time() + grace + 10
        while not stopper.step() and time.time() < deadline:
            time.sleep(0.1)
    sup = vouched(run_dir, "supervisor.pid")
    if sup:
        deadline = time.time() + 5
        while alive(sup) and time.time() < deadline:
            time.sleep(0.1)
        if alive(sup) and identity(sup) == (read(os.path.join(run_dir, "supervisor.pid_start"), "") or "").strip():
            os.kill(sup, signal.SIGKILL)
    return bool(procs)


# -- the supervisor ------------------------------------------------------------------------------

class Supervisor:
    def __init__(self, run_dir):
        self.run_dir = run_dir
        cfg = json.loads(read(os.path.join(run_dir, CONFIG)))
        self.cfg = cfg
        self.run_id = cfg["run_id"]
        self.node = cfg["node"]
        self.master = bool(cfg["master"])
        self.key = bytes.fromhex(cfg["secret"])
        self.peer_timeout = float(cfg.get("peer_timeout_s") or 30)
        self.stall_timeout = float(cfg.get("stall_timeout_s") or 0)
        self.start_timeout = float(cfg.get("start_timeout_s") or 0)
        self.grace = float(cfg.get("fail_grace_s") or 1)
        self.started = time.time()
        # peer name -> what is known of it; a worker's only peer is the master
        self.peers = {name: {"last": self.started, "addr": None, "state": "running", "reason": None, "seq": 0,
                             "ack": False}
                      for name in cfg["peers"]}
        self.seq = int(time.time() * 1000)
        self.proc = None
        self.rc = None
        self.state = "starting"
        self.reason = None
        self.origin = None
        self.stopper = None
        self.ended_at = None
        self.last_sent = 0.0
        self.last_written = 0.0
        self.progress_paths = [os.path.join(run_dir, cfg.get("progress_file") or "output/trainer_log.jsonl"),
                               os.path.join(run_dir, "train.log")]
        self.progress_seen = [self._size(p) for p in self.progress_paths]
        self.first_step = False
        self.last_progress = self.started
        self.sock = None
        self.quiet = False  # a worker whose part succeeded no longer hears the master (it ended first)
        self.wait_ack = True  # a worker that failed waits for the master to hear it
        self.terminated = False

    # -- signed datagrams
    def _pack(self, **body):
        self.seq += 1
        body.update(r=self.run_id, n=self.node, s=self.seq)
        data = json.dumps(body, sort_keys=True).encode()
        return hmac.new(self.key, data, hashlib.sha256).hexdigest().encode() + b" " + data

    def _unpack(self, raw):
        mac, _, data = raw.partition(b" ")
        if not hmac.compare_digest(mac, hmac.new(self.key, data, hashlib.sha256).hexdigest().encode()):
            return None
        try:
            body = json.loads(data)
        except ValueError:
            return None
        peer = self.peers.get(body.get("n"))
        if body.get("r") != self.run_id or peer is None or not isinstance(body.get("s"), int) or body["s"] <= peer["seq"]:
            return None  # another run's, a stranger's, or a replay
        peer["seq"] = body["s"]
        return body

    def _send(self, addr, **body):
        try:
            self.sock.sendto(self._pack(**body), addr)
        except OSError:
            pass  # the network is down: the peer times out, or the link comes back

    # -- the socket, bound to the training address
    def _open(self):
        port = int(self.cfg["port"])
        master_addr = socket.gethostbyname(self.cfg["master_addr"])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if self.master:
            try:
                s.bind((master_addr, port))
            except OSError as exc:
                if exc.errno != 99:  # EADDRNOTAVAIL: the address is not this host's own (NAT): any address
                    raise
                s.bind(("", port))
        else:
            s.connect((master_addr, port))  # the route to the master picks the training interface
            self.peers[self.cfg["peers"][0]]["addr"] = (master_addr, port)
        s.setblocking(False)
        self.sock = s

    def _write_state(self, force=False):
        now = time.time()
        if not force and now - self.last_written < 2:
            return
        self.last_written = now
        state = {"state": self.state, "reason": self.reason, "by": self.origin, "node": self.node,
                 "master": self.master, "updated": now, "started": self.started, "rc": self.rc,
                 "peer_timeout_s": self.peer_timeout, "stall_timeout_s": self.stall_timeout,
                 "peers": {n: {"state": p["state"], "heard_s_ago": round(now - p["last"], 1)}
                           for n, p in self.peers.items()},
                 "progress_s_ago": round(now - self.last_progress, 1) if self.first_step else None}
        write(os.path.join(self.run_dir, STATE), json.dumps(state, indent=1, sort_keys=True))

    @staticmethod
    def _size(path):
        try:
            return os.path.getsize(path)
        except OSError:
            return -1

    # -- start
    def start(self):
        self._open()
        env = {k: v for k, v in os.environ.items() if k in KEEP_ENV}
        env[RUN_ID_VAR] = self.run_id
        env[NODE_VAR] = self.node
        for stale in ("rc", "stopped", "pid", "pid_start"):
            try:
                os.unlink(os.path.join(self.run_dir, stale))
            except FileNotFoundError:
                pass
        with open(os.path.join(self.run_dir, "train.log"), "ab") as log:
            self.proc = subprocess.Popen(["/bin/sh", os.path.join(self.run_dir, "launch.sh")], cwd=self.run_dir,
                                         env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its pid is the ranks' process group
        # the start time first: a pid without one is never signalled
        write(os.path.join(self.run_dir, "pid_start"), identity(self.proc.pid) or "")
        write(os.path.join(self.run_dir, "pid"), str(self.proc.pid))
        self.state = "running"
        self._write_state(force=True)

    # -- failure: every rank on every node stops
    def fail(self, reason, origin=None, state="failed"):
        if self.stopper is not None:
            return
        self.state, self.reason, self.origin = state, reason, origin or self.node
        self.ended_at = time.time()
        self._log("%s: %s" % (state, reason))
        self._broadcast()
        mark_stopped(self.run_dir, reason)
        self._write_state(force=True)  # why, before any rank is signalled: whoever sees them gone can read it
        self.stopper = Stopper(self.run_dir, self.run_id, self.grace, node=self.node)
        self.stop_logged = False

    def _log(self, text):
        now = time.time()
        sys.stdout.write("%s.%03d %s %s\n" % (time.strftime("%H:%M:%S", time.localtime(now)), now % 1 * 1000, self.node,
                                              text))
        sys.stdout.flush()

    def _broadcast(self):
        """Tell every peer where this node stands (for the master: what each worker is to do)."""
        self.last_sent = time.time()
        for name, p in self.peers.items():
            if p["addr"] is None:
                continue
            if self.master:
                cmd = "stop" if self.stopper is not None or self.reason else ("done" if p["state"] == "done" else "run")
                self._send(p["addr"], k="hb", cmd=cmd, reason=self.reason, by=self.origin)
            else:
                self._send(p["addr"], k="hb", state=self.state, reason=self.reason, by=self.origin, rc=self.rc)

    def _receive(self):
        while True:
            try:
                raw, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNREFUSED from an earlier send while the master was not there yet
            body = self._unpack(raw)
            if body is None:
                continue
            peer = self.peers[body["n"]]
            peer["last"] = time.time()
            if self.master:
                peer["addr"] = addr
                peer["state"] = body.get("state") or "running"
                if peer["state"] in ("failed", "stopped") and self.reason is None:
                    self.fail(body.get("reason") or "%s stopped" % body["n"], origin=body.get("by") or body["n"])
            elif body.get("cmd") == "stop":
                peer["ack"], peer["state"] = True, "stopped"
                if self.stopper is None:
                    self.fail(body.get("reason") or "the master stopped the run", origin=body.get("by"),
                              state="stopped")
            elif body.get("cmd") == "done":
                peer["ack"] = True

    # -- the node's own ranks
    def _check_own(self):
        if self.rc is not None or self.proc.poll() is None:
            return
        self.rc = self.proc.returncode
        stopped = read(os.path.join(self.run_dir, "stopped"))
        if self.stopper is not None:
            return
        if stopped is not None:  # llamafleet stop, on this node
            try:
                why = json.loads(stopped).get("why")
            except (ValueError, AttributeError):
                why = None
            self.fail(why or "stopped by llamafleet stop", state="stopped")
        elif self.rc == 0:
            self.state = "done"
            self.ended_at = time.time()
            self._log("the ranks exited with code 0")
            self._broadcast()
            self._write_state(force=True)
        elif self.rc < 0:
            self.fail("%s: training was killed by signal %d" % (self.node, -self.rc))
        else:
            self.fail("%s: training exited with code %s" % (self.node, self.rc))

    def _check_progress(self):
        if not self.master or self.state != "running":
            return
        now = time.time()
        sizes = [self._size(p) for p in self.progress_paths]
        if sizes[0] > max(self.progress_seen[0], 0) and not self.first_step:
            self.first_step = True
        if sizes != self.progress_seen:
            self.progress_seen = sizes
            self.last_progress = now
        if not self.first_step and self.start_timeout and now - self.started > self.start_timeout:
            self.fail(self._timeout_message("start", self.start_timeout))
        elif self.first_step and self.stall_timeout and now - self.last_progress > self.stall_timeout:
            self.fail(self._timeout_message("stall", self.stall_timeout))

    def _timeout_message(self, which, seconds):
        if self.cfg.get("activity") == "fabric":
            return ("the fabric check did not complete within %g s%s: a node never reached the rendezvous "
                    "(MASTER_ADDR/MASTER_PORT, firewall, NCCL/GLOO socket interface) or a collective hangs on a link "
                    "(train_fabric_timeout_s)" % (seconds, " of the start" if which == "start" else " of its last result"))
        if which == "start":
            return ("no training step within %g s of the start: a node probably never reached the rendezvous "
                    "(MASTER_ADDR/MASTER_PORT, firewall, NCCL interface) or rank 0 is stuck before training "
                    "(train_start_timeout_s)" % seconds)
        return ("no progress for %g s after the first step: a collective hangs (a rank stopped or stuck, a "
                "link, a GPU); rank 0's trainer log and the training log stopped growing "
                "(train_stall_timeout_s)" % seconds)

    def _check_peers(self):
        if self.stopper is not None:
            return
        now = time.time()
        for name, p in self.peers.items():
            if p["state"] == "done" or now - p["last"] <= self.peer_timeout:
                continue
            if not self.master and self.state == "done":
                self.quiet = True  # this node's part succeeded; the master's own result says the rest
                return
            what = "the master" if not self.master else "node"
            self.fail("%s %s not heard from for %g s (train_peer_timeout_s): the node is down, or the training "
                      "network between it and %s is cut" % (what, name, self.peer_timeout, self.node))
            self.wait_ack = False  # nobody to hear it
            return

    def _finished(self):
        now = time.time()
        if self.stopper is not None:
            if not self.stopper.step():
                return False
            if not self.stop_logged:
                self.stop_logged = True
                self._log("every rank on this node stopped%s" % (" (KILL after %g s)" % self.grace
                                                                   if self.stopper.killed else ""))
            if self.master:  # every worker heard the stop (it answered stopped or failed), or has gone quiet
                quiet = all(p["state"] in ("stopped", "failed", "done") or now - p["last"] > self.peer_timeout
                            for p in self.peers.values())
                return quiet or now - self.ended_at > self.peer_timeout
            return not self.wait_ack or any(p["ack"] for p in self.peers.values()) \
                or now - self.ended_at > self.peer_timeout
        if self.state != "done":
            return False
        if self.master:
            return all(p["state"] == "done" for p in self.peers.values())
        return self.quiet or any(p["ack"] for p in self.peers.values())

    def loop(self):
        while True:
            if self.terminated and self.stopper is None:
                self.fail("the supervisor on %s was terminated" % self.node, state="stopped")
            self._receive()
            self._check_own()
            self._check_peers()
            self._check_progress()
            if time.time() - self.last_sent >= HEARTBEAT_S:
                self._broadcast()
            self._write_state()
            if self._finished():
                # the last word: a worker that ended sends its state once more, the master its last orders
                self._broadcast()
                self._write_state(force=True)
                return 0 if self.state == "done" else 1
            time.sleep(TICK_S)


def _wait_go(control, run_dir):
    """Spawned by the train module before the all-or-nothing decision (``control``: the fds ``GO_R,UP_W``): wait
    for ``go`` (False on anything else, or the pipe closed: nothing starts), then log to the run directory."""
    go_r = int(control.split(",")[0])
    data = b""
    while b"\n" not in data:
        chunk = os.read(go_r, 64)
        if not chunk:
            break
        data += chunk
    os.close(go_r)
    if data.strip() != b"go":
        return False
    os.chdir(run_dir)
    log = os.open(os.path.join(run_dir, "supervisor.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return True


def _tell(control, text):
    """The train module's answer: ``up`` once the ranks started, else why not."""
    if control:
        up_w = int(control.split(",")[1])
        try:
            os.write(up_w, (text.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        os.close(up_w)


def main(argv):
    run_dir = os.path.abspath(argv[1])
    control = argv[2] if len(argv) > 2 else None

    def on_term(_signum, _frame):
        # stopped from outside (a node shutting down): stop the ranks, tell the peers, then exit
        sup.terminated = True

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if control and not _wait_go(control, run_dir):
        return 0
    sup = None
    try:
        sup = Supervisor(run_dir)
        signal.signal(signal.SIGTERM, on_term)
        sup.start()
    except Exception as exc:  # nothing started: say why, for the train module to report
        why = "the supervisor could not start: %s" % exc
        if sup is not None:
            sup.state, sup.reason = "error", why
            sup._write_state(force=True)
        _tell(control, why)
        return 2
    _tell(control, "up")
    try:
        return sup.loop()
    except Exception:
        sup._log(traceback.format_exc())
        if sup.stopper is None:
            sup.fail("the supervisor on %s failed: %s" % (sup.node, traceback.format_exc().splitlines()[-1]))
        deadline = time.time() + sup.grace + 10
        while not sup.stopper.step() and time.time() < deadline:
            time.sleep(0.1)
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))

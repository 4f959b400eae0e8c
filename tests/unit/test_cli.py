"""The CLI and the library's follower: redacted output, detaching on a signal, run ids checked first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llamafleet import cli, training
from llamafleet.training import NodeRun, RunStatus

PROJECT = Path(__file__).resolve().parents[2]
EXE = [sys.executable, "-m", "llamafleet"]


@pytest.fixture
def job(tmp_path):
    job = tmp_path / "examples" / "tiny"  # laid out as in the repository: the yaml's paths start at tmp_path
    shutil.copytree(PROJECT / "examples" / "tiny", job, ignore=shutil.ignore_patterns("model", "saves"))
    (job / "model").mkdir()
    (job / "model" / "config.json").write_text('{"model_type": "qwen2"}')
    return job


def _run(*args, state):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=300, cwd=PROJECT,
                          env={**os.environ, "LLAMAFLEET_STATE_DIR": str(state)})


def test_dry_run_output_and_json_show_secrets_redacted(job, tmp_path):
    """A dry run on the built-in local inventory: the plan only, on this machine; no node is touched."""
    token = "hf_dryrun_5ecret"
    env = json.dumps({"HF_TOKEN": token, "WANDB_API_KEY": "wandb_5ecret", "NCCL_P2P_DISABLE": "1"})
    args = ("train", "-i", "inventory/local", str(job / "sft_lora.yaml"), "--dry-run", "--workdir", str(job.parents[1]),
            "-e", f"train_env={env}")
    as_json = _run(*args, "--json", state=tmp_path / "state")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["state"] == "planned"
    for node in result["plan"]["nodes"].values():
        assert node["env"]["HF_TOKEN"] == "***" and node["env"]["NCCL_P2P_DISABLE"] == "1"
        assert "HF_TOKEN" not in node["files"]["node.env"]
    assert "HF_TOKEN=***" in result["summary"] and "WANDB_API_KEY=***" in result["summary"]
    text = _run(*args, state=tmp_path / "state")
    assert text.returncode == 0 and "HF_TOKEN=***" in text.stdout, text.stdout + text.stderr
    for out in (as_json.stdout + as_json.stderr, text.stdout + text.stderr):
        assert token not in out and "wandb_5ecret" not in out
    for f in (tmp_path / "state").rglob("*"):
        assert not f.is_file() or b"5ecret" not in f.read_bytes(), f


@pytest.mark.parametrize("verb", ["status", "stop", "logs", "follow", "collect", "export"])
@pytest.mark.parametrize("run_id", ["..", "a/b", ".hidden", "-x"])
def test_every_verb_refuses_a_bad_run_id_before_anything_runs(verb, run_id, tmp_path):
    proc = _run(verb, "-i", "inventory/local", "--", run_id, state=tmp_path / "state")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"run id {run_id!r}" in proc.stderr and "letters, digits" in proc.stderr
    assert not (tmp_path / "state" / "logs").exists(), "a playbook ran"


def test_train_refuses_a_bad_job_name_before_anything_runs(job, tmp_path):
    (tmp_path / "state" / "stage").mkdir(parents=True)
    (tmp_path / "state" / "keep").write_text("x")
    proc = _run("train", "-i", "inventory/local", str(job / "sft_lora.yaml"), "-e", "train_job=..",
                state=tmp_path / "state")
    assert proc.returncode == 2 and "train_job '..'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "state" / "keep").read_text() == "x" and not (tmp_path / "state" / "logs").exists()


@pytest.mark.parametrize("setting, said", [
    ("train_model_source=foo", "value of train_model_source must be one of: auto, controller, nodes, hub, got: foo"),
    ("train_master_port=abc", "train_master_port"),
])
def test_a_role_setting_outside_its_argument_spec_is_refused_before_the_plan(job, tmp_path, setting, said):
    """The train role's argument spec is checked by the plan action (no task of its own): same rules, same words."""
    proc = _run("train", "-i", "inventory/local", str(job / "sft_lora.yaml"), "--dry-run", "--workdir",
                str(job.parents[1]), "-e", setting, state=tmp_path / "state")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Validation of arguments failed" in proc.stdout and said in proc.stdout, proc.stdout
    assert "planned" not in proc.stdout and not (tmp_path / "state" / "runs").exists()


RUNNING = RunStatus("r1", (NodeRun("a", "running", None, 10, ()), NodeRun("b", "running", None, 11, ())),
                    {"current_steps": 3, "total_steps": 10}, 1.0)


@pytest.fixture
def fake_cluster(monkeypatch):
    """The library's playbook verbs replaced by records of their calls; ``cancel_after`` statuses set cancel."""
    calls = []

    class Fake:
        cancel: threading.Event | None = None
        cancel_after = 2

        def status(self, inventory, run_id=None, **kw):
            calls.append(("status", run_id))
            if sum(c[0] == "status" for c in calls) >= self.cancel_after and self.cancel is not None:
                self.cancel.set()
            return RUNNING

    fake = Fake()
    monkeypatch.setattr(training, "status", fake.status)
    monkeypatch.setattr(training, "stop", lambda inv, run_id=None, **kw: calls.append(("stop", run_id)) or RUNNING)
    monkeypatch.setattr(training, "collect", lambda inv, run_id=None, **kw: calls.append(("collect", run_id)) or {})
    fake.calls = calls
    return fake


def test_a_cancelled_follow_detaches_and_leaves_the_run_alone(fake_cluster):
    fake_cluster.cancel = threading.Event()
    result = training.follow("inv", "r1", poll_s=0.01, cancel=fake_cluster.cancel)
    assert result.state == "detached" and not result.ok and result.run_id == "r1"
    assert [c[0] for c in fake_cluster.calls] == ["status", "status"], "a detached follower touched the run"


def test_a_cancelled_follow_with_stop_on_cancel_stops_every_rank(fake_cluster):
    fake_cluster.cancel = threading.Event()
    result = training.follow("inv", "r1", poll_s=0.01, cancel=fake_cluster.cancel, stop_on_cancel=True)
    assert result.state == "stopped" and ("stop", "r1") in fake_cluster.calls and ("collect", "r1") in fake_cluster.calls


def test_follow_without_a_run_id_follows_the_nodes_active_run(fake_cluster):
    fake_cluster.cancel = threading.Event()
    fake_cluster.cancel_after = 3
    result = training.follow("inv", None, poll_s=0.01, cancel=fake_cluster.cancel)
    assert result.run_id == "r1" and fake_cluster.calls[0] == ("status", None) and fake_cluster.calls[1] == ("status", "r1")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_first_signal_ends_following_and_the_handlers_are_restored(signum):
    before = {s: signal.getsignal(s) for s in cli.Interrupts.SIGNALS}
    with cli.Interrupts() as interrupts:
        os.kill(os.getpid(), signum)
        assert interrupts.event.wait(2) and interrupts.exit_code == 128 + signum
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C gives up at once
                os.kill(os.getpid(), signal.SIGINT)
                signal.sigtimedwait([], 0.5) if hasattr(signal, "sigtimedwait") else None
    assert {s: signal.getsignal(s) for s in cli.Interrupts.SIGNALS} == before


def test_a_detached_follower_says_how_to_follow_see_and_stop_the_run(monkeypatch, capsys):
    detached = training.TrainResult(ok=False, run_id="r1", state="detached", plan=None, summary="", status=None,
                                    errors=(), run_dir=None, outputs={}, log_path=None)

    def fake_follow(inventory, run_id, cancel=None, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        assert cancel.wait(2)
        return detached

    monkeypatch.setattr(training, "follow", fake_follow)
    rc = cli.main(["follow", "r1", "-i", "inv dir"])
    out = capsys.readouterr().out
    assert rc == 128 + signal.SIGTERM
    assert "run r1 goes on" in out and "llamafleet follow r1 -i 'inv dir'" in out
    assert "llamafleet status r1 -i 'inv dir'" in out and "llamafleet stop r1 -i 'inv dir'" in out


def test_follow_waits_for_a_node_that_misses_a_look_and_reports_the_supervisors_reason(monkeypatch):
    """One missed look (an SSH hiccup) stops nothing; a run the supervisors stopped is reported with their
    reason (the node that saw it first), then stopped again from here (a no-op) and collected."""
    blip = RunStatus("r1", (NodeRun("a", "running", None, 10, ()), NodeRun("b", "unreachable", None, None, ())),
                     None, 1.0)
    ended = RunStatus("r1", (NodeRun("a", "stopped", None, 10, (), "b: training exited with code 1", "b"),
                             NodeRun("b", "exited-error", 1, 11, ("RuntimeError: boom",),
                                     "b: training exited with code 1", "b")), None, 1.0)
    looks = iter([blip, blip, RUNNING, ended, ended])
    calls = []
    monkeypatch.setattr(training, "status", lambda *a, **k: next(looks))
    monkeypatch.setattr(training, "stop", lambda *a, **k: calls.append("stop") or ended)
    monkeypatch.setattr(training, "collect", lambda *a, **k: calls.append("collect") or {})
    result = training.follow("inv", "r1", poll_s=0.01)
    assert result.state == "failed" and calls == ["stop", "collect"]
    assert result.errors[0] == "the run failed: b: training exited with code 1"
    assert "b exited with code 1" in result.errors[2] and "RuntimeError: boom" in result.errors[2]
    assert ended.format_line().endswith("| b: training exited with code 1")


def test_while_the_master_runs_follow_asks_only_the_master(monkeypatch):
    """Its supervisor stops the run when any worker fails: one node per look while it runs, every node at
    the first look and as soon as the master's ranks are not running."""
    both = RunStatus("r1", (NodeRun("a", "running", None, 10, ()), NodeRun("b", "running", None, 11, ())),
                     None, 1.0, "a")
    master_only = RunStatus("r1", (NodeRun("a", "running", None, 10, ()),), {"current_steps": 2}, 1.0, "a")
    master_stopped = RunStatus("r1", (NodeRun("a", "stopped", None, 10, (), "b: training exited with code 1", "b"),),
                               None, 1.0, "a")
    ended = RunStatus("r1", (NodeRun("a", "stopped", None, 10, (), "b: training exited with code 1", "b"),
                             NodeRun("b", "exited-error", 1, 11, (), "b: training exited with code 1", "b")),
                      None, 1.0, "a")
    answers = {None: iter([both, ended, ended]), "a": iter([master_only, master_only, master_stopped])}
    asked = []

    def status(inv, run_id=None, *, limit=None, **kw):
        asked.append(limit)
        return next(answers[limit])
    monkeypatch.setattr(training, "status", status)
    monkeypatch.setattr(training, "stop", lambda *a, **k: ended)
    monkeypatch.setattr(training, "collect", lambda *a, **k: {})
    seen = []
    result = training.follow("inv", "r1", poll_s=0.01, on_status=seen.append)
    assert asked == [None, "a", "a", "a", None, None]  # the last: the final status after collecting
    assert result.state == "failed" and result.errors[0] == "the run failed: b: training exited with code 1"
    assert [n.name for n in seen[1].nodes] == ["a", "b"] and seen[1].progress == {"current_steps": 2}


def test_a_rank_that_aborts_in_cxx_shows_its_abort_line_not_only_torchruns_signal_6():
    # node2's last lines in a real run where rank 1 aborted in PyTorch's gloo teardown after training
    tail = ("[INFO|trainer.py:1823] 2026-12-02 21:57:48,066 >> ", "Training completed. Do not forget to share",
            "terminate called without an active exception",
            "E1202 21:57:48.253000 5125 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -6)",
            "Traceback (most recent call last):", "    raise ChildFailedError(",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
            "  exitcode  : -6 (pid: 5126)  (SIGABRT)", "  traceback : Signal 6 (SIGABRT) received by PID 5126",
            "subprocess.CalledProcessError: Command '['torchrun', ...]' returned non-zero exit status 1.")
    shown = training._telling_lines(tail)
    assert shown[0] == "terminate called without an active exception"
    assert shown.count("terminate called without an active exception") == 1
    assert not any("CalledProcessError" in line or "ChildFailedError" in line for line in shown)
    plain = ("Traceback (most recent call last):", "ValueError: Cannot find dataset_info.json", "exit")
    assert training._telling_lines(plain) == ["Traceback (most recent call last):",
                                               "ValueError: Cannot find dataset_info.json"]


def test_full_check_makes_the_launch_go_the_full_way(monkeypatch, tmp_path):
    """--full-check reaches the playbook as train_fast false (no one-wave start); without it the inventory decides."""
    from llamafleet import cli

    seen = []

    def stop_here(*_args, **kw):
        seen.append(kw["extravars"])
        raise KeyboardInterrupt  # nothing runs: the CLI answers 130

    monkeypatch.setattr(training, "run_playbook", stop_here)
    cfg = tmp_path / "x.yaml"
    cfg.write_text("stage: sft\n")
    for argv, want in ((["--full-check"], False), ([], None)):
        seen.clear()
        assert cli.main(["train", "-i", "inventory/local", str(cfg), "--json", *argv]) == 130
        assert seen[0].get("train_fast") is want

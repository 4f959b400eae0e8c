"""Serving a run from Python: ``serve``, ``serve_status``, ``serve_stop`` (``playbooks/serve.yml``).

A run's LoRA adapter (or its merged export) is served with ``llamafactory-cli api`` (the huggingface
backend; CPU included) from the run's own stack, or with ``vllm serve`` from the lock's vllm serving stack (a
venv of its own: vLLM pins its own torch), on the chosen nodes (default: the master, which holds
rank 0's adapter), detached like a training run, bound to each node's training address. A server is
ready only when ``/v1/models`` lists the model and a real chat completion came back. Every request
needs the API key: the one given, else ``$LLAMAFLEET_API_KEY``, else one made once per run and kept in
``<state_dir>/servers/<run_id>.key`` (mode 0600) on the controller; it is never printed or logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .names import check_run_id
from .paths import state_dir
from .runner import TaskEvent, run_playbook

KEY_ENV = "LLAMAFLEET_API_KEY"


@dataclasses.dataclass(frozen=True)
class Server:
    node: str
    state: str  # running | stopped | absent | unreachable
    endpoint: str | None
    model_name: str | None
    pid: int | None
    ready_s: float | None
    first_completion_s: float | None
    first_answer: str | None
    log_tail: tuple[str, ...]
    backend: str | None = None  # api | vllm


@dataclasses.dataclass(frozen=True)
class ServeResult:
    ok: bool
    run_id: str
    servers: tuple[Server, ...]
    api_key_file: str | None
    errors: tuple[str, ...]
    log_path: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format(self) -> str:
        lines = [f"run {self.run_id}: " + ("serving" if self.ok and any(s.state == "running" for s in self.servers)
                                           else "not serving" if self.ok else "failed")]
        lines += [f"  {e}".replace("\n", "\n  ") for e in self.errors]
        for s in self.servers:
            if s.state != "running":
                lines.append(f"  {s.node}: {s.state}")
                continue
            ready = f", ready in {s.ready_s:g} s" if s.ready_s is not None else ""
            via = f"{s.backend}, " if s.backend else ""
            lines.append(f"  {s.node}: {s.endpoint} model {s.model_name} ({via}pid {s.pid}{ready})")
        running = [s for s in self.servers if s.state == "running" and s.endpoint]
        if running and self.api_key_file:
            s = running[0]
            body = json.dumps({"model": s.model_name, "messages": [{"role": "user", "content": "Hello"}]})
            lines.append("  try it (the key is in %s):" % self.api_key_file)
            lines.append(f"    curl {shlex.quote(s.endpoint + '/chat/completions')} -H \"Authorization: Bearer "
                         f"$(cat {shlex.quote(self.api_key_file)})\" -H 'Content-Type: application/json' -d {shlex.quote(body)}")
        return "\n".join(lines)


def key_file(run_id: str, extravars: Mapping[str, Any] | None = None, inventory: str | os.PathLike | None = None) -> Path:
    sdir = state_dir((extravars or {}).get("llamafleet_state_dir"), inventory)
    return sdir / "servers" / f"{check_run_id(run_id)}.key"


def _write_key(path: Path, key: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(key)
    os.replace(tmp, path)


def _servers(run) -> tuple[Server, ...]:
    out = []
    for host, res in sorted((run.results.get("serve") or {}).items()):
        if res.get("unreachable"):
            out.append(Server(host, "unreachable", None, None, None, None, None, None, ()))
            continue
        s = res.get("server") or {}
        if not s:
            continue
        out.append(Server(host, s.get("state", "absent"), s.get("endpoint"), s.get("model_name"), s.get("pid"),
                          s.get("ready_s"), s.get("first_completion_s"), s.get("first_answer"),
                          tuple(s.get("log_tail") or ()), s.get("backend")))
    return tuple(out)


def _run(state: str, inventory, run_id: str, extravars, on_event=None, **settings) -> ServeResult:
    ev = dict(extravars or {})
    ev.update({f"serve_{k}": v for k, v in settings.items() if v is not None})
    ev.update(serve_state=state, serve_run_id=run_id)
    run = run_playbook("serve.yml", inventory, verb=f"serve-{state}", extravars=ev, on_event=on_event)
    servers = _servers(run)
    errors = tuple(dict.fromkeys(run.failure_messages())) if not run.ok else ()
    if errors and not run.hosts:
        raise ConfigError(list(errors))
    return ServeResult(run.ok, run_id, servers, ev.get("serve_api_key_file"), errors, str(run.log_path))


def serve(inventory: str | os.PathLike, run_id: str, *, nodes: Sequence[str] | None = None, model: str = "adapter",
          host: str | None = None, port: int = 8000, name: str | None = None, api_key: str | None = None,
          ready_timeout_s: int = 900, backend: str | None = None, tensor_parallel: int | None = None,
          vllm_args: Sequence[str] | None = None, extravars: Mapping[str, Any] | None = None,
          on_event: Callable[[TaskEvent], None] | None = None) -> ServeResult:
    """Serve the run's adapter (``model="adapter"``) or merged export (``"export"``) on ``nodes`` (default: the
    master); returns when every server answered a real completion, or with the reason it did not.
    ``backend``: auto (the role's default: vLLM on CUDA stacks whose lock has a vllm serving stack, else
    ``llamafactory-cli api``), ``api`` or ``vllm`` (``tensor_parallel``, ``vllm_args`` for it)."""
    run_id = check_run_id(run_id, "run id")
    path = key_file(run_id, extravars, inventory)
    key = api_key or os.environ.get(KEY_ENV)
    if key:
        _write_key(path, key)
    elif not path.is_file():
        _write_key(path, "lf-" + secrets.token_urlsafe(24))
    return _run("started", inventory, run_id, extravars, on_event, nodes=list(nodes or []), model=model, host=host,
                port=port, name=name, api_key_file=str(path), ready_timeout_s=ready_timeout_s, backend=backend,
                tensor_parallel=tensor_parallel, vllm_args=list(vllm_args) if vllm_args else None)


def serve_status(inventory: str | os.PathLike, run_id: str, *, nodes: Sequence[str] | None = None,
                 extravars: Mapping[str, Any] | None = None) -> ServeResult:
    run_id = check_run_id(run_id, "run id")
    result = _run("status", inventory, run_id, extravars, nodes=list(nodes or []))
    path = key_file(run_id, extravars, inventory)
    return dataclasses.replace(result, api_key_file=str(path) if path.is_file() else None)


def serve_stop(inventory: str | os.PathLike, run_id: str, *, nodes: Sequence[str] | None = None,
               extravars: Mapping[str, Any] | None = None) -> ServeResult:
    run_id = check_run_id(run_id, "run id")
    return _run("stopped", inventory, run_id, extravars, nodes=list(nodes or []))

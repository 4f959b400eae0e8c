"""Models and datasets on a hub: pinned to one commit on the controller, fetched before any rank starts.

A hub id in a training yaml names a moving target: the branch ``main`` may gain a commit while a run
starts, and two nodes that download at different moments would then train different bytes.
``resolve`` asks the hub once, on the controller, for the commit a revision names and the size of
every file at that commit; the plan records both, every node fetches exactly that commit
(``llamafleet.cluster.fetch`` on the nodes, or ``download`` here when the nodes are offline) and
its copy is compared with those sizes and with every other node's before training starts, with
the hub offline.

The real ``huggingface_hub`` client does the talking (``HF_ENDPOINT`` mirrors and ``HF_TOKEN``
honoured, from the run's environment first, then the controller's). ModelScope ids
(``USE_MODELSCOPE_HUB=1``, as LLaMA-Factory reads it) are fetched by the nodes' own ``modelscope``
client at the revision given: ModelScope has no commit to pin here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_ENDPOINT = "https://huggingface.co"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# the environment variables LLaMA-Factory reads to choose a hub
_TRUE = ("1", "true", "y", "yes")


@dataclasses.dataclass(frozen=True)
class HubRevision:
    """One repository at one commit: what every node must hold."""

    hub: str  # huggingface | modelscope
    repo_type: str  # model | dataset
    repo_id: str
    revision: str  # as asked
    commit: str | None  # the commit it names (None on ModelScope: fetched at ``revision``)
    files: dict[str, int]  # path in the repository -> size in bytes (empty when not known)

    @property
    def cache_subdir(self) -> str:
        """Where the fetched copy lives under a node's hub cache directory (the Hugging Face cache layout)."""
        if self.hub == "modelscope":
            return os.path.join("modelscope", self.repo_type + "s", self.repo_id, self.revision)
        return os.path.join(repo_folder(self.repo_type, self.repo_id), "snapshots", self.commit or self.revision)

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{(self.commit or self.revision)[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def repo_folder(repo_type: str, repo_id: str) -> str:
    """The Hugging Face cache's directory name of a repository (``models--org--name``)."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def hub_of(env: Mapping[str, str]) -> str:
    """The hub LLaMA-Factory uses for hub ids under ``env`` (the run's environment over the controller's)."""
    merged = {**os.environ, **env}
    if merged.get("USE_OPENMIND_HUB", "").lower() in _TRUE:
        raise ConfigError("USE_OPENMIND_HUB is set: llamafleet fetches from Hugging Face and ModelScope only; "
                          "download the model and give its directory")
    return "modelscope" if merged.get("USE_MODELSCOPE_HUB", "").lower() in _TRUE else "huggingface"


def endpoint_and_token(env: Mapping[str, str]) -> tuple[str, str | None]:
    """``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN`` from the run's environment, else the controller's."""
    endpoint = env.get("HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    token = env.get("HF_TOKEN") or os.environ.get("HF_TOKEN") or None
    return endpoint.rstrip("/"), token


def _api(endpoint: str, token: str | None):
    try:
        from huggingface_hub import HfApi
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConfigError("huggingface_hub is not installed on the controller; pip install llamafleet again") from None
    return HfApi(endpoint=endpoint, token=token)


def resolve(hub: str, repo_type: str, repo_id: str, revision: str, *, endpoint: str, token: str | None,
            what: str) -> HubRevision:
    """Pin ``repo_id`` at ``revision`` to a commit and list its files with their sizes (one call to the hub).

    ``what`` names the yaml key or dataset for messages. Every failure is a ``ConfigError`` that says
    what to fix: the id, the revision, the token, or the endpoint.
    """
    if hub == "modelscope":
        return HubRevision(hub, repo_type, repo_id, revision if revision != "main" else "master", None, {})
    import httpx
    from huggingface_hub import errors

    api = _api(endpoint, token)
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
    except errors.RevisionNotFoundError:
        raise ConfigError(f"{what}: {repo_id} has no revision {revision!r} on {endpoint}; fix model_revision "
                          "(a branch, tag or commit)") from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"{what}: {repo_type} {repo_id} is not on {endpoint} (or needs a token: set HF_TOKEN in "
                          "train_env); fix the id, or give a local directory") from None
    except errors.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        fix = "set HF_TOKEN in train_env" if status in (401, 403) else "check HF_ENDPOINT and the network"
        raise ConfigError(f"{what}: the hub at {endpoint} refused {repo_id}@{revision} (HTTP {status}); {fix}") from None
    except (OSError, ValueError, httpx.TransportError) as err:
        # a refused or timed-out connection (httpx), or a mirror that answers something that is not the hub's API
        if is_commit(revision):  # already pinned: the nodes fetch it; only the sizes are not known here
            return HubRevision(hub, repo_type, repo_id, revision, revision, {})
        raise ConfigError(f"{what}: cannot reach the hub at {endpoint} from the controller to pin {repo_id}@{revision} "
                          f"({' '.join(str(err).split())[:200]}); set HF_ENDPOINT to a mirror you can reach, or "
                          "download the model and give its directory") from None
    files = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    return HubRevision(hub, repo_type, repo_id, revision, info.sha, files)


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def download(rev: HubRevision, cache_dir: str | os.PathLike, *, endpoint: str, token: str | None) -> Path:
    """Fetch ``rev`` into the controller's hub cache (resumable; files already complete are not fetched again)
    and return the snapshot directory. Used when the nodes cannot reach the hub: the snapshot is then synced."""
    if rev.hub != "huggingface":
        raise ConfigError(f"{rev.repo_id}: ModelScope repositories are fetched by the nodes; the nodes must reach "
                          "ModelScope (train_hub_fetch: nodes), or download it and give its directory")
    from huggingface_hub import snapshot_download

    path = snapshot_download(rev.repo_id, repo_type=rev.repo_type, revision=rev.commit, cache_dir=str(cache_dir),
                             endpoint=endpoint, token=token)
    return Path(path)

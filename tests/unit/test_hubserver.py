"""tests/hubserver.py against the real huggingface_hub client: what it downloads, resolves, lists and resumes.

The client reads HF_ENDPOINT when it is imported, so in-process calls pass ``endpoint=`` (and ``token=`` explicitly,
so no token of the machine's leaks in); subprocess clients get HF_ENDPOINT, HF_HOME and HF_TOKEN in their env.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import HubRepos, HubServer, ServerProcess, read_request_log

MiB = 1024 * 1024
HUBSERVER = Path(__file__).resolve().parents[1] / "hubserver.py"
DOWNLOAD_SCRIPT = """
import sys
from huggingface_hub import hf_hub_download
print(hf_hub_download(sys.argv[1], sys.argv[2], revision=sys.argv[3], cache_dir=sys.argv[4]))
"""


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub") as server:
        yield server


def client_env(endpoint: str, tmp_path: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a client subprocess: this server, a private HF_HOME, no Xet, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def assert_same_files(folder: Path, files: dict[str, bytes]) -> None:
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert found == set(files)
    for path, content in files.items():
        assert (folder / path).read_bytes() == content, path


MODEL_FILES = {
    "config.json": b'{"hidden_size": 8}',
    "README.md": b"# a model\n",
    "sub/dir/notes.txt": "unicode \u00e9\n".encode(),
    "model.safetensors": os.urandom(MiB + 123),  # LFS by name and size
    "weights.dat": os.urandom(2 * MiB),  # LFS by size only
    "tiny.bin": b"0123456789",  # LFS by name only
}
DATASET_FILES = {
    "README.md": b"---\nlicense: mit\n---\n",
    "data/train.jsonl": b'{"text": "hello"}\n' * 120_000,  # 2 MiB: LFS
    "data/test.jsonl": b'{"text": "bye"}\n',
}
LFS_PATHS = {"model.safetensors", "weights.dat", "tiny.bin", "data/train.jsonl"}


def test_commits_move_the_branch_and_older_commits_stay_downloadable(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=False)
    first = hub.repos.commit("org/model", {"config.json": b"v1", "model.safetensors": b"weights v1"}, message="v1")
    assert api.model_info("org/model", revision="main").sha == first
    second = hub.repos.commit("org/model", {"config.json": b"v2", "extra.txt": b"new"}, message="v2")
    assert second != first and len(second) == 40
    assert api.model_info("org/model", revision="main").sha == second
    assert api.model_info("org/model").sha == second  # no revision: the default branch
    assert [b.target_commit for b in api.list_repo_refs("org/model").branches] == [second]

    old = Path(snapshot_download("org/model", revision=first, endpoint=hub.url, cache_dir=tmp_path / "c", token=False))
    assert_same_files(old, {"config.json": b"v1", "model.safetensors": b"weights v1"})
    new = Path(snapshot_download("org/model", endpoint=hub.url, cache_dir=tmp_path / "c", token=False))
    assert new.name == second
    assert_same_files(new, {"config.json": b"v2", "model.safetensors": b"weights v1", "extra.txt": b"new"})

    third = hub.repos.commit("org/model", {}, delete=["extra.txt"])
    assert api.list_repo_files("org/model", revision=third) == ["config.json", "model.safetensors"]
    assert [c.commit_id for c in api.list_repo_commits("org/model")] == [third, second, first]


@pytest.mark.parametrize("repo_type, files", [("model", MODEL_FILES), ("dataset", DATASET_FILES)])
def test_snapshot_is_byte_identical_and_files_metadata_has_sizes_and_lfs_sha256(hub, tmp_path, repo_type, files):
    sha = hub.repos.commit("org/repo", files, repo_type=repo_type)
    folder = snapshot_download("org/repo", repo_type=repo_type, endpoint=hub.url, cache_dir=tmp_path / "c",
                               token=False)
    assert Path(folder).name == sha
    assert_same_files(Path(folder), files)

    info = HfApi(endpoint=hub.url, token=False).repo_info("org/repo", repo_type=repo_type, files_metadata=True)
    assert info.sha == sha
    assert {s.rfilename: s.size for s in info.siblings} == {p: len(c) for p, c in files.items()}
    for sibling in info.siblings:
        content = files[sibling.rfilename]
        if sibling.rfilename in LFS_PATHS:
            assert (sibling.lfs.sha256, sibling.lfs.size) == (sha256(content), len(content))
        else:
            assert sibling.lfs is None and sibling.blob_id == git_blob_sha1(content)


def test_a_cached_snapshot_is_not_downloaded_again(hub, tmp_path):
    sha = hub.repos.commit("org/model", MODEL_FILES)
    cache = tmp_path / "cache"
    snapshot_download("org/model", endpoint=hub.url, cache_dir=cache, token=False)
    assert sum(r.is_file_download for r in hub.request_log()) == len(MODEL_FILES)

    hub.clear_request_log()
    snapshot_download("org/model", endpoint=hub.url, cache_dir=cache, token=False)
    assert [(r.method, r.path) for r in hub.request_log()] == [("GET", "/api/models/org/model/revision/main")]
    hub.clear_request_log()
    snapshot_download("org/model", revision=sha, endpoint=hub.url, cache_dir=cache, token=False)
    hf_hub_download("org/model", "weights.dat", revision=sha, endpoint=hub.url, cache_dir=cache, token=False)
    assert hub.request_log() == []


def test_tree_pages_paths_info_tags_and_revisions_by_ref_name(tmp_path):
    with HubServer(tmp_path / "hub", tree_page_size=2) as hub:
        sha = hub.repos.commit("org/model", MODEL_FILES)
        assert hub.repos.create_tag("org/model", "v1.0") == sha
        api = HfApi(endpoint=hub.url, token=False)
        entries = list(api.list_repo_tree("org/model", recursive=True))
        assert sum("cursor=" in r.query for r in hub.request_log()) == 3  # 8 entries, 2 a page
        assert sorted(e.path for e in entries) == sorted([*MODEL_FILES, "sub", "sub/dir"])
        assert [e.path for e in api.list_repo_tree("org/model", "sub")] == ["sub/dir"]
        info = {e.path: e for e in api.get_paths_info("org/model", ["weights.dat", "sub", "missing"])}
        assert set(info) == {"weights.dat", "sub"}
        assert info["weights.dat"].lfs.sha256 == sha256(MODEL_FILES["weights.dat"])
        assert [(t.name, t.target_commit) for t in api.list_repo_refs("org/model").tags] == [("v1.0", sha)]
        for revision in ("v1.0", "refs/tags/v1.0", "refs/heads/main", sha):
            assert api.model_info("org/model", revision=revision).sha == sha


def test_headers_and_ranges_are_the_hubs_on_one_keep_alive_connection(hub):
    weights, config = MODEL_FILES["weights.dat"], MODEL_FILES["config.json"]
    sha = hub.repos.commit("org/model", MODEL_FILES)
    connection = http.client.HTTPConnection(hub.host, hub.port, timeout=10)

    def request(method: str, path: str, **headers: str) -> tuple[http.client.HTTPResponse, bytes]:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response, response.read()

    response, body = request("HEAD", "/org/model/resolve/main/weights.dat")
    assert (response.status, body) == (200, b"")
    assert response.headers["ETag"] == response.headers["X-Linked-Etag"] == f'"{sha256(weights)}"'
    assert response.headers["X-Linked-Size"] == response.headers["Content-Length"] == str(len(weights))
    assert response.headers["X-Repo-Commit"] == sha
    assert response.headers["Accept-Ranges"] == "bytes"
    assert not any(name.lower().startswith("x-xet") for name in response.headers)

    response, body = request("GET", "/org/model/resolve/main/config.json")
    assert (response.status, body) == (200, config)
    assert response.headers["ETag"] == f'"{git_blob_sha1(config)}"' and "X-Linked-Etag" not in response.headers

    response, body = request("GET", f"/org/model/resolve/{sha}/weights.dat", Range="bytes=5-9")
    assert (response.status, body) == (206, weights[5:10])
    assert response.headers["Content-Range"] == f"bytes 5-9/{len(weights)}"
    response, body = request("GET", "/org/model/resolve/main/weights.dat", Range="bytes=-4")
    assert (response.status, body) == (206, weights[-4:])
    response, body = request("GET", "/org/model/resolve/main/weights.dat", Range=f"bytes={len(weights)}-")
    assert (response.status, response.headers["Content-Range"]) == (416, f"bytes */{len(weights)}")

    for path, code in [("/org/nope/resolve/main/x", "RepoNotFound"), ("/org/model/resolve/nope/x", "RevisionNotFound"),
                       ("/org/model/resolve/main/nope", "EntryNotFound"),
                       ("/api/models/org/model/revision/nope", "RevisionNotFound")]:
        response, _ = request("GET", path)
        assert (response.status, response.headers["X-Error-Code"]) == (404, code), path
    connection.close()
    assert all(r.complete for r in hub.request_log())


def test_missing_repo_revision_and_file_raise_the_clients_own_errors(hub, tmp_path):
    hub.repos.commit("org/model", {"config.json": b"{}"})
    api = HfApi(endpoint=hub.url, token=False)
    download = dict(endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("org/model")  # a model repo is no dataset repo
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nope", "config.json", **download)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/nope", **download)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/model", "config.json", revision="nope", **download)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/model", revision="0" * 40, **download)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "missing.json", **download)


def test_a_configured_token_is_required_and_reaches_the_server(hub, tmp_path):
    hub.repos.commit("org/model", MODEL_FILES)
    hub.token = "hf_right"
    for token in (False, "hf_wrong"):
        with pytest.raises(HfHubHTTPError) as raised:
            HfApi(endpoint=hub.url, token=token).model_info("org/model")
        assert raised.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as raised:
            hf_hub_download("org/model", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c", token=token)
        assert raised.value.response.status_code == 401
    # a request is recorded once its answer is sent: the client may have read the answer a moment before
    deadline = time.monotonic() + 5
    while len(hub.request_log()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {(r.bearer_token, r.status) for r in hub.request_log()} == {(None, 401), ("hf_wrong", 401)}

    hub.clear_request_log()
    assert HfApi(endpoint=hub.url, token="hf_right").model_info("org/model").private is True
    folder = snapshot_download("org/model", endpoint=hub.url, cache_dir=tmp_path / "c", token="hf_right")
    assert_same_files(Path(folder), MODEL_FILES)
    assert {(r.bearer_token, r.status) for r in hub.request_log()} == {("hf_right", 200)}


def test_a_dropped_connection_is_resumed_with_a_range_request(hub, tmp_path):
    content = os.urandom(12 * MiB)
    hub.repos.commit("org/model", {"model.safetensors": content})
    dropped_after = 11 * MiB  # the client keeps only whole 10 MiB chunks: it must resume past the first one
    hub.drop_next_download("model.safetensors", dropped_after)
    path = hf_hub_download("org/model", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    assert sha256(Path(path).read_bytes()) == sha256(content)
    first, resumed = [r for r in hub.request_log() if r.is_file_download]
    assert (first.range, first.status, first.bytes_sent, first.complete) == (None, 200, dropped_after, False)
    start = int(resumed.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= dropped_after
    assert (resumed.status, resumed.bytes_sent, resumed.complete) == (206, len(content) - start, True)


def test_a_download_resumes_after_the_server_is_killed_and_restarted(tmp_path):
    root, cache = tmp_path / "hub", tmp_path / "cache"
    content = os.urandom(20 * MiB)
    sha = HubRepos(root).commit("org/big", {"model.safetensors": content})
    server = ServerProcess(root, rate_limit=6 * MiB)
    client = subprocess.Popen([sys.executable, "-c", DOWNLOAD_SCRIPT, "org/big", "model.safetensors", sha, str(cache)],
                              env=client_env(server.url, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        # The client writes to blobs/SHA256.<random>.incomplete in 10 MiB chunks: kill once one has landed.
        deadline = time.monotonic() + 20
        while not any(p.stat().st_size >= 10 * MiB for p in cache.glob("models--org--big/blobs/*.incomplete")):
            assert time.monotonic() < deadline and client.poll() is None, "the download never got 10 MiB in"
            time.sleep(0.02)
        server.kill()
        server = ServerProcess(root, port=server.port)  # same port and root; the client retries within ~5 s
        out, err = client.communicate(timeout=30)
    finally:
        server.stop()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err
    assert sha256(Path(out.strip().splitlines()[-1]).read_bytes()) == sha256(content)
    resumed = [r for r in read_request_log(root) if r.is_file_download and r.range]
    assert len(resumed) == 1 and resumed[0].status == 206 and resumed[0].complete
    assert int(resumed[0].range.removeprefix("bytes=").removesuffix("-")) > 0


def test_hf_download_cli_with_revision_local_dir_and_token(hub, tmp_path):
    sha = hub.repos.commit("org/model", MODEL_FILES)
    hub.repos.commit("org/model", {"config.json": b"newer"})
    hub.token = "hf_cli"
    local_dir = tmp_path / "local"
    proc = subprocess.run([str(Path(sys.executable).parent / "hf"), "download", "org/model", "--revision", sha,
                           "--local-dir", str(local_dir)], env=client_env(hub.url, tmp_path, token="hf_cli"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_files(local_dir, MODEL_FILES)
    assert {r.bearer_token for r in hub.request_log() if r.path != "/api/agent-harnesses"} == {"hf_cli"}


def test_repos_persist_across_processes_and_the_commit_command(tmp_path):
    root, folder = tmp_path / "hub", tmp_path / "files"
    for path, content in DATASET_FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    proc = subprocess.run([sys.executable, str(HUBSERVER), "commit", "--root", str(root), "--repo-id", "org/data",
                           "--repo-type", "dataset", "--folder", str(folder)], capture_output=True, text=True,
                          timeout=60, check=True)
    sha = proc.stdout.strip()
    with ServerProcess(root, token="hf_proc") as server:
        assert HfApi(endpoint=server.url, token="hf_proc").dataset_info("org/data").sha == sha
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=server.url, token=False).dataset_info("org/data")
    assert [(r.status, r.bearer_token) for r in read_request_log(root)] == [(200, "hf_proc"), (401, None)]
    with HubServer(root) as hub:
        assert HfApi(endpoint=hub.url, token=False).dataset_info("org/data").sha == sha
        local_dir = snapshot_download("org/data", repo_type="dataset", revision=sha, endpoint=hub.url, token=False,
                                      local_dir=tmp_path / "local")
        assert_same_files(Path(local_dir), DATASET_FILES)

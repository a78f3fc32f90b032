"""The "huggingface" driver beyond the backend contract (tests/unit/test_backends.py):
revision pinning, tokens, an unreachable Hub, repo types, the prefix, reserved names,
and how the Hub's answers map to Ferry's errors.

Everything runs against tests/fixtures/hubpeer.py, a local protocol-level stand-in for
huggingface.co (which cannot be reached here), through the real huggingface_hub library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidKey,
    KeyNotFound,
    ReadOnlyBackend,
)
from ferry.settings import BackendSpec
from tests.unit.test_backends import (
    HF_TOKEN_ENV,
    MiB,
    build,
    chunked,
    closed_port,
    hub_settings,
    keys,
    payload,
    read_all,
)


@pytest.fixture
def token(hub_peer, monkeypatch) -> str:
    monkeypatch.setenv(HF_TOKEN_ENV, hub_peer.token)
    return hub_peer.token


@pytest.fixture
def repo(hub_peer) -> str:
    repo_id = hub_peer.new_repo()
    yield repo_id
    hub_peer.delete_repo("dataset", repo_id)


def admin(peer) -> HfApi:
    """The library itself, to change a repo behind the driver's back."""
    return HfApi(endpoint=peer.url, token=peer.token)


def never_read():
    raise AssertionError("the source was read")
    yield b""  # pragma: no cover - makes this a generator


# -- revisions ----------------------------------------------------------------------------


def test_pinned_revision_reads_the_old_bytes_and_refuses_writes(hub_peer, token, repo):
    writer = build("huggingface", **hub_settings(hub_peer, repo))
    old, new = payload(2 * MiB), b"new bytes"
    writer.write("w.bin", chunked(old))  # *.bin: an LFS file
    writer.write("t.txt", [b"old text"])  # a regular one
    pinned_at = hub_peer.history("dataset", repo)[0]
    writer.write("w.bin", [new])
    writer.write("t.txt", [b"new text"])
    writer.write("later", [b"x"])

    pinned = build("huggingface", **hub_settings(hub_peer, repo, pinned_revision=pinned_at))
    assert pinned.read_only and not writer.read_only
    pinned.check()
    assert read_all(pinned, "w.bin") == old
    assert read_all(pinned, "t.txt") == b"old text"
    stat = pinned.stat("w.bin")
    assert (stat.size, stat.etag) == (len(old), hashlib.sha256(old).hexdigest())
    assert keys(pinned.list()) == ["t.txt", "w.bin"]  # "later" came after the pin
    with pytest.raises(KeyNotFound):
        pinned.stat("later")
    assert read_all(writer, "w.bin") == new
    commits = len(hub_peer.history("dataset", repo))
    for call in (lambda: pinned.write("w.bin", never_read()), lambda: pinned.write("z", never_read(), size=1),
                 lambda: pinned.delete("w.bin")):
        with pytest.raises(ReadOnlyBackend, match=pinned_at):
            call()
    assert len(hub_peer.history("dataset", repo)) == commits


def test_unknown_pinned_revision_or_branch_is_unavailable(hub_peer, token, repo):
    pinned = build("huggingface", **hub_settings(hub_peer, repo, pinned_revision="0" * 40))
    with pytest.raises(BackendUnavailable, match="revision"):
        pinned.check()
    with pytest.raises(BackendUnavailable, match="revision"):
        pinned.stat("k")
    branch = build("huggingface", **hub_settings(hub_peer, repo, revision="no-such-branch"))
    with pytest.raises(BackendUnavailable, match="no-such-branch"):
        branch.check()
    with pytest.raises(BackendUnavailable, match="no-such-branch"):
        branch.write("k", [b"x"])
    assert hub_peer.raw_contents("dataset", repo) == [".gitattributes"]


def test_identical_rewrite_makes_no_commit(hub_peer, token, repo):
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    for data in (b"small text", payload(MiB)):
        backend.write("k", chunked(data))
        commits = len(hub_peer.history("dataset", repo))
        assert backend.write("k", chunked(data)) == len(data)  # the same bytes again
        assert len(hub_peer.history("dataset", repo)) == commits
        assert read_all(backend, "k") == data
    backend.write("k", [b"other"])
    assert len(hub_peer.history("dataset", repo)) == commits + 1


# -- tokens -------------------------------------------------------------------------------


def test_wrong_token_is_a_clear_error(hub_peer, monkeypatch, repo):
    monkeypatch.setenv(HF_TOKEN_ENV, "hf_not_the_token")
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    with pytest.raises(BackendUnavailable, match="refused the token"):
        backend.check()
    for call in (lambda: backend.stat("k"), lambda: backend.read("k"), lambda: list(backend.list()),
                 lambda: backend.write("k", [b"x"]), lambda: backend.delete("k")):
        with pytest.raises(BackendError, match="refused the token") as caught:
            call()
        assert type(caught.value) is BackendError  # not KeyNotFound, not retried as unavailable
        assert repo in caught.value.message and "hf_not_the_token" not in caught.value.message
    assert hub_peer.raw_contents("dataset", repo) == [".gitattributes"]


def test_no_token_cannot_see_a_private_repo_and_none_is_taken_implicitly(hub_peer, monkeypatch, repo):
    # The library would use HF_TOKEN (or a cached login) when given no token: the driver
    # sends only the token its settings name.
    monkeypatch.setenv("HF_TOKEN", hub_peer.token)
    settings = hub_settings(hub_peer, repo)
    del settings["token"]
    backend = build("huggingface", **settings)
    with pytest.raises(BackendUnavailable, match="private and no token"):
        backend.check()
    with pytest.raises(BackendUnavailable, match="private and no token"):
        backend.write("k", [b"x"])


def test_public_repo_reads_without_a_token(hub_peer, token):
    repo = hub_peer.new_repo(private=False)
    build("huggingface", **hub_settings(hub_peer, repo)).write("k", [b"public"])
    settings = hub_settings(hub_peer, repo)
    del settings["token"]
    anonymous = build("huggingface", **settings)
    anonymous.check()
    assert read_all(anonymous, "k") == b"public"
    with pytest.raises(BackendError):
        anonymous.write("k", [b"x"])
    hub_peer.delete_repo("dataset", repo)


def test_read_only_token_reads_but_cannot_write(hub_peer, monkeypatch, token, repo):
    build("huggingface", **hub_settings(hub_peer, repo)).write("k", [b"data"])
    monkeypatch.setenv(HF_TOKEN_ENV, hub_peer.read_token)
    reader = build("huggingface", **hub_settings(hub_peer, repo))
    reader.check()
    assert read_all(reader, "k") == b"data"
    for call in (lambda: reader.write("k", [b"x"]), lambda: reader.delete("k")):
        with pytest.raises(BackendError, match="403") as caught:
            call()
        assert type(caught.value) is BackendError
    assert read_all(reader, "k") == b"data"


def test_token_is_not_shown(hub_peer, token, repo):
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    assert backend.config.token.get_secret_value() == token
    assert token not in repr(backend.config)
    with pytest.raises(ValueError, match="looks like a secret"):
        BackendSpec(name="hf", driver="huggingface", settings={"repo_id": repo, "token": token})


# -- the service --------------------------------------------------------------------------


def test_unreachable_endpoint_is_unavailable(monkeypatch):
    monkeypatch.setenv(HF_TOKEN_ENV, "hf_x")
    backend = build("huggingface", repo_id="org/name", endpoint=f"http://127.0.0.1:{closed_port()}",
                    token={"env": HF_TOKEN_ENV}, timeout=1)
    started = time.monotonic()
    for call in (backend.check, lambda: backend.stat("k"), lambda: backend.read("k"),
                 lambda: list(backend.list()), lambda: backend.delete("k")):
        with pytest.raises(BackendUnavailable, match="cannot reach the Hub"):
            call()
    assert time.monotonic() - started < 5
    # A write goes through the library's preupload, which retries (huggingface_hub 1.19
    # closes its client after the refused connection, and the retry fails on the closed one).
    with pytest.raises(BackendUnavailable, match="cannot reach the Hub"):
        backend.write("k", [b"x"])


def test_uploads_negotiate_plain_lfs_with_a_hub_that_has_no_xet(hub_peer, token, repo):
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    hub_peer.lfs_batches.clear()
    requests_before = len(hub_peer.requests)
    data = payload(3 * MiB)
    backend.write("big.bin", chunked(data))
    offered = ["basic", "multipart"] + (["xet"] if importlib.util.find_spec("hf_xet") else [])
    assert hub_peer.lfs_batches == [offered]  # the client offers, the server (basic) decides
    sent = [(method, path.split("/")[2] if path.startswith("/_peer/") else path)
            for method, path in hub_peer.requests[requests_before:]]
    assert sent == [
        ("POST", f"/api/datasets/{repo}/preupload/main"),
        ("POST", f"/datasets/{repo}.git/info/lfs/objects/batch"),
        ("PUT", "lfs-upload"),
        ("POST", f"/datasets/{repo}.git/info/lfs/objects/verify"),
        ("POST", f"/api/datasets/{repo}/commit/main"),
    ]
    assert hub_peer.files("dataset", repo)["big.bin"] == data


def test_error_mapping(hub_peer, token, repo):
    """The library's own errors, raised from Hub-shaped answers, as Ferry's."""
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    url = f"{hub_peer.url}/api/datasets/{repo}/paths-info/main"

    def answer(status: int, **headers: str):
        response = httpx.Response(status, headers=headers, json={"error": "msg"},
                                  request=httpx.Request("POST", url))
        try:
            hf_raise_for_status(response)
        except HfHubHTTPError as exc:
            return backend._error(exc, "key 'k'")
        raise AssertionError(f"HTTP {status} raised nothing")

    assert type(answer(404, **{"X-Error-Code": "EntryNotFound"})) is KeyNotFound
    assert type(answer(404, **{"X-Error-Code": "RepoNotFound"})) is BackendUnavailable
    assert type(answer(404, **{"X-Error-Code": "RevisionNotFound"})) is BackendUnavailable
    refused = answer(401, **{"X-Error-Message": "Invalid credentials in Authorization header"})
    assert type(refused) is BackendError and "refused the token" in refused.message
    assert type(answer(403)) is BackendError
    assert type(answer(400)) is BackendError
    assert type(answer(500)) is BackendUnavailable
    assert type(answer(503)) is BackendUnavailable
    assert type(answer(429)) is BackendUnavailable
    assert type(backend._error(httpx.ConnectError("refused"), "check")) is BackendUnavailable
    assert type(backend._error(httpx.ReadTimeout("slow"), "check")) is BackendUnavailable


# -- repos, prefix, names -----------------------------------------------------------------


def test_model_and_dataset_repos_are_apart(hub_peer, token):
    model = hub_peer.new_repo(repo_type="model")
    backend = build("huggingface", **hub_settings(hub_peer, model, repo_type="model"))
    backend.check()
    backend.write("weights.bin", chunked(payload(MiB)))
    backend.write("notes.parquet", [b"PAR1"])  # the library's "belongs in a dataset" hint is no error
    assert sorted(hub_peer.files("model", model)) == [".gitattributes", "notes.parquet", "weights.bin"]
    assert read_all(backend, "weights.bin") == payload(MiB)
    # The same name as a dataset is another repo, which does not exist.
    dataset = build("huggingface", **hub_settings(hub_peer, model, repo_type="dataset"))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        dataset.check()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        dataset.stat("weights.bin")
    hub_peer.delete_repo("model", model)


def test_create_repo(hub_peer, token):
    name = f"ferry-test/created-{time.monotonic_ns()}"
    missing = build("huggingface", **hub_settings(hub_peer, name))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        missing.check()
    backend = build("huggingface", **hub_settings(hub_peer, name, create_repo=True))
    backend.check()  # creates it
    assert hub_peer.repo("dataset", name).meta()["private"] is True
    backend.write("k", [b"x"])
    again = build("huggingface", **hub_settings(hub_peer, name, create_repo=True))
    again.write("k2", [b"y"])  # an existing repo is fine
    assert keys(again.list()) == ["k", "k2"]
    hub_peer.delete_repo("dataset", name)


def test_prefix(hub_peer, token, repo):
    api = admin(hub_peer)
    api.create_commit(repo, [CommitOperationAdd("outside.txt", b"not ours"),
                             CommitOperationAdd("ferry/objectsX/also-outside", b"not ours")],
                      commit_message="others' files", repo_type="dataset")
    backend = build("huggingface", **hub_settings(hub_peer, repo, prefix="ferry/objects"))
    assert backend.config.prefix == "ferry/objects/"
    assert keys(backend.list()) == []
    backend.write("a/b", [b"ab"])
    backend.write("README.md", [b"a key like any other, inside the prefix"])
    assert keys(backend.list()) == ["README.md", "a/b"]
    assert keys(backend.list("a/")) == ["a/b"]
    assert read_all(backend, "a/b") == b"ab"
    assert sorted(hub_peer.files("dataset", repo)) == [
        ".gitattributes", "ferry/objects/README.md", "ferry/objects/a/b", "ferry/objectsX/also-outside",
        "outside.txt"]
    with pytest.raises(KeyNotFound):
        backend.stat("outside.txt")  # not under the prefix
    assert backend.delete("a/b") is True
    assert keys(backend.list()) == ["README.md"]


@pytest.mark.parametrize("key", [".gitattributes", "d/.gitattributes", ".gitignore", "x/.gitignore", "README.md",
                                 ".git/config", "a/.git/x", ".cache/x"])
def test_reserved_names_are_invalid_keys(hub_peer, token, repo, key):
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    for verb in (backend.stat, backend.read, backend.delete):
        with pytest.raises(InvalidKey, match="reserves"):
            verb(key)
    with pytest.raises(InvalidKey, match="reserves"):
        backend.write(key, never_read())
    assert hub_peer.raw_contents("dataset", repo) == [".gitattributes"]


def test_a_gitignored_key_fails_rather_than_vanish(hub_peer, token, repo):
    admin(hub_peer).create_commit(repo, [CommitOperationAdd(".gitignore", b"*.tmp\n")],
                                  commit_message="ignore", repo_type="dataset")
    backend = build("huggingface", **hub_settings(hub_peer, repo))
    with pytest.raises(BackendError, match="gitignore"):
        backend.write("scratch.tmp", [b"x"])
    with pytest.raises(KeyNotFound):
        backend.stat("scratch.tmp")
    backend.write("kept", [b"x"])
    assert keys(backend.list()) == ["kept"]  # .gitignore and .gitattributes are not objects


@pytest.mark.parametrize(
    "settings",
    [
        {"repo_id": "no-namespace"},
        {"repo_id": "a/b/c"},
        {"repo_id": "org/name", "repo_type": "space"},
        {"repo_id": "org/name", "pinned_revision": "main"},
        {"repo_id": "org/name", "pinned_revision": "abc123"},
        {"repo_id": "org/name", "endpoint": "huggingface.co"},
        {"repo_id": "org/name", "prefix": "../x"},
        {"repo_id": "org/name", "prefix": "/abs"},
        {"repo_id": "org/name", "prefix": ".git/x"},
        {"repo_id": "org/name", "timeout": 0},
        {"repo_id": "org/name", "unknown": 1},
        {"endpoint": "https://huggingface.co"},
    ],
)
def test_settings_are_validated(settings):
    with pytest.raises(ConfigError):
        build("huggingface", **settings)


def test_settings_are_normalized():
    backend = build("huggingface", repo_id="org/name", endpoint="https://hub.example/", prefix="a/b")
    assert (backend.config.endpoint, backend.config.prefix) == ("https://hub.example", "a/b/")
    assert (backend.config.repo_type, backend.config.revision, backend.config.token) == ("dataset", "main", None)
    assert not backend.read_only

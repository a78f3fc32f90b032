"""Settings and the backends file: defaults, validation, secrets by reference."""

from __future__ import annotations

import pytest
import yaml

from ferry.errors import ConfigError
from ferry.settings import BackendSpec, Settings, load_backends, resolve_secrets
from workers import registry


def test_embedded_defaults(tmp_path):
    s = Settings(data_dir=tmp_path, database_url=None, broker_url=None, backends_file=None)
    assert s.database == f"sqlite:///{tmp_path}/ferry.db"
    assert s.broker == "filesystem://"
    assert set(s.backends()) == {"local", "archive"}
    assert s.backends()["local"].settings["root"] == str(tmp_path / "disks" / "local")


def test_visibility_timeout_must_exceed_task_limit():
    with pytest.raises(ValueError, match="visibility_timeout"):
        Settings(task_time_limit=3600, visibility_timeout=3600)


def test_secret_in_clear_is_refused():
    with pytest.raises(ValueError, match="looks like a secret"):
        BackendSpec(name="s3", driver="s3", settings={"bucket": "b", "secret_access_key": "hunter2"})
    with pytest.raises(ValueError, match="looks like a secret"):  # an IPFS RPC API's Authorization header
        BackendSpec(name="ipfs", driver="ipfs", settings={"auth": "Bearer hunter2"})
    BackendSpec(name="s3", driver="s3", settings={"bucket": "b", "secret_access_key": {"env": "X"}})


def test_secret_references_resolve_only_when_asked(tmp_path, monkeypatch):
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("FERRY_TEST_SECRET", "from-env")
    resolved = resolve_secrets({"a": {"env": "FERRY_TEST_SECRET"}, "b": {"file": str(secret_file)}, "c": 1})
    assert resolved == {"a": "from-env", "b": "from-file", "c": 1}
    with pytest.raises(ConfigError, match="not set"):
        resolve_secrets({"a": {"env": "FERRY_TEST_SECRET_MISSING"}})


@pytest.mark.parametrize("content,message", [
    ("backends: [{name: a, driver: local}, {name: a, driver: local}]", "unique"),
    ("backends: [{name: 'Bad Name', driver: local}]", "name"),
    ("backends: [{name: a, driver: local, colour: red}]", "colour"),
    ("backends: {", "invalid backends file"),
])
def test_bad_backends_files_are_refused(tmp_path, content, message):
    path = tmp_path / "backends.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_backends(path)


def test_backends_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump({"backends": [{"name": "a", "driver": "local", "settings": {"root": "/x"}}]}))
    assert set(load_backends(path)) == {"a"}
    path.write_text(yaml.safe_dump({"backends": [{"name": "b", "driver": "local", "settings": {"root": "/y"}}]}))
    import os
    os.utime(path, ns=(1, 10**18))
    assert set(load_backends(path)) == {"b"}


def test_registry_names_unknown_drivers_and_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown backend driver 'tape'"):
        registry.build(BackendSpec(name="t", driver="tape"))
    with pytest.raises(ConfigError, match="invalid settings"):
        registry.build(BackendSpec(name="l", driver="local", settings={"root": str(tmp_path), "speed": 9}))
    backend = registry.build(BackendSpec(name="l", driver="local", settings={"root": str(tmp_path)}))
    assert backend.name == "l"

"""A lazy registry of backend drivers.

A driver name maps to a dotted path and an install hint; the module is imported only
when a backend of that driver is first used, so a worker that never touches S3 needs
no boto3. Third parties register drivers through the `ferry.backends` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from pydantic import ValidationError

from ferry.errors import ConfigError, DriverNotInstalled
from ferry.settings import BackendSpec, resolve_secrets
from workers.base import Backend

DRIVERS: dict[str, tuple[str, str | None]] = {
    "local": ("workers.local:LocalBackend", None),
    "s3": ("workers.s3:S3Backend", "pip install 'ferry[s3]'"),
    "gateway": ("workers.gateway:GatewayBackend", None),
    "ipfs": ("workers.ipfs:IpfsBackend", None),
    "huggingface": ("workers.huggingface:HuggingFaceBackend", "pip install 'ferry[huggingface]'"),
    "filecoin": ("workers.filecoin:FilecoinBackend", None),
    "storacha": ("workers.storacha:StorachaBackend", None),
}


def driver_class(driver: str) -> type[Backend]:
    """The Backend subclass for `driver`; ConfigError if unknown, DriverNotInstalled if
    its optional dependency is missing."""
    if driver in DRIVERS:
        target, hint = DRIVERS[driver]
    else:
        found = [ep for ep in entry_points(group="ferry.backends") if ep.name == driver]
        if not found:
            known = ", ".join(sorted(DRIVERS))
            raise ConfigError(f"unknown backend driver {driver!r} (known: {known})")
        target, hint = found[0].value, None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DriverNotInstalled(
            f"driver {driver!r} needs {exc.name}: {hint or 'install its package'}"
        ) from exc
    return getattr(module, attr)


def traits(driver: str) -> tuple[bool, bool]:
    """(content_addressed, read_only) of a driver; a driver that is not installed here is
    taken as neither (its workers, where it is installed, know better)."""
    try:
        cls = driver_class(driver)
    except DriverNotInstalled:
        return False, False
    return cls.content_addressed, cls.read_only


def build(spec: BackendSpec) -> Backend:
    """A ready backend instance for `spec`, its secret references resolved."""
    cls = driver_class(spec.driver)
    try:
        config = cls.Config.model_validate(resolve_secrets(spec.settings))
    except ValidationError as exc:
        raise ConfigError(f"backend {spec.name!r}: invalid settings: {exc}") from exc
    return cls(spec.name, config)


_cache: dict[str, Backend] = {}


def get(spec: BackendSpec) -> Backend:
    """The process's instance for `spec` (built once, reused while the spec is unchanged)."""
    key = spec.model_dump_json()
    backend = _cache.get(key)
    if backend is None:
        backend = _cache[key] = build(spec)
    return backend

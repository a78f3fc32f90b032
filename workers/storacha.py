"""The "storacha" driver: Storacha (formerly web3.storage) as a read-only, verified
retrieval source, because Storacha no longer accepts uploads.

What the service is now (docs/storacha.md gives every source and its date):
  - the old web3.storage HTTP API stopped taking uploads on 2024-01-09;
  - its successor, the UCAN upload service (`space/blob/add`, `upload/add` invoked on
    up.storacha.network), stopped taking them in 2026: third parties date the cut-off
    2026-04-15; Storacha's own kill switch, which answers every user write with
    `ServiceUnavailable`, was merged on 2026-05-15 (storacha/upload-service#708,
    storacha/w3infra#636); by 2026-09-05 up.storacha.network no longer resolved;
  - its gateways (w3s.link, storacha.link, served by freeway) were reported closed on
    2026-05-31, and on 2026-09-05 they only redirected to dweb.link.

So nothing is uploaded here, and nothing pretends to be: `write`, `add` and `delete`
raise ServiceDiscontinued (a ReadOnlyBackend, HTTP 410) naming the date and the source,
before reading a byte, and the driver is `read_only`, so Ferry never places data here.

Reads are the gateway driver's (workers.gateway): freeway speaks the trustless-gateway
protocol (`format=car`, CARv1 in DFS order with duplicates, and `format=raw`), so a read
walks the file's DAG and checks every block against its CID; a lying gateway fails with
ChecksumMismatch and never yields a wrong byte.

Settings:
  gateways        required, no default: Storacha's own gateways no longer serve content,
                  so which gateway still holds Storacha's data is the operator's to say
  timeout, mode, max_block_size
                  as in workers.gateway
  probe_cid       a CID check() fetches (`format=raw`) and hashes; by default the spec's
                  probe, the empty identity CID `bafkqaaa`

check() passes only when a gateway answers the probe as the protocol promises: 200, the
raw-block type, and the empty body (or, with `probe_cid`, a block that hashes to it). A
refused connection, a DNS failure, a 404, another type or a wrong block fail it, and so
does a redirect off the gateway's own domain (w3s.link -> dweb.link): that is another
service answering, and check() does not report Storacha healthy on its behalf.

Honest limits: reads use workers.gateway's HTTP client, which follows redirects wherever
they lead; the bytes are still verified, but once a gateway only forwards, a read is
served by whoever it forwards to (check() says so by failing). Uploads are not
implemented: there is no service left to send them to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import httpx
from pydantic import ConfigDict, model_validator

from ferry.errors import BackendUnavailable, InvalidKey, ServiceDiscontinued
from workers.base import DriverConfig
from workers.cid import check_cid
from workers.gateway import (
    PROBE_CID,
    RAW_TYPE,
    REFUSED,
    GatewayBackend,
    GatewayConfig,
    _Fault,
    _open,
    _transport_fault,
    fetch_raw,
)

# Settings an upload would need; refused with the reason rather than as merely unknown.
UPLOAD_SETTINGS = frozenset({"space_did", "key", "proof", "email", "upload_url", "service_url", "service_did"})
DISCONTINUED = (
    "Storacha no longer accepts uploads: its upload service refuses every write since 2026 "
    "(reported from 2026-04-15; kill switch storacha/upload-service#708 and storacha/w3infra#636, "
    "merged 2026-05-15) and has since been shut down; see docs/storacha.md"
)
GATEWAYS_CLOSED = "Storacha's gateways were reported closed on 2026-05-31 (docs/storacha.md)"


class StorachaConfig(GatewayConfig):
    # A refused upload setting may hold a resolved secret (`key: {env: ...}`): errors must
    # not echo the input back.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    probe_cid: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_upload_settings(cls, data: Any) -> Any:
        offered = sorted(UPLOAD_SETTINGS & set(data)) if isinstance(data, dict) else []
        if offered:
            raise ValueError(f"{', '.join(offered)}: this driver does not upload, because {DISCONTINUED}")
        return data

    @model_validator(mode="after")
    def _probe_is_a_cid(self) -> StorachaConfig:
        if self.probe_cid is not None:
            try:
                self.probe_cid = check_cid(self.probe_cid)
            except InvalidKey as exc:
                raise ValueError(f"probe_cid: {exc.message}") from None
        return self


def _same_domain(host: str) -> Callable[[httpx.Request], None]:
    """A request hook refusing any request (a redirect's) outside `host` and its subdomains:
    a subdomain gateway sends /ipfs/{cid} to {cid}.ipfs.{host}, which is still it."""

    def hook(request: httpx.Request) -> None:
        there = request.url.host
        if there != host and not there.endswith("." + host):
            raise _Fault(REFUSED, f"redirects to {request.url.scheme}://{there}, another service, "
                                  "so this gateway no longer serves content itself")

    return hook


class StorachaBackend(GatewayBackend):
    """Files read by CID, verified, through gateways to Storacha's data; never written."""

    driver: ClassVar[str] = "storacha"
    Config: ClassVar[type[DriverConfig]] = StorachaConfig
    config: StorachaConfig

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        check_cid(key)
        raise ServiceDiscontinued(f"backend {self.name!r}: {DISCONTINUED}")

    def add(self, chunks: Iterable[bytes], size: int | None = None, expect: object = None) -> tuple[str, int]:
        raise ServiceDiscontinued(f"backend {self.name!r}: {DISCONTINUED}")

    def delete(self, key: str) -> bool:
        check_cid(key)
        raise ServiceDiscontinued(f"backend {self.name!r}: {DISCONTINUED}")

    def check(self) -> None:
        """Passes if a gateway answers the probe itself, as the trustless spec promises."""
        failures = []
        for gateway in self.config.gateways:
            hooks = {"request": [_same_domain(httpx.URL(gateway).host)]}
            with httpx.Client(timeout=self.config.timeout, follow_redirects=True, event_hooks=hooks) as client:
                try:
                    self._probe(client, gateway)
                    return
                except _Fault as fault:
                    failures.append(f"{gateway}: {fault.reason}")
        raise BackendUnavailable(f"backend {self.name!r}: no gateway answers the trustless probe "
                                 f"({'; '.join(failures)}); {GATEWAYS_CLOSED}")

    def _probe(self, client: httpx.Client, gateway: str) -> None:
        """Return if `gateway` serves the probe block intact; _Fault otherwise."""
        if self.config.probe_cid is not None:  # checked against its CID by fetch_raw
            fetch_raw(client, gateway, self.config.probe_cid, self.config.max_block_size)
            return
        response = _open(client, f"{gateway}/ipfs/{PROBE_CID}", {"format": "raw"}, RAW_TYPE)
        try:
            body = next(response.iter_bytes(), b"")
        except httpx.HTTPError as exc:
            raise _transport_fault(exc) from exc
        finally:
            response.close()
        if body:
            raise _Fault(REFUSED, f"answered the empty block {PROBE_CID} with bytes")

"""The "filecoin" driver: storage deals made through a deal tool, the chain read over
Lotus JSON-RPC, and objects read back through providers' trustless HTTP retrieval.

Three clients, each a thin typed layer over one real API:

* `LotusClient`: the chain, over Lotus' JSON-RPC (`Filecoin.ChainHead`,
  `StateMarketStorageDeal`, `StateVerifiedClientStatus`, `WalletBalance`,
  `StateMarketBalance`, `StateLookupID`). Ferry believes the chain, not the deal tool:
  a deal is active only when the chain shows its sector start and no slash epoch.
* `DealEngine`, the one interface for proposing and tracking deals, and its driver
  `SingularityEngine` over Singularity's REST API (`POST /api/send_deal`, `POST /api/deal`,
  `GET /api/wallet`): Singularity speaks Boost's deal protocol to the provider (an online
  deal: the provider fetches the CAR from the URL Ferry gives, with a per-deal token) and
  tracks the deal. Why Singularity and not Boost's client: Lotus' `Client*` deal API is
  gone, Boost's `boost` client is a CLI over libp2p with no API to call, and Singularity
  is the maintained deal-making service with an HTTP API; Ferry keeps data preparation,
  provider choice and scheduling for itself and uses only its manual-deal path.
* `FilecoinBackend`: read-only and content-addressed, like a gateway. Ferry writes to
  Filecoin only through deals (tasks/deals.py); a read fetches the object by CID from the
  trustless retrieval endpoints (booster-http's `/ipfs/{cid}`) of providers holding it in
  an active deal, with every block verified by workers.gateway's DAG walk.

Nothing here fakes an answer: an API that cannot be reached raises BackendUnavailable,
an answer that does not have the documented shape raises BackendError, a provider's
refusal raises DealRejected. No chain is reachable where Ferry's tests run, so they
exercise these clients against a local simulation of Singularity, Lotus and providers
(tests/fixtures/filecoin_sim.py) that speaks the same HTTP APIs.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
from pydantic import Field, field_validator

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    FerryError,
    InvalidKey,
    KeyNotFound,
    ReadOnlyBackend,
)
from workers.base import CHUNK_SIZE, Backend, DriverConfig, ObjectStat, check_prefix
from workers.cid import check_cid
from workers.gateway import GatewayBackend, GatewayConfig, GatewayRead

GiB = 2**30
EPOCH_SECONDS = 30
ATTO = 10**18


class DealRejected(BackendError):
    """Raised when a storage provider refuses a deal proposal (price, size, datacap...)."""

    code = "deal_rejected"
    status = 409


class DatacapShort(BackendError):
    """Raised when a verified deal needs more datacap than the client has left."""

    code = "datacap_short"
    status = 409


def _url(value: str) -> str:
    parsed = httpx.URL(value)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


class FilecoinConfig(DriverConfig):
    lotus_url: str = Field(description="Lotus JSON-RPC endpoint, e.g. http://lotus:1234/rpc/v1")
    lotus_token: str | None = Field(None, description="Lotus API token (a secret reference)")
    singularity_url: str = Field(description="Singularity API base, e.g. http://singularity:9090/api")
    client: str = Field(description="the client wallet (as imported into Singularity)")
    piece_dir: str = Field(description="where prepared CARs are kept for providers to fetch")
    piece_url: str = Field(description="the API's base URL as providers reach it; pieces are "
                                       "fetched from {piece_url}/v1/pieces/{piece_cid}")
    piece_size: int = Field(2**35, description="target padded piece size (power of two)")
    copies: int = Field(1, ge=1, le=16, description="deals per piece unless a job says otherwise")
    verified: bool = True
    duration: int = Field(1_555_200, ge=2880, description="deal duration in epochs (540 days)")
    start_delay: int = Field(8640, ge=1, description="epochs between proposal and start (3 days)")
    renew_before: int = Field(172_800, ge=0, description="epochs before the end a renewal is made")
    max_attempts: int = Field(3, ge=1, le=20, description="proposals per copy (retries go to other providers)")
    keep_unsealed: bool = True
    ipni: bool = True
    gas_per_deal: int = Field(10_000_000, ge=0, description="gas units a quote counts per deal")
    gateways: list[str] = Field([], description="extra retrieval endpoints tried after the providers'")
    timeout: float = Field(30.0, gt=0)

    @field_validator("lotus_url", "singularity_url", "piece_url")
    @classmethod
    def _http(cls, value: str) -> str:
        return _url(value)

    @field_validator("piece_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 256 or value & (value - 1):
            raise ValueError("piece_size must be a power of two of at least 256 bytes")
        return value


def _transport(what: str, exc: httpx.HTTPError) -> FerryError:
    if isinstance(exc, httpx.TransportError):
        return BackendUnavailable(f"{what}: cannot be reached ({type(exc).__name__}: {exc})")
    return BackendError(f"{what}: {exc}")


# -- the chain ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainDeal:
    """A storage deal as the chain's market actor holds it."""

    deal_id: int
    piece_cid: str
    padded_size: int
    client: str
    provider: str
    label: str
    start_epoch: int
    end_epoch: int
    price_per_epoch: int
    verified: bool
    sector_start_epoch: int  # -1 until the sector holding it is proven
    slash_epoch: int         # -1 unless slashed

    @property
    def active(self) -> bool:
        return self.sector_start_epoch > 0 and self.slash_epoch < 0


class LotusClient:
    """Chain reads over Lotus' JSON-RPC 2.0 API."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": f"Filecoin.{method}", "params": list(params)}
        what = f"Lotus {method} at {self.url}"
        try:
            response = self._http.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise _transport(what, exc) from exc
        if response.status_code in (401, 403):
            raise BackendError(f"{what}: refused ({response.status_code}): check lotus_token")
        if response.status_code >= 500:
            raise BackendUnavailable(f"{what}: HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise BackendError(f"{what}: HTTP {response.status_code}, not JSON-RPC") from None
        if not isinstance(answer, dict) or ("result" not in answer and "error" not in answer):
            raise BackendError(f"{what}: not a JSON-RPC answer")
        if answer.get("error"):
            raise RpcError(what, answer["error"])
        return answer["result"]

    def head(self) -> int:
        """The chain head's height (epoch)."""
        result = self.call("ChainHead")
        try:
            return int(result["Height"])
        except (KeyError, TypeError, ValueError):
            raise BackendError(f"Lotus ChainHead at {self.url}: no Height in the answer") from None

    def base_fee(self) -> int:
        """attoFIL per gas unit, from the head's first block."""
        result = self.call("ChainHead")
        try:
            return int(result["Blocks"][0]["ParentBaseFee"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise BackendError(f"Lotus ChainHead at {self.url}: no ParentBaseFee in the answer") from None

    def market_deal(self, deal_id: int) -> ChainDeal | None:
        """The deal on chain, or None when the market actor does not hold it (never
        published, or ended and removed)."""
        try:
            result = self.call("StateMarketStorageDeal", deal_id, None)
        except RpcError as exc:
            if "not found" in exc.message.lower():
                return None
            raise
        try:
            p, s = result["Proposal"], result["State"]
            return ChainDeal(
                deal_id=deal_id, piece_cid=p["PieceCID"]["/"], padded_size=int(p["PieceSize"]),
                client=p["Client"], provider=p["Provider"], label=str(p.get("Label", "")),
                start_epoch=int(p["StartEpoch"]), end_epoch=int(p["EndEpoch"]),
                price_per_epoch=int(p["StoragePricePerEpoch"]), verified=bool(p["VerifiedDeal"]),
                sector_start_epoch=int(s["SectorStartEpoch"]), slash_epoch=int(s["SlashEpoch"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"Lotus StateMarketStorageDeal {deal_id}: unexpected answer ({exc})") from None

    def datacap(self, address: str) -> int | None:
        """Bytes of datacap left to a verified client; None when it is not one."""
        result = self.call("StateVerifiedClientStatus", address, None)
        return None if result is None else int(result)

    def balance(self, address: str) -> int:
        return int(self.call("WalletBalance", address))

    def market_balance(self, address: str) -> tuple[int, int]:
        """(escrow, locked) attoFIL in the storage market actor."""
        result = self.call("StateMarketBalance", address, None)
        return int(result["Escrow"]), int(result["Locked"])

    def lookup_id(self, address: str) -> str:
        """The f0 id address of an account."""
        return str(self.call("StateLookupID", address, None))


class RpcError(BackendError):
    """Raised when Lotus answers a JSON-RPC call with an error object."""

    code = "lotus_error"

    def __init__(self, what: str, error: Any):
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        super().__init__(f"{what}: {message}")
        self.message = message


# -- the deal tool -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proposal:
    """What Ferry asks a provider to store, and on what terms."""

    provider: str
    client: str
    piece_cid: str
    padded_size: int
    car_size: int
    root_cid: str
    url_template: str            # with {PIECE_CID}, where the provider fetches the CAR
    headers: dict[str, str]      # sent with the fetch (the per-deal token)
    price_per_gib_epoch: int     # attoFIL
    verified: bool
    duration: int                # epochs
    start_delay: int             # epochs
    keep_unsealed: bool = True
    ipni: bool = True


@dataclass(frozen=True, slots=True)
class EngineDeal:
    """A deal as the deal tool tracks it."""

    proposal_id: str
    provider: str
    piece_cid: str
    state: str                  # the tool's own state name
    chain_deal_id: int | None
    start_epoch: int | None
    end_epoch: int | None
    price_per_epoch: int | None
    error: str | None


class DealEngine(abc.ABC):
    """Proposes deals and reports what became of them."""

    @abc.abstractmethod
    def propose(self, proposal: Proposal) -> EngineDeal:
        """Send the proposal; DealRejected if the provider refuses it."""

    @abc.abstractmethod
    def deals(self, providers: Iterable[str]) -> list[EngineDeal]:
        """Every deal the tool tracks with these providers."""

    @abc.abstractmethod
    def check(self, client: str) -> None:
        """Return if the tool answers and knows `client`'s wallet."""


def _fil(atto: int) -> float:
    return atto / ATTO


class SingularityEngine(DealEngine):
    """Singularity's REST API (v0.5+): manual deals, the deal list, wallets."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, doing: str, **kwargs: Any) -> Any:
        what = f"Singularity {doing} at {self.url}"
        try:
            response = self._http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise _transport(what, exc) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            reason = body.get("err") if isinstance(body, dict) else response.text[:200]
            if response.status_code >= 500 and "reject" in str(reason).lower():
                raise DealRejected(f"{reason}")
            if response.status_code >= 500:
                raise BackendUnavailable(f"{what}: HTTP {response.status_code}: {reason}")
            raise BackendError(f"{what}: HTTP {response.status_code}: {reason}")
        if body is None:
            raise BackendError(f"{what}: HTTP {response.status_code}, not JSON")
        return body

    def propose(self, proposal: Proposal) -> EngineDeal:
        body = {
            "providerId": proposal.provider,
            "clientAddress": proposal.client,
            "pieceCid": proposal.piece_cid,
            "pieceSize": str(proposal.padded_size),
            "fileSize": proposal.car_size,
            "rootCid": proposal.root_cid,
            "urlTemplate": proposal.url_template,
            "httpHeaders": [f"{k}={v}" for k, v in proposal.headers.items()],
            "pricePerGbEpoch": _fil(proposal.price_per_gib_epoch),
            "pricePerGb": 0,
            "pricePerDeal": 0,
            "verified": proposal.verified,
            "duration": str(proposal.duration),
            "startDelay": str(proposal.start_delay),
            "keepUnsealed": proposal.keep_unsealed,
            "ipni": proposal.ipni,
        }
        return self._deal(self._request("POST", "/send_deal", f"send_deal to {proposal.provider}", json=body))

    def deals(self, providers: Iterable[str]) -> list[EngineDeal]:
        body = self._request("POST", "/deal", "deal list", json={"providers": sorted(set(providers))})
        if not isinstance(body, list):
            raise BackendError(f"Singularity deal list at {self.url}: not a list")
        return [self._deal(d) for d in body]

    def check(self, client: str) -> None:
        wallets = self._request("GET", "/wallet", "wallet list")
        if not isinstance(wallets, list):
            raise BackendError(f"Singularity wallet list at {self.url}: not a list")
        if not any(client in (w.get("id"), w.get("address")) for w in wallets if isinstance(w, dict)):
            raise BackendError(f"Singularity at {self.url} has no wallet {client!r}: import it first "
                               f"(singularity wallet import)")

    def _deal(self, d: Any) -> EngineDeal:
        try:
            price = d.get("price")
            return EngineDeal(
                proposal_id=str(d["proposalId"]), provider=d["provider"], piece_cid=d["pieceCid"],
                state=d["state"], chain_deal_id=d.get("dealId"),
                start_epoch=d.get("startEpoch"), end_epoch=d.get("endEpoch"),
                price_per_epoch=int(float(price)) if price not in (None, "") else None,
                error=d.get("errorMessage") or None)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise BackendError(f"Singularity at {self.url}: a deal without the documented fields ({exc})") from None


# -- the backend -------------------------------------------------------------------------


class FilecoinBackend(Backend):
    """Objects in active deals, read by CID through providers' trustless retrieval.

    `locate(cid)` (set by the task layer, which reads the catalog) names the retrieval
    URLs of the providers holding the object in an active deal; `config.gateways` come
    after them.
    """

    driver: ClassVar[str] = "filecoin"
    Config: ClassVar[type[DriverConfig]] = FilecoinConfig
    content_addressed: ClassVar[bool] = True
    read_only: ClassVar[bool] = True  # written only through deals, never by a copy
    config: FilecoinConfig
    locate: Callable[[str], list[str]] | None = None

    def _retrieval(self, cid: str) -> GatewayConfig:
        urls = list(dict.fromkeys([*(self.locate(cid) if self.locate else []), *self.config.gateways]))
        if not urls:
            raise KeyNotFound(f"{self.name}:{cid}: no provider holds it in an active deal")
        return GatewayConfig(gateways=urls, timeout=self.config.timeout)

    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        cid = check_cid(key)
        return GatewayRead(self._retrieval(cid), cid, chunk_size)

    def stat(self, key: str) -> ObjectStat:
        cid = check_cid(key)
        return GatewayBackend(self.name, self._retrieval(cid)).stat(cid)

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        """Filecoin cannot list (what Ferry stored there is in the catalog's deals): a prefix
        that is a whole CID yields that object, so a job can name one object by CID."""
        check_prefix(prefix)
        try:
            cid = check_cid(prefix)
        except InvalidKey:
            raise BackendError(f"backend {self.name!r}: Filecoin cannot list; name objects by CID "
                               f"(got prefix {prefix!r})") from None
        return iter([self.stat(cid)])

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        check_cid(key)
        raise ReadOnlyBackend(f"backend {self.name!r}: Filecoin is written through deals "
                              f"(`ferry deal make`, or a policy's filecoin copies), not by a copy")

    def add(self, chunks: Iterable[bytes], size: int | None = None, expect: object = None) -> tuple[str, int]:
        raise ReadOnlyBackend(f"backend {self.name!r}: Filecoin is written through deals, not by a copy")

    def delete(self, key: str) -> bool:
        check_cid(key)
        raise ReadOnlyBackend(f"backend {self.name!r}: a deal cannot be deleted; it ends at its end epoch")

    def check(self) -> None:
        lotus = self.lotus()
        engine = self.engine()
        try:
            lotus.head()
            engine.check(self.config.client)
        finally:
            lotus.close()
            engine.close()

    def lotus(self) -> LotusClient:
        return LotusClient(self.config.lotus_url, self.config.lotus_token, self.config.timeout)

    def engine(self) -> SingularityEngine:
        return SingularityEngine(self.config.singularity_url, self.config.timeout)

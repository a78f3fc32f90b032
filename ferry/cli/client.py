"""A small typed client of the control API, used by the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ferry.errors import FerryError


class ApiError(FerryError):
    """Raised when the API answers with an error (its JSON error shape is kept)."""

    def __init__(self, status: int, body: dict[str, Any]):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(err.get("message") or f"HTTP {status}", field=err.get("field"),
                         details=err.get("details"))
        self.status = status
        self.code = err.get("code", "http_error")


class ApiUnreachable(FerryError):
    """Raised when the API cannot be reached at all."""

    code = "api_unreachable"


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach the Ferry API at {self.base_url}: {exc}. "
                                 "Is `ferry serve` running, or FERRY_API_URL set?") from exc
        try:
            body = resp.json()
        except ValueError:
            body = {"error": {"message": resp.text[:500]}}
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, body)
        return body

    def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/jobs", json=payload)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def items(self, job_id: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/items",
                            params={k: v for k, v in params.items() if v is not None})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    # -- live events (/v1/events/stream) -------------------------------------------------

    def events(self, params: dict[str, Any], *, last_event_id: str | None = None,
               parser: SseParser | None = None) -> Iterator[ServerSentEvent]:
        """The events of one connection to /v1/events/stream, until the server ends it.
        ApiError for an error answer; ApiUnreachable when the API cannot be reached;
        StreamDropped when the connection breaks mid-stream."""
        parser = parser or SseParser()
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        # The server writes at least every 15 s (a keepalive): silence three times that long is a dead link.
        timeout = httpx.Timeout(30.0, read=STREAM_READ_TIMEOUT)
        try:
            with self.http.stream("GET", "/v1/events/stream", params=params, headers=headers, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    try:
                        body = resp.json()
                    except ValueError:
                        body = {"error": {"message": resp.text[:500]}}
                    raise ApiError(resp.status_code, body)
                try:
                    for line in resp.iter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
                except httpx.TransportError as exc:
                    raise StreamDropped(f"the event stream from {self.base_url} broke: {exc}") from exc
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ApiUnreachable(f"cannot reach the Ferry API at {self.base_url}: {exc}. "
                                 "Is `ferry serve` running, or FERRY_API_URL set?") from exc
        except httpx.TransportError as exc:  # before the answer began
            raise StreamDropped(f"the event stream from {self.base_url} broke: {exc}") from exc

    def live_events(self, params: Callable[[], dict[str, Any]]) -> Iterator[ServerSentEvent]:
        """Events from /v1/events/stream for as long as the caller reads them: when the
        server ends a stream (its time bound) or the connection drops, it reconnects with
        the last event id, so nothing is lost. `params()` gives each connection's query.
        While the API has no room for another stream (503), a `busy` event (no id, data
        {"retry_after": seconds}) comes before each wait. ApiUnreachable when the API stays
        away for RECONNECT_FOR seconds (or from the first connection); ApiError for an
        error answer (a 404 when the API has no live events)."""
        parser = SseParser()
        connected = False
        failing_since: float | None = None
        while True:
            try:
                for event in self.events(params(), last_event_id=parser.last_id, parser=parser):
                    connected, failing_since = True, None
                    yield event
                failing_since = None
            except ApiError as exc:
                if exc.status != 503 or exc.code != "too_many_streams":
                    raise
                wait = float((exc.details or {}).get("retry_after", 5))
                yield ServerSentEvent("busy", json.dumps({"retry_after": wait}), None)
                time.sleep(wait)
            except (StreamDropped, ApiUnreachable) as exc:
                if isinstance(exc, ApiUnreachable) and not connected:
                    raise
                connected = True
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > RECONNECT_FOR:
                    raise ApiUnreachable(f"{exc.message}; gave up reconnecting after {RECONNECT_FOR:.0f} s") from exc
                time.sleep((parser.retry if parser.retry is not None else 3000) / 1000)


STREAM_READ_TIMEOUT = 45.0
RECONNECT_FOR = 60.0  # seconds a follower keeps reconnecting to an API that went away


class StreamDropped(FerryError):
    """Raised when an event stream's connection breaks before the server ended it."""

    code = "stream_dropped"


@dataclass
class ServerSentEvent:
    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        return json.loads(self.data)


class SseParser:
    """Server-sent events from lines of text, by the WHATWG rules: `id:` sets the last
    event id even in a message without data (Ferry's keepalives carry one), `retry:` the
    reconnection delay, lines starting with ':' are comments."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if line == "":
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            return ServerSentEvent(event, "\n".join(data), self.last_id) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None

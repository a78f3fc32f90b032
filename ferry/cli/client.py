"""A small typed client of the control API, used by the CLI."""

from __future__ import annotations

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

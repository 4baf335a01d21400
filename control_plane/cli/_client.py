"""The HTTP client ``edgectl`` uses: one method per API call, errors as ``ClientError``.

The transport is a constructor parameter (tests pass none and talk to a real server on
loopback); upload progress is reported through a callback as bytes leave.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from control_plane.errors import ClientError

__all__ = ["ControlPlaneClient"]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)  # seconds; an upload's checks take a while


class _ProgressFile(io.BufferedReader):
    """A file that reports every read, so a progress bar follows httpx's multipart upload."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._on_read = on_read

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._on_read(len(data))
        return data


class ControlPlaneClient:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, transport=transport, timeout=timeout
        )

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(
                f"cannot reach the control plane at {self._http.base_url}: {exc}"
            ) from exc
        if response.status_code >= 400:
            self._raise(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            body = response.json()
            error, message = str(body["error"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            error, message = (
                "ClientError",
                f"HTTP {response.status_code}: {response.text[:200]}",
            )
        raise ClientError(message, error=error, status_code=response.status_code)

    def create_model(self, name: str, *, accuracy_budget: float, description: str) -> Any:
        body = {"name": name, "accuracy_budget": accuracy_budget, "description": description}
        return self._call("POST", "/v1/models", json=body)

    def list_models(self) -> Any:
        return self._call("GET", "/v1/models")

    def get_model(self, name: str) -> Any:
        return self._call("GET", f"/v1/models/{name}")

    def download(
        self, path: str, dest: Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> int:
        """Stream ``/v1/artifacts/<path>`` into ``dest`` (replaced only when complete); the
        number of bytes written."""
        tmp = dest.with_name(f".{dest.name}.part")
        written = 0
        try:
            with self._http.stream("GET", f"/v1/artifacts/{path}") as response:
                if response.status_code != 200:
                    response.read()
                    self._raise(response)
                with tmp.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        written += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
            tmp.replace(dest)
        except httpx.HTTPError as exc:
            raise ClientError(f"download of {path} failed: {exc}", error="ConnectError") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def list_deltas(self, name: str) -> Any:
        return self._call("GET", f"/v1/models/{name}/deltas")

    def get_version(self, name: str, version: str) -> Any:
        return self._call("GET", f"/v1/models/{name}/versions/{version}")

    def upload_version(
        self,
        name: str,
        version: str,
        files: dict[str, Path],
        *,
        task: str | None = None,
        preprocessing: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Any:
        """``files``: multipart field -> path (``onnx`` and any of the sample sets);
        ``task``: what the accuracy gate measures (None: the server decides);
        ``preprocessing``: the declared preprocessing (``Preprocessing`` JSON)."""
        report = on_bytes or (lambda _n: None)
        handles = {field: _ProgressFile(path, report) for field, path in files.items()}
        try:
            parts = {
                field: (files[field].name, handle, "application/octet-stream")
                for field, handle in handles.items()
            }
            data = {"version": version} | ({"task": task} if task else {})
            if preprocessing:
                data["preprocessing"] = preprocessing
            return self._call("POST", f"/v1/models/{name}/versions", data=data, files=parts)
        finally:
            for handle in handles.values():
                handle.close()

    def get_job(self, job_id: int) -> Any:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self, *, model: str | None = None, status: str | None = None, limit: int = 50
    ) -> Any:
        params: dict[str, str | int] = {"limit": limit}
        if model:
            params["model"] = model
        if status:
            params["status"] = status
        return self._call("GET", "/v1/jobs", params=params)

    def delete_version(self, name: str, version: str) -> None:
        self._call("DELETE", f"/v1/models/{name}/versions/{version}")

    def delete_device(self, device_id: str) -> None:
        self._call("DELETE", f"/v1/devices/{device_id}")

    def retry_device(self, device_id: str, model: str | None = None) -> Any:
        return self._call("POST", f"/v1/devices/{device_id}/retry", json={"model": model})

    def list_devices(self) -> Any:
        return self._call("GET", "/v1/devices")

    def get_device(self, device_id: str) -> Any:
        return self._call("GET", f"/v1/devices/{device_id}")

    def label_device(self, device_id: str, *, set_: dict[str, str], remove: list[str]) -> Any:
        body = {"set": set_, "remove": remove}
        return self._call("PATCH", f"/v1/devices/{device_id}/labels", json=body)

    def assign(
        self,
        model: str,
        version: str,
        *,
        device_id: str | None = None,
        selector: dict[str, str] | None = None,
    ) -> Any:
        body = {"model": model, "version": version, "device_id": device_id, "selector": selector}
        return self._call("POST", "/v1/assignments", json=body)

    def create_token(self, name: str, role: str, *, expires_in_s: int | None = None) -> Any:
        body: dict[str, Any] = {"name": name, "role": role}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        return self._call("POST", "/v1/tokens", json=body)

    def list_tokens(self) -> Any:
        return self._call("GET", "/v1/tokens")

    def revoke_token(self, token_id: int) -> Any:
        return self._call("DELETE", f"/v1/tokens/{token_id}")

    def create_bootstrap_token(
        self, name: str, *, labels: dict[str, str], max_uses: int, expires_in_s: int
    ) -> Any:
        body = {
            "name": name,
            "labels": labels,
            "max_uses": max_uses,
            "expires_in_s": expires_in_s,
        }
        return self._call("POST", "/v1/bootstrap-tokens", json=body)

    def list_bootstrap_tokens(self) -> Any:
        return self._call("GET", "/v1/bootstrap-tokens")

    def revoke_bootstrap_token(self, token_id: int) -> Any:
        return self._call("DELETE", f"/v1/bootstrap-tokens/{token_id}")

    def approve_labels(self, device_id: str, keys: list[str] | None) -> Any:
        body = {"keys": keys}
        return self._call("POST", f"/v1/devices/{device_id}/labels/approve", json=body)

    def rotate_credential(self, device_id: str, *, grace_s: int) -> Any:
        body = {"grace_s": grace_s}
        return self._call("POST", f"/v1/devices/{device_id}/rotate-credential", json=body)

    def revoke_credential(self, device_id: str) -> Any:
        return self._call("POST", f"/v1/devices/{device_id}/revoke-credential")

    def tuf_root(self) -> bytes:
        """The fleet's current TUF root metadata, to provision devices with."""
        try:
            response = self._http.get("/v1/tuf/root")
        except httpx.HTTPError as exc:
            raise ClientError(
                f"cannot reach the control plane at {self._http.base_url}: {exc}"
            ) from exc
        if response.status_code != 200:
            raise ClientError(
                f"HTTP {response.status_code}: {response.text[:200]}",
                status_code=response.status_code,
            )
        return response.content

    def whoami_check(self) -> None:
        """A cheap authenticated call that proves the URL and token work."""
        self._call("GET", "/v1/models")

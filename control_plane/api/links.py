"""OpenAPI links between the control plane's operations.

A link says where a response's values go next: the device id an enrollment answers is the
``device_id`` of every per-device operation, the version an upload answers is what an
assignment or a rollout names, the rollout id a create answers is what pause, resume, abort and
rollback take. Clients generated from the spec and stateful API testers (schemathesis's state
machine) follow them; they are part of the published contract, so they live beside the routes'
paths and are checked against the generated spec when it is built (a link to an operation or a
status that is gone fails loudly rather than silently dropping out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Link:
    """From one operation's response to another operation's parameters and body."""

    source: tuple[str, str, str]  # (method, path, status)
    target: tuple[str, str]  # (method, path)
    parameters: dict[str, str] = field(default_factory=dict)
    body: dict[str, str] | None = None


_DEVICE = "/v1/devices/{device_id}"
_ENROLL = ("post", "/v1/devices/enroll", "201")
_FROM_ENROLL = {"device_id": "$response.body#/device_id"}
_UPLOAD = ("post", "/v1/models/{name}/versions", "202")
_VERSION_BODY = {"model": "$response.body#/model", "version": "$response.body#/version"}
_ROLLOUT = "/v1/rollouts/{rollout_id}"
_FROM_ROLLOUT = {"rollout_id": "$response.body#/id"}

LINKS: tuple[Link, ...] = (
    # enrollment -> the device's own and the operator's per-device operations
    Link(_ENROLL, ("get", _DEVICE), _FROM_ENROLL),
    Link(_ENROLL, ("delete", _DEVICE), _FROM_ENROLL),
    Link(_ENROLL, ("patch", f"{_DEVICE}/labels"), _FROM_ENROLL),
    Link(_ENROLL, ("post", f"{_DEVICE}/labels/approve"), _FROM_ENROLL),
    Link(_ENROLL, ("put", f"{_DEVICE}/profile"), _FROM_ENROLL),
    Link(_ENROLL, ("get", f"{_DEVICE}/desired-state"), _FROM_ENROLL),
    Link(_ENROLL, ("put", f"{_DEVICE}/reported-state"), _FROM_ENROLL),
    Link(_ENROLL, ("post", f"{_DEVICE}/retry"), _FROM_ENROLL),
    Link(_ENROLL, ("post", f"{_DEVICE}/rotate-credential"), _FROM_ENROLL),
    Link(_ENROLL, ("post", f"{_DEVICE}/revoke-credential"), _FROM_ENROLL),
    # a model -> its versions
    Link(
        ("post", "/v1/models", "201"),
        ("post", "/v1/models/{name}/versions"),
        {"name": "$response.body#/name"},
    ),
    # an uploaded version -> assigning it, rolling it out, reading and deleting it
    Link(_UPLOAD, ("post", "/v1/assignments"), body=_VERSION_BODY),
    Link(_UPLOAD, ("post", "/v1/rollouts"), body=_VERSION_BODY),
    Link(
        _UPLOAD,
        ("get", "/v1/models/{name}/versions/{version}"),
        {"name": "$response.body#/model", "version": "$response.body#/version"},
    ),
    Link(
        _UPLOAD,
        ("delete", "/v1/models/{name}/versions/{version}"),
        {"name": "$response.body#/model", "version": "$response.body#/version"},
    ),
    # a rollout -> its lifecycle
    Link(("post", "/v1/rollouts", "201"), ("get", _ROLLOUT), _FROM_ROLLOUT),
    Link(("post", "/v1/rollouts", "201"), ("post", f"{_ROLLOUT}/pause"), _FROM_ROLLOUT),
    Link(("post", "/v1/rollouts", "201"), ("post", f"{_ROLLOUT}/resume"), _FROM_ROLLOUT),
    Link(("post", "/v1/rollouts", "201"), ("post", f"{_ROLLOUT}/abort"), _FROM_ROLLOUT),
    Link(("post", "/v1/rollouts", "201"), ("post", f"{_ROLLOUT}/rollback"), _FROM_ROLLOUT),
)


def add_links(spec: dict[str, Any], links: tuple[Link, ...] = LINKS) -> dict[str, Any]:
    """Write ``links`` into the generated ``spec`` (in place); returns it.

    Raises ``KeyError`` naming the link when an operation or a response status it names is not
    in the spec: a renamed route must take its links with it.
    """
    paths = spec["paths"]
    for link in links:
        method, path, status = link.source
        target_method, target_path = link.target
        try:
            response = paths[path][method]["responses"][status]
            operation_id = paths[target_path][target_method]["operationId"]
        except KeyError as exc:
            raise KeyError(f"OpenAPI link {link} names a missing operation: {exc}") from None
        name = f"{target_method.upper()} {target_path}"
        definition: dict[str, Any] = {"operationId": operation_id}
        if link.parameters:
            definition["parameters"] = dict(link.parameters)
        if link.body is not None:
            definition["requestBody"] = dict(link.body)
        response.setdefault("links", {})[name] = definition
    return spec

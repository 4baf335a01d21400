"""Agent images through the Docker SDK. Builds and the smoke test need a Docker engine; where
none runs they are skipped and say so."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.images import IMAGES, ImageError, build_image, docker_client

ROOT = Path(__file__).resolve().parent.parent.parent


def _engine() -> object | None:
    try:
        return docker_client()
    except ImageError:
        return None


def test_no_engine_is_a_clear_error_not_a_traceback() -> None:
    client = _engine()
    if client is not None:
        pytest.skip("a Docker engine is running here; the no-engine path cannot be shown")
    with pytest.raises(ImageError, match="no Docker engine reachable"):
        docker_client()


def test_every_image_names_an_existing_dockerfile() -> None:
    for spec in IMAGES.values():
        assert (ROOT / spec.dockerfile).is_file(), spec.dockerfile
        assert spec.platform == "linux/arm64"


@pytest.mark.docker
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_agent_image_builds(name: str) -> None:
    client = _engine()
    if client is None:
        pytest.skip("no Docker engine runs on this machine: image builds not exercised")
    image_id = build_image(client, IMAGES[name], ROOT, "test")
    assert image_id.startswith("sha256:")


def test_edgectl_images_without_an_engine_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from control_plane.cli import main

    if _engine() is not None:
        pytest.skip("a Docker engine is running here; the no-engine path cannot be shown")
    assert main(["images", "build", "--tag", "t"]) == 1
    assert capsys.readouterr().err.strip().startswith("ImageError: no Docker engine reachable")

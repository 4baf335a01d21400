"""``edgectl images``: build and push the agent images through the Docker SDK
(``control_plane.images``); needs a Docker engine with BuildKit, and QEMU for arm64 on x86."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from control_plane.images import IMAGES, build_image, docker_client, push_image

images_app = typer.Typer(
    help="Agent container images (Jetson, Raspberry Pi).", no_args_is_help=True
)
_console = Console(stderr=True)

Which = Annotated[list[str] | None, typer.Option("--image", help="jetson, rpi (default: both)")]
Tag = Annotated[str, typer.Option(help="image tag")]


def _chosen(which: list[str] | None) -> list[str]:
    names = which or sorted(IMAGES)
    unknown = sorted(set(names) - set(IMAGES))
    if unknown:
        raise typer.BadParameter(f"unknown image(s) {unknown}; known: {sorted(IMAGES)}")
    return names


@images_app.command("build")
def build(
    tag: Tag = "latest",
    image: Which = None,
    context: Annotated[Path, typer.Option(help="repository root")] = Path(),
) -> None:
    """Build the agent images for linux/arm64."""
    client = docker_client()
    for name in _chosen(image):
        spec = IMAGES[name]
        with _console.status(f"building {spec.repository}:{tag} ({spec.platform})"):
            image_id = build_image(client, spec, context, tag)
        _console.print(f"built {spec.repository}:{tag} {image_id[:19]}")


@images_app.command("push")
def push(tag: Tag = "latest", image: Which = None) -> None:
    """Push built agent images to their registry."""
    client = docker_client()
    for name in _chosen(image):
        spec = IMAGES[name]
        with _console.status(f"pushing {spec.repository}:{tag}"):
            push_image(client, spec, tag)
        _console.print(f"pushed {spec.repository}:{tag}")

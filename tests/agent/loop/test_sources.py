"""Frame sources: synthetic tensors, an image folder, a video file, a callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, InputError
from agent.loop import CallbackSource, ImageFolderSource, SyntheticSource, VideoSource


def spec(name: str, shape: tuple[int, ...], datatype: str = "FP32") -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


# -- synthetic ------------------------------------------------------------------------------


def test_synthetic_tensors_follow_the_input_specs() -> None:
    specs = (spec("img", (-1, 3, -1, -1)), spec("ids", (2, -1), "INT64"), spec("on", (1,), "BOOL"))
    source = SyntheticSource(specs, dynamic_size=16)
    feeds = source.read()
    assert feeds is not None
    assert feeds["img"].shape == (1, 3, 16, 16)
    assert feeds["img"].dtype == np.float32
    assert 0.0 <= feeds["img"].min() <= feeds["img"].max() < 1.0
    assert (feeds["ids"].shape, feeds["ids"].dtype) == ((2, 16), np.int64)
    assert feeds["on"].dtype == np.bool_
    assert source.read() is feeds  # the same tensors every read
    assert source.static_feeds is feeds


def test_synthetic_shape_override_and_count() -> None:
    source = SyntheticSource([spec("x", (-1, 3, -1, -1))], shapes={"x": (1, 3, 640, 640)}, count=2)
    assert source.static_feeds is None  # a counted source must be read to its end
    source.open()
    first = source.read()
    assert first is not None
    assert first["x"].shape == (1, 3, 640, 640)
    source.skip(1)
    assert source.read() is None


@pytest.mark.parametrize(
    ("shapes", "specs", "match"),
    [
        ({"x": (1, 4, 8, 8)}, [spec("x", (-1, 3, -1, -1))], "does not fit"),
        ({"y": (1,)}, [spec("x", (1,))], "unknown input"),
        (None, [spec("s", (1,), "BYTES")], "BYTES"),
    ],
)
def test_synthetic_bad_declarations(shapes: Any, specs: list[TensorSpec], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SyntheticSource(specs, shapes=shapes)


# -- image folder ---------------------------------------------------------------------------


def write_images(folder: Path, count: int = 3) -> list[np.ndarray[Any, Any]]:
    """PNG files named in reverse creation order, so name order is what the test checks."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8) for _ in range(count)]
    for i, img in reversed(list(enumerate(images))):
        Image.fromarray(img).save(folder / f"frame-{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return images


def test_image_folder_reads_rgb_frames_in_name_order(tmp_path: Path) -> None:
    images = write_images(tmp_path)
    source = ImageFolderSource(tmp_path)
    source.open()
    for expected in images:
        got = source.read()
        assert got is not None
        np.testing.assert_array_equal(got, expected)
    assert source.read() is None
    source.close()


def test_image_folder_repeat_and_skip(tmp_path: Path) -> None:
    images = write_images(tmp_path)
    source = ImageFolderSource(tmp_path, repeat=True)
    source.open()
    source.skip(2)
    np.testing.assert_array_equal(source.read(), images[2])
    np.testing.assert_array_equal(source.read(), images[0])  # wrapped around


def test_grey_png_comes_back_as_rgb(tmp_path: Path) -> None:
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(grey).save(tmp_path / "g.png")
    got = ImageFolderSource(tmp_path).read()
    assert got is not None
    assert got.shape == (4, 5, 3)
    np.testing.assert_array_equal(got[:, :, 1], grey)


def test_corrupt_image_is_a_bad_frame_not_the_end(tmp_path: Path) -> None:
    images = write_images(tmp_path, count=2)
    (tmp_path / "frame-00b.png").write_bytes(b"\x89PNG but not really")
    source = ImageFolderSource(tmp_path)
    np.testing.assert_array_equal(source.read(), images[0])
    with pytest.raises(InputError, match=r"frame-00b\.png"):
        source.read()
    np.testing.assert_array_equal(source.read(), images[1])


def test_missing_or_empty_image_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="no images"):
        ImageFolderSource(tmp_path)


# -- video ----------------------------------------------------------------------------------


def write_video(path: Path, frames: int = 6) -> None:
    """Frame i is pure blue in BGR at brightness 40*i, 32x24, MJPG."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for i in range(frames):
        bgr = np.zeros((24, 32, 3), np.uint8)
        bgr[:, :, 0] = 40 * i
        writer.write(bgr)
    writer.release()


def test_video_file_frames_are_rgb_and_end(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video)
    source = VideoSource(video)
    source.open()
    frames = []
    while (f := source.read()) is not None:
        frames.append(f)
    source.close()
    assert len(frames) == 6
    assert frames[0].shape == (24, 32, 3)
    last = frames[5].reshape(-1, 3).mean(axis=0)
    assert last[2] == pytest.approx(200, abs=12)  # blue arrives in the last channel (RGB)
    assert last[0] == pytest.approx(0, abs=12)


def test_video_skip_and_repeat(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video)
    source = VideoSource(video, repeat=True)
    source.open()
    source.skip(4)
    fifth = source.read()
    assert fifth is not None
    assert fifth[:, :, 2].mean() == pytest.approx(160, abs=12)
    for _ in range(3):  # 6th, then wraps to the 1st and 2nd
        assert source.read() is not None
    source.close()


def test_video_that_does_not_open(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        VideoSource(tmp_path / "missing.avi")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video at all")
    source = VideoSource(junk)
    with pytest.raises(ConfigError, match="cannot open"):
        source.open()


# -- callback -------------------------------------------------------------------------------


def test_callback_source_hands_over_what_the_function_returns() -> None:
    items = iter([np.zeros((2, 2), np.uint8), None])
    skipped: list[int] = []
    source = CallbackSource(lambda: next(items), skip=skipped.append)
    assert source.yields == "frames"
    first = source.read()
    assert first is not None
    assert first.shape == (2, 2)
    source.skip(3)
    assert skipped == [3]
    assert source.read() is None

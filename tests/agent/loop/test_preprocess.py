"""Frame preprocessing against hand computations."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from agent._preprocess import FramePreprocessor, default_preprocessing
from agent.contracts.manifest import Preprocessing
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, InputError


def spec(shape: tuple[int, ...], datatype: str = "FP32") -> TensorSpec:
    return TensorSpec(name="x", datatype=datatype, shape=shape)  # type: ignore[arg-type]


def frame(h: int = 4, w: int = 5, c: int = 3, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def by_hand(img: np.ndarray[Any, Any], scale: float, mean: Any, std: Any) -> list[Any]:
    """out[c][y][x] = (img[y][x][c] * scale - mean[c]) / std[c], one pixel at a time."""
    h, w, c = img.shape
    return [
        [[(float(img[y, x, ch]) * scale - mean[ch]) / std[ch] for x in range(w)] for y in range(h)]
        for ch in range(c)
    ]


def test_nchw_normalization_matches_a_hand_computation() -> None:
    img = frame()
    pre = FramePreprocessor(
        spec((1, 3, 4, 5)), Preprocessing(layout="NCHW", scale=1 / 255, mean=MEAN, std=STD)
    )
    out = pre(img)
    assert out.shape == (1, 3, 4, 5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], by_hand(img, 1 / 255, MEAN, STD), rtol=1e-5, atol=1e-5)


def test_nhwc_normalization_matches_a_hand_computation() -> None:
    img = frame()
    pre = FramePreprocessor(
        spec((1, 4, 5, 3)), Preprocessing(layout="NHWC", scale=2.0, mean=(1, 2, 3), std=(4, 5, 6))
    )
    out = pre(img)
    assert out.shape == (1, 4, 5, 3)
    expected = np.transpose(np.array(by_hand(img, 2.0, (1, 2, 3), (4, 5, 6))), (1, 2, 0))
    np.testing.assert_allclose(out[0], expected, rtol=1e-5)


def test_grayscale_uses_bt601_weights_then_normalizes() -> None:
    img = frame()
    pre = FramePreprocessor(
        spec((1, 1, 4, 5)), Preprocessing(grayscale=True, scale=1 / 255, mean=(0.5,), std=(0.25,))
    )
    out = pre(img)
    r, g, b = (img[:, :, i].astype(np.float64) for i in range(3))
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    np.testing.assert_allclose(out[0, 0], (grey / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_grayscale_with_rgb_defaults_for_mean_and_std() -> None:
    img = frame(c=3)
    out = FramePreprocessor(spec((1, 1, 4, 5)), Preprocessing(grayscale=True, scale=1.0))(img)
    expected = img[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)


def test_resize_is_bilinear_like_opencv() -> None:
    img = frame(h=40, w=30)
    pre = FramePreprocessor(spec((1, 3, 16, 12)), Preprocessing(resize=(16, 12), scale=1.0))
    out = pre(img)
    resized = cv2.resize(img, (12, 16), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out[0], resized.transpose(2, 0, 1).astype(np.float32))


def test_dynamic_input_takes_any_size_and_reallocates_per_size() -> None:
    pre = FramePreprocessor(spec((-1, 3, -1, -1)), Preprocessing(scale=1.0))
    assert pre(frame(h=4, w=5)).shape == (1, 3, 4, 5)
    assert pre(frame(h=6, w=2)).shape == (1, 3, 6, 2)


def test_output_buffer_is_reused_between_frames_of_one_size() -> None:
    pre = FramePreprocessor(spec((1, 3, 4, 5)))
    first = pre(frame(seed=1))
    second = pre(frame(seed=2))
    assert first is second  # no allocation per frame
    expected = by_hand(frame(seed=2), 1 / 255, (0, 0, 0), (1, 1, 1))
    np.testing.assert_allclose(second[0], expected, rtol=1e-6)


def test_rgba_drops_alpha_and_grey_frames_fill_one_channel_inputs() -> None:
    rgba = frame(c=4)
    out = FramePreprocessor(spec((1, 3, 4, 5)), Preprocessing(scale=1.0))(rgba)
    np.testing.assert_array_equal(out[0], rgba[:, :, :3].transpose(2, 0, 1))
    grey = frame(c=1)[:, :, 0]
    out1 = FramePreprocessor(spec((1, 1, 4, 5)), Preprocessing(grayscale=True, scale=1.0))(grey)
    np.testing.assert_array_equal(out1[0, 0], grey)


def test_fp16_and_uint8_inputs() -> None:
    img = frame()
    half = FramePreprocessor(spec((1, 3, 4, 5), "FP16"), Preprocessing(scale=1 / 255))(img)
    assert half.dtype == np.float16
    raw = FramePreprocessor(spec((1, 4, 5, 3), "UINT8"), Preprocessing(layout="NHWC"))(img)
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw[0], img)


def test_three_dimensional_input_has_no_batch_axis() -> None:
    out = FramePreprocessor(spec((3, 4, 5)), Preprocessing(scale=1.0))(frame())
    assert out.shape == (3, 4, 5)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((4, 5, 3), np.float32), "uint8"),
        (np.zeros((4, 5, 3, 1), np.uint8), "HxW"),
        (np.zeros((4, 5, 2), np.uint8), "HxW"),
        (np.zeros((6, 5, 3), np.uint8), "6x5 where"),
        ([[1, 2]], "uint8"),
    ],
)
def test_bad_frames_raise_input_error(bad: Any, match: str) -> None:
    pre = FramePreprocessor(spec((1, 3, 4, 5)), Preprocessing())
    with pytest.raises(InputError, match=match):
        pre(bad)


def test_grey_frame_for_a_colour_model_is_an_input_error() -> None:
    with pytest.raises(InputError, match="1 channel"):
        FramePreprocessor(spec((1, 3, 4, 5)))(frame(c=1))


@pytest.mark.parametrize(
    ("input_spec", "pre", "match"),
    [
        (spec((1, 3, 4, 5)), Preprocessing(mean=(0.0, 0.0)), "mean has 2 values"),
        (spec((1, 3, 4, 5)), Preprocessing(std=(1.0, 0.0, 1.0)), "std must not contain zeros"),
        (spec((1, 3, 4, 5)), Preprocessing(grayscale=True), "3 channel"),
        (spec((1, 3, 4, 5)), Preprocessing(resize=(8, 8)), "does not match"),
        (spec((1, 3, 4, 5)), Preprocessing(resize=(0, 5)), "positive"),
        (spec((1, 3, 4, 5), "INT64"), Preprocessing(), "INT64"),
        (spec((1, 20)), Preprocessing(), "image input"),
    ],
)
def test_declarations_that_cannot_fit_the_input_are_config_errors(
    input_spec: TensorSpec, pre: Preprocessing, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        FramePreprocessor(input_spec, pre)


def test_default_preprocessing_from_the_input_spec() -> None:
    digits = default_preprocessing(spec((-1, 1, 8, 8)))
    assert (digits.resize, digits.layout, digits.grayscale) == ((8, 8), "NCHW", True)
    ppocr = default_preprocessing(spec((-1, 3, -1, -1)))
    assert (ppocr.resize, ppocr.layout, ppocr.grayscale) == (None, "NCHW", False)
    nhwc = default_preprocessing(spec((1, 224, 224, 3)))
    assert (nhwc.resize, nhwc.layout) == ((224, 224), "NHWC")


# -- fit, color order, and the declaration's text form ---------------------------------------


def test_letterbox_keeps_the_aspect_and_pads() -> None:
    img = frame(20, 40, seed=3)
    pre = FramePreprocessor(
        spec((1, 3, 16, 16)),
        Preprocessing(resize=(16, 16), fit="letterbox", pad=7, scale=1.0, mean=(0.0,) * 3),
    )
    out = pre(img)[0]
    scaled = cv2.resize(img, (16, 8), interpolation=cv2.INTER_LINEAR)  # 20x40 -> 8x16
    np.testing.assert_array_equal(out[:, :4], 7)  # 4 rows of border above, 4 below
    np.testing.assert_array_equal(out[:, 12:], 7)
    np.testing.assert_array_equal(out[:, 4:12], scaled.transpose(2, 0, 1))


def test_center_crop_keeps_the_middle() -> None:
    img = frame(20, 40, seed=4)
    pre = FramePreprocessor(
        spec((1, 3, 10, 10)),
        Preprocessing(resize=(10, 10), fit="center_crop", scale=1.0, mean=(0.0,) * 3),
    )
    scaled = cv2.resize(img, (20, 10), interpolation=cv2.INTER_LINEAR)  # 20x40 -> 10x20
    np.testing.assert_array_equal(pre(img)[0], scaled[:, 5:15].transpose(2, 0, 1))


def test_bgr_order_and_per_channel_constants_follow_the_model() -> None:
    img = frame(4, 5, seed=5)
    pre = FramePreprocessor(spec((1, 3, 4, 5)), Preprocessing(color="bgr", mean=MEAN, std=STD))
    want = (img[:, :, ::-1] / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(pre(img)[0], want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_the_text_form_parses_lists_and_fractions() -> None:
    pre = Preprocessing.parse(
        "resize=640x480,layout=nhwc,mean=0.485,0.456,0.406,std=0.229,0.224,0.225,"
        "color=BGR,fit=center-crop,scale=1/127.5,pad=0"
    )
    assert pre.resize == (640, 480)
    assert pre.layout == "NHWC"
    assert pre.mean == MEAN
    assert pre.std == STD
    assert (pre.color, pre.fit, pre.pad) == ("bgr", "center_crop", 0)
    assert pre.scale == pytest.approx(1 / 127.5)
    assert Preprocessing.parse("mean=0.5").std == (1.0,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resize=640", "is not an integer"),
        ("resize=0x640", "resize must be 1..16384"),
        ("std=1,0,1", "std must not contain zeros"),
        ("fit=squash", "fit"),
        ("layout=nhcw", "layout"),
        ("gamma=2", "unknown key"),
        ("resize=8x8,resize=4x4", "given twice"),
        ("scale=1/0x", "not a number"),
        ("mean=nan", "not a finite number"),
        ("8x8", "is not key=value"),
        ("mean=" + ",".join(["1"] * 5), "one to four values"),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_a_bad_text_form_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessing.parse(text)


def test_the_new_fields_are_left_out_of_manifests_at_their_defaults() -> None:
    plain = Preprocessing(resize=(8, 8)).model_dump(mode="json")
    assert not {"color", "fit", "pad"} & set(plain)
    boxed = Preprocessing(resize=(8, 8), fit="letterbox").model_dump(mode="json")
    assert boxed["fit"] == "letterbox"
    assert Preprocessing.model_validate(boxed) == Preprocessing(resize=(8, 8), fit="letterbox")

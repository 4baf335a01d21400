"""Postprocessing: top-k on the real digits CNN, DB boxes from the real PP-OCR detector through
the loop, a plugin found through a real entry point (a dist-info on ``sys.path`` of a separate
process), and every bad declaration refused before a loop starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter

from agent.backends import Artifact, LoadOptions, Session, load_first
from agent.config import (
    DbBoxesPostprocessConfig,
    LoopConfig,
    PluginPostprocessConfig,
    TopkPostprocessConfig,
    load_settings,
)
from agent.contracts.accuracy import DbDecoding, db_boxes
from agent.contracts.manifest import Preprocessing
from agent.contracts.results import Classification, Detection, RawOutputs, ResultMessage
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, PostprocessError
from agent.loop import ImageFolderSource, InferenceLoop
from agent.postprocess import build_postprocessor
from agent.sinks import build_sinks

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: TypeAdapter[Any] = TypeAdapter(ResultMessage)


@pytest.fixture(scope="module")
def digits_session(digits_path: Path) -> Iterator[Session]:
    session = load_first(
        Artifact(digits_path, name="digits"), LoadOptions(intra_op_threads=1), order=["onnxruntime"]
    )
    yield session
    session.close()


def _softmax(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    e = np.exp(x.astype(np.float64) - x.max())
    out: np.ndarray[Any, Any] = e / e.sum()
    return out


def test_topk_of_the_digits_cnn_is_the_softmax_of_its_logits(
    digits_session: Session, digits: Any
) -> None:
    labels = tuple(f"digit-{i}" for i in range(10))
    topk = build_postprocessor(
        TopkPostprocessConfig(kind="topk", k=3, labels=labels), digits_session.outputs
    )
    right = 0
    for i in range(20):
        outputs = digits_session.run({"input": digits.x_test[i : i + 1]})
        logits = outputs["logits"][0]
        result = topk(outputs)
        assert isinstance(result, Classification)
        assert result.output == "logits"
        probs = _softmax(logits)
        want = np.argsort(-probs)[:3]
        assert [c.index for c in result.classes] == want.tolist()
        assert [c.score for c in result.classes] == pytest.approx(probs[want].tolist())
        assert [c.label for c in result.classes] == [labels[j] for j in want]
        right += result.classes[0].index == int(digits.y_test[i])
    assert right >= 17  # the trained CNN is right on almost every test digit


def test_scores_that_are_already_probabilities_are_kept() -> None:
    spec = TensorSpec(name="prob", datatype="FP32", shape=[1, 4])
    probs = np.array([[0.1, 0.6, 0.3, 0.0]], np.float32)
    auto = build_postprocessor(TopkPostprocessConfig(kind="topk", k=2), [spec])
    got = auto({"prob": probs})
    assert isinstance(got, Classification)
    assert [(c.index, round(c.score, 6)) for c in got.classes] == [(1, 0.6), (2, 0.3)]
    forced = build_postprocessor(TopkPostprocessConfig(kind="topk", k=1, softmax="always"), [spec])
    first = forced({"prob": probs})
    assert isinstance(first, Classification)
    assert first.classes[0].score == pytest.approx(_softmax(probs[0])[1])


def test_raw_is_the_older_digest(digits_session: Session, digits: Any) -> None:
    outputs = digits_session.run({"input": digits.x_test[:1]})
    raw = build_postprocessor(None)(outputs)
    assert isinstance(raw, RawOutputs)
    digest = raw.outputs["logits"]
    assert digest.shape == [1, 10]
    assert digest.argmax == int(outputs["logits"].argmax())


def test_outputs_that_do_not_fit_fail_the_frame_not_the_loop() -> None:
    topk = build_postprocessor(TopkPostprocessConfig(kind="topk", k=2, labels=("a", "b", "c")))
    with pytest.raises(PostprocessError, match="4 classes, 3 labels"):
        topk({"y": np.zeros((1, 4), np.float32)})
    with pytest.raises(PostprocessError, match="NaN or inf"):
        topk({"y": np.array([[np.nan, 1.0, 2.0]], np.float32)})
    with pytest.raises(PostprocessError, match="not one score vector"):
        topk({"y": np.zeros((1, 3, 3), np.float32)})


@pytest.mark.parametrize(
    ("loop", "match"),
    [
        ({"postprocess": {"kind": "yolo"}}, "postprocess"),
        ({"postprocess": {"kind": "topk", "k": 0}}, "k"),
        ({"postprocess": {"kind": "topk", "labels": []}}, "labels"),
        ({"postprocess": {"kind": "plugin", "name": "../x"}}, "name"),
        ({"postprocess": {"kind": "db_boxes", "threshold": 1.5}}, "threshold"),
        ({"sinks": [{"kind": "kafka"}]}, "sinks"),
        ({"sinks": [{"kind": "mqtt", "queue_size": 0}]}, "queue_size"),
        ({"sinks": [{"kind": "jsonl"}]}, "path"),
    ],
)
def test_bad_declarations_are_config_errors(loop: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(None, loop=loop)


def test_declarations_that_do_not_fit_the_model_are_refused_at_build(
    digits_session: Session, tmp_path: Path
) -> None:
    outputs = digits_session.outputs
    with pytest.raises(ConfigError, match="3 labels for output 'logits' with 10 classes"):
        build_postprocessor(TopkPostprocessConfig(kind="topk", labels=("a", "b", "c")), outputs)
    with pytest.raises(ConfigError, match="k = 11 but output 'logits' has only 10 classes"):
        build_postprocessor(TopkPostprocessConfig(kind="topk", k=11), outputs)
    with pytest.raises(ConfigError, match="no output 'scores'"):
        build_postprocessor(TopkPostprocessConfig(kind="topk", output="scores"), outputs)
    with pytest.raises(ConfigError, match="plugin 'nowhere' is not installed"):
        build_postprocessor(PluginPostprocessConfig(kind="plugin", name="nowhere"), outputs)
    path = tmp_path / "r.jsonl"
    twice = LoopConfig(sink_path=path, sinks=[{"kind": "jsonl", "path": path}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="same file"):
        build_sinks(twice, device_id="d", mqtt=load_settings(None).mqtt)
    with pytest.raises(ConfigError, match=r"needs \[mqtt\] host"):
        build_sinks(
            LoopConfig(sinks=[{"kind": "mqtt"}]),  # type: ignore[list-item]
            device_id="d",
            mqtt=load_settings(None).mqtt,
        )


def _text_page(size: int, words: list[str]) -> np.ndarray[Any, Any]:
    import cv2

    page = np.full((size, size, 3), 235, np.uint8)
    for line, word in enumerate(words):
        y = int(size * (0.3 + 0.35 * line))
        cv2.putText(page, word, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (20, 20, 20), 2)
    return page


def test_db_boxes_from_the_ppocr_detector_through_the_loop(
    ppocr_path: Path, tmp_path: Path
) -> None:
    session = load_first(
        Artifact(ppocr_path, name="ppocr"), LoadOptions(intra_op_threads=1), order=["onnxruntime"]
    )
    try:
        folder = tmp_path / "pages"
        folder.mkdir()
        pages = [_text_page(160, ["edge", "fleet"]), _text_page(160, ["robot"])]
        for i, page in enumerate(pages):
            Image.fromarray(page).save(folder / f"{i}.png")
        pre = Preprocessing(
            resize=(160, 160), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
        )
        out = tmp_path / "boxes.jsonl"
        loop_config = LoopConfig(
            postprocess=DbBoxesPostprocessConfig(kind="db_boxes", label="text"),
            sinks=[{"kind": "jsonl", "path": out}],  # type: ignore[list-item]
        )
        sinks = build_sinks(loop_config, device_id="d", mqtt=load_settings(None).mqtt)
        loop = InferenceLoop(
            session,
            ImageFolderSource(folder),
            name="ppocr",
            preprocessing=pre,
            sink=sinks.for_loop("ppocr", session.outputs),
            rate_hz=None,
        )
        final = loop.run()
        sinks.close()
        assert final is not None
        assert (final.total_count, final.total_failed) == (2, 0)
        messages = [MESSAGES.validate_json(line) for line in out.read_text().splitlines()]
        # the same page by hand: the detector's map decoded by the accuracy gate's DB decoder
        from agent._preprocess import FramePreprocessor

        by_hand = FramePreprocessor(session.inputs[0], pre)
        for message, page in zip(messages, pages, strict=True):
            assert isinstance(message, Detection)
            assert (message.model, message.width, message.height) == ("ppocr", 160, 160)
            prob = next(iter(session.run({session.inputs[0].name: by_hand(page)}).values()))
            want = db_boxes(prob[0, 0], DbDecoding())
            assert len(message.boxes) == len(want) >= 1
            got = np.array(sorted((b.x0, b.y0, b.x1, b.y1) for b in message.boxes))
            expected = np.array(sorted(tuple(map(float, b[:4])) for b in want))
            np.testing.assert_allclose(got, expected, atol=1e-3)
            assert {b.label for b in message.boxes} == {"text"}
        assert len(messages[0].boxes) >= 2  # two lines of text on the first page
    finally:
        session.close()


# -- a plugin through a real entry point ---------------------------------------------------

PLUGIN = '''
"""A team's decoder: the index of the largest score, and a threshold from its options."""

from agent.contracts.results import Classification, ClassScore


def make(options, outputs):
    threshold = float(options["threshold"])
    name = outputs[0].name if outputs else "logits"

    def decode(arrays):
        scores = arrays[name][0]
        best = int(scores.argmax())
        if {mode!r} == "dict":
            return {{"best": best, "over": bool(scores[best] > threshold)}}
        return Classification(output=name, classes=[ClassScore(index=best, score=1.0)])

    return decode
'''


def _plugin_site(tmp_path: Path, *, mode: str = "dict", target: str = "team_decoders:make") -> Path:
    """A distribution 'team-decoders' installed into ``site`` by hand: its module and a
    dist-info whose entry_points.txt registers ``best-class`` under edgefleet.postprocessors."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "team_decoders.py").write_text(textwrap.dedent(PLUGIN.format(mode=mode)))
    info = site / "team_decoders-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: team-decoders\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[edgefleet.postprocessors]\nbest-class = {target}\n")
    return site


def _run_agent(
    site: Path, config: Path, digits_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    argv = ["run", "--config", str(config), "--model", str(digits_path), *extra]
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _images(tmp_path: Path, digit_frames: Any, n: int = 6) -> Path:
    frames, _ = digit_frames
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.stack([frames[i]] * 3, axis=-1)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def digit_frames(digits: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    frames = np.rint(digits.x_test[:, 0] * 255).astype(np.uint8)
    return frames, digits.y_test


def _plugin_config(tmp_path: Path, folder: Path, name: str = "best-class") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nlog_json = true\n'
        f'[loop]\nrate_hz = 1000\ndrop_policy = "catch_up"\n'
        f'[loop.source]\nkind = "images"\npath = "{folder}"\n'
        f'[loop.postprocess]\nkind = "plugin"\nname = "{name}"\n'
        "options = {threshold = 0.5}\n"
        f'[[loop.sinks]]\nkind = "jsonl"\npath = "{tmp_path / "out.jsonl"}"\n'
    )
    return config


@pytest.mark.parametrize("mode", ["dict", "body"])
def test_a_plugin_registered_by_entry_point_decodes_the_loop_results(
    mode: str, tmp_path: Path, digits_path: Path, digit_frames: Any
) -> None:
    site = _plugin_site(tmp_path, mode=mode)
    folder = _images(tmp_path, digit_frames)
    proc = _run_agent(site, _plugin_config(tmp_path, folder), digits_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["total_count"], stats["total_failed"]) == (6, 0)
    messages = [MESSAGES.validate_json(x) for x in (tmp_path / "out.jsonl").read_text().split()]
    assert [m.seq for m in messages] == [1, 2, 3, 4, 5, 6]
    if mode == "dict":
        assert {(m.kind, m.name) for m in messages} == {("custom", "best-class")}
        assert all(set(m.data) == {"best", "over"} for m in messages)
        best = [m.data["best"] for m in messages]
    else:
        assert {(m.kind, m.output) for m in messages} == {("classification", "logits")}
        best = [m.classes[0].index for m in messages]
    truth = digit_frames[1][:6].tolist()
    assert sum(b == t for b, t in zip(best, truth, strict=True)) >= 5  # the plugin saw the CNN


@pytest.mark.parametrize(
    ("target", "name", "match"),
    [
        ("team_decoders:make", "other-decoder", "plugin 'other-decoder' is not installed"),
        ("team_decoders:missing", "best-class", "does not load: AttributeError"),
        ("no_such_module:make", "best-class", "does not load: ModuleNotFoundError"),
    ],
)
def test_a_missing_or_broken_plugin_is_a_config_error_at_start(
    target: str, name: str, match: str, tmp_path: Path, digits_path: Path, digit_frames: Any
) -> None:
    site = _plugin_site(tmp_path, target=target)
    folder = _images(tmp_path, digit_frames, n=1)
    proc = _run_agent(site, _plugin_config(tmp_path, folder, name=name), digits_path)
    assert proc.returncode == 78, proc.stderr[-3000:]  # EX_CONFIG
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ConfigError: ")
    assert match in last
    assert not (tmp_path / "out.jsonl").exists()


def test_a_plugin_that_refuses_its_options_is_a_config_error(
    tmp_path: Path, digits_path: Path, digit_frames: Any
) -> None:
    site = _plugin_site(tmp_path)
    folder = _images(tmp_path, digit_frames, n=1)
    config = _plugin_config(tmp_path, folder)
    config.write_text(config.read_text().replace("options = {threshold = 0.5}", "options = {}"))
    proc = _run_agent(site, config, digits_path)
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert "refused its options: KeyError" in proc.stderr.strip().splitlines()[-1]

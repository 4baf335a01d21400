"""Task metrics (agent.contracts.accuracy) on hand-made maps and on the real PP-OCR detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from agent.contracts.accuracy import (
    DbDecoding,
    box_f1,
    connected_components,
    cosine_similarity,
    db_boxes,
    mask_iou,
    match_boxes,
    retrieval_agreement,
    score_task,
)
from agent.samples import text_page


def _page_map(boxes: list[tuple[int, int, int, int]], size: int = 64) -> np.ndarray[Any, Any]:
    prob = np.zeros((1, 1, size, size), np.float32)
    for x0, y0, x1, y1 in boxes:
        prob[0, 0, y0:y1, x0:x1] = 0.9
    return prob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_components_match_scipy_8_connectivity(seed: int) -> None:
    mask = np.random.default_rng(seed).random((57, 83)) > 0.6
    runs, count = connected_components(mask)
    _, expected = ndimage.label(mask, structure=np.ones((3, 3)))
    assert count == expected
    labels = np.full(mask.shape, -1)
    for label, row, start, stop in runs.tolist():
        labels[row, start:stop] = label
    assert ((labels >= 0) == mask).all()
    scipy_labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    pairs = {
        (a, b) for a, b in zip(labels[mask].tolist(), scipy_labels[mask].tolist(), strict=True)
    }
    assert len(pairs) == count  # the same partition of the pixels


def test_db_boxes_find_each_region_grown_by_unclip() -> None:
    prob = _page_map([(4, 4, 24, 12), (30, 40, 60, 50)])
    boxes = db_boxes(prob[0, 0], DbDecoding(unclip_ratio=0.0, dilate=False))
    assert sorted(boxes[:, :4].astype(int).tolist()) == [[4, 4, 24, 12], [30, 40, 60, 50]]
    assert np.allclose(boxes[:, 4], 0.9)
    grown = db_boxes(prob[0, 0])
    assert (grown[:, 2] - grown[:, 0] > boxes[:, 2] - boxes[:, 0]).all()
    faint = prob * 0.5  # 0.45: above the 0.3 threshold, below the 0.5 box score
    assert len(db_boxes(faint[0, 0])) == 0


def test_box_f1_counts_moved_split_and_missing_boxes() -> None:
    reference = _page_map([(4, 4, 24, 12), (30, 40, 60, 50)])
    assert box_f1(reference, reference)[0] == 1.0
    moved = _page_map([(4, 4, 24, 12), (50, 40, 64, 50)])  # IoU of the second box < 0.5
    f1, per_sample = box_f1(reference, moved)
    assert f1 == pytest.approx(0.5)
    assert per_sample == [pytest.approx(0.5)]
    assert box_f1(reference, _page_map([]))[0] == 0.0
    assert box_f1(_page_map([]), _page_map([]))[0] == 1.0
    a = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
    assert match_boxes(a, a[::-1]) == 2


def test_mask_iou_thresholded_and_multiclass() -> None:
    reference = _page_map([(0, 0, 10, 10)])
    half = _page_map([(0, 0, 10, 5)])
    assert mask_iou(reference, half)[0] == pytest.approx(0.5)
    logits = np.zeros((2, 3, 4, 4), np.float32)
    logits[:, 1, :2] = 1.0
    logits[:, 2, 2:] = 1.0
    assert mask_iou(logits, logits)[0] == 1.0
    swapped = logits[:, [0, 2, 1]]
    assert mask_iou(logits, swapped)[0] == 0.0


def test_embeddings_cosine_and_retrieval_agreement() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 16)).astype(np.float32)
    assert cosine_similarity(emb, emb * 3.0)[0] == pytest.approx(1.0)
    assert retrieval_agreement(emb, emb * 3.0, k=5)[0] == 1.0
    shuffled = emb[rng.permutation(40)]
    assert retrieval_agreement(emb, shuffled, k=5)[0] < 0.5
    score = score_task("embedding", [emb], [emb + rng.normal(scale=0.5, size=emb.shape)])
    assert score.metric in ("cosine", "retrieval")
    assert score.delta == max(100 - score.metrics["cosine"], 100 - score.metrics["retrieval"])


def test_score_task_names_the_deciding_metric_per_task() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], np.float32)
    flipped = logits[:, ::-1]
    labelled = score_task("classification", [logits], [flipped], labels=np.array([0, 1, 1]))
    assert (labelled.metric, labelled.reference, labelled.value) == (
        "top1",
        pytest.approx(200 / 3),
        pytest.approx(100 / 3),
    )
    assert score_task("classification", [logits], [flipped]).metric == "agreement"
    generic = score_task("generic", [logits], [logits * 1.1])
    assert (generic.metric, generic.delta) == ("rel_l2", pytest.approx(10.0))
    segmentation = score_task("segmentation", [_page_map([(0, 0, 8, 8)])], [_page_map([])])
    assert (segmentation.metric, segmentation.value) == ("mask_iou", 0.0)


def test_detection_ignores_probability_noise_that_l2_counts(ppocr_path: Path) -> None:
    """On the real detector: a map perturbed well inside the threshold keeps every box (F1
    100) while its relative L2 error is far over a 1-point budget."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(ppocr_path), providers=["CPUExecutionProvider"])
    pages = text_page(2, seed=3, size=320)
    reference = np.concatenate([session.run(None, {"x": pages[i : i + 1]})[0] for i in range(2)])
    assert len(db_boxes(reference[0, 0])) >= 5  # text pages light the detector up
    noisy = reference.copy()
    for i in range(2):  # background outside every box lifted, far under the 0.3 threshold
        outside = np.ones(reference.shape[-2:], bool)
        every_region = DbDecoding(box_threshold=0.0, min_size=0)
        for x0, y0, x1, y1, _ in db_boxes(reference[i, 0], every_region).astype(int).tolist():
            outside[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = False
        noisy[i, 0][outside] += 0.1
    score = score_task("detection", [reference], [noisy])
    assert score.metric == "box_f1"
    assert score.value == 100.0
    assert score.metrics["rel_l2"] > 5.0

"""Skipped variants read back from a build job's log, whatever else the log holds."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from control_plane.jobs import MAX_LOG_LINES, _append, skipped_variants

target_st = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,30}", fullmatch=True)
reason_st = st.text(
    st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
    ),
    min_size=1,
    max_size=200,
).filter(lambda r: r.strip() and not r.strip().startswith(":"))
other_st = st.sampled_from(
    [
        "build started",
        "normalizing: opset upgrade and graph optimization",
        "measuring the FP32 reference",
        "onnx-fp32 accepted",
        "building onnx-int8",
        "restarted after the service stopped mid-build",
        "failed: BuildError: no variant could be built: {'onnx-int8': 'needs a calibration set'}",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    skips=st.dictionaries(target_st, reason_st, max_size=6),
    noise=st.lists(other_st, max_size=20),
    prefixed=st.booleans(),
    data=st.data(),
)
def test_every_skip_line_the_build_writes_is_read_back(
    skips: dict[str, str], noise: list[str], prefixed: bool, data: st.DataObject
) -> None:
    lines = list(noise)
    for target, reason in skips.items():
        assume(not reason.strip().startswith(f"{target}:"))
        # the builds library writes f"{target} skipped: {exc}", exc often "<target>: <why>"
        message = f"{target}: {reason}" if prefixed else reason
        lines.insert(data.draw(st.integers(0, len(lines))), f"{target} skipped: {message}")
    log = ""
    for line in lines:
        log = _append(log, line)
    assert skipped_variants(log) == {t: r.strip() for t, r in skips.items()}


def test_the_latest_attempt_wins_and_old_lines_fall_off() -> None:
    log = _append("", "onnx-int8 skipped: onnx-int8: needs a calibration set")
    log = _append(log, "onnx-int8 skipped: onnx-int8: quantizer crashed")
    assert skipped_variants(log) == {"onnx-int8": "quantizer crashed"}
    for i in range(MAX_LOG_LINES):
        log = _append(log, f"step {i}")
    assert skipped_variants(log) == {}
    assert skipped_variants("x skipped: ") == {}  # no reason: not a line of ours
    assert skipped_variants("x skipped:   ") == {}
    assert skipped_variants("onnx-fp16 skipped: onnx-fp16:") == {"onnx-fp16": "no reason given"}

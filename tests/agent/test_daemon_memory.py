"""What a device keeps after choosing a variant, through a real ``edge-agent daemon``: a
version with a heavy variant (100 MB of weights, slow) and a light one is measured at start,
the light one serves, and the daemon's RSS is that of a daemon that only ever loaded the light
one, not the heavy variant's pages kept in the C allocator's arenas."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from agent.models.bundle import VariantSpec, build_bundle
from agent.samples import DigitsData
from tests.agent.daemon_proc import bundle_daemon, running_daemon
from tests.agent.store import models

SECTIONS = "[backends]\nintra_op_threads = 1\nchoice_budget_s = 60\n[swap]\nwarmup_runs = 1\n"


def _serving_rss(
    work: Path, variants: list[VariantSpec], golden: np.ndarray, *, below: int | None = None
) -> tuple[int, str]:
    """Start a daemon on a bundle of ``variants``: its RSS once ready and settled, and the
    variant that serves. ``below``: the RSS looked for, read again for up to 10 s while the
    daemon holds more (the hand-back runs on the loader thread, between frames)."""
    bundle = work / "bundle"
    build_bundle(bundle, "digits", "1.0.0", variants, golden_inputs={"input": golden})
    config, port = bundle_daemon(work, bundle, "digits", "1.0.0", f"mem-{work.name}", SECTIONS)
    with running_daemon(config, port, work / "daemon.log", timeout_s=120) as proc:
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/digits", timeout=10).json()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v2/models/digits/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": list(golden.shape),
                        "data": golden.ravel().tolist(),
                    }
                ]
            },
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        time.sleep(1.0)  # the hand-back runs on the loader thread once the swap is done
        rss = psutil.Process(proc.pid).memory_info().rss
        deadline = time.monotonic() + 10
        while below is not None and rss >= below and time.monotonic() < deadline:
            time.sleep(0.5)
            rss = psutil.Process(proc.pid).memory_info().rss
    return rss, str(meta["parameters"]["variant"])


def test_a_daemon_that_measured_a_heavy_variant_holds_what_the_light_one_needs(
    digits_path: Path, digits: DigitsData, tmp_path: Path
) -> None:
    golden = digits.x_test[:2].astype(np.float32)
    heavy = models.heavier(digits_path, tmp_path / "heavy.onnx")
    both = tmp_path / "both"
    light = tmp_path / "light"
    both.mkdir()
    light.mkdir()
    alone, served_alone = _serving_rss(light, [VariantSpec(digits_path, id="b-light")], golden)
    assert served_alone == "b-light"
    measured, served = _serving_rss(
        both,
        [VariantSpec(heavy, id="a-heavy"), VariantSpec(digits_path, id="b-light")],
        golden,
        below=alone + 50_000_000,
    )
    assert served == "b-light"
    log = (both / "daemon.log").read_text()
    assert re.search(r"a-heavy [0-9.]+ ms", log), log[-3000:]  # it was loaded and timed
    extra_mb = (measured - alone) / 1e6
    # Here: 4 MB more (163 against 159 MB). Without the hand-back the heavy variant's load left
    # 93-99 MB of its weights and their copies in the daemon's heap.
    assert extra_mb < 50, f"{extra_mb:.0f} MB more than a daemon that never loaded a-heavy"

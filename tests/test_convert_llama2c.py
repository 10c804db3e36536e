"""`convert llama2c`: the real stories260K weights reproduce llama2.c's published greedy outputs, and the
v1, v2 and unshared-classifier layouts (written here by an independent writer that follows llama2.c's
export.py) import to the same parameters as the v0 file."""

import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from module_runner import assert_one_error_line, run_module

from llama_jax.convert import convert_llama2c, load_llama2c
from llama_jax.loading import load
from llama_jax.model_dir import read_model_dir
from llama_jax.sharding import make_mesh

GENERATION_LENGTH = 256  # the longest published case: 256 steps, one generated token per position
MAGIC = 0x616B3432
V0_ORDER = (
    "tok_emb",
    "rms_att",
    "wq",
    "wk",
    "wv",
    "wo",
    "rms_ffn",
    "w1",
    "w2",
    "w3",
    "rms_final",
    "freq_cis_real",
    "freq_cis_imag",
)
V1_ORDER = ("rms_att", "rms_ffn", "rms_final", "tok_emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
QUANTIZED = ("tok_emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tensor_shapes(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len):
    """The v0 layout as assets/README.md describes it (from llama2.c's export.py)."""
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    return {
        "tok_emb": (vocab, dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hidden, dim),
        "w2": (n_layers, dim, hidden),
        "w3": (n_layers, hidden, dim),
        "rms_final": (dim,),
        "freq_cis_real": (seq_len * head_size // 2,),
        "freq_cis_imag": (seq_len * head_size // 2,),
    }


def read_v0(path):
    header = [int(v) for v in np.fromfile(path, "<i4", 7)]
    data = np.fromfile(path, "<f4", offset=28)
    tensors, offset = {}, 0
    for name, shape in tensor_shapes(*header[:5], abs(header[5]), header[6]).items():
        size = int(np.prod(shape))
        tensors[name] = data[offset : offset + size].reshape(shape)
        offset += size
    assert offset == data.size, "stories260K.bin has a shared classifier: nothing follows the RoPE tables"
    return header, tensors


def write_v0(path, header, tensors, classifier=None):
    fields = list(header)
    fields[5] = -abs(fields[5]) if classifier is not None else abs(fields[5])
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *fields))
        for name in V0_ORDER:
            f.write(tensors[name].astype("<f4").tobytes())
        if classifier is not None:
            f.write(classifier.astype("<f4").tobytes())


def _v1_header(version, header, shared, extra=b""):
    fields = list(header)
    fields[5] = abs(fields[5])
    head = struct.pack("<Ii7iB", MAGIC, version, *fields, int(shared)) + extra
    return head + b"\0" * (256 - len(head))


def write_v1(path, header, tensors, classifier=None):
    with open(path, "wb") as f:
        f.write(_v1_header(1, header, classifier is None))
        for name in V1_ORDER:
            f.write(tensors[name].astype("<f4").tobytes())
        if classifier is not None:
            f.write(classifier.astype("<f4").tobytes())


def quantize_q80(w, group_size):
    """export.py `quantize_q80`: symmetric int8 per group of `group_size` values."""
    groups = w.astype(np.float32).reshape(-1, group_size)
    scale = np.abs(groups).max(axis=1) / np.float32(127.0)
    q = np.round(groups / scale[:, None]).astype(np.int8)
    return q, scale, (q.astype(np.float32) * scale[:, None]).reshape(w.shape)


def write_v2(path, header, tensors, group_size):
    """export.py `version2_export` (shared classifier); returns the dequantized tensors."""
    per_layer = [tensors["tok_emb"]] + [layer for name in QUANTIZED[1:] for layer in tensors[name]]
    quantized = [quantize_q80(w, group_size) for w in per_layer]
    with open(path, "wb") as f:
        f.write(_v1_header(2, header, True, struct.pack("<i", group_size)))
        for name in ("rms_att", "rms_ffn", "rms_final"):
            f.write(tensors[name].astype("<f4").tobytes())
        for q, _, _ in quantized:
            f.write(q.tobytes())
        for _, scale, _ in quantized:
            f.write(scale.astype("<f4").tobytes())
    dequantized = dict(tensors, tok_emb=quantized[0][2])
    n_layers = header[2]
    for i, name in enumerate(QUANTIZED[1:]):
        dequantized[name] = np.stack([quantized[1 + i * n_layers + layer][2] for layer in range(n_layers)])
    return dequantized


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, state, ids, position):
    logits = nnx.merge(graphdef, state)(ids)[0][0, position]
    return jnp.argmax(logits), logits


def load_on_one_device(model_dir):
    """Batch 1 cannot be split over the two fake devices; one device avoids computing everything twice."""
    loaded = load(model_dir, mesh=make_mesh(devices=jax.devices()[:1]))
    return loaded, *nnx.split(loaded.model)


def greedy(model_dir, steps):
    """llama2.c run.c at temperature 0 with an empty prompt: start from BOS, one token per position, stop
    early on BOS. One fixed-length forward, compiled once, read at each position."""
    loaded, graphdef, state = load_on_one_device(model_dir)
    ids = np.zeros((1, steps), np.int32)
    ids[0, 0] = 1
    generated = []
    with jax.set_mesh(loaded.mesh):
        for position in range(steps):
            token = int(_logits_at(graphdef, state, ids, position)[0])
            if token == 1:
                break
            generated.append(token)
            if position + 1 < steps:
                ids[0, position + 1] = token
    return generated, loaded.tokenizer


def final_logits(model_dir, generated):
    """Logits at the last position of BOS + `generated`, with the same compiled forward."""
    loaded, graphdef, state = load_on_one_device(model_dir)
    ids = np.asarray([[1, *generated[: GENERATION_LENGTH - 1]]], np.int32)
    with jax.set_mesh(loaded.mesh):
        return np.asarray(_logits_at(graphdef, state, ids, GENERATION_LENGTH - 1)[1])


@pytest.fixture(scope="module")
def stories(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "model"
    result = run_module(
        "llama_jax.convert", "llama2c", assets / "stories260K.bin", "--tokenizer", assets / "tok512.bin", "--out", out
    )
    assert result.returncode == 0, result.stderr
    return out, *greedy(out, GENERATION_LENGTH)


def test_greedy_decoding_reproduces_llama2c(stories, assets):
    _, generated, tokenizer = stories
    expected = json.loads((assets / "stories260K_expected.json").read_text())
    ids = expected["first_greedy_ids"]
    assert generated[: len(ids)] == ids
    for case in expected["cases"]:
        assert case["prompt"] == "" and case["temperature"] == 0.0
        assert tokenizer.decode(generated[: case["steps"]]) == case["expected"], case["name"]


def test_a_chat_template_is_recorded_when_it_fits_the_tokenizer(assets, tmp_path):
    """llama2.c files carry no chat template: `--chat-template` records one; one the tokenizer cannot write
    is refused before anything is written."""
    source = [assets / "stories260K.bin", "--tokenizer", assets / "tok512.bin"]
    refused = run_module("llama_jax.convert", "llama2c", *source, "--out", tmp_path / "m", "--chat-template", "llama3")
    assert_one_error_line(refused, "the llama3 chat template needs the Llama 3 tokenizer")
    assert not (tmp_path / "m").exists()
    result = run_module("llama_jax.convert", "llama2c", *source, "--out", tmp_path / "m", "--chat-template", "llama2")
    assert result.returncode == 0, result.stderr
    loaded = read_model_dir(tmp_path / "m")
    assert loaded.chat_template == "llama2"


def test_v1_file_gives_the_same_model(stories, assets, tmp_path):
    v0_dir, generated, _ = stories
    header, tensors = read_v0(assets / "stories260K.bin")
    write_v1(tmp_path / "v1.bin", header, tensors)
    _, v0_params = load_llama2c(assets / "stories260K.bin")
    config, v1_params = load_llama2c(tmp_path / "v1.bin")
    assert config == read_model_dir(v0_dir).config
    jax.tree.map(np.testing.assert_array_equal, v1_params, v0_params)
    convert_llama2c(tmp_path / "v1.bin", assets / "tok512.bin", tmp_path / "v1")
    assert len(generated) == GENERATION_LENGTH
    np.testing.assert_array_equal(final_logits(tmp_path / "v1", generated), final_logits(v0_dir, generated))


def test_v2_q8_file_dequantizes_exactly(assets, tmp_path):
    header, tensors = read_v0(assets / "stories260K.bin")
    dequantized = write_v2(tmp_path / "v2.bin", header, tensors, group_size=64)
    write_v0(tmp_path / "dequantized_v0.bin", header, dequantized)
    _, expected = load_llama2c(tmp_path / "dequantized_v0.bin")
    _, params = load_llama2c(tmp_path / "v2.bin")
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert not np.array_equal(params["embed"], load_llama2c(assets / "stories260K.bin")[1]["embed"])


def test_unshared_classifier_v0_and_v1(assets, tmp_path):
    header, tensors = read_v0(assets / "stories260K.bin")
    classifier = np.random.default_rng(0).standard_normal(tensors["tok_emb"].shape).astype(np.float32)
    write_v0(tmp_path / "v0.bin", header, tensors, classifier)
    write_v1(tmp_path / "v1.bin", header, tensors, classifier)
    config, params = load_llama2c(tmp_path / "v0.bin")
    assert not config.tie_embeddings
    np.testing.assert_array_equal(params["lm_head"], classifier.T)
    np.testing.assert_array_equal(params["embed"], tensors["tok_emb"])
    jax.tree.map(np.testing.assert_array_equal, load_llama2c(tmp_path / "v1.bin")[1], params)

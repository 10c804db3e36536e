"""`convert meta`: Meta-layout checkpoints built here from transformers weights (rows of wq/wk put back in
Meta's interleaved RoPE order, split into two model-parallel shards the way Meta's layers split them)
import to the transformers logits."""

import json
import shutil

from hf_reference import hf_logits, hf_model, our_logits, relative_error, sample_ids, torch
from module_runner import run_module

from llama_jax.convert import convert_meta

# HF name suffix -> (Meta name, dimension Meta's model-parallel layer splits; None: replicated)
_LAYER_TENSORS = {
    "self_attn.q_proj": ("attention.wq", 0),
    "self_attn.k_proj": ("attention.wk", 0),
    "self_attn.v_proj": ("attention.wv", 0),
    "self_attn.o_proj": ("attention.wo", 1),
    "mlp.gate_proj": ("feed_forward.w1", 0),
    "mlp.down_proj": ("feed_forward.w2", 1),
    "mlp.up_proj": ("feed_forward.w3", 0),
    "input_layernorm": ("attention_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
}


def interleaved_rows(w, n_heads):
    """The inverse of transformers' `permute`: half-split rows (i, i + d/2) back to pairs (2i, 2i + 1)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model, directory, params, embedding_split_dim, n_shards=2):
    config = model.config
    state = model.state_dict()
    tensors = {
        "tok_embeddings.weight": (state["model.embed_tokens.weight"], embedding_split_dim),
        "norm.weight": (state["model.norm.weight"], None),
        # Meta's files carry the classifier even when it is tied to the embedding (Llama 3.2).
        "output.weight": (state["lm_head.weight"], 0),
    }
    for i in range(config.num_hidden_layers):
        for hf_suffix, (meta, split) in _LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf_suffix}.weight"]
            if meta == "attention.wq":
                w = interleaved_rows(w, config.num_attention_heads)
            elif meta == "attention.wk":
                w = interleaved_rows(w, config.num_key_value_heads)
            tensors[f"layers.{i}.{meta}.weight"] = (w, split)
    directory.mkdir()
    for shard in range(n_shards):
        torch.save(
            {
                name: (w if split is None else torch.tensor_split(w, n_shards, dim=split)[shard]).clone()
                for name, (w, split) in tensors.items()
            },
            directory / f"consolidated.{shard:02d}.pth",
        )
    (directory / "params.json").write_text(json.dumps(params))


def test_llama2_layout_through_the_cli(tmp_path, assets):
    """Embedding split along dim (ParallelEmbedding), vocab_size -1, ffn width from multiple_of and
    ffn_dim_multiplier, tokenizer.model next to the weights."""
    model = hf_model("llama2")
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": -1,
        "multiple_of": 8,
        "ffn_dim_multiplier": 0.7,
        "norm_eps": 1e-5,
    }
    write_meta_checkpoint(model, tmp_path / "meta", params, embedding_split_dim=1)
    shutil.copyfile(assets / "tok512.bin", tmp_path / "meta" / "tokenizer.model")
    result = run_module(
        "llama_jax.convert", "meta", tmp_path / "meta", "--out", tmp_path / "ours", "--max-model-len", "64"
    )
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "ours" / "config.json").read_text())["model"]
    assert (written["vocab_size"], written["ffn_dim"], written["tie_embeddings"]) == (515, 120, False)
    ids = sample_ids()
    assert relative_error(our_logits(tmp_path / "ours", ids), hf_logits(model, ids)) <= 1e-5


def test_llama32_layout_tied_and_scaled(tmp_path, assets):
    """Embedding split along vocab (VocabParallelEmbedding), output.weight equal to it (tied), and
    use_scaled_rope with the Llama 3.2 factor of 32."""
    model = hf_model("llama3.2")
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 515,
        "multiple_of": 8,
        "ffn_dim_multiplier": 0.7,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    write_meta_checkpoint(model, tmp_path / "meta", params, embedding_split_dim=0)
    convert_meta(tmp_path / "meta", tmp_path / "ours", tokenizer=assets / "tok512.bin", max_seq_len=64)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())["model"]
    assert written["tie_embeddings"] is True
    assert written["rope_scaling"] == {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position": 8192,
    }
    ids = sample_ids()
    assert relative_error(our_logits(tmp_path / "ours", ids), hf_logits(model, ids)) <= 1e-5

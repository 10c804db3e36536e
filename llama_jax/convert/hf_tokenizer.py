"""Tokenizer files for a Hugging Face export that `transformers.AutoTokenizer` loads and that encode as
llama_jax does: BOS added like LLaMA, the chat template as Jinja, and a generation config whose EOS ids
are the ids our generation stops on.

  sentencepiece: tokenizer.model as is, plus tokenizer.json (BPE with merges ranked by piece score);
  llama2c:       the same two files: tokenizer.bin rewritten as the SentencePiece BPE model it was exported
                 from (llama2.c's tokenizer.py writes pieces and scores of one; we put them back into a
                 ModelProto), so transformers, sentencepiece and our re-import all read it;
  tiktoken:      original/tokenizer.model as Meta ships it, plus tokenizer.json (byte-level BPE with the
                 merges recovered from the ranks, as transformers' TikTokenConverter does), the file
                 Hugging Face's Llama 3 repositories carry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama_jax.chat import end_of_turn
from llama_jax.tokenizers import Tokenizer
from llama_jax.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from llama_jax.tokenizers.tiktoken_tokenizer import PAT_STR, TiktokenTokenizer

# The templates Meta's Hugging Face repositories ship, rendering what llama_jax.chat builds at the token level.
JINJA_TEMPLATES = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
        "{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def write_hf_tokenizer(tokenizer: Tokenizer, chat_template: str | None, directory: Path) -> None:
    """Tokenizer files, tokenizer_config.json, special_tokens_map.json and generation_config.json."""
    if tokenizer.kind == "tiktoken":
        (directory / "original").mkdir(exist_ok=True)
        shutil.copyfile(tokenizer.path, directory / "original" / "tokenizer.model")
        _write_json(directory / "tokenizer.json", tiktoken_tokenizer_json(tokenizer))
        named = tokenizer
    else:
        model = sentencepiece_model(tokenizer)
        (directory / "tokenizer.model").write_bytes(model)
        _write_json(directory / "tokenizer.json", sentencepiece_tokenizer_json(model))
        named = SentencePieceTokenizer(model, directory / "tokenizer.model")
    specials = {"bos_token": named.id_to_piece(named.bos_id), "eos_token": named.id_to_piece(named.eos_id)}
    if tokenizer.kind != "tiktoken":
        specials["unk_token"] = named.id_to_piece(0)
    # PreTrainedTokenizerFast reads tokenizer.json as written (LlamaTokenizer would rebuild the pipeline in
    # code, with another space handling); BOS comes from its post-processor.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    if chat_template is not None:
        config["chat_template"] = JINJA_TEMPLATES.get(chat_template, chat_template)  # a name, or Jinja text
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", specials)
    _write_json(directory / "generation_config.json", generation_config(tokenizer, chat_template))


def generation_config(tokenizer: Tokenizer, chat_template: str | None) -> dict:
    """EOS as every id llama_jax stops on (plus the end-of-turn id of the chat template), so
    `model.generate` stops where `infer.py` does."""
    stops = list(tokenizer.stop_ids)
    try:
        turn_end = end_of_turn(tokenizer, chat_template) if chat_template is not None else None
    except KeyError:  # a template recorded for another tokenizer: its turns cannot end
        turn_end = None
    if turn_end is not None and turn_end not in stops:
        stops.append(turn_end)
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops if len(stops) > 1 else stops[0],
        "pad_token_id": tokenizer.pad_id,
        "do_sample": False,
    }


def sentencepiece_model(tokenizer: Tokenizer) -> bytes:
    """The serialized SentencePiece model of a SentencePiece or llama2.c tokenizer."""
    if tokenizer.kind == "sentencepiece":
        return tokenizer.path.read_bytes()
    return tokenizer.sentencepiece_model()


def sentencepiece_tokenizer_json(model_proto: bytes) -> dict:
    """A `tokenizers` BPE equal to a LLaMA SentencePiece BPE model: the dummy-prefix space and "▁" for
    spaces as a normalizer, byte fallback, and each piece's merges ranked by the piece's score (the
    order SentencePiece merges in; whitespace runs such as "▁▁" score lowest, so they merge last)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(model_proto)
    kinds = pb.ModelProto.SentencePiece
    vocab = {piece.piece: token_id for token_id, piece in enumerate(model.pieces)}
    merges = []
    for token_id, piece in enumerate(model.pieces):
        if piece.type != kinds.NORMAL:
            continue
        text = piece.piece
        for i in range(1, len(text)):
            left, right = text[:i], text[i:]
            if left in vocab and right in vocab:
                merges.append((-piece.score, token_id, vocab[left], vocab[right], left, right))
    merges.sort()
    specials = [
        _added_token(token_id, piece.piece)
        for token_id, piece in enumerate(model.pieces)
        if piece.type in (kinds.CONTROL, kinds.UNKNOWN)
    ]
    bos = model.pieces[model.trainer_spec.bos_id].piece
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": _bos_template(bos, model.trainer_spec.bos_id),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": model.pieces[model.trainer_spec.unk_id].piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for *_, left, right in merges],
        },
    }


def tiktoken_tokenizer_json(tokenizer: TiktokenTokenizer) -> dict:
    """A `tokenizers` byte-level BPE equal to the tiktoken ranks: each multi-byte token's merge is ranked by
    the token's own rank, which is the order tiktoken merges in."""
    ranks = tokenizer.ranks
    to_unicode = _bytes_to_unicode()

    def text(piece: bytes) -> str:
        return "".join(to_unicode[b] for b in piece)

    merges = []
    for piece, rank in ranks.items():
        if len(piece) < 2:
            continue
        splits = [
            (ranks[piece[:i]], ranks[piece[i:]], piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in ranks and piece[i:] in ranks
        ]
        for left_rank, right_rank, left, right in splits:
            merges.append((rank, left_rank, right_rank, text(left), text(right)))
    merges.sort()
    specials = [
        _added_token(token_id, name)
        for name, token_id in sorted(tokenizer.special_ids.items(), key=lambda item: item[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": _bos_template(tokenizer.id_to_piece(tokenizer.bos_id), tokenizer.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text(piece): rank for piece, rank in ranks.items()},
            "merges": [[left, right] for *_, left, right in merges],
        },
    }


def _added_token(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _bos_template(bos: str, bos_id: int) -> dict:
    """Post-processor that starts every encoding with BOS, as LLaMA models expect."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")

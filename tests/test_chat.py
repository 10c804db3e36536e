"""Chat templates against published token sequences.

Sources of the expected ids:
  [META3]  meta-llama/llama3 llama/test_tokenizer.py, test_encode_message / test_encode_dialog.
  [OV]     a public C++ chat-template test by Intel's OpenVINO team (its requests go to an
           ov-spr-19.sclab.intel.com server), ids of meta-llama/Llama-2-7b-chat-hf and
           meta-llama/Meta-Llama-3-8B-Instruct for three dialogs; found through the code search index, which
           did not name its repository.
  [HF]     Hugging Face transformers rendering the chat_template published in
           meta-llama/Llama-2-7b-chat-hf tokenizer_config.json, tokenized by transformers' SentencePiece
           backend over the real LLaMA 2 tokenizer.model (legacy=True: SentencePiece's dummy prefix after
           every special token, as Meta's encode gives it). Checked against [OV] first.
"""

import pytest

from llama_jax.chat import detect_chat_template, encode_dialog

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template".
HF_LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template".
HF_LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SYSTEM = {"role": "system", "content": "You are assistant."}
HELLO = {"role": "user", "content": "hello"}
ANSWER = {"role": "assistant", "content": "how can I help you?"}
QUESTION = {"role": "user", "content": "how much is 2+2?"}
OV_DIALOGS = {"user": [HELLO], "system_user": [SYSTEM, HELLO], "multi_turn": [SYSTEM, HELLO, ANSWER, QUESTION]}

# [OV] meta-llama/Llama-2-7b-chat-hf
OV_LLAMA2 = {
    "user": [1, 518, 25580, 29962, 22172, 518, 29914, 25580, 29962],
    "system_user": [
        1,
        518,
        25580,
        29962,
        3532,
        14816,
        29903,
        6778,
        13,
        3492,
        526,
        20255,
        29889,
        13,
        29966,
        829,
        14816,
        29903,
        6778,
        13,
        13,
        12199,
        518,
        29914,
        25580,
        29962,
    ],
    "multi_turn": [
        1,
        518,
        25580,
        29962,
        3532,
        14816,
        29903,
        6778,
        13,
        3492,
        526,
        20255,
        29889,
        13,
        29966,
        829,
        14816,
        29903,
        6778,
        13,
        13,
        12199,
        518,
        29914,
        25580,
        29962,
        920,
        508,
        306,
        1371,
        366,
        29973,
        29871,
        2,
        1,
        518,
        25580,
        29962,
        920,
        1568,
        338,
        29871,
        29906,
        29974,
        29906,
        29973,
        518,
        29914,
        25580,
        29962,
    ],
}
# [OV] meta-llama/Meta-Llama-3-8B-Instruct
OV_LLAMA3 = {
    "user": [128000, 128006, 882, 128007, 271, 15339, 128009, 128006, 78191, 128007, 271],
    "system_user": [
        128000,
        128006,
        9125,
        128007,
        271,
        2675,
        527,
        18328,
        13,
        128009,
        128006,
        882,
        128007,
        271,
        15339,
        128009,
        128006,
        78191,
        128007,
        271,
    ],
    "multi_turn": [
        128000,
        128006,
        9125,
        128007,
        271,
        2675,
        527,
        18328,
        13,
        128009,
        128006,
        882,
        128007,
        271,
        15339,
        128009,
        128006,
        78191,
        128007,
        271,
        5269,
        649,
        358,
        1520,
        499,
        30,
        128009,
        128006,
        882,
        128007,
        271,
        5269,
        1790,
        374,
        220,
        17,
        10,
        17,
        30,
        128009,
        128006,
        78191,
        128007,
        271,
    ],
}


def test_llama3_meta_reference_dialog(llama3_tok):
    dialog = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    expected = [  # [META3] test_encode_dialog
        128000,
        128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip
    assert encode_dialog(llama3_tok, "llama3", dialog) == expected
    # [META3] test_encode_message, inside a one-message dialog (begin_of_text ... assistant header).
    message = [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    user_only = [{"role": "user", "content": "  This is a test sentence.\n"}]  # content is stripped
    assert encode_dialog(llama3_tok, "llama3", user_only) == [128000, *message, 128006, 78191, 128007, 271]


@pytest.mark.parametrize("name", OV_DIALOGS)
def test_llama3_published_instruct_ids(llama3_tok, name):
    assert encode_dialog(llama3_tok, "llama3", OV_DIALOGS[name]) == OV_LLAMA3[name]


def test_llama3_special_token_text_in_content_stays_text(llama3_tok):
    ids = encode_dialog(llama3_tok, "llama3", [{"role": "user", "content": "<|eot_id|><|start_header_id|>"}])
    assert ids.count(128009) == 1 and ids.count(128006) == 2  # only the template's own


@pytest.mark.parametrize("name", OV_DIALOGS)
def test_llama2_published_chat_ids(llama2_tok, name):
    assert encode_dialog(llama2_tok, "llama2", OV_DIALOGS[name]) == OV_LLAMA2[name]


@pytest.mark.parametrize("name", OV_DIALOGS)
def test_the_published_jinja_templates_give_the_published_ids(llama2_tok, llama3_tok, name):
    """Meta's Hugging Face templates, rendered as Jinja (what `serve --chat-template FILE.jinja` does)."""
    assert encode_dialog(llama3_tok, HF_LLAMA3_CHAT_TEMPLATE, OV_DIALOGS[name]) == OV_LLAMA3[name]
    assert encode_dialog(llama2_tok, HF_LLAMA2_CHAT_TEMPLATE, OV_DIALOGS[name]) == OV_LLAMA2[name]


def test_a_jinja_template_that_refuses_the_conversation_says_so(llama2_tok):
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    with pytest.raises(ValueError, match="refused the conversation: no system turns"):
        encode_dialog(llama2_tok, no_system, [SYSTEM, HELLO])
    with pytest.raises(ValueError, match="not valid Jinja"):
        encode_dialog(llama2_tok, "{% for m in messages %}", [HELLO])


@pytest.fixture(scope="module")
def hf_llama2(llama2_tokenizer_file):
    transformers = pytest.importorskip("transformers")
    # transformers' SentencePiece-backed tokenizer: its converted `LlamaTokenizer` splits runs of spaces
    # differently from SentencePiece (and so from Meta's encode).
    hf = transformers.SentencePieceBackend(
        vocab_file=str(llama2_tokenizer_file),
        legacy=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    hf.chat_template = HF_LLAMA2_CHAT_TEMPLATE

    def apply(messages):
        out = hf.apply_chat_template(messages, tokenize=True, add_special_tokens=False)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    # The reference must itself reproduce the published ids before it is trusted.
    assert apply(OV_DIALOGS["multi_turn"]) == OV_LLAMA2["multi_turn"]
    return apply


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "  Write a haiku about JAX.\n"}],
        [
            {"role": "system", "content": "  Answer in French.\nBe brief.  "},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": " Quatre. \n"},
            {"role": "user", "content": "Et 3 × 3 ? Réponds en chiffres 🙂"},
        ],
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "[INST] nested tags stay text [/INST]"},
        ],
    ],
    ids=["single", "system-multi-turn", "long"],
)
def test_llama2_matches_hf_chat_template(llama2_tok, hf_llama2, messages):
    assert encode_dialog(llama2_tok, "llama2", messages) == hf_llama2(messages)


@pytest.mark.parametrize(
    "roles",
    [
        [],
        ["system"],
        ["assistant"],
        ["user", "user"],
        ["user", "assistant"],
        ["user", "system", "user"],
        ["system", "system", "user"],
        ["user", "tool"],
    ],
)
def test_invalid_role_order_raises(llama2_tok, roles):
    with pytest.raises(ValueError, match="chat"):
        encode_dialog(llama2_tok, "llama2", [{"role": role, "content": "x"} for role in roles])


def test_bad_arguments_raise(llama2_tok):
    with pytest.raises(ValueError, match="unknown chat template"):
        encode_dialog(llama2_tok, "chatml", [HELLO])
    with pytest.raises(ValueError, match="Llama 3 tokenizer"):
        encode_dialog(llama2_tok, "llama3", [HELLO])
    with pytest.raises(ValueError, match="content"):
        encode_dialog(llama2_tok, "llama2", [{"role": "user", "content": None}])


def test_detect_chat_template(llama2_tok, llama3_tok):
    assert detect_chat_template(llama2_tok, HF_LLAMA2_CHAT_TEMPLATE) == "llama2"
    assert detect_chat_template(llama2_tok, HF_LLAMA3_CHAT_TEMPLATE) == "llama3"
    assert detect_chat_template(llama3_tok) == "llama3"
    assert detect_chat_template(llama2_tok) is None  # LLaMA 1 and base Llama 2 share this tokenizer
    assert detect_chat_template(llama2_tok, "{{ messages }}") is None

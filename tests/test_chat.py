"""Chat rendering: token for token transformers' apply_chat_template on DeepSeek's released templates,
the answers' loss mask, DeepSeek's format for the byte tokenizer, and the errors that name the problem."""

import json
import pathlib

import numpy as np
import pytest

from dsmoe_jax import chat
from dsmoe_jax.errors import DataError
from dsmoe_jax.tokenizer import ByteTokenizer, HFTokenizer

TEMPLATES = pathlib.Path(__file__).parent / "data" / "chat_templates"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
# What each template writes for an answer after its generation prompt: V1/V2 prompt with "Assistant:" and
# write "Assistant: " + content, so the answer the model writes starts with the space.
ANSWER = {"deepseek-moe-16b-chat": " {}" + EOS, "DeepSeek-V2-Lite-Chat": " {}" + EOS, "DeepSeek-V3": "{}" + EOS,
          "DeepSeek-R1-Distill-Llama-8B": "{}" + EOS}

_user = lambda text: {"role": "user", "content": text}
_assistant = lambda text: {"role": "assistant", "content": text}
CONVERSATIONS = {
    "single turn": [_user("What is a mixture of experts?"), _assistant("A layer routing each token to a few FFNs.")],
    "multi-turn": [_user("Hi"), _assistant("Hello! How can I help?"), _user("Name a prime, then café in French."),
                   _assistant("7.\nCafé: café, 咖啡.")],
    "system prompt": [{"role": "system", "content": "You are terse."}, _user("2+2?"), _assistant("4"),
                      _user("And 3+3?"), _assistant("  6  ")],
    "awaiting an answer": [{"role": "system", "content": "Be kind."}, _user("Tell me a joke.")],
}


def _tokenizer_dir(root: pathlib.Path, name: str, template, **config) -> pathlib.Path:
    """A directory as a released model ships its tokenizer: tokenizer.json (a small byte-level BPE with
    DeepSeek's special tokens) and tokenizer_config.json with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = root / name
    out.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(m["content"] for m in c) for c in CONVERSATIONS.values()] + ["User: Assistant: \n\n"]
    tok.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast", **config}
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("released")
    return {path.stem: _tokenizer_dir(root, path.stem, path.read_text(encoding="utf-8"))
            for path in sorted(TEMPLATES.glob("*.jinja"))}


def _transformers_ids(directory: pathlib.Path, messages, add_generation_prompt: bool) -> list[int]:
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out) if isinstance(out, list) else list(out["input_ids"])  # a list, or a BatchEncoding (v5)


def _runs(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The ids of each run of masked-in tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [ids[a:b] for a, b in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize("template", sorted(ANSWER))
def test_released_templates_give_transformers_ids_and_mask_the_answers(released, template):
    directory = released[template]
    tok = HFTokenizer(directory / "tokenizer.json")
    assert set(released) == set(ANSWER), f"templates in {TEMPLATES}: {sorted(released)}"
    for name, messages in CONVERSATIONS.items():
        for generation_prompt in (False, True):
            out = chat.render_chat(messages, tok, add_generation_prompt=generation_prompt)
            expected = _transformers_ids(directory, messages, generation_prompt)
            assert out.ids.tolist() == expected, f"{template}, {name}, add_generation_prompt={generation_prompt}"
            assert out.ids.dtype == np.int32 and out.loss_mask.dtype == np.uint8 and len(out.loss_mask) == len(out.ids)
            answers = [tok._tok.decode(r.tolist(), skip_special_tokens=False) for r in _runs(out.ids, out.loss_mask)]
            wanted = [ANSWER[template].format(m["content"]) for m in messages if m["role"] == "assistant"]
            assert answers == wanted, f"{template}, {name}: the masked-in tokens are exactly the answers"
            assert out.text.startswith(BOS) and tok.encode(out.text) == expected


def test_a_template_that_drops_reasoning_masks_what_it_writes(released):
    """R1's template drops the reasoning before </think> from every answer: the ids are transformers',
    and the mask covers the answer as written."""
    directory = released["DeepSeek-R1-Distill-Llama-8B"]
    messages = [_user("Is 7 prime?"), _assistant("<think>7 has no divisor but 1 and 7.</think>Yes."), _user("9?"),
                _assistant("<think>3 x 3</think>No.")]
    tok = HFTokenizer(directory / "tokenizer.json")
    out = chat.render_chat(messages, tok)
    assert out.ids.tolist() == _transformers_ids(directory, messages, False)
    assert [tok._tok.decode(r.tolist(), skip_special_tokens=False) for r in _runs(out.ids, out.loss_mask)] == \
        ["Yes." + EOS, "No." + EOS]


def test_the_byte_tokenizer_writes_deepseeks_format_with_its_own_bos_and_eos():
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "Be terse."}, _user("Hi"), _assistant("Hello"), _user("Bye"),
                _assistant("Bye!")]
    out = chat.render_chat(messages, tok)
    b = lambda text: list(text.encode())
    # BOS, system content + "\n\n", "User: " + content + "\n\n", "Assistant:" (prompt) + " " + content + EOS (answer)
    pieces = [([256], 0), (b("Be terse.\n\n"), 0), (b("User: Hi\n\n"), 0), (b("Assistant:"), 0), (b(" Hello"), 1),
              ([257], 1), (b("User: Bye\n\n"), 0), (b("Assistant:"), 0), (b(" Bye!"), 1), ([257], 1)]
    assert out.ids.tolist() == [i for ids, _ in pieces for i in ids]
    assert out.loss_mask.tolist() == [m for ids, m in pieces for _ in ids]
    assert out.text is None
    prompt = chat.render_chat(messages[:4], tok, add_generation_prompt=True)
    assert prompt.ids.tolist() == out.ids[:len(prompt.ids)].tolist(), "the prompt for an answer is what precedes it"
    assert prompt.loss_mask.tolist() == out.loss_mask[:len(prompt.ids)].tolist() and bytes(prompt.ids[-10:].tolist()) \
        == b"Assistant:" and not prompt.loss_mask[-10:].any()


def test_prompt_completion_is_a_user_turn_then_an_assistant_turn(released):
    for tok in (ByteTokenizer(), HFTokenizer(released["DeepSeek-V3"] / "tokenizer.json")):
        a = chat.render_prompt_completion("2+2?", "4", tok)
        b = chat.render_chat([_user("2+2?"), _assistant("4")], tok)
        assert a.ids.tolist() == b.ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


def test_where_the_template_is_found(tmp_path, released):
    """chat_template.jinja beside tokenizer.json wins over the config's entry (as transformers reads
    them); a list of named templates gives its "default"."""
    v1, v3 = ((TEMPLATES / f"{n}.jinja").read_text(encoding="utf-8") for n in ("deepseek-moe-16b-chat", "DeepSeek-V3"))
    messages = CONVERSATIONS["multi-turn"]
    beside = _tokenizer_dir(tmp_path, "beside", v1)
    (beside / chat.TEMPLATE_FILE).write_text(v3, encoding="utf-8")
    out = chat.render_chat(messages, HFTokenizer(beside / "tokenizer.json"))
    assert out.ids.tolist() == _transformers_ids(beside, messages, False) and "<｜User｜>" in out.text
    named = _tokenizer_dir(tmp_path, "named", [{"name": "tool_use", "template": v3},
                                               {"name": "default", "template": v1}])
    assert chat.render_chat(messages, HFTokenizer(named / "tokenizer.json")).text.startswith(BOS + "User: Hi")
    # an edited tokenizer_config.json is read again
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = v3
    (named / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False) + " ")
    assert "<｜User｜>" in chat.render_chat(messages, HFTokenizer(named / "tokenizer.json")).text


@pytest.mark.parametrize("messages, options, message", [
    ([_user("Hi")], {"require_assistant": True}, r"the conversation has no assistant message, so nothing to train on"),
    ([_user("Hi"), {"role": "tool", "content": "4"}], {}, r"message 1 has the role 'tool'; the roles are system, user"),
    ([_user("Hi"), {"role": "assistant", "content": None}], {}, r"message 1 \(assistant\) has no string 'content'"),
    ([_user("Hi"), "Hello"], {}, r"message 1 is a str, not an object with 'role' and 'content'"),
    ([], {}, r"a conversation is a non-empty list"),
])
@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_bad_conversations_are_named(released, messages, options, message, tokenizer):
    tok = ByteTokenizer() if tokenizer == "byte" else HFTokenizer(released["DeepSeek-V3"] / "tokenizer.json")
    with pytest.raises(DataError, match=message):
        chat.render_chat(messages, tok, **options)
    assert chat.render_chat([_user("Hi")], tok, add_generation_prompt=True).loss_mask.sum() == 0, \
        "chat at inference has no answer yet"


@pytest.mark.parametrize("template, message", [
    (None, r"the tokenizer .*tokenizer.json has no chat template: no 'chat_template' in .*tokenizer_config.json and no "
           r".*chat_template.jinja; add the model's template as 'chat_template' to tokenizer_config.json"),
    ("{% for m in messages %}{{ raise_exception('Conversation roles must alternate') }}{% endfor %}",
     r"the chat template in .*tokenizer_config.json fails on this conversation: TemplateError: Conversation roles "
     r"must alternate"),
    ("{% for m in messages %}{{ m.content }}", r"tokenizer_config.json is not valid Jinja \(line 1: Unexpected end"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}",
     r"does not write assistant message 1 after the generation prompt it writes for the messages before it"),
    ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[answer]{% else %}{{ m.content }}"
     "{% endif %}{% endfor %}", r"writes messages 0..1 otherwise when later messages follow \(it rewrites earlier"),
])
def test_templates_that_cannot_be_used_are_named(tmp_path, template, message):
    tok = HFTokenizer(_tokenizer_dir(tmp_path, "tok", template) / "tokenizer.json")
    with pytest.raises(DataError, match=message):
        chat.render_chat([_user("Hi"), _assistant("Hello"), _user("Bye"), _assistant("Bye!")], tok)

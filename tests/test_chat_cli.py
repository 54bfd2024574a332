"""Talking to a model: ``dsmoe-jax chat`` and ``generate --chat`` (``chat_session.py``): each answer is
the greedy decode of the whole conversation in the chat format, answers are kept in it, Ctrl-C ends an
answer and not the session, and a conversation too long for the model loses its oldest turns."""

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import chat_session, cli, inference, load_config, loading
from dsmoe_jax.errors import InputError
from dsmoe_jax.loading import LoadedModel
from dsmoe_jax.tokenizer import ByteTokenizer, HFTokenizer

SYSTEM = "Be brief."
N = 6  # new tokens per answer


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    """A one-block tiny model with fresh weights and the byte tokenizer."""
    cfg = load_config("tiny", ["model.n_layers=1"])
    return LoadedModel(dsmoe_jax.init_params(cfg, jax.random.key(0)), cfg, ByteTokenizer())


@pytest.fixture
def checkpoint(model, tmp_path, monkeypatch):
    """A checkpoint directory that loads as ``model`` (these tests are about the conversation, not reading)."""
    monkeypatch.setattr(loading, "load_checkpoint", lambda directory, step=None: (model.params, model.cfg))
    return str(tmp_path)


@pytest.fixture
def prompts(monkeypatch):
    """The prompts ``inference.stream`` is asked to continue, in order."""
    seen, real = [], inference.stream

    def recording(params, prompt_ids, *args, **kwargs):
        seen.append([int(i) for i in prompt_ids])
        return real(params, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(inference, "stream", recording)
    return seen


def _greedy(model: LoadedModel, messages) -> tuple[list[int], str]:
    """The conversation's prompt and its greedy answer, by ``generate`` (all on device), cut at EOS and
    without the space that DeepSeek's format writes after ``Assistant:``."""
    ids = dsmoe_jax.render_chat(messages, model.tokenizer, add_generation_prompt=True).ids
    fn = jax.jit(dsmoe_jax.generate, static_argnames=("cfg", "max_new_tokens", "temperature", "eos"))
    out = np.asarray(fn(model.params, jnp.asarray(ids)[None], cfg=model.cfg.model, max_new_tokens=N,
                        rng=jax.random.key(0), temperature=0.0, eos=model.tokenizer.eos_id))[0].tolist()
    out = out[:out.index(model.tokenizer.eos_id)] if model.tokenizer.eos_id in out else out
    text = model.tokenizer.decode(out)
    return ids.tolist(), text[1:] if text.startswith(" ") else text


def test_chat_answers_each_line_with_the_whole_conversation_and_generate_chat_agrees(model, checkpoint, prompts,
                                                                                  monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\n  \nwhat next?\n"))
    options = ["--checkpoint", checkpoint, "--system", SYSTEM, "--max-new-tokens", str(N), "--temperature", "0"]
    assert cli.main(["chat", *options]) == 0
    out, err = capsys.readouterr()
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}]
    first_prompt, first = _greedy(model, conversation)
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "what next?"}]
    second_prompt, second = _greedy(model, conversation)
    assert out == f"{first}\n\n{second}\n\n", (out, first, second)
    assert not err, "no notes: nothing was dropped or interrupted"
    assert prompts[-2:] == [first_prompt, second_prompt], "two turns; blank lines are skipped"
    assert bytes(first_prompt[1:]).startswith(SYSTEM.encode()), "the system prompt leads the rendered prompt"
    kept = list(f" {first}".encode()) + [model.tokenizer.eos_id]
    assert second_prompt[:len(first_prompt)] == first_prompt and \
        second_prompt[len(first_prompt):len(first_prompt) + len(kept)] == kept, \
        "the second prompt is the first, the first answer and its EOS, then the second turn"

    assert cli.main(["generate", *options, "--prompt", "hello there", "--chat"]) == 0
    assert capsys.readouterr().out == f"{first}\n", "generate --chat is the chat's first answer"


def test_generate_refuses_system_without_chat(checkpoint, capsys):
    assert cli.main(["generate", "--checkpoint", checkpoint, "--prompt", "hi", "--system", SYSTEM]) == 2
    assert "--system: only with --chat" in capsys.readouterr().err


def test_chat_refuses_bad_options_before_the_first_turn(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert cli.main(["chat", "--checkpoint", checkpoint, "--top-p", "0"]) == 2
    out, err = capsys.readouterr()
    assert not out and "top_p must be in (0, 1]" in err and err.count("\n") == 1, err


def _fake_stream(answers, interrupt_after=None):
    """An ``inference.stream`` that yields each answer's bytes in turn; with ``interrupt_after``, the first
    answer raises KeyboardInterrupt (Ctrl-C) after that many tokens."""
    calls = []

    def stream(params, prompt_ids, cfg, max_new_tokens, *args, **kwargs):
        calls.append(([int(i) for i in prompt_ids], max_new_tokens))

        def tokens():
            answer = list(answers[len(calls) - 2].encode())  # call 0 is the session's check of its options
            for i, token in enumerate(answer[:max_new_tokens]):
                if interrupt_after is not None and len(calls) == 2 and i == interrupt_after:
                    raise KeyboardInterrupt
                yield token
        return tokens()

    stream.calls = calls
    return stream


def test_ctrl_c_ends_the_answer_and_keeps_it_not_the_session(model, monkeypatch):
    stream = _fake_stream([" Hello world", " Fine."], interrupt_after=3)
    monkeypatch.setattr(inference, "stream", stream)
    notes, out = io.StringIO(), io.StringIO()
    session = chat_session.ChatSession(model, max_new_tokens=N, temperature=0, notes=notes)
    chat_session.run(session, io.StringIO("hi\nhow?\n"), out)
    assert out.getvalue() == "He\n\nFine.\n\n", "the first answer stops after 3 tokens (' He'); the next one comes"
    assert session.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "He"},
                                {"role": "user", "content": "how?"}, {"role": "assistant", "content": "Fine."}]
    assert "interrupted: the answer's first 3 tokens are kept" in notes.getvalue()
    kept = list(b"Assistant: He") + [model.tokenizer.eos_id]
    second = stream.calls[2][0]
    assert any(second[i:i + len(kept)] == kept for i in range(len(second))), "the cut answer, then EOS"


def test_ctrl_c_or_ctrl_d_at_the_prompt_ends_the_session(model, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for ending in (EOFError, KeyboardInterrupt):
        def ask(prompt, ending=ending):
            raise ending

        monkeypatch.setattr("builtins.input", ask)
        out = io.StringIO()
        chat_session.run(chat_session.ChatSession(model, max_new_tokens=N, notes=io.StringIO()), Terminal(), out)
        assert out.getvalue() == "\n", ending


def test_a_long_conversation_drops_its_oldest_turns_and_keeps_the_system_prompt(monkeypatch):
    cfg = load_config("tiny", ["model.n_layers=1", "model.max_seq_len=80", "train.seq_len=64"])
    model = LoadedModel(None, cfg, ByteTokenizer())
    stream = _fake_stream([" one", " two", " three"])
    monkeypatch.setattr(inference, "stream", stream)
    notes, out = io.StringIO(), io.StringIO()
    session = chat_session.ChatSession(model, system="Sys.", max_new_tokens=8, temperature=0, notes=notes)
    lines = ["a" * 20, "b" * 20, "c" * 20]
    chat_session.run(session, io.StringIO("\n".join(lines) + "\n"), out)
    assert out.getvalue() == "one\n\ntwo\n\nthree\n\n"
    prompt, room = stream.calls[-1]
    assert len(prompt) + room <= 80 and room == 8, (len(prompt), room)
    assert [m["content"] for m in session.messages] == ["Sys.", "c" * 20, "three"]
    assert notes.getvalue().count("dropped its oldest 2 messages") == 2, notes.getvalue()

    with pytest.raises(InputError, match="shorten it"):
        session.reply("d" * 100, io.StringIO())
    assert session.messages[-1]["content"] == "three", "a message that cannot fit is not kept"


def test_text_is_printed_when_its_characters_are_whole():
    text = chat_session.TextStream(ByteTokenizer(), lead=" ")
    pieces = [text.push(b) for b in " é€!".encode()]
    assert pieces == ["", "", "é", "", "", "€", "!"], pieces
    assert text.flush() == "" and text.text() == "é€!"
    cut = chat_session.TextStream(ByteTokenizer())
    assert [cut.push(b) for b in "é".encode()[:1]] == [""] and cut.flush() == "\ufffd", "an unfinished end is shown"


def test_the_answer_lead_is_what_the_template_writes_before_an_answer(tmp_path):
    from test_chat import TEMPLATES, _tokenizer_dir

    messages = [{"role": "user", "content": "Hi"}]
    for name, lead in (("deepseek-moe-16b-chat", " "), ("DeepSeek-V3", "")):
        tok = HFTokenizer(_tokenizer_dir(tmp_path, name, (TEMPLATES / f"{name}.jinja").read_text()) / "tokenizer.json")
        prompt = dsmoe_jax.render_chat(messages, tok, add_generation_prompt=True)
        assert chat_session.answer_lead(messages, tok, prompt.text) == lead, name
    tok = ByteTokenizer()
    prompt = dsmoe_jax.render_chat(messages, tok, add_generation_prompt=True)
    assert chat_session.answer_lead(messages, tok, tok.decode(prompt.ids)) == " "

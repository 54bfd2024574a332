"""Talking to a model: ``dsmoe-jax chat`` and ``generate --chat``.

    session = ChatSession(load_model("runs/sft"), system="Be brief.", temperature=0)
    reply = session.reply("What is a mixture of experts?")   # printed as it is decoded
    run(session)                                              # the command's loop over standard input

Each turn renders the whole conversation with the tokenizer's chat template (``chat.render_chat``,
with the generation prompt), streams the answer (``inference.stream``) until the end-of-sentence
token, and keeps it as the assistant's message. A conversation that no longer fits the model's
``max_seq_len`` with room for the answer loses its oldest turns (the system prompt stays).
"""

from __future__ import annotations

import sys
from typing import NamedTuple, TextIO

import jax

from dsmoe_jax import inference
from dsmoe_jax.chat import render_chat
from dsmoe_jax.errors import InputError
from dsmoe_jax.loading import LoadedModel
from dsmoe_jax.tokenizer import Tokenizer

PROMPT = ">>> "  # what a terminal shows before each user turn
_MARK = "\x00dsmoe-jax answer\x00"  # stands for an answer's content when finding the text written before it


class TextStream:
    """Tokens in, text to print out: each token's new text as soon as it is whole. A token may end
    inside a character (bytes, byte-level BPE), which decodes as U+FFFD until its last byte comes,
    so a trailing U+FFFD waits for the next token. ``lead``: text the answer starts with that is not
    shown (the space of DeepSeek's ``Assistant: answer``)."""

    def __init__(self, tokenizer: Tokenizer, lead: str = ""):
        self.tokenizer, self.lead = tokenizer, lead
        self.ids: list[int] = []
        self.shown = ""

    def text(self, final: bool = True) -> str:
        """The text of the tokens so far, without the lead; ``final=False``: without an unfinished character."""
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.lead):
            return text[len(self.lead):]
        return "" if self.lead.startswith(text) and not final else text

    def push(self, token: int) -> str:
        """Add a token; the text it completes."""
        self.ids.append(int(token))
        return self._advance(self.text(final=False))

    def flush(self) -> str:
        """The text not shown yet, unfinished characters included (the stream has ended)."""
        return self._advance(self.text())

    def _advance(self, text: str) -> str:
        new = text[len(self.shown):]
        self.shown = text if len(text) >= len(self.shown) else self.shown
        return new


class Reply(NamedTuple):
    text: str  # the answer as kept in the conversation (no EOS, no lead)
    tokens: int  # tokens generated
    interrupted: bool  # Ctrl-C ended it


def answer_lead(messages: list[dict], tokenizer: Tokenizer, prompt_text: str) -> str:
    """The text the chat format writes between the generation prompt and an answer's content (DeepSeek
    V1/V2: the space of ``Assistant: ``): the model writes it first, and the kept answer leaves it out,
    so that the conversation renders again as the model saw it. Empty when the format does not write
    the prompt again before an answer."""
    turn = render_chat([*messages, {"role": "assistant", "content": _MARK}], tokenizer)
    text = turn.text if turn.text is not None else tokenizer.decode(turn.ids)
    if not text.startswith(prompt_text) or _MARK not in text[len(prompt_text):]:
        return ""
    return text[len(prompt_text):text.index(_MARK, len(prompt_text))]


class ChatSession:
    """A conversation with a model (module docstring); ``messages`` holds it, system prompt first."""

    def __init__(self, model: LoadedModel, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 notes: TextIO | None = None):
        self.model = model
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.rng = jax.random.key(seed)
        self.notes = notes  # where notes go (dropped turns, interruptions); None: standard error
        # stream checks its settings when called and runs nothing until iterated: bad options stop the
        # session here, before the first prompt
        inference.stream(model.params, [0], model.cfg, max_new_tokens, self.rng, temperature, top_k, top_p,
                         eos=model.tokenizer.eos_id).close()

    def note(self, text: str) -> None:
        """A message for the person chatting, on standard error (not part of any answer)."""
        print(f"dsmoe-jax chat: {text}", file=self.notes or sys.stderr, flush=True)

    def prompt(self) -> tuple[list[int], int, str]:
        """The conversation as the prompt for the next answer, the new tokens it leaves room for, and the
        answer's lead (``answer_lead``). Drops the oldest turns, never the system prompt or the last
        message, until the prompt and ``max_new_tokens`` fit ``max_seq_len``; refuses (``InputError``)
        a last message that leaves no room for any answer, and then drops nothing."""
        limit, tok = self.model.cfg.model.max_seq_len, self.model.tokenizer
        messages = list(self.messages)
        first = 1 if messages[0]["role"] == "system" else 0
        while True:
            rendered = render_chat(messages, tok, add_generation_prompt=True)
            if len(rendered.ids) + self.max_new_tokens <= limit or len(messages) - first <= 1:
                break
            # one exchange at a time: the oldest message and those after it up to the next user turn
            del messages[first]
            while messages[first]["role"] != "user":
                del messages[first]
        room = min(self.max_new_tokens, limit - len(rendered.ids))
        if room < 1:
            raise InputError(f"the message makes a prompt of {len(rendered.ids)} tokens, and the model takes at most "
                             f"{limit - 1} before its answer; shorten it")
        if len(messages) < len(self.messages):
            self.note(f"the conversation is longer than the model's {limit} tokens with {self.max_new_tokens} for "
                      f"the answer: dropped its oldest {len(self.messages) - len(messages)} messages")
            self.messages = messages
        if room < self.max_new_tokens:
            self.note(f"this answer can be at most {room} tokens long (the model's max_seq_len is {limit})")
        text = rendered.text if rendered.text is not None else tok.decode(rendered.ids)
        return [int(i) for i in rendered.ids], room, answer_lead(messages, tok, text)

    def reply(self, text: str, out: TextIO | None = None) -> Reply:
        """Add a user message, print the answer to ``out`` (standard output) token by token, and add it to
        the conversation. Ctrl-C ends the answer, not the session: what was generated is kept. A message
        that cannot fit is left out of the conversation (``InputError``)."""
        out = out or sys.stdout
        self.messages.append({"role": "user", "content": text})
        try:
            ids, room, lead = self.prompt()
        except InputError:
            self.messages.pop()
            raise
        self.rng, rng = jax.random.split(self.rng)
        tok = self.model.tokenizer
        shown = TextStream(tok, lead)
        interrupted = False
        tokens = inference.stream(self.model.params, ids, self.model.cfg, room, rng, self.temperature, self.top_k,
                                  self.top_p, eos=tok.eos_id)
        try:
            for token in tokens:
                out.write(shown.push(token))
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            tokens.close()
        out.write(shown.flush())
        out.flush()
        answer = shown.text()
        self.messages.append({"role": "assistant", "content": answer})
        return Reply(answer, len(shown.ids), interrupted)


def run(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """The ``chat`` command's loop: a user turn per line of ``stdin`` (standard input; blank lines are
    skipped), each answer printed as it comes and followed by a blank line. On a terminal each turn is
    asked for with a prompt; Ctrl-C or Ctrl-D there ends the session."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    terminal = stdin.isatty()
    if terminal:
        try:
            import readline  # noqa: F401 - input() then edits lines and keeps their history
        except ImportError:  # not on every platform
            pass
        session.note("Ctrl-C stops an answer; Ctrl-D (or Ctrl-C here) ends the session")
    while True:
        try:
            line = input(PROMPT) if terminal else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if terminal:
                out.write("\n")
            return
        if not terminal and not line:  # end of input
            return
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            reply = session.reply(text, out)
        except InputError as e:
            session.note(str(e))
            continue
        out.write("\n\n")
        out.flush()
        if reply.interrupted:
            session.note(f"interrupted: the answer's first {reply.tokens} tokens are kept")

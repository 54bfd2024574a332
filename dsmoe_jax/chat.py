"""Conversations -> token ids and a loss mask: supervised fine-tuning data (the DeepSeekMoE paper's
section 6: the released chat models were trained only on their answers) and chat prompts.

An HF tokenizer renders with the chat template that ships beside its ``tokenizer.json``
(``chat_template`` in ``tokenizer_config.json``, or ``chat_template.jinja``) exactly as
``transformers``' ``apply_chat_template`` does (the same sandboxed Jinja environment and variables),
then tokenizes the whole text at once with special tokens recognised where the template writes
them as text. The byte tokenizer has no template file; it writes DeepSeek's chat format
(``DEEPSEEK_FORMAT``) with its own BOS and EOS ids.

The loss mask is 1 on each assistant turn's answer: what the template writes for that message after
the generation prompt it writes for the conversation before it (the content, the EOS after it, and
for DeepSeek's V1/V2 format the space after ``Assistant:``), 0 on everything else (BOS, system and
user turns, role headers). The spans are found without knowing the template: for assistant message
``i``, ``messages[:i]`` rendered with the generation prompt must be a prefix of ``messages[:i + 1]``
rendered without it, and the answer is the text between. Where this is an approximation:

- the mask is over the answer as the template writes it: a template that rewrites an answer (as
  DeepSeek-R1's drops the reasoning before ``</think>``) masks in the rewritten text, which is also
  what the tokens hold;
- a token is masked in only when its characters lie wholly inside an answer, so a token that merges
  the end of the prompt with the start of the answer is left out (the released templates end the
  prompt with a special token or ``:``, which byte-level BPE pre-tokenizers split from the text after);
- a template whose turn does not repeat the generation prompt in full (a prompt of
  ``<｜Assistant｜><think>\\n`` before an answer written as ``<｜Assistant｜>answer``), or that rewrites
  earlier turns when later ones follow, has no such spans: ``DataError`` names it.

A template that writes today's date (``strftime_now``) renders differently from day to day; DeepSeek's
do not.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from dsmoe_jax.errors import DataError
from dsmoe_jax.tokenizer import TOKENIZER_CONFIG, HFTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save the template, beside tokenizer.json
# The tokenizer_config.json entries transformers passes to a template (its special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# DeepSeek's chat format (the template of deepseek-moe-16b-chat and DeepSeek-V2-Chat), for a tokenizer
# without a template file: BOS, then each message as role: (text before its content, text after it),
# an assistant turn then ending with EOS; DEEPSEEK_GENERATION_PROMPT is what an answer follows, the
# start of the assistant's text before its content.
DEEPSEEK_FORMAT = {
    "system": ("", "\n\n"),
    "user": ("User: ", "\n\n"),
    "assistant": ("Assistant: ", ""),
}
DEEPSEEK_GENERATION_PROMPT = "Assistant:"


class RenderedChat(NamedTuple):
    ids: np.ndarray  # [tokens] int32
    loss_mask: np.ndarray  # [tokens] uint8: 1 where the token is a training target (an answer's)
    text: str | None  # the rendered conversation; None for a tokenizer without a template (bytes)


def render_chat(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool = False,
                require_assistant: bool = False) -> RenderedChat:
    """Token ids of a conversation (``[{"role": "system" | "user" | "assistant", "content": str}, ...]``)
    in the tokenizer's chat format, and the mask of its answers' tokens (module docstring).
    ``add_generation_prompt``: end with the prompt for the next answer (chat at inference);
    ``require_assistant``: refuse a conversation without an answer (training data)."""
    messages = _check(messages, require_assistant)
    if isinstance(tokenizer, HFTokenizer):
        return _render_template(messages, tokenizer, add_generation_prompt)
    return _render_format(messages, tokenizer, add_generation_prompt)


def render_prompt_completion(prompt: str, completion: str, tokenizer: Tokenizer) -> RenderedChat:
    """A ``{"prompt", "completion"}`` record as a conversation: a user turn and an assistant turn."""
    return render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenizer,
                       require_assistant=True)


def _check(messages, require_assistant: bool) -> list[dict]:
    """The messages as plain ``{"role", "content"}`` dicts (other keys are not passed on)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"a conversation is a non-empty list of {{'role', 'content'}} messages, not {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"message {i} is a {type(message).__name__}, not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"message {i} has the role {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"message {i} ({role}) has no string 'content' (it holds {type(content).__name__})")
        out.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"the conversation has no assistant message, so nothing to train on (roles: "
                        f"{', '.join(m['role'] for m in out)})")
    return out


# ---- tokenizers without a template: DeepSeek's format, written as token ids ------------------------


def _render_format(messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool) -> RenderedChat:
    # Each piece is encoded on its own and the answer apart from the generation prompt, so the prompt's
    # tokens are those the model sees at inference whatever the tokenizer; for bytes it is one encoding.
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise DataError("DeepSeek's chat format needs a tokenizer with BOS and EOS ids")
    ids, mask = [[tokenizer.bos_id]], [[0]]

    def write(text: str, target: int) -> None:
        piece = np.asarray(tokenizer.encode(text), np.int32)
        ids.append(piece)
        mask.append(np.full(len(piece), target))

    for message in messages:
        before, after = DEEPSEEK_FORMAT[message["role"]]
        if message["role"] == "assistant":
            write(DEEPSEEK_GENERATION_PROMPT, 0)
            write(before[len(DEEPSEEK_GENERATION_PROMPT):] + message["content"] + after, 1)
            ids.append([tokenizer.eos_id])
            mask.append([1])
        else:
            write(before + message["content"] + after, 0)
    if add_generation_prompt:
        write(DEEPSEEK_GENERATION_PROMPT, 0)
    return RenderedChat(np.concatenate(ids).astype(np.int32), np.concatenate(mask).astype(np.uint8), None)


# ---- HF tokenizers: the chat template ------------------------------------------------------------


class _Generation(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (its own marker of assistant text):
    rendered as its body, so templates that use it render here too."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: json.dumps, not Jinja's own tojson, which escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """The template in transformers' environment: sandboxed (templates come with downloaded models),
    trim_blocks and lstrip_blocks, loop controls, its ``tojson``, ``raise_exception`` and ``strftime_now``."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)


class _Template(NamedTuple):
    source: str  # the file it was read from, for messages
    text: str
    variables: dict  # bos_token, eos_token, ... as the template sees them

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            compiled = _compile(self.text)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"the chat template in {self.source} is not valid Jinja (line {e.lineno}: {e.message}); "
                            "fix it, or copy the model's own chat_template") from None
        try:
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.variables)
        except Exception as e:  # noqa: BLE001 - a template is a program: it may fail in any way
            raise DataError(f"the chat template in {self.source} fails on this conversation: {type(e).__name__}: "
                            f"{e}") from None


@functools.lru_cache(maxsize=8)
def _read_template(tokenizer_json: str, stamp: tuple) -> _Template:
    """``stamp``: the template files' sizes and times, so an edited file is read again."""
    path = pathlib.Path(tokenizer_json)
    config_path, file_path = path.with_name(TOKENIZER_CONFIG), path.with_name(TEMPLATE_FILE)
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{config_path} is not valid JSON: {e}") from None
    variables = {}
    for key in TEMPLATE_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[key] = value
    # transformers' order: chat_template.jinja, saved by newer versions, wins over the config's entry
    if file_path.is_file():
        return _Template(str(file_path), file_path.read_text(encoding="utf-8"), variables)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name", "template"}, ...]; the default one is used
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise DataError(f"{config_path} names chat templates {', '.join(map(str, named))} but none 'default'; "
                            "name the one to use 'default'")
        template = named["default"]
    if not isinstance(template, str):
        raise DataError(f"the tokenizer {path} has no chat template: no 'chat_template' in {config_path} and no "
                        f"{file_path}; add the model's template as 'chat_template' to {config_path.name} (the chat "
                        "model's own tokenizer_config.json has it)")
    return _Template(str(config_path), template, variables)


def _template(tokenizer: HFTokenizer) -> _Template:
    stamp = []
    for name in (TOKENIZER_CONFIG, TEMPLATE_FILE):
        try:
            stat = os.stat(tokenizer.path.with_name(name))
            stamp.append((name, stat.st_size, stat.st_mtime_ns))
        except FileNotFoundError:
            stamp.append((name, None))
    return _read_template(str(tokenizer.path), tuple(stamp))


def _answer_spans(template: _Template, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """``[start, end)`` in ``text`` of each assistant message's answer (module docstring)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        turn = template.render(messages[:i + 1], add_generation_prompt=False)
        if not turn.startswith(prompt):
            cut = max(len(prompt) - 40, 0)
            raise DataError(f"the chat template in {template.source} does not write assistant message {i} after "
                            f"the generation prompt it writes for the messages before it (the prompt ends "
                            f"{prompt[cut:]!r}, the conversation with the answer has {turn[cut:len(prompt)]!r} "
                            "there), so which tokens are the answer cannot be told; use a template whose assistant "
                            "turns repeat its generation prompt")
        if not text.startswith(turn):
            raise DataError(f"the chat template in {template.source} writes messages 0..{i} otherwise when later "
                            "messages follow (it rewrites earlier turns), so the answers of the whole conversation "
                            "cannot be told from its prefixes; split the conversation into one record per answer")
        spans.append((len(prompt), len(turn)))
    return spans


def _render_template(messages: list[dict], tokenizer: HFTokenizer, add_generation_prompt: bool) -> RenderedChat:
    template = _template(tokenizer)
    text = template.render(messages, add_generation_prompt)
    # HFTokenizer.encode gives ids only; the character offsets come from the tokenizers object it wraps
    encoding = tokenizer._tok.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), np.uint8)
    for start, end in _answer_spans(template, messages, text):
        mask[(offsets[:, 0] >= start) & (offsets[:, 1] <= end)] = 1
    return RenderedChat(ids, mask, text)

"""The system prompt a fine-tune was trained with, carried in its chat template.

When every training example of a run shares one system prompt, the run writes it into the chat
template it saves with the model: a conversation that brings no system message gets that one, and
one that brings its own keeps it. Whatever renders through the template then answers a bare user
message as the model was trained to: `chat`, `serve`, the jobs API, `eval`, a merged export, the
GGUF's template (llama.cpp reads it) and vLLM.

The prompt is a Jinja string literal in a fixed header in front of the model's own template, so it is
read back exactly (`recorded_system_prompt`) and replaced rather than stacked when a tuned model is
tuned again.

    record_system_prompt(tokenizer, "You triage support tickets ...")
    recorded_system_prompt(tokenizer)        # "You triage support tickets ..."
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

from .loading import chat_template

_MARK = "{#- tuneforge: the system prompt this model was fine-tuned with, for conversations that bring none -#}"
_SET = "{%- set tuneforge_system_prompt = "
_APPLY = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{%- set messages = [{'role': 'system', 'content': tuneforge_system_prompt}] + messages -%}"
    "{%- endif -%}"
)
# The JSON string json.dumps writes, which is also a Jinja string literal.
_HEADER = re.compile(re.escape(_MARK + _SET) + r'("(?:[^"\\]|\\.)*")' + re.escape(" -%}" + _APPLY), re.S)


def with_system_prompt(template: str, prompt: str | None) -> str:
    """`template` with `prompt` as the default system prompt (any earlier one replaced); None removes it."""
    body = _HEADER.sub("", template, count=1) if template.startswith(_MARK) else template
    if prompt is None:
        return body
    return f"{_MARK}{_SET}{json.dumps(prompt, ensure_ascii=False)} -%}}{_APPLY}{body}"


def recorded_system_prompt(tokenizer) -> str | None:
    """The system prompt the tokenizer's template adds when a conversation has none, if a run recorded one."""
    match = _HEADER.match(chat_template(tokenizer) or "")
    return json.loads(match.group(1)) if match else None


def record_system_prompt(tokenizer, prompt: str | None) -> None:
    """Make `prompt` the default system prompt of the tokenizer's chat template (None: no recorded one)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        tokenizer.chat_template = {**template, "default": with_system_prompt(template["default"], prompt)}
    elif isinstance(template, str):
        tokenizer.chat_template = with_system_prompt(template, prompt)


@contextmanager
def without_recorded_system_prompt(tokenizer) -> Iterator[None]:
    """The tokenizer's template as the base model had it while the block runs (general questions are
    asked of a tuned model as of its base, not under its task's system prompt)."""
    saved = tokenizer.chat_template
    record_system_prompt(tokenizer, None)
    try:
        yield
    finally:
        tokenizer.chat_template = saved

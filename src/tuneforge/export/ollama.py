"""An Ollama Modelfile beside the GGUF: the file, the chat template in Ollama's Go template
syntax, the default system prompt and the end-of-turn stop.

A Jinja template cannot be translated into Go in general, so this writes the one Go template of
the ChatML family and proves it equivalent instead: the model's own Jinja template must render the
probe conversations exactly as ChatML does (with its default system prompt, if it has one), or
the Modelfile is refused.
"""

from __future__ import annotations

from ..errors import TuneforgeError
from .probe import PROBE_CONVERSATIONS

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"

# Ollama puts the Modelfile's SYSTEM into .Messages when a request has no system message.
_CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}"
    + TURN_START
    + "{{ .Role }}\n{{ .Content }}"
    + TURN_END
    + "\n{{ end }}"
    + TURN_START
    + "assistant\n"
)


def render_chatml(messages: list[dict], default_system: str | None) -> str:
    """What the Go template above writes for `messages`, ready for the assistant to reply."""
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    turns = "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)
    return f"{turns}{TURN_START}assistant\n"


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a conversation brings none."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    opening = f"{TURN_START}system\n"
    if not rendered.startswith(opening):
        return None
    return rendered[len(opening) : rendered.find(TURN_END)]


def modelfile(tokenizer, gguf_name: str) -> str:
    default_system = default_system_prompt(tokenizer)
    for messages in PROBE_CONVERSATIONS:
        expected = render_chatml(list(messages), default_system)
        rendered = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if rendered != expected:
            raise TuneforgeError(
                "--ollama writes ChatML chat templates (<|im_start|>role ... <|im_end|>), and this model's "
                f"template renders differently:\n  template: {rendered!r}\n  ChatML:   {expected!r}\n"
                "Export without --ollama and write the Modelfile's TEMPLATE by hand.",
                code="unsupported_chat_template",
            )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{_CHATML_GO_TEMPLATE}"""']
    if default_system is not None:
        lines.append(f'SYSTEM """{default_system}"""')
    lines.append(f'PARAMETER stop "{TURN_END}"')
    return "\n".join(lines) + "\n"

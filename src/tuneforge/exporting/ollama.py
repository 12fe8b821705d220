"""An Ollama Modelfile beside the GGUF: the file, the chat template in Ollama's Go template syntax,
the default system prompt and the end-of-turn stop.

A Jinja template cannot be translated into Go in general. Each family's turns are written down here
instead (`TurnFormat`), and one Go template is generated from that description; the same
description renders conversations in Python, and the model's own Jinja template must render the
probe conversations exactly so, or the Modelfile is refused. A tokenizer that adds BOS itself has
the runtime add it too (the GGUF says so), so a BOS its Jinja template writes first is not part of
the comparison. The Go template trims no whitespace: every newline in it is one the template writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from ..errors import TuneforgeError
from ..models.loading import chatml_end_of_turn
from ..models.system_prompt import recorded_system_prompt, without_recorded_system_prompt
from .probe import PROBE_CONVERSATIONS


@dataclass(frozen=True)
class TurnFormat:
    """How a family's template writes a conversation."""

    name: str
    turns: dict[str, tuple[str, str]]  # role -> (what opens its turn, what closes it)
    reply: str  # the generation prompt
    # Where the system prompt goes: a turn of its own; the start of the first user message (Gemma);
    # the start of the last message when the user wrote it (Mistral); or a turn always written,
    # after fixed text such as Llama 3's knowledge date ("always").
    system: str = "turn"

    def render(self, messages: list[dict], system: str | None) -> str:
        """What the Go template writes for `messages` (system prompt `system`), ready for the reply."""
        chat = [m for m in messages if m["role"] != "system"]
        out = ""
        if self.system == "always" or (self.system == "turn" and system is not None):
            opening, closing = self.turns["system"]
            out += f"{opening}{system or ''}{closing}"
        for i, message in enumerate(chat):
            opening, closing = self.turns[message["role"]]
            if system and message["role"] == "user" and self._takes_system(i, chat):
                opening += f"{system}\n\n"
            out += f"{opening}{message['content']}{closing}"
        return out + self.reply

    def go_template(self, preamble: str) -> str:
        """The same in Ollama's Go template syntax; `preamble` opens an "always" system turn."""
        out = ""
        if self.system in ("turn", "always"):
            opening, closing = self.turns["system"]
            system = f"{opening}{preamble}{{{{ .System }}}}{closing}"
            out += system if self.system == "always" else f"{{{{ if .System }}}}{system}{{{{ end }}}}"
        if self.system == "first_user":
            out += "{{ $system := .System }}"
        out += "{{ range $i, $_ := .Messages }}"
        for role in ("user", "assistant"):
            opening, closing = self.turns[role]
            content = self._go_system() + "{{ .Content }}" if role == "user" else "{{ .Content }}"
            out += f'{{{{ {"if" if role == "user" else "else if"} eq .Role "{role}" }}}}{opening}{content}{closing}'
        return out + "{{ end }}{{ end }}" + self.reply

    def _takes_system(self, index: int, chat: list[dict]) -> bool:
        first_user = next(i for i, m in enumerate(chat) if m["role"] == "user")
        return (self.system == "first_user" and index == first_user) or (
            self.system == "last_user" and index == len(chat) - 1
        )

    def _go_system(self) -> str:
        if self.system == "first_user":
            return '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
        if self.system == "last_user":
            return "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
        return ""


def _roles(opening: str, closing: str, names: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    names = names or {}
    return {role: (opening.format(names.get(role, role)), closing) for role in ("system", "user", "assistant")}


FORMATS = (
    TurnFormat("ChatML", _roles("<|im_start|>{}\n", "<|im_end|>\n"), "<|im_start|>assistant\n"),
    TurnFormat(
        "Llama 3",
        _roles("<|start_header_id|>{}<|end_header_id|>\n\n", "<|eot_id|>"),
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        system="always",
    ),
    TurnFormat(
        "Gemma",
        _roles("<start_of_turn>{}\n", "<end_of_turn>\n", {"assistant": "model"}),
        "<start_of_turn>model\n",
        system="first_user",
    ),
    TurnFormat(
        "Mistral",
        {"user": ("[INST] ", "[/INST]"), "assistant": (" ", "</s>")},
        "",
        system="last_user",
    ),
    TurnFormat("Phi-3", _roles("<|{}|>\n", "<|end|>\n"), "<|assistant|>\n"),
)


def formats(tokenizer) -> tuple[TurnFormat, ...]:
    """FORMATS, and on a vocabulary without <|im_end|> ChatML with its turns ended by the token tuneforge's
    ChatML ends them with there (`chatml_end_of_turn`: EOS, Llama 3's <|eot_id|>), as a model without a
    template of its own or trained with model.chat_template: chatml has it."""
    end = chatml_end_of_turn(tokenizer)
    if end == "<|im_end|>":
        return FORMATS
    return (*FORMATS, TurnFormat("ChatML", _roles("<|im_start|>{}\n", f"{end}\n"), "<|im_start|>assistant\n"))


def modelfile(tokenizer, gguf_name: str) -> str:
    """The Modelfile for `gguf_name`, in the first format that renders the probes as the model's own
    template does; refused when none does. The system prompt a fine-tune recorded is its SYSTEM line
    (Ollama's default for a request without one), so the format is matched on the template without it."""
    recorded = recorded_system_prompt(tokenizer)
    with without_recorded_system_prompt(tokenizer):
        for turn_format in formats(tokenizer):
            system = _system_text(tokenizer, turn_format)
            if _renders_alike(tokenizer, turn_format, system):
                return _write(turn_format, system, recorded, gguf_name)
        rendered = _render_jinja(tokenizer, list(PROBE_CONVERSATIONS[-1]))
    raise TuneforgeError(
        f"--ollama writes the chat formats {', '.join(f.name for f in FORMATS)}, and this model's template "
        f"renders none of them:\n  template: {rendered!r}\n"
        "Export without --ollama and write the Modelfile's TEMPLATE by hand.",
        code="unsupported_chat_template",
    )


def _write(turn_format: TurnFormat, system: str | None, recorded: str | None, gguf_name: str) -> str:
    always = turn_format.system == "always"
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{turn_format.go_template(system if always else "")}"""']
    default = recorded if recorded is not None else None if always else system
    if default and '"""' in default:
        # A Modelfile's triple-quoted value has no escape: the first `"""` inside would end it.
        raise TuneforgeError(
            f'--ollama: the system prompt holds `"""`, which a Modelfile\'s SYSTEM cannot carry: {default!r}. '
            'Train with a system prompt without `"""`, or export without --ollama and give Ollama the '
            "system prompt with each request.",
            code="unsupported_system_prompt",
        )
    if default:
        lines.append(f'SYSTEM """{default}"""')
    lines.append(f'PARAMETER stop "{turn_format.turns["assistant"][1].strip()}"')
    return "\n".join(lines) + "\n"


def _system_text(tokenizer, turn_format: TurnFormat) -> str | None:
    """The system turn's text when a conversation brings no system prompt: the default system prompt
    a template inserts (ChatML), or the fixed text an "always" system turn holds (Llama 3)."""
    if "system" not in turn_format.turns or turn_format.system not in ("turn", "always"):
        return None
    rendered = _render_jinja(tokenizer, [{"role": "user", "content": "x"}])
    opening, closing = turn_format.turns["system"]
    if rendered is None or not rendered.startswith(opening):
        return None
    return rendered[len(opening) : rendered.find(closing, len(opening))]


def _renders_alike(tokenizer, turn_format: TurnFormat, system: str | None) -> bool:
    """Whether the Jinja template renders every probe it accepts (Gemma 2 refuses system prompts)
    as `turn_format` does, and accepts at least one."""
    compared = 0
    for messages in PROBE_CONVERSATIONS:
        rendered = _render_jinja(tokenizer, list(messages))
        if rendered is None:
            continue
        given = next((m["content"] for m in messages if m["role"] == "system"), None)
        if turn_format.system == "always":
            given = (system or "") + (given or "")
        if rendered != turn_format.render(list(messages), given if given is not None else system):
            return False
        compared += 1
    return compared > 0


def _render_jinja(tokenizer, messages: list[dict]) -> str | None:
    """The model's own rendering, ready for the reply, without a BOS the runtime adds; None if refused."""
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError):
        return None
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    return rendered.removeprefix(tokenizer.bos_token) if adds_bos else rendered

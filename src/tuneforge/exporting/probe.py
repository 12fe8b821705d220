"""The fixed batch every export is checked on, and the figures and bounds of that check.

An export is only as good as its agreement with the model it came from: the same few chat prompts
(rendered with the model's own chat template) run through the model before and after each step
(merging, writing a dtype), and the export refuses to finish when the largest logit difference
is above that step's bound. The figures go into `export.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError

from ..errors import EXIT_RUN_FAILED, TuneforgeError
from ..generate import encode_prompts

# Short, varied turns: a default system prompt, an explicit one, digits and punctuation, and a
# finished assistant reply, so every part of the chat template is on the batch.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 2? Answer briefly."}],
    [
        {"role": "system", "content": "You are a support agent. Reply in JSON."},
        {"role": "user", "content": "My database is down and production is affected, please help!"},
    ],
    [
        {"role": "user", "content": "Hello, how are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "How do I reset my password for the web console?"},
    ],
)

# Largest absolute logit difference each step may cause. Folding LoRA into fp32 weights reorders a
# few sums: 1e-3 is well above that and far below a wrong merge. A written file is compared with
# the fp32 model it was written from: an f32 file agrees to rounding; f16, bf16 and q8_0 bounds
# are about 3x what SmolLM2-135M showed with a LoRA merged in (0.044, 0.54, 1.84). 4- and 5-bit
# weights (4-9% error each) move a small model's logits by units: their bounds are about 1.5x the
# largest difference SmolLM2-135M (with and without a LoRA) and the tiny family models showed
# (q4_0 24.6, q4_1 5.7, q5_0 8.9, q5_1 17.8).
MERGE_BOUND = 1e-3
DTYPE_BOUNDS = {
    "f32": 1e-4,
    "f16": 0.15,
    "bf16": 1.5,
    "q8_0": 5.0,
    "q4_0": 40.0,
    "q4_1": 10.0,
    "q5_0": 15.0,
    "q5_1": 25.0,
}
# One large logit difference can be noise; a changed next token at many positions is damage.
# Every step measured keeps the same next token at 98% of positions or more, the tiny random test
# models (full of near-ties) included, but for the 4- and 5-bit types: they keep it at 70%, 95%,
# 81% and 81% (q4_0, q4_1, q5_0, q5_1) on SmolLM2-135M with a LoRA and down to 35%, 35%, 55% and
# 57% on the tiny family models. Their floors are below those and far above a broken file's (a
# tiny model with one weight matrix scrambled keeps 1%).
MIN_ARGMAX_AGREEMENT = 0.9
DTYPE_MIN_ARGMAX_AGREEMENT = {"q4_0": 0.3, "q4_1": 0.3, "q5_0": 0.45, "q5_1": 0.45}


def min_argmax_agreement(dtype: str) -> float:
    """The least share of positions whose next token a file of `dtype` must keep."""
    return DTYPE_MIN_ARGMAX_AGREEMENT.get(dtype, MIN_ARGMAX_AGREEMENT)


class ExportFailed(TuneforgeError):
    """What was written does not behave like its source; nothing was left at the output path."""

    exit_code = EXIT_RUN_FAILED


@dataclass(frozen=True)
class Agreement:
    max_abs_logit_diff: float
    argmax_agreement: float  # share of positions whose most likely next token is the same
    scores: bool = False  # a sequence classifier's (a reward model's) scores, one per prompt: no next token

    def described(self, bound: float, min_agreement: float | None = None) -> str:
        """The figures, in words: a language model's logits and next tokens, or a classifier's scores."""
        if self.scores:
            return f"largest score difference {self.max_abs_logit_diff:.3g} (bound {bound:g})"
        text = f"largest logit difference {self.max_abs_logit_diff:.3g} (bound {bound:g})"
        if min_agreement is None:
            return text
        return f"{text}, same next token at {self.argmax_agreement:.1%} of positions (at least {min_agreement:.0%})"

    def as_dict(self, bound: float, min_agreement: float = MIN_ARGMAX_AGREEMENT) -> dict:
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "bound": bound,
            "argmax_agreement": self.argmax_agreement,
            "min_argmax_agreement": min_agreement,
        }


# The most recent added tokens that are not special (those of model.add_tokens last) that a probe reply holds.
ADDED_TOKENS_PROBED = 32


def probe_ids(tokenizer) -> list[list[int]]:
    """The fixed batch as token ids: each conversation through the chat template, ready to reply;
    those the template refuses (Gemma 2 takes no system prompt) are left out. A tokenizer with added
    tokens that text holds (model.add_tokens, Qwen's <tool_call>) gets one more, a reply of those tokens,
    so the rows an adapter trained for them are on the batch too."""
    conversations = [list(c) for c in PROBE_CONVERSATIONS]
    added = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if not t.special]
    if added:
        reply = " ".join(added[-ADDED_TOKENS_PROBED:])
        conversations.append(
            [*PROBE_CONVERSATIONS[0], {"role": "assistant", "content": reply}, *PROBE_CONVERSATIONS[0]]
        )
    accepted = [c for c in conversations if _renders(tokenizer, c)]
    if not accepted:
        raise TuneforgeError(
            "The model's chat template refuses every probe conversation an export is checked on (user turns, "
            "a system prompt, an earlier reply): fix the template, or export --format adapter.",
            code="unsupported_chat_template",
        )
    return encode_prompts(tokenizer, accepted)


def _renders(tokenizer, messages: list[dict]) -> bool:
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError):
        return False
    return True


@torch.no_grad()
def probe_logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits for every position of each prompt, one forward pass each (no padding to mask)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([row], device=device)).logits[0].float().cpu() for row in ids]


def agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> Agreement:
    # torch's max, not Python's: a NaN in any prompt's logits is the largest difference, wherever it is.
    diffs = torch.stack([(r - c).abs().max() for r, c in zip(reference, candidate, strict=True)])
    same = sum(int((r.argmax(-1) == c.argmax(-1)).sum()) for r, c in zip(reference, candidate))
    positions = sum(r.shape[0] for r in reference)
    # A classifier's output for a prompt is its scores (one row), a language model's the logits of each position.
    return Agreement(diffs.max().item(), same / positions, scores=reference[0].dim() == 1)


def require_within(
    measured: Agreement, bound: float, what: str, min_agreement: float = MIN_ARGMAX_AGREEMENT, *, lossy: bool = False
) -> None:
    """Refuse (exit 1) when `what` differs from its source by more than `bound`, or keeps the most
    likely next token at fewer than `min_agreement` of the positions. `lossy`: `what` is a 4- or 5-bit
    file, which may be beyond its bounds for a model less robust than those measured."""
    within = measured.max_abs_logit_diff <= bound  # False for NaN too
    if not (within and measured.argmax_agreement >= min_agreement):
        why = (
            "A 4- or 5-bit file of a small model can differ this much: export --dtype q8_0 (or a 5-bit type for a "
            "4-bit one), and report it with the run's config.yaml if you need this type."
            if lossy
            else "This is a bug in the export or a damaged model: please report it with the run's config.yaml."
        )
        raise ExportFailed(
            f"{what}: {measured.described(bound, min_agreement)}. Nothing was written. {why}",
            code="export_mismatch",
        )

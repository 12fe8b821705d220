"""What the model answers while it trains (`train.eval_samples`): at each validation, and at the final
one, the model answers a few validation prompts greedily (`generate.py`), beside their reference
replies, into the run folder's `samples.jsonl` (a record per validation), the console, and the trackers.

The prompts are the same at every validation: validation examples spread evenly over the file, each
cut before its last trained reply. Those tokens are the template's prompt with its generation prompt
(`data.render` trains a reply as what it adds to that prompt), so the model sees what `generate`,
`chat` and `serve` give it. An answer that reaches `train.eval_max_new_tokens` without ending its turn
"did not stop": the sign of a template or end-of-turn token the training does not teach.

Greedy decoding draws no random numbers, runs without gradients, and leaves each module in the
training mode it had, so a run with samples trains the same weights as one without. Every process
answers the same prompts with its own copy of the weights (no collective, so none waits for
another), and rank 0 alone writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import IGNORE_INDEX
from ..data.schema import SHOWN_IMAGE
from ..errors import json_value
from ..fsio import complete_lines, writing
from ..generate import generate
from ..models.loading import image_inputs
from .run_folder import restart_step_log

FILE = "samples.jsonl"
SHOWN_CHARS = 100  # of each answer and reference in the console


@dataclass(frozen=True)
class SamplePrompt:
    example: int  # the validation example's index
    prompt_ids: tuple[int, ...]
    reference_ids: tuple[int, ...]
    images: tuple[bytes, ...] = ()  # the image files its image tokens stand for: a reply holds none, so all of them


def prompt_and_reply(example) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """An example's tokens before its last trained reply, and that reply's tokens (its end of turn
    included); None where no untrained prompt comes before it (text data, data.train_on: all)."""
    trained = np.asarray(example.labels) != IGNORE_INDEX  # trained[t - 1]: token t is trained
    if not trained.any():
        return None
    last = int(np.nonzero(trained)[0][-1]) + 1
    untrained = np.nonzero(~trained[: last - 1])[0]
    if not len(untrained):
        return None
    start = int(untrained[-1]) + 2  # the first token of the last trained span
    ids = [int(t) for t in example.input_ids]
    return tuple(ids[:start]), tuple(ids[start : last + 1])


def sample_prompts(examples, n: int) -> list[SamplePrompt]:
    """`n` validation examples spread evenly over them (all, if fewer), each as its prompt and reference."""
    candidates = []
    for index, example in enumerate(examples):
        split = None if getattr(example, "is_replay", False) else prompt_and_reply(example)
        if split is not None:
            candidates.append(SamplePrompt(index, *split, getattr(example, "images", ())))
    if n >= len(candidates):
        return candidates
    return [candidates[k * len(candidates) // n] for k in range(n)]


def shown_prompt(tokenizer, prompt: SamplePrompt) -> str:
    """The prompt as a person reads it: the template's text, its special tokens included, with each image's
    tokens shown as `SHOWN_IMAGE`, as eval's examples show an image."""
    text = tokenizer.decode(prompt.prompt_ids)
    image_side = image_inputs(tokenizer)
    return image_side.collapse(text, prompt.images, SHOWN_IMAGE) if image_side is not None else text


@torch.no_grad()
def answer(model, tokenizer, prompts: list[SamplePrompt], max_new_tokens: int) -> list[dict]:
    """Each prompt's greedy answer beside its reference, and whether it stopped (ended its turn)."""
    modes = {module: module.training for module in model.modules()}
    try:
        completions = generate(
            model,
            tokenizer,
            [p.prompt_ids for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=len(prompts),
            images=[p.images for p in prompts],
        )
    finally:
        for module, training in modes.items():
            module.train(training)
    return [
        {
            "example": p.example,
            "prompt": shown_prompt(tokenizer, p),
            "answer": c.text,
            "reference": tokenizer.decode(p.reference_ids, skip_special_tokens=True),
            "stopped": c.finish_reason == "stop",
            "tokens": c.completion_tokens,
        }
        for p, c in zip(prompts, completions)
    ]


def console_lines(step: int, samples: list[dict], final: bool = False) -> list[str]:
    """A few lines for the console: each answer and its reference, cut short, and the answers that did
    not stop, loudly."""

    def short(text: str) -> str:
        shown = " ".join(text.split())
        if not shown:
            return "(nothing but whitespace)" if text else "(empty)"
        return shown if len(shown) <= SHOWN_CHARS else shown[: SHOWN_CHARS - 1] + "…"

    unstopped = [s for s in samples if not s["stopped"]]
    head = f"samples at {'the final validation, step' if final else 'step'} {step}"
    if unstopped:
        head += (
            f": {len(unstopped)} of {len(samples)} answers DID NOT STOP within {unstopped[0]['tokens']} tokens "
            "(no end of turn: check the chat template and that the replies train their end-of-turn token)"
        )
    lines = [head]
    for i, s in enumerate(samples, 1):
        flag = "" if s["stopped"] else "  [did not stop]"
        lines.append(f"  {i}. answer:    {short(s['answer'])}{flag}")
        lines.append(f"     reference: {short(s['reference'])}")
    return lines


class SamplesLog:
    """samples.jsonl: a record per validation, {"step", "samples"} (the final validation's with
    "full_valid": true); a resumed run drops the records past its checkpoint, as metrics.jsonl does."""

    def __init__(self, out: Path, resume_step: int | None, enabled: bool, trackers=None):
        self.path, self.enabled, self.trackers = out / FILE, enabled, trackers
        self.kept: list[dict] = []  # the records up to a resumed run's checkpoint, for the trackers' catch-up
        if enabled:
            self.kept = restart_step_log(self.path, resume_step)

    def write(self, step: int, samples: list[dict], final: bool = False) -> None:
        if not self.enabled:
            return
        record = {"step": step, **({"full_valid": True} if final else {}), "samples": samples}
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log_samples(step, samples, final)


def read(path: Path, note: Callable[[str], None]) -> list[tuple[int, object]]:
    """samples.jsonl's JSON values with their line numbers, in order; a last line still being written (no newline
    yet) is left out, and a line that is not JSON is said to `note` and left out."""
    records = []
    for number, line in enumerate(complete_lines(path), start=1):
        if line.strip():
            record, wrong = json_value(line)
            if wrong is None:
                records.append((number, record))
            else:
                note(f"{FILE} line {number} {wrong}; it is left out.")
    return records

"""Forgetting: what fine-tuning cost a model outside its task, on general data no training set touches.

    from tuneforge.eval import measure_forgetting
    report = measure_forgetting("runs/quickstart")          # an adapter: base = adapter switched off
    report["general_text"]["change"], report["kl"]["mean"], report["general_questions"]["retained"]

Three measures, base against tuned (sets from `tuneforge.tasks.general`):
- general text: cross-entropy on plain English prose, and its relative change;
- KL: mean KL(base || tuned) of the next-token distributions where the base model answers general
  chat prompts (its own greedy answers, so the positions are ones the model really writes);
- general questions: accuracy (the `contains` metric) on the questions that the base SmolLM2 knows
  firmly, listed in `base_questions.json`; a drop there is knowledge or behaviour lost.

For an adapter, the base is the same model with its adapter switched off: one copy in memory.
A fully fine-tuned model needs its base named, and both are loaded.

`python -m tuneforge.eval.forgetting` measures the base model on the question set again and
rewrites `base_questions.json` (do so when the question set or the bundled model changes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources

import torch

from ..config import DEFAULT_MODEL
from ..data import IGNORE_INDEX, Document, Example, collate, render_conversation
from ..errors import TuneforgeError, check_counts, damaged_install, json_value
from ..fsio import write_json
from ..generate import BATCH_SIZE, encode_prompts, generate
from ..methods.sft import trained_logits
from ..models import causal_lm, load_model, load_tokenizer, resolve
from ..models.system_prompt import without_recorded_system_prompt
from ..progress import library_bars, progress_bar
from ..tasks.general import general_prompts, general_questions, general_text
from ..tasks.metrics import holds_answer
from .evaluate import DEFAULT_BATCH_SIZE, token_loss

BASE_QUESTIONS_FILE = "base_questions.json"
# Generation settings for general questions and prompts: short answers suffice, and the question
# filter in BASE_QUESTIONS_FILE is measured with exactly these.
QUESTION_MAX_NEW_TOKENS = 32
ANSWER_MAX_NEW_TOKENS = 32
# A question counts as known when the base answers it right greedily and in at least
# QUESTION_SAMPLES_RIGHT of QUESTION_SAMPLES answers sampled at QUESTION_TEMPERATURE. Greedy alone
# keeps answers that are right by luck: "1 year is 365 * 12 = 312 months" holds "12". A tuned model
# that loses such a question has lost no knowledge, yet those are most of the questions lost
# (docs/LOG.md, "Forgetting", has the examples and the figures).
QUESTION_SAMPLES = 8
QUESTION_SAMPLES_RIGHT = 6
QUESTION_TEMPERATURE = 0.7


class ModelPair:
    """The tuned model and its base. For an adapter model the base is the adapter switched off."""

    def __init__(self, tuned, base=None):
        if base is None and not hasattr(tuned, "disable_adapter"):
            raise TuneforgeError(
                "measuring forgetting of a fully fine-tuned model needs its base model: name it "
                "(measure_forgetting(model, base=...)).",
                code="missing_base_model",
            )
        self.tuned_model, self.base_model = tuned, base

    @contextlib.contextmanager
    def base(self) -> Iterator:
        if self.base_model is not None:
            yield self.base_model
        else:
            with self.tuned_model.disable_adapter():
                yield self.tuned_model

    @contextlib.contextmanager
    def tuned(self) -> Iterator:
        yield self.tuned_model


def _base_questions_record() -> dict:
    """`BASE_QUESTIONS_FILE`, installed with tuneforge: one that cannot be read, or holds no model and list of
    kept questions, is refused as a damaged install."""
    path = resources.files(__package__).joinpath(BASE_QUESTIONS_FILE)
    try:
        record, unreadable = json_value(path.read_bytes())
    except OSError as error:
        record, unreadable = None, f"cannot be read ({error.strerror or error})"
    kept = record.get("kept") if isinstance(record, dict) else None
    if unreadable is None and not (
        isinstance(kept, list) and all(isinstance(q, str) for q in kept) and isinstance(record.get("model"), str)
    ):
        unreadable = "holds no model and list of kept questions"
    if unreadable is not None:
        raise damaged_install(path, "the record of the general questions the base model knows", unreadable)
    return record


def kept_questions() -> list[dict]:
    """The general questions the bundled base model knows firmly (their text is their id)."""
    kept = set(_base_questions_record()["kept"])
    return [q for q in general_questions() if q["question"] in kept]


def answer_questions(
    model,
    tokenizer,
    questions: list[dict],
    *,
    progress: bool = True,
    label: str = "questions",
    samples: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[list[str]]:
    """Each question's answers: one greedy answer, or `samples` answers sampled at `temperature`."""
    prompts = [[{"role": "user", "content": q["question"]}] for q in questions] * samples
    with progress_bar(label, len(prompts), progress) as advance:
        texts = [
            a.text
            for a in generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=QUESTION_MAX_NEW_TOKENS,
                temperature=temperature,
                seed=seed,
                on_progress=advance,
            )
        ]
    return [texts[i :: len(questions)] for i in range(len(questions))]


@torch.inference_mode()
def _answer_log_probs(model, batch: dict) -> torch.Tensor:
    """Log-probabilities of the next token at every trained (answer) position of a batch."""
    model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    return torch.log_softmax(trained_logits(causal_lm(model), **batch), dim=-1)


def mean_kl(
    pair: ModelPair, tokenizer, prompts: list[str], *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True
) -> dict:
    """Mean KL(base || tuned) per answer token, over the base model's own greedy answers to `prompts`."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    with pair.base() as base, progress_bar("KL: base answers", len(chats), progress) as advance:
        answers = generate(base, tokenizer, chats, max_new_tokens=ANSWER_MAX_NEW_TOKENS, on_progress=advance)
    # The answers' own tokens, not their text tokenized again: exactly the positions the model wrote.
    examples = [
        Example(ids + list(a.token_ids), [IGNORE_INDEX] * (len(ids) - 1) + list(a.token_ids) + [IGNORE_INDEX])
        for ids, a in zip(encode_prompts(tokenizer, chats), answers)
    ]
    total = tokens = 0.0
    with progress_bar("KL", len(examples), progress) as advance:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            with pair.base() as base:
                base_lp = _answer_log_probs(base, batch)
            with pair.tuned() as tuned:
                tuned_lp = _answer_log_probs(tuned, batch)
            total += (base_lp.exp() * (base_lp - tuned_lp.to(base_lp.device))).sum().item()
            tokens += base_lp.shape[0]
            advance(len(examples[start : start + batch_size]))
    return {"mean": total / max(tokens, 1), "tokens": int(tokens), "prompts": len(prompts)}


def positions_needed(tokenizer) -> int:
    """The most positions a row of the measure fills: a general text, or a general prompt or question with
    the longest answer it is given (without the system prompt a fine-tune recorded, as the measure asks)."""
    with without_recorded_system_prompt(tokenizer):
        texts = [len(render_conversation(Document(t), tokenizer).input_ids) for t in general_text()]
        asked = [
            (general_prompts(), ANSWER_MAX_NEW_TOKENS),
            ([q["question"] for q in kept_questions()], QUESTION_MAX_NEW_TOKENS),
        ]
        answered = [
            len(ids) + max_new_tokens
            for prompts, max_new_tokens in asked
            for ids in encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
        ]
    return max(texts + answered)


def forgetting_loaded(
    pair: ModelPair, tokenizer, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True
) -> dict:
    """`measure_forgetting` on models already in memory. General ability is asked for as of the base:
    without the system prompt a fine-tune recorded for its task (`models.system_prompt`)."""
    with without_recorded_system_prompt(tokenizer):
        texts = [render_conversation(Document(t), tokenizer) for t in general_text()]
        losses = {}
        for side in ("base", "tuned"):
            with getattr(pair, side)() as model, progress_bar(f"general text: {side}", len(texts), progress) as advance:
                losses[side] = token_loss(model, texts, tokenizer.pad_token_id, batch_size=batch_size, advance=advance)

        questions = kept_questions()
        answers, right, accuracy = {}, {}, {}
        for side in ("base", "tuned"):
            with getattr(pair, side)() as model:
                answers[side] = [
                    a
                    for (a,) in answer_questions(
                        model, tokenizer, questions, progress=progress, label=f"questions: {side}"
                    )
                ]
            right[side] = [holds_answer(a, q["answers"]) for a, q in zip(answers[side], questions)]
            accuracy[side] = sum(right[side]) / len(questions)
        lost = [
            {"question": q["question"], "answers": q["answers"], "base": b, "tuned": t}
            for q, b, t, base_right, tuned_right in zip(
                questions, answers["base"], answers["tuned"], right["base"], right["tuned"]
            )
            if base_right and not tuned_right
        ]
        base_loss, tuned_loss = losses["base"]["loss"], losses["tuned"]["loss"]
        return {
            "general_text": {
                "base_loss": base_loss,
                "tuned_loss": tuned_loss,
                "change": tuned_loss / base_loss - 1,
                "tokens": losses["base"]["tokens"],
                "texts": len(texts),
            },
            "kl": mean_kl(pair, tokenizer, general_prompts(), batch_size=batch_size, progress=progress),
            "general_questions": {
                "n": len(questions),
                "known_by": _base_questions_record()["model"],  # the model the set was chosen for, whatever the base
                "base_accuracy": accuracy["base"],
                "tuned_accuracy": accuracy["tuned"],
                # None (JSON's null) when the base knows none of them: no share of nothing is kept or lost.
                "retained": accuracy["tuned"] / accuracy["base"] if accuracy["base"] else None,
                "lost": lost,
            },
        }


def measure_forgetting(
    model: str, base: str | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True
) -> dict:
    """Base vs tuned on general text, prompts and questions (see the module doc).

    `model` is anything `resolve` takes. `base` may be left out for an adapter (its base is the
    adapter switched off); a fully fine-tuned model needs it.
    """
    check_counts({"batch_size": (batch_size, 1)})
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    with library_bars(progress):
        tuned = load_model(source)
        pair = ModelPair(tuned, load_model(resolve(base)) if base is not None else None)
    return {
        "model": source.name,
        "base": base or str(source.path),
        **forgetting_loaded(pair, tokenizer, batch_size=batch_size, progress=progress),
    }


def measure_base_questions(model: str = DEFAULT_MODEL, *, progress: bool = True) -> dict:
    """Which general questions `model` knows firmly, as `base_questions.json` records it: right
    greedily and in at least QUESTION_SAMPLES_RIGHT of QUESTION_SAMPLES sampled answers."""
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    with library_bars(progress):
        lm = load_model(source)
    questions = general_questions()
    greedy = answer_questions(lm, tokenizer, questions, progress=progress, label="questions: greedy")
    sampled = answer_questions(
        lm,
        tokenizer,
        questions,
        progress=progress,
        label="questions: sampled",
        samples=QUESTION_SAMPLES,
        temperature=QUESTION_TEMPERATURE,
        seed=0,
    )
    right_in_samples = {
        q["question"]: sum(holds_answer(a, q["answers"]) for a in answers) for q, answers in zip(questions, sampled)
    }
    greedy_right = [q["question"] for q, (answer,) in zip(questions, greedy) if holds_answer(answer, q["answers"])]
    kept = [q for q in greedy_right if right_in_samples[q] >= QUESTION_SAMPLES_RIGHT]
    return {
        "model": model,
        "measured_with": f"the chat template with the question as the only user message, max_new_tokens "
        f"{QUESTION_MAX_NEW_TOKENS}, batch size {BATCH_SIZE}, scored with contains; greedy, and "
        f"{QUESTION_SAMPLES} samples a question at temperature {QUESTION_TEMPERATURE} (seed 0)",
        "rule": f"kept: right greedily and in at least {QUESTION_SAMPLES_RIGHT} of the {QUESTION_SAMPLES} samples",
        "questions": len(questions),
        "greedy_right": len(greedy_right),
        "correct": len(kept),
        "kept": kept,
        "right_in_samples": right_in_samples,
    }


if __name__ == "__main__":
    from pathlib import Path

    record = measure_base_questions()
    write_json(Path(__file__).with_name(BASE_QUESTIONS_FILE), record)
    print(
        f"{record['model']} answers {record['greedy_right']} of {record['questions']} general questions right "
        f"greedily, {record['correct']} of them firmly; kept those in {BASE_QUESTIONS_FILE}"
    )

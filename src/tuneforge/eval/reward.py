"""A reward model on held-out preference pairs: how often it scores the chosen reply above the rejected one.

    from tuneforge.eval.reward import evaluate_reward_model
    result = evaluate_reward_model("runs/rm", "data/valid_pairs.jsonl", out="runs/rm/eval/pairs")
    result["accuracy"], result["margin"]["median"], result["samples"][0]["chosen_score"]

The pairs are read as training reads them (every preference format; a bad row is refused with its file,
line and field) and rendered with the model's chat template as `method: reward` renders them; each reply
is scored where training scored it (`methods.reward.example_rewards`: the score at its last token that
is not the pad token). The figures are TRL's RewardTrainer's: `accuracy`, the share of pairs whose chosen
reply scores higher (a tie counts as wrong, and `ties` counts them), the margin r_chosen - r_rejected
(mean, median, smallest, largest), and `loss`, the mean Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected - margin) with each row's `margin` where it gives one. On a run's validation file they are the
run's `full_valid_accuracy`, `full_valid_margin` and (without `reward.center_rewards_coefficient`)
`full_valid_loss`, unless training cut rows at `data.max_length`: every pair here is scored whole.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..data import Preference, Problem, collate, read_conversations
from ..data.formats import file_format
from ..data.readers import not_a_file, one_file_by_name
from ..data.render import renderer_for
from ..errors import ConfigError, DataError, TuneforgeError, check_counts
from ..fsio import MOUNT_POINT_REFUSED, atomic_dir, is_mount_point
from ..methods.reward import example_rewards, pair_losses
from ..models import load_model, load_tokenizer, model_context_length
from ..progress import library_bars, progress_bar
from ..wording import counted
from .report import Table, share_interval, share_with_interval

DEFAULT_BATCH_SIZE = 16  # pairs scored a forward
HISTOGRAM_BINS = 30


def read_pairs(path: str | Path, limit: int | None = None, model: str = "RM") -> list[tuple[int, Preference]]:
    """The first `limit` (all, if None) preference pairs of a data file, with their lines; a file that holds
    no pairs, or any bad row among them (one with images too: a reward model scores text only, as `method:
    reward` trains it), is refused with its file, line and field."""
    if (missing := not_a_file(str(path), one_file_by_name("eval scores"))) is not None:
        raise TuneforgeError(missing.message, code=missing.code)
    found = file_format(path)
    if found != "preference":
        raise TuneforgeError(
            f"{path}: a reward model is evaluated on preference pairs, but this file holds "
            f'{found or "rows of no known format"} data. Give rows with {{"prompt", "chosen", "rejected"}} (or '
            "any preference format training reads), or score answers with the reward model as a grader: "
            f'tuneforge eval MODEL DATA --grader \'{{"type": "reward_model", "model": "{model}"}}\'.',
            code="not_preference_data",
        )
    pairs: list[tuple[int, Preference]] = []
    problems: list[Problem] = []
    for line, item in read_conversations(path, "preference"):
        if isinstance(item, Problem):
            problems += [item] if item.is_error else []
        elif limit is None or len(pairs) < limit:
            pairs.append((line, item))
            problems += _images_in_pair(item, str(path), line)
    if problems:
        raise DataError.listing(f"{path}: {counted(len(problems), 'problem')} in the pairs", problems)
    if not pairs:
        raise TuneforgeError(f"{path}: the file holds no preference pairs to score.", code="no_valid_rows")
    return pairs


def _images_in_pair(pair: Preference, file: str, line: int) -> list[Problem]:
    """The pair's first message with images, refused: a reward model's score reads the tokens alone, so an image
    would be scored as its bare image tokens."""
    for conversation in pair.sides():
        at = next((i for i, m in enumerate(conversation.messages) if m.images), None)
        if at is not None:
            return [
                Problem(
                    "images_not_read",
                    "the pair holds images, and a reward model scores text only (method: reward trains no rows "
                    "with images either); remove the image parts or leave the pair out.",
                    file=file,
                    line=line,
                    field=conversation.row_field(f"messages[{at}].content"),
                )
            ]
    return []


def evaluate_reward_model(
    model,
    data: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    out: str | Path | None = None,
) -> dict:
    """Score both replies of each pair of `data` with the reward model `model` (a `method: reward` run or
    checkpoint, its merged export, or any sequence classifier with one output) and measure the ranking.
    `out`: a folder that gets `scores.jsonl` (one line a pair: its line, both scores and the margin) and
    `margins.png` (a histogram of the margins), written whole; one holding other files is refused first."""
    check_counts({"batch_size": (batch_size, 1)})
    if out is not None:
        check_report_folder(Path(out))
    from ..models import resolve

    pairs = read_pairs(data, limit, str(model))
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    rendered, problems = [], []
    for (line, _), result in zip(pairs, renderer_for(tokenizer).render_preferences([p for _, p in pairs])):
        if isinstance(result, list):
            problems += [Problem(p.code, p.message, file=str(data), line=line, field=p.field) for p in result]
        else:
            rendered.append(result)
    if problems:
        raise DataError.listing(f"{data}: {counted(len(problems), 'row')} cannot be rendered", problems)
    with library_bars(progress):
        loaded = load_model(source).eval()
    window = model_context_length(loaded)
    too_long = [
        Problem(
            "too_long",
            f"the pair is {length} tokens with its longer reply, more than the model's maximum context length of "
            f"{window} tokens; shorten the row or leave it out.",
            file=str(data),
            line=line,
        )
        for (line, _), pair in zip(pairs, rendered)
        if window and (length := max(map(len, pair))) > window
    ]
    if too_long:
        raise DataError.listing(f"{data}: {counted(len(too_long), 'pair')} do not fit the model's context", too_long)

    started = time.perf_counter()
    pad_id = tokenizer.pad_token_id
    scores: list[float] = []
    with progress_bar("pairs", len(rendered), progress) as advance, torch.no_grad():
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start : start + batch_size]
            # Each reply a row of its own, right-padded: scored at its last token that is not the pad token.
            batch = collate([e for pair in chunk for e in pair], pad_id)
            batch = {k: v.to(loaded.device) for k, v in batch.items()}
            scores += example_rewards(loaded, **batch, pad_id=pad_id).tolist()
            advance(len(chunk))
    chosen, rejected = torch.tensor(scores[0::2]), torch.tensor(scores[1::2])
    margins = (chosen - rejected).tolist()
    row_margins = torch.tensor([p.margin or 0.0 for _, p in pairs])
    losses = pair_losses(chosen, rejected, margin=row_margins)
    n = len(pairs)
    accuracy = sum(m > 0 for m in margins) / n
    samples = [
        {
            "line": line,
            "input": next((m.content for m in reversed(p.prompt) if m.role == "user"), ""),
            "chosen": p.chosen.content,
            "rejected": p.rejected.content,
            "chosen_score": c,
            "rejected_score": r,
            "margin": m,
            **({"row_margin": p.margin} if p.margin is not None else {}),
        }
        for (line, p), c, r, m in zip(pairs, chosen.tolist(), rejected.tolist(), margins)
    ]
    result = {
        "model": source.name,
        "spec": str(model),
        "data": str(data),
        "kind": "reward_model",
        "n": n,
        "accuracy": accuracy,
        "accuracy_interval": list(share_interval(accuracy, n)),
        "ties": sum(m == 0 for m in margins),
        "margin": {
            "mean": statistics.fmean(margins),
            "median": statistics.median(margins),
            "min": min(margins),
            "max": max(margins),
        },
        "loss": float(losses.mean()),
        "seconds": {"scoring": round(time.perf_counter() - started, 2)},
        "samples": samples,
    }
    if out is not None:
        result["files"] = write_scores(Path(out), result)
    return result


SCORES_FILE, PLOT_FILE = "scores.jsonl", "margins.png"


def check_report_folder(folder: Path) -> None:
    """`folder` holds nothing but an earlier report, if anything, and is no mount point: `write_scores` replaces it
    whole, by a rename that a mounted folder refuses."""
    if is_mount_point(folder):
        raise ConfigError(f"--out {folder} is {MOUNT_POINT_REFUSED}, e.g. --out {folder / 'reward'}.")
    others = (
        sorted(p.name for p in folder.iterdir() if p.name not in (SCORES_FILE, PLOT_FILE)) if folder.is_dir() else []
    )
    if others:
        raise ConfigError(
            f"--out {folder} holds {', '.join(others[:5])}{' and more' if len(others) > 5 else ''}, which a reward "
            f"model's report ({SCORES_FILE}, {PLOT_FILE}) would replace, as it replaces the folder whole; give it "
            "a folder of its own (a new one is made)."
        )


def write_scores(folder: Path, result: dict) -> dict:
    """`scores.jsonl` (each pair's line, both scores and the margin) and `margins.png` (their histogram) in
    `folder`, written whole (a folder renamed into place, an earlier report swapped out): a write stopped midway
    never leaves new scores beside an old histogram. Their paths."""
    with atomic_dir(folder, replace=True) as tmp:
        with open(tmp / SCORES_FILE, "w", encoding="utf-8") as f:
            for s in result["samples"]:
                keys = ("line", "chosen_score", "rejected_score", "margin", "row_margin")
                f.write(json.dumps({k: s[k] for k in keys if k in s}, ensure_ascii=False) + "\n")
        with open(tmp / PLOT_FILE, "wb") as f:
            margins_figure(result).savefig(f, format="png", dpi=110, bbox_inches="tight")
    return {"scores": str(folder / SCORES_FILE), "margins_plot": str(folder / PLOT_FILE)}


def margins_figure(result: dict):
    """A histogram of the pairs' margins r_chosen - r_rejected, with 0 (a tie) marked: the pairs right of it
    are ranked right."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.subplots()
    from matplotlib.ticker import MaxNLocator

    margins = [s["margin"] for s in result["samples"]]
    # The bins span 0 too, so the line at a tie sits among bars of the same width as the others.
    span = (min(0.0, *margins), max(0.0, *margins))
    axes.hist(margins, bins=HISTOGRAM_BINS, range=span if span[0] < span[1] else None, color="#4c72b0")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.axvline(0, color="#c44e52", linestyle="--", linewidth=1)
    axes.set_title(f"Margins of {result['n']} pairs: accuracy {result['accuracy']:.1%}")
    axes.set_xlabel("r(chosen) - r(rejected)")
    axes.set_ylabel("pairs")
    axes.grid(alpha=0.3)
    return figure


def reward_table(result: dict) -> Table:
    """The ranking figures of `evaluate_reward_model`, for the terminal."""
    margin = result["margin"]
    rows = [
        ["pairs", str(result["n"])],
        ["accuracy (chosen scored higher)", share_with_interval(result["accuracy"], result["n"])],
        ["ties", str(result["ties"])],
        ["margin: mean", f"{margin['mean']:.4f}"],
        ["margin: median", f"{margin['median']:.4f}"],
        ["margin: smallest, largest", f"{margin['min']:.4f}, {margin['max']:.4f}"],
        ["loss (Bradley-Terry)", f"{result['loss']:.4f}"],
    ]
    files = result.get("files")
    caption = (
        f"each pair's scores: {files['scores']}; histogram of the margins: {files['margins_plot']}"
        if files
        else "--out FOLDER writes each pair's scores (scores.jsonl) and a histogram of the margins (margins.png)"
    )
    return Table(f"reward model: {result['model']} on {result['data']}", ["", ""], rows, caption)

"""`tuneforge distill init|generate`: parse the options, call the stage, print what it did."""

from __future__ import annotations

from ..console import new_console, plain
from ..errors import TuneforgeError
from ..wording import counted
from .student import init_student
from .teacher_data import generate_teacher_data


def parse_layers(text: str) -> list[int]:
    """`0,6,12` -> [0, 6, 12]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TuneforgeError(
            f"--keep-layers {text!r}: expected layer numbers separated by commas, e.g. 0,6,12,29.", code="bad_option"
        ) from None


def influence_chart(influence: tuple[float, ...], kept: tuple[int, ...], width: int = 40) -> str:
    """One bar per teacher layer, kept ones marked. The bars are scaled to the second largest value,
    so that the first layer, which usually turns the embeddings far more than any other layer
    turns its input, does not flatten the rest; a longer bar is cut at `width` and ends in "▸"."""
    ranked = sorted(influence, reverse=True)
    top = ranked[min(1, len(ranked) - 1)] or 1.0
    lines = ["block influence by teacher layer (1 - cosine of the hidden state before and after it):"]
    for i, value in enumerate(influence):
        length = round(width * value / top)
        bar = "█" * (width - 1) + "▸" if length > width else "█" * length
        lines.append(f"{i:>4} {'kept' if i in kept else '    '} {bar:<{width}} {value:.3f}")
    return "\n".join(lines)


def distill_init(
    teacher: str,
    out: str,
    *,
    keep_layers: str | None = None,
    every: int | None = None,
    most_influential: int | None = None,
    data: str | None = None,
) -> int:
    if (most_influential is None) != (data is None):
        raise TuneforgeError(
            "--most-influential N and --data FILE go together: the layers are ranked by how much they turn "
            "the hidden state on FILE's first rows (the training data).",
            code="bad_option",
        )
    result = init_student(
        teacher,
        out,
        keep=parse_layers(keep_layers) if keep_layers is not None else None,
        every=every,
        most_influential_of=(most_influential, data) if most_influential is not None else None,
    )
    share = result.student_parameters / result.teacher_parameters
    console = new_console()
    if result.influence is not None:
        console.print(influence_chart(result.influence, result.kept_layers), highlight=False, soft_wrap=True)
    console.print(
        f"teacher: {result.teacher_parameters / 1e6:.1f}M parameters, {result.teacher_layers} layers\n"
        f"student: {result.student_parameters / 1e6:.1f}M parameters ({share:.0%}), {len(result.kept_layers)} layers "
        f"(teacher layers {','.join(map(str, result.kept_layers))})\n"
        f"written to {plain(result.out)}",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def distill_generate(
    teacher: str,
    prompts: str,
    out: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None = None,
    precision: str = "auto",
    samples: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    grader: str | None = None,
    keep: str = "best",
) -> int:
    from ..eval.command import grader_spec

    result = generate_teacher_data(
        teacher,
        prompts,
        out,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        limit=limit,
        precision=precision,
        samples=samples,
        temperature=temperature,
        seed=seed,
        grader=grader_spec(grader) if grader is not None else None,
        keep=keep,
    )
    resumed = f" ({result.resumed_from} were already there)" if result.resumed_from else ""
    cut = (
        f"; {result.stopped_by_length} answers reached --max-new-tokens and are cut off"
        if result.stopped_by_length
        else ""
    )
    if result.empty:
        cut += (
            f"; {result.empty} answers are empty (data checks reject them as missing_content: "
            "train with data.on_error=skip, or remove them)"
        )
    if result.samples_file is not None:
        why = (
            "their answers that ended within --max-new-tokens all scored alike, or were fewer than two"
            if keep == "pairs"
            else "no answer ended within --max-new-tokens and reached the grader's pass_threshold"
        )
        left_out = f"; {result.left_out} of this call's prompts left out ({why})" if result.left_out else ""
        kind = "DPO pairs" if keep == "pairs" else "best answers"
        new_console().print(
            plain(
                f"{result.written} of {counted(result.prompts, 'prompt')} sampled {samples} times into "
                f"{result.samples_file}{resumed}; {counted(result.rows, 'row')} ({kind}) in {result.out}{left_out}{cut}"
            ),
            highlight=False,
            soft_wrap=True,
        )
        return 0
    new_console().print(
        plain(f"{result.written} of {counted(result.prompts, 'row')} in {result.out}{resumed}{cut}"),
        highlight=False,
        soft_wrap=True,
    )
    return 0

"""`tuneforge distill init`: a smaller student made from a subset of the teacher's decoder layers.

As DistilBERT initialised its student from every other teacher layer: the embeddings, the final
norm, the output layer and the kept layers' weights are the teacher's, unchanged. Starting from
the teacher's own weights, the student begins close to the teacher's function and distillation
has far less to learn than from random weights.

Llama-style models only (the decoder layers at `model.model.layers`, as in Llama, Mistral, Qwen,
SmolLM and Gemma): the layers are re-numbered in the checkpoint and the config says how many there
are, so the result is a plain Hugging Face folder any tool loads.

Which layers to keep: every K-th (spread evenly), a list, or the N with the most block influence on
the user's data (ShortGPT, Men et al. 2024): 1 minus the cosine between the hidden state entering a
layer and the one leaving it, averaged over the tokens of the data's first rows. A layer that
barely turns its input is the one the student misses least; on the quickstart's triage teacher the
influence cut makes a plain-SFT student far better than every third layer (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, TuneforgeError
from ..wording import counted

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
INFLUENCE_ROWS = 64  # the data rows block influence is averaged over


@dataclass(frozen=True)
class StudentInit:
    out: Path
    teacher_layers: int
    kept_layers: tuple[int, ...]
    teacher_parameters: int
    student_parameters: int
    influence: tuple[float, ...] | None = None  # each teacher layer's block influence, when it chose the layers


def layers_to_keep(n_layers: int, keep: list[int] | None = None, every: int | None = None) -> tuple[int, ...]:
    """The teacher layers the student keeps, in order: `keep` as given, or every `every`-th layer
    (default 2: about half), always with the first and the last."""
    if keep is not None and every is not None:
        raise TuneforgeError("give either --keep-layers or --every, not both.", code="bad_option")
    if keep is not None:
        wrong = [i for i in keep if not 0 <= i < n_layers]
        if wrong:
            raise TuneforgeError(
                f"--keep-layers {wrong} are not layers of the teacher, which has {n_layers} (0 to {n_layers - 1}).",
                code="bad_option",
            )
        if len(set(keep)) != len(keep):
            raise TuneforgeError(f"--keep-layers names a layer twice: {keep}.", code="bad_option")
        chosen = sorted(keep)
    else:
        every = 2 if every is None else every
        if every < 1:
            raise TuneforgeError(f"--every must be at least 1, got {every}.", code="bad_option")
        chosen = sorted(set(range(0, n_layers, every)) | {n_layers - 1})
    if not chosen:
        raise TuneforgeError("--keep-layers is empty; keep at least one layer.", code="bad_option")
    return tuple(chosen)


def influence_rows(path: str | Path, tokenizer, rows: int = INFLUENCE_ROWS) -> list[list[int]]:
    """The token ids of the first `rows` rows of a data file (any format training reads), rendered
    with the teacher's chat template; every problem in those rows at once, as a `DataError`."""
    from ..data import Preference, Problem
    from ..data.formats import read_conversations
    from ..data.render import render_examples, render_preference

    path = str(path)
    if not Path(path).is_file():
        raise TuneforgeError(f"--data {path}: no such file.", code="file_not_found")
    token_ids, problems = [], []
    for line, record in read_conversations(path):
        if isinstance(record, Problem):
            problems += [record] if record.is_error else []
            continue
        try:
            if isinstance(record, Preference):
                example = render_preference(record, tokenizer)[0]
            else:
                example = render_examples(record, tokenizer, "all")[-1]
        except DataError as error:
            problems += error.problems or [Problem(error.code, str(error), file=path, line=line)]
            continue
        token_ids.append(example.input_ids)
        if len(token_ids) == rows:
            break
    if problems:
        raise DataError.listing(f"{path}: {counted(len(problems), 'row')} cannot be used", problems)
    if not token_ids:
        raise DataError(f"--data {path} holds no rows.", code="empty_file")
    return token_ids


def block_influence(model, token_ids: list[list[int]]) -> tuple[float, ...]:
    """Each decoder layer's block influence: 1 minus the cosine between the hidden state entering it
    and the one leaving it, averaged over every token of every row (rows run one at a time, so no
    padding enters the mean; the cosine is taken in fp32)."""
    import torch
    import torch.nn.functional as F

    from ..progress import progress_bar

    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)  # on the device: no sync per layer

    def measure(index):
        def hook(module, args, kwargs, output):
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            # At least 0, as 1 minus a cosine is: rounding leaves a pass-through layer's at -1e-8, shown "-0.000".
            turned = (1 - F.cosine_similarity(entering.float(), leaving.float(), dim=-1)).clamp(min=0)
            sums[index] += turned.sum()

        return hook

    handles = [layer.register_forward_hook(measure(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), progress_bar("block influence", len(token_ids)) as advance:
            for ids in token_ids:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                advance(1)
    finally:
        for handle in handles:
            handle.remove()
    return tuple((sums / sum(map(len, token_ids))).tolist())


def most_influential(influence: tuple[float, ...], count: int) -> tuple[int, ...]:
    """The `count` layers with the most influence, in layer order."""
    ranked = sorted(range(len(influence)), key=lambda i: -influence[i])
    return tuple(sorted(ranked[:count]))


def decoder_layers(model):
    """The list of decoder layers of a Llama-style causal LM; a clear error for other layouts."""
    from torch import nn

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        kind = (model.config.architectures or [model.config.model_type])[0]
        raise TuneforgeError(
            f"distill init keeps decoder layers of Llama-style models (layers at model.model.layers: Llama, "
            f"Mistral, Qwen, SmolLM, Gemma); {kind} keeps its layers elsewhere. Build the student by hand, or "
            "distill into an existing smaller model of the same family.",
            code="unsupported_architecture",
        )
    return layers


def student_state(teacher_state: dict, kept: tuple[int, ...]) -> dict:
    """The teacher's weights with only the kept layers, re-numbered 0..len(kept)-1."""
    position = {layer: i for i, layer in enumerate(kept)}
    state = {}
    for name, tensor in teacher_state.items():
        match = _LAYER_KEY.fullmatch(name)
        if match is None:
            state[name] = tensor
        elif int(match[1]) in position:
            state[f"model.layers.{position[int(match[1])]}.{match[2]}"] = tensor
    return state


def init_student(
    teacher: str,
    out: str | Path,
    *,
    keep: list[int] | None = None,
    every: int | None = None,
    most_influential_of: tuple[int, str | Path] | None = None,
) -> StudentInit:
    """Write a student made of the kept teacher layers to `out` (model, tokenizer, chat template,
    generation config), atomically; `out` must not exist yet. The layers are `keep`, every
    `every`-th, or with `most_influential_of=(count, data_file)` the `count` layers of most block
    influence on the data file's first rows."""
    from transformers import AutoModelForCausalLM

    from ..models import load_frozen_model, load_tokenizer, resolve_at
    from ..models.saving import save_model

    out = Path(out)
    if out.exists():
        raise TuneforgeError(f"{out} already exists; choose another --out or remove it.", code="output_exists")
    if most_influential_of is not None and (keep is not None or every is not None):
        raise TuneforgeError("give one of --keep-layers, --every and --most-influential.", code="bad_option")
    source = resolve_at(teacher, "--teacher")
    tokenizer = load_tokenizer(source)
    rows = influence_rows(most_influential_of[1], tokenizer) if most_influential_of is not None else None
    model = load_frozen_model(source, "distill init")
    n_layers = len(decoder_layers(model))
    influence = None
    if rows is not None:
        count = most_influential_of[0]
        if not 1 <= count <= n_layers:
            raise TuneforgeError(
                f"--most-influential {count}: the teacher has {n_layers} layers; keep 1 to {n_layers}.",
                code="bad_option",
            )
        influence = block_influence(model, rows)
        kept = most_influential(influence, count)
    else:
        kept = layers_to_keep(n_layers, keep, every)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        # Per-layer attention kinds (sliding or full) go with their layers.
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    student.load_state_dict(student_state(model.state_dict(), kept), strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    save_model(student, tokenizer, source.path, out)
    return StudentInit(
        out,
        n_layers,
        kept,
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in student.parameters()),
        influence,
    )

"""`tuneforge distill init`: a smaller student made from a subset of the teacher's decoder layers.

As DistilBERT initialised its student from every other teacher layer: the embeddings, the final
norm, the output layer and the kept layers' weights are the teacher's, unchanged. Starting from
the teacher's own weights, the student begins close to the teacher's function and distillation
has far less to learn than from random weights.

Llama-style models only (the decoder layers at `model.model.layers`, as in Llama, Mistral, Qwen,
SmolLM and Gemma): the layers are re-numbered in the checkpoint and the config says how many there
are, so the result is a plain Hugging Face folder any tool loads.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneforgeError

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class StudentInit:
    out: Path
    teacher_layers: int
    kept_layers: tuple[int, ...]
    teacher_parameters: int
    student_parameters: int


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
    teacher: str, out: str | Path, *, keep: list[int] | None = None, every: int | None = None
) -> StudentInit:
    """Write a student made of the kept teacher layers to `out` (model, tokenizer, chat template,
    generation config), atomically; `out` must not exist yet."""
    from transformers import AutoModelForCausalLM

    from ..models import load_frozen_model, load_tokenizer, resolve
    from ..models.saving import save_model

    out = Path(out)
    if out.exists():
        raise TuneforgeError(f"{out} already exists; choose another --out or remove it.", code="output_exists")
    source = resolve(teacher)
    tokenizer = load_tokenizer(source)
    model = load_frozen_model(source)
    n_layers = len(decoder_layers(model))
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
        out, n_layers, kept, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in student.parameters())
    )

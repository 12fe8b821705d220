"""Several LoRA adapters on one base combined into one plain PEFT adapter, each with a weight, by PEFT's
`add_weighted_adapter`; or one adapter weighted alone (a weight below 1 softens its effect).

    tuneforge export runs/support --combine runs/tools:0.5 --combination cat --format merged --out DIR

The combined adapter is written to a scratch folder and exported from there like any adapter, so every
format (adapter, merged, gguf) and every check of `export` applies to it. What PEFT would combine wrongly
without a word is refused before any weights load: adapters on different bases, DoRA (PEFT gives the
combined adapter the base's magnitudes, not the trained ones), layers trained whole (`modules_to_save`) or
token rows (`trainable_token_indices`, `model.add_tokens`), which the combined adapter would take from the
base untrained, and different ranks where the combination adds A and B matrices of one shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..console import plain
from ..errors import TuneforgeError
from ..models import ModelSource, describe_whole_model, load_model, load_tokenizer, resolve
from ..models.loading import base_weight_copies, chat_template
from ..wording import unknown_choice

# PEFT's combination types offered here; the first is the default. `cat` and `svd` take adapters of any
# ranks (`cat` is exact: its delta is the weighted sum of the adapters' deltas); the others add the A and B
# matrices apart, so they take adapters of one rank.
COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
WITH_DENSITY = ("ties", "dare_linear", "dare_ties")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")
COMBINED = "combined"  # PEFT's name for the combined adapter, and the folder save_pretrained writes it to


@dataclass
class Part:
    spec: str  # the run, checkpoint or adapter folder as given
    weight: float
    source: ModelSource | None = None


@dataclass
class Plan:
    parts: list[Part]
    combination: str
    density: float | None

    def describe(self) -> dict:
        """What `export.json` records of the combination."""
        return {
            "combination": self.combination,
            "density": self.density,
            "adapters": [
                {"spec": part.spec, "adapter": str(part.source.adapter), "weight": part.weight} for part in self.parts
            ],
        }


def weighted(text: str) -> tuple[str, float | None]:
    """`SPEC[:WEIGHT]` as (spec, weight); the weight is None where none is given (a path that exists is
    taken whole, and so is a text after ':' that is no number where no path is before it: a hub id's)."""
    spec, sep, tail = text.rpartition(":")
    if not sep or not spec or Path(text).exists():
        return text, None
    try:
        weight = float(tail)
    except ValueError:
        if not Path(spec).exists():
            return text, None
        weight = None  # a path that exists, then a weight that is no number (`runs/tools:0,3`)
    if weight is None or not math.isfinite(weight):
        raise TuneforgeError(
            f"{text}: the weight after ':' must be a finite number, e.g. {spec}:0.5.", code="bad_export_option"
        )
    return spec, weight


def plan(run: str, combine: list[str], combination: str | None, density: float | None) -> Plan | None:
    """The combination asked for (`run` and each `--combine` as `SPEC[:WEIGHT]`, weight 1 where none is
    given), or None where there is none to make; options that do not fit are refused, naming the option."""
    run_spec, run_weight = weighted(run)
    if not combine and run_weight is None:
        if combination is not None or density is not None:
            raise TuneforgeError(
                f"--{'combination' if combination is not None else 'density'} combines several adapters: name the "
                "others with --combine OTHER_RUN[:WEIGHT].",
                code="bad_export_option",
            )
        return None
    if not combine and combination not in (None, "linear"):
        raise TuneforgeError(
            f"--combination {combination} combines several adapters, and one weighted adapter ({run}) is only "
            "scaled (linear): name the others with --combine OTHER_RUN[:WEIGHT], or leave --combination out.",
            code="bad_export_option",
        )
    combination = combination or (COMBINATIONS[0] if combine else "linear")
    if combination not in COMBINATIONS:
        raise TuneforgeError(unknown_choice("--combination", combination, COMBINATIONS), code="bad_export_option")
    if combination in WITH_DENSITY and density is None:
        raise TuneforgeError(
            f"--combination {combination} needs --density: the share of each adapter's values it keeps, above 0 "
            "and at most 1 (e.g. --density 0.5).",
            code="bad_export_option",
        )
    if combination not in WITH_DENSITY and density is not None:
        raise TuneforgeError(
            f"--density applies to --combination {', '.join(WITH_DENSITY)}; {combination} keeps every value. "
            "Leave --density out, or choose one of those.",
            code="bad_export_option",
        )
    if density is not None and not 0 < density <= 1:
        raise TuneforgeError(
            f"--density {density} is the share of each adapter's values kept: give a number above 0 and at most 1.",
            code="bad_export_option",
        )
    parts = [Part(run_spec, 1.0 if run_weight is None else run_weight)]
    for text in combine:
        spec, weight = weighted(text)
        parts.append(Part(spec, 1.0 if weight is None else weight))
    return Plan(parts, combination, density)


def check(plan: Plan, console) -> ModelSource:
    """Resolve every part and refuse what cannot be combined (no weights read); returns the first part's source.
    The export takes the first part's tokenizer: a part trained with another chat template is warned of."""
    for part in plan.parts:
        part.source = resolve(part.spec)
        if part.source.adapter is None:
            raise TuneforgeError(
                f"{part.spec} holds a full model, not an adapter: {describe_whole_model(part.source)}. Only LoRA "
                "adapters (LoRA run folders, checkpoints or adapter folders) can be combined.",
                code="not_an_adapter",
            )
    first = plan.parts[0]
    configs = {}
    for part in plan.parts:
        if part.source.path.resolve() != first.source.path.resolve():
            raise TuneforgeError(
                f"{part.spec} was trained on {part.source.path}, but {first.spec} on {first.source.path}: adapters "
                "combine only on the base they were both trained on. Train both on one base.",
                code="adapter_base_mismatch",
            )
        configs[part.spec] = config = _adapter_config(part.source.adapter)
        _check_combinable(part, config)
    template = chat_template(load_tokenizer(first.source))
    for part in plan.parts[1:]:
        if chat_template(load_tokenizer(part.source)) != template:
            console.print(
                f"[yellow]warning:[/] {plain(part.spec)} was trained with another chat template than "
                f"{plain(first.spec)}; the combined model is exported with {plain(first.spec)}'s, so what "
                f"{plain(part.spec)} learned may show less."
            )
    if plan.combination in SAME_RANK:
        ranks = {spec: _ranks(config) for spec, config in configs.items()}
        if len({rank for _, rank in ranks.items()}) > 1:
            raise TuneforgeError(
                f"--combination {plan.combination} adds the adapters' A and B matrices, which needs one rank in "
                f"every layer, but the ranks are {'; '.join(f'{spec}: {rank}' for spec, rank in ranks.items())}. "
                "Use --combination cat (exact) or svd, which take adapters of any rank.",
                code="bad_export_option",
            )
    return first.source


def _adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TuneforgeError(f"{path} cannot be read: {err}.", code="model_load_failed") from err


def _check_combinable(part: Part, config: dict) -> None:
    where = f"{part.spec} ({part.source.adapter / 'adapter_config.json'})"
    instead = (
        "Serve the adapters side by side instead (tuneforge serve --adapter NAME=RUN ...), or train one adapter "
        "on both tasks' data."
    )
    if config.get("peft_type", "LORA") != "LORA":
        raise TuneforgeError(
            f"{where} is a {config.get('peft_type')} adapter (peft_type); only LoRA adapters can be combined.",
            code="not_combinable",
        )
    if config.get("use_dora"):
        raise TuneforgeError(
            f"{where} is a DoRA adapter (use_dora: true): PEFT combines LoRA's A and B matrices but not DoRA's "
            f"magnitudes, so the combined adapter would not be the trained one. {instead}",
            code="not_combinable",
        )
    if config.get("modules_to_save"):
        raise TuneforgeError(
            f"{where} trains {', '.join(config['modules_to_save'])} whole (modules_to_save, lora.modules_to_save): "
            f"PEFT does not carry such layers into a combined adapter, which would hold the base's untrained ones. "
            f"{instead}",
            code="not_combinable",
        )
    if config.get("trainable_token_indices"):
        raise TuneforgeError(
            f"{where} trains embedding rows of its own (trainable_token_indices: tokens added in training, "
            "model.add_tokens): PEFT does not carry them into a combined adapter, which would hold the base's "
            f"untrained rows. {instead}",
            code="not_combinable",
        )
    if config.get("target_parameters"):
        raise TuneforgeError(
            f"{where} targets parameters (target_parameters), which PEFT cannot combine. {instead}",
            code="not_combinable",
        )


def _ranks(config: dict) -> str:
    pattern = config.get("rank_pattern") or {}
    return f"r={config.get('r')}" + (f", rank_pattern {pattern}" if pattern else "")


def write(plan: Plan, folder: Path) -> Path:
    """Combine the plan's adapters (checked by `check`) and save the result under `folder`; returns the
    adapter folder, a plain PEFT adapter on the parts' base."""
    model = load_model(plan.parts[0].source)  # a PeftModel holding the first adapter as "default"
    names = ["default"]
    for i, part in enumerate(plan.parts[1:], 1):
        copies, _ = base_weight_copies(model, part.source.adapter)
        names.append(f"part-{i}")
        model.load_adapter(str(part.source.adapter), adapter_name=names[-1], key_mapping=copies)
    _target_adapted_modules(model, names)
    # DARE drops values at random: seeded, so one export gives one adapter.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.add_weighted_adapter(
            names,
            [part.weight for part in plan.parts],
            COMBINED,
            combination_type=plan.combination,
            density=plan.density,
            # svd keeps the first r singular vectors: the reduced SVD gives them without the full square
            # matrices, which for an output layer of a large vocabulary (49152 rows) take 10 GB.
            svd_full_matrices=False,
        )
    # PEFT folds each adapter's scaling into the combined A and B and gives the combined adapter
    # lora_alpha = r, a scaling of 1; with use_rslora kept from the first adapter that scaling would be
    # alpha / sqrt(r) = sqrt(r) on loading, so the saved adapter scales plainly.
    model.peft_config[COMBINED].use_rslora = False
    model.save_pretrained(folder, selected_adapters=[COMBINED])
    return folder / COMBINED


def _target_adapted_modules(model, names: list[str]) -> None:
    """Name in each loaded adapter's config the modules it puts LoRA on, one by one. PEFT's combined adapter
    takes the first adapter's config with the adapters' target_modules joined, so the first one's
    layers_to_transform (lora.from_layer) and exclude_modules would leave out layers another adapter trains,
    and joined names would reach modules no adapter trains; named one by one, their union is exactly the
    modules some adapter trains."""
    from peft.tuners.lora import LoraLayer

    layers = [(key, module) for key, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)]
    for name in names:
        config = model.peft_config[name]
        config.target_modules = {key for key, layer in layers if name in layer.lora_A or name in layer.lora_embedding_A}
        config.layers_to_transform = config.layers_pattern = config.exclude_modules = None

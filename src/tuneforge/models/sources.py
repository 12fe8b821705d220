"""What a `base_model` string means: a `ModelSource` naming the base folder and an optional adapter.

Resolution order, first match wins:
1. a registry name (pulled and converted on first use);
2. a local Hugging Face folder (has config.json);
3. a local `.gguf` file (converted once into the cache, keyed by its sha256);
4. a PEFT adapter folder (adapter_config.json), a finished tuneforge run (final/), or a checkpoint
   folder holding one model or adapter;
5. a hub id `org/name` (the local Hugging Face cache first; the hub only when it is reachable).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from ..console import new_console, plain
from ..errors import ConfigError, ModelSourceError, json_kind
from ..fsio import BEING_DELETED_PREFIX, SWAPPED_OUT_PREFIX, TEMPORARY_PREFIX
from .convert import cached_registry_folder, convert_local_gguf, pull, text_ggufs, unknown_registry_name
from .registry import REGISTRY

SourceKind = Literal["registry", "hf_folder", "gguf", "adapter", "hub"]

# A hub repo id: exactly one slash; a spec with more, or starting with . / ~, is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a causal LM needs from a hub repo; skips duplicate weight formats (.bin, .onnx, .gguf).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_PROBE_SECONDS = 3.0
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: SourceKind
    path: Path  # a Hugging Face folder holding the base model
    adapter: Path | None  # a PEFT adapter folder to apply on top, if any
    name: str  # a short human name: registry name, folder or run name, hub id


def untuned_base_note(source: ModelSource) -> str | None:
    """One line for `chat` and `serve` when `source` is a registry base model as it is (no adapter on it):
    it has not learned the chat format, so what it says in a chat reads poorly; None for any other model."""
    entry = REGISTRY.get(source.name) if source.kind == "registry" else None
    if entry is None or entry.instruction_tuned or source.adapter is not None:
        return None
    return (
        f"{entry.name} is a base model, not instruction-tuned: it has not learned the chat format, so its replies "
        f"will be poor until it is fine-tuned (e.g. `tuneforge quickstart --model {entry.name}`)"
    )


def resolve_at(spec: str | os.PathLike, where: str, *, pull_missing: bool = True) -> ModelSource:
    """`resolve`, a model that cannot be found or read refused with `where` first (the config key or option that
    named it: base_model, distill.teacher, --teacher), so the message says which model it is about."""
    try:
        return resolve(spec, pull_missing=pull_missing)
    except ModelSourceError as error:
        raise ModelSourceError(f"{where}: {error.message}", code=error.code) from None


def resolve(spec: str | os.PathLike, *, pull_missing: bool = True) -> ModelSource:
    """Turn a `base_model` string into a `ModelSource`, pulling or converting it when needed.

    With `pull_missing=False` nothing is downloaded or converted: a model not yet in the cache is a
    `ModelSourceError` that says how to fetch it.
    """
    if not isinstance(spec, str | os.PathLike):  # str() would make a name of None or a list, looked for as a path
        raise ModelSourceError(
            f"a model is a registry model's name ({', '.join(REGISTRY)}), a folder's or .gguf file's path or a hub "
            f"id (org/name), as a str or Path; got {type(spec).__name__} {spec!r:.60}.",
            code="unknown_model",
        )
    text = str(spec).strip()
    if not text:
        raise ModelSourceError(
            f"the model's name is empty. Give a registry model ({', '.join(REGISTRY)}), a local folder, "
            "a .gguf file or a hub id (org/name).",
            code="missing_model",
        )
    if text.lower() in REGISTRY:
        name = text.lower()
        return ModelSource(text, "registry", _registry_folder(name, pull_missing), None, name)
    local = Path(text).expanduser()
    if local.exists():
        return _resolve_local(text, local, pull_missing=pull_missing)
    if _looks_like_path(text):
        raise ModelSourceError(
            f"{text} does not exist (looked for {local.absolute()}). Check the path, or use a "
            f"registry model ({', '.join(REGISTRY)}) or a hub id (org/name).",
            code="model_not_found",
        )
    if _HUB_ID.fullmatch(text):
        try:
            return _resolve_hub(text, pull_missing=pull_missing)
        except ModelSourceError as e:
            if local.parent.is_dir():  # `runs/my-rnu`: a path with a typo far more likely than a hub id
                raise ModelSourceError(
                    f"{text} does not exist (looked for {local.absolute()}; {local.parent}/ holds "
                    f"{_listing(local.parent)}). Check the path. As a hub id: {e.message}",
                    code="model_not_found",
                ) from None
            raise
    raise unknown_registry_name(text)


def _listing(folder: Path, most: int = 8) -> str:
    names = sorted(child.name for child in folder.iterdir() if not child.name.startswith("."))
    if not names:
        return "nothing"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _registry_folder(name: str, pull_missing: bool) -> Path:
    cached = cached_registry_folder(REGISTRY[name])
    if cached:
        return cached
    if not pull_missing:
        raise ModelSourceError(
            f"{name} has not been pulled yet: run `tuneforge models pull {name}` (needs pip's index once).",
            code="model_not_pulled",
        )
    # Said before the download starts: a command that reads a model (info, train, eval) pulls it on the way.
    new_console(stderr=True, soft_wrap=True).print(
        plain(
            f"{name} is not in the model cache yet: pulling it first, as `tuneforge models pull {name}` does "
            f"(a {REGISTRY[name].gguf_size / 1e6:.1f} MB download, converted once into a trainable folder)"
        ),
        highlight=False,
    )
    return pull(name)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith(".gguf")
        or bool(re.match(r"[A-Za-z]:[\\/]", text))  # a Windows drive
    )


# ---- local files and folders ---------------------------------------------------------------------


def _resolve_local(spec: str, path: Path, *, pull_missing: bool, name: str | None = None) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            folder = convert_local_gguf(path, convert_missing=pull_missing)
            return ModelSource(spec, "gguf", folder, None, name or path.stem)
        raise ModelSourceError(
            f"{path} is a file but not a .gguf model. Give a .gguf file, or a folder holding config.json "
            "(a Hugging Face model) or adapter_config.json (a PEFT adapter).",
            code="model_not_found",
        )
    if (path / "config.json").is_file():
        _refuse_remote_code(path)
        return ModelSource(spec, "hf_folder", path, None, name or _folder_name(path))
    if (path / "adapter_config.json").is_file():
        return _resolve_adapter(spec, path, pull_missing=pull_missing, name=name or path.name)
    # A run or checkpoint folder: the model is one level down. Named after the outer folder,
    # which is what the user knows it by (`runs/my-run`, not `final`).
    return _resolve_local(spec, _model_inside(path), pull_missing=pull_missing, name=name or path.name)


def _folder_name(folder: Path) -> str:
    """What a model folder is known by: its name, or for a snapshot in the Hugging Face cache
    (models--org--name/snapshots/COMMIT) its hub id, as `resolve("org/name")` names it."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return folder.name


def _model_inside(folder: Path) -> Path:
    """The model or adapter a run or checkpoint folder holds: `final/`, else its only model subfolder. One still
    being written (`atomic_dir`'s temporary folder, or the earlier one it swaps out and deletes) is none."""
    if (folder / "final").is_dir():
        return folder / "final"
    candidates = sorted(
        child
        for child in folder.iterdir()
        if child.is_dir()
        and not child.name.startswith((TEMPORARY_PREFIX, SWAPPED_OUT_PREFIX, BEING_DELETED_PREFIX))
        and ((child / "config.json").is_file() or (child / "adapter_config.json").is_file())
    )
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ModelSourceError(
            f"{folder} holds several models ({', '.join(c.name for c in candidates)}): give the folder of one.",
            code="ambiguous_model",
        )
    from ..training.checkpoint import latest  # here: training imports models
    from ..training.run_folder import RUN_LOCK, training_process

    # A complete checkpoint only, never one a stopped run left half-written (.tmp-step-N-...).
    newest = latest(folder / "checkpoints")
    if (folder / "config.yaml").is_file():  # a tuneforge run's own folder
        if (process := training_process(folder)) is not None:
            training = f"{folder} is a tuneforge run still training (process {process} holds its {RUN_LOCK})"
            raise ModelSourceError(
                f"{training}: it has no final/ until training ends. Wait for it to end, or give its newest "
                f"checkpoint: {newest}."
                if newest
                else f"{training} and has saved no model yet. Wait for it to save a checkpoint (train.save_every) "
                "or to end.",
                code="run_in_progress",
            )
        if newest is None:
            raise ModelSourceError(
                f"{folder} is a tuneforge run that has saved no model yet: no final/ (written when training ends), "
                "no complete checkpoint in checkpoints/ (a step cut short as it was written is none) and no "
                f"training process holding its {RUN_LOCK}, so it stopped before saving one. Train it again "
                "(tuneforge train CONFIG --overwrite).",
                code="model_not_found",
            )
    if newest:
        hint = f" The run has no final/ yet but has checkpoints: point at one, e.g. {newest}."
    elif ggufs := text_ggufs(folder):  # a GGUF export's folder
        hint = (
            f" It holds a GGUF file: point at it, {ggufs[0]}."
            if len(ggufs) == 1
            else f" It holds GGUF files: point at one, e.g. {ggufs[0]}."
        )
    else:
        hint = ""
    raise ModelSourceError(
        f"{folder} is not a model: it holds no config.json (Hugging Face model), adapter_config.json "
        f"(PEFT adapter) or final/ (finished tuneforge run).{hint}",
        code="model_not_found",
    )


def _resolve_adapter(spec: str, adapter_dir: Path, *, pull_missing: bool, name: str) -> ModelSource:
    try:
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{adapter_dir / 'adapter_config.json'} cannot be read: {err}.") from err
    _require_peft_config(adapter_dir / "adapter_config.json", adapter_config)
    _require_adapter_weights(adapter_dir)
    base = _adapter_base(adapter_dir, adapter_config.get("base_model_name_or_path"), pull_missing=pull_missing)
    if base.adapter is not None:
        raise ModelSourceError(
            f"The adapter at {adapter_dir} sits on another adapter ({base.adapter}); stacked adapters are "
            "not supported. Merge the first one into its base (`tuneforge export`) and use that folder.",
            code="stacked_adapter",
        )
    return ModelSource(spec, "adapter", base.path, adapter_dir, name)


def _require_peft_config(path: Path, config) -> None:
    """Refuse an adapter_config.json that PEFT cannot build an adapter from: no JSON object, or one without a
    peft_type PEFT knows (it would fail with a bare KeyError). A name it does not know may be a newer PEFT's type."""
    import peft
    from peft.utils import PeftType

    if not isinstance(config, dict):
        problem = f"holds {json_kind(config)}, not an object"
    elif "peft_type" not in config:
        problem = "names no peft_type"
    elif not isinstance(config["peft_type"], str):
        problem = f"names peft_type {config['peft_type']!r}, which is no PEFT adapter type (LORA, ...)"
    elif config["peft_type"] not in {kind.value for kind in PeftType}:
        raise ModelSourceError(
            f"{path} names peft_type {config['peft_type']!r}, which PEFT {peft.__version__} here does not know "
            "(LORA, ...). An adapter type of a newer PEFT: merge it into its base with that PEFT (merge_and_unload) "
            "and give the merged folder. Otherwise the file is damaged: copy the adapter again from where it came "
            "from.",
            code="adapter_incomplete",
        )
    else:
        return
    raise ModelSourceError(
        f"{path} {problem}: it is damaged, or not the config PEFT saves with an adapter. Copy the adapter again "
        "from where it came from.",
        code="adapter_incomplete",
    )


def _require_adapter_weights(adapter_dir: Path) -> None:
    """An adapter folder holds its weights beside its config; without them PEFT would look for the
    folder's path on the Hugging Face hub and fail with a message about repo ids."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    if not any((adapter_dir / name).is_file() for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise ModelSourceError(
            f"{adapter_dir} has adapter_config.json but no adapter weights ({SAFETENSORS_WEIGHTS_NAME} or "
            f"{WEIGHTS_NAME}): the adapter was not saved or copied whole. Point at a complete checkpoint or "
            "the run's final/.",
            code="adapter_incomplete",
        )


def _adapter_base(adapter_dir: Path, recorded: str | None, *, pull_missing: bool) -> ModelSource:
    """Find an adapter's base: as recorded in adapter_config.json, else as the run's config names it.

    The recorded base is often an absolute path on the machine that trained it, so the base_model
    of the run's config.yaml (a registry name or hub id, usually) is the portable fallback.
    """
    candidates = []
    if recorded:
        beside = adapter_dir / recorded
        candidates.append(str(beside) if not Path(recorded).is_absolute() and beside.exists() else recorded)
    run_base = _run_config_base_model(adapter_dir)
    if run_base and run_base not in candidates:
        candidates.append(run_base)
    if not candidates:
        raise ModelSourceError(
            f"The adapter at {adapter_dir} does not say which base model it was trained on: set "
            "base_model_name_or_path in its adapter_config.json.",
            code="adapter_base_missing",
        )
    problems = []
    for candidate in candidates:
        try:
            return resolve(candidate, pull_missing=pull_missing)
        except ModelSourceError as err:
            problems.append(f"'{candidate}': {err.message}")
    raise ModelSourceError(
        f"The base model of the adapter at {adapter_dir} cannot be found. Tried "
        + "; ".join(problems)
        + " Make the base available, or edit base_model_name_or_path in its adapter_config.json.",
        code="adapter_base_missing",
    )


def _run_config_base_model(adapter_dir: Path) -> str | None:
    """`base_model` from the config.yaml of the run this adapter belongs to (final/ or a checkpoint)."""
    base_model = run_config_of(adapter_dir).get("base_model")
    return str(base_model) if base_model else None


def run_config_path(model_dir: Path) -> Path | None:
    """The config.yaml of the run whose `final/` or `checkpoints/step-N/` `model_dir` is; None for any other
    folder."""
    model_dir = Path(model_dir).resolve()
    if model_dir.name == "final":
        return model_dir.parent / "config.yaml"
    if model_dir.parent.name == "checkpoints":
        return model_dir.parent.parent / "config.yaml"
    return None


def run_config_of(model_dir: Path) -> dict:
    """The config.yaml, as written, of the run whose `final/` or `checkpoints/step-N/` `model_dir`
    is; {} for any other folder, or a config that cannot be read."""
    import yaml

    from ..config import load_yaml

    path = run_config_path(model_dir)
    if path is None:
        return {}
    try:
        config = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return {}
    return config if isinstance(config, dict) else {}


def describe_whole_model(source: ModelSource) -> str:
    """What a model with no adapter is, for the refusals that wanted one (`export --format adapter`, `serve
    --adapter`), from the config.yaml of the run that saved it: a run whose every weight trained, or a LoRA policy
    saved merged into a base that existed only in memory."""
    recorded = run_config_of(source.path)
    method = recorded.get("method")
    key = {"distill": "student", "dpo": "policy", "grpo": "policy"}.get(method)
    trained = (recorded.get(method) or {}).get(key) if key else None
    if not method or (trained == "lora" and method == "distill"):
        return "it is a base model, or a model saved whole (no adapter_config.json)"
    if trained == "lora":  # dpo and grpo merge a LoRA base_model before their LoRA policy trains
        return (
            f"it is a {method} run whose LoRA {key} ({method}.{key}: lora) trained on base_model "
            f"{recorded.get('base_model')}, a LoRA adapter it merged into its base first; that merged base exists "
            "only in memory, so the run saved its model merged"
        )
    if not key:
        return f"it is a run that trained every weight (method: {method})"
    return f"it is a {method} run that trained every weight ({method}.{key}: {trained})"


# ---- the Hugging Face hub ------------------------------------------------------------------------


def _resolve_hub(repo_id: str, *, pull_missing: bool) -> ModelSource:
    folder = _hub_snapshot(repo_id, local_only=True)
    if folder is None:
        if _hub_offline():
            raise _hub_unavailable(repo_id, "HF_HUB_OFFLINE is set")
        if not pull_missing:
            raise ModelSourceError(
                f"{repo_id} is not in the local Hugging Face cache and downloads are off here. "
                f"Run `tuneforge models info {repo_id}` once to download it.",
                code="model_not_pulled",
            )
        unreachable = _hub_unreachable_reason()
        if unreachable:
            raise _hub_unavailable(repo_id, unreachable)
        folder = _hub_snapshot(repo_id, local_only=False)
    if folder is None or not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"The hub repo {repo_id} has no config.json, so it is not a transformers model. If it holds "
            "a .gguf file, download that file and give its path instead.",
            code="model_not_found",
        )
    _refuse_remote_code(folder)
    return ModelSource(repo_id, "hub", folder, None, repo_id)


def _refuse_remote_code(folder: Path) -> None:
    """Refuse a model whose architecture exists only as code in its folder (config.json's `auto_map`
    for a `model_type` transformers does not have). tuneforge never runs a model's own code
    (`trust_remote_code`): transformers would otherwise stop at a y/N prompt and then fail. A model
    whose type transformers has (Phi-3, Qwen 2 and others still ship an `auto_map`) loads with
    transformers' own classes, as transformers does by default."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader says what is wrong with it
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    code = sorted({str(ref).split("--")[-1].split(".")[0] + ".py" for ref in _auto_map_refs(config["auto_map"])})
    raise ModelSourceError(
        f"{folder / 'config.json'}: model_type {model_type!r} is not an architecture transformers has; its "
        f"auto_map names code that ships with the model ({', '.join(code)}), and tuneforge does not run a "
        "model's own code (trust_remote_code). Use a version of the model in a transformers architecture "
        "(set model_type and architectures to the built-in ones it matches, or get a converted copy), or a "
        "transformers release that has this architecture.",
        code="remote_code",
    )


def _auto_map_refs(auto_map: dict) -> list[str]:
    """The `module.Class` references of an auto_map (a tokenizer's are pairs, slow and fast)."""
    refs = []
    for value in auto_map.values() if isinstance(auto_map, dict) else []:
        refs.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return refs


def _hub_snapshot(repo_id: str, *, local_only: bool) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=local_only))
    except LocalEntryNotFoundError as err:
        if local_only:
            return None
        raise _hub_unavailable(repo_id, f"the download failed: {err}") from err
    except (RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise ModelSourceError(
            f"Could not get {repo_id} from the Hugging Face hub: {err}. Check the id (org/name), and "
            "for gated models your token (`hf auth login`).",
            code="download_failed",
        ) from err
    # A snapshot that another tool cached partly (a tokenizer only, say) does not count as local.
    return folder if (folder / "config.json").is_file() or not local_only else None


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached, or None when a TCP connection opens within a few seconds.

    The probe runs in a daemon thread so that a hanging DNS lookup, which socket timeouts do not
    cover, cannot stall resolution either.
    """
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_HUB_PROBE_SECONDS).close()
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_SECONDS)
    if outcome.get("ok"):
        return None
    if "error" in outcome:
        return f"cannot connect to {host}:{port}: {outcome['error']}"
    return f"{host}:{port} did not answer within {_HUB_PROBE_SECONDS:.0f} s"


def _hub_unavailable(repo_id: str, reason: str) -> ModelSourceError:
    return ModelSourceError(
        # A relative path is looked for from the working folder: a recipe made for another folder
        # (runs/quickstart) says where it was looked for.
        f"'{repo_id}' is not a local path (from {Path.cwd()}), so it was taken as a Hugging Face hub id, but the "
        "hub cannot "
        f"be used ({reason}) and the model is not in the local Hugging Face cache. Use an offline "
        f"source instead: a registry model ({', '.join(REGISTRY)}; see `tuneforge models list`), a "
        "local Hugging Face folder (with config.json), or a local .gguf file.",
        code="hub_unavailable",
    )

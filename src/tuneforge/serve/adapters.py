"""One base model and the LoRA adapters served on it, each under a name the `model` field picks.

Adapters are PEFT adapters on the one base model in memory (`load_adapter` / `set_adapter`; the
adapter layers disabled for the base), loaded on first use; beyond `max_loaded`, the least
recently used one is deleted again. Every adapter is resolved and its weights file checked (its header
read, no weights loaded) when the pool is built, or when `add_adapter` adds it, so a wrong path, an
adapter for another base or a damaged weights file is an error then, not at the first request.
`retire` stops serving an adapter's name at once; `remove`, on the
thread that owns the model once no request on it is left, deletes it (`Engine.unload` does both).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from ..config import DEFAULT_MODEL
from ..errors import ConfigError, ModelSourceError
from ..generate import load_for_inference
from ..models import ModelSource, describe_whole_model, load_tokenizer, resolve
from ..models.loading import (
    MODEL_BUILDING,
    adapter_embedding_rows,
    adapter_token_rows,
    adapter_weight_shapes,
    base_weight_copies,
    input_embedding_name,
    model_config,
    model_vocab_rows,
    refuse_damaged_adapter,
    refuse_reward_model,
    trained_rope_scaling,
)


class AdapterPool:
    """The base model (`model` is what to run: the base, or a `PeftModel` once an adapter is loaded).

    `activate` and `remove` belong to the thread that owns the model; `names`, `tokenizer` and `loaded`
    may be read from any thread.
    """

    def __init__(
        self,
        base: str | None = None,
        adapters: dict[str, str] | None = None,
        *,
        max_loaded: int = 4,
        precision: str = "fp32",
    ):
        if max_loaded < 1:
            raise ConfigError(f"max_loaded must be at least 1, got {max_loaded}", code="invalid_value")
        adapter_sources = {name: _adapter_source(name, spec) for name, spec in (adapters or {}).items()}
        base_source = _base_source(base, adapter_sources)
        if base_source.adapter is not None:
            # A run or adapter folder as the model: serve its base, and the adapter under the run's name.
            if base_source.name in adapter_sources:
                raise ConfigError(
                    f"Adapter name '{base_source.name}' is the name the model {base_source.spec} is served under; "
                    "pick another (--adapter OTHER=PATH).",
                    code="invalid_value",
                )
            adapter_sources = {base_source.name: base_source, **adapter_sources}
            base_source = resolve(str(base_source.path))
        self.base_source = base_source
        self.base_name, self.base_path = base_source.name, base_source.path.resolve()
        self._base_config = model_config(self.base_path)
        self._embedding_name = input_embedding_name(self._base_config)
        self._base_rows = model_vocab_rows(self._base_config)
        # The base in memory runs with the rotary scaling its adapters trained with (model.rope_scaling), each
        # adapter's read once from its run.
        trained = {name: trained_rope_scaling(source.adapter) for name, source in adapter_sources.items()}
        self.rope_scaling = next((scaling for scaling in trained.values() if scaling), None)
        for name, source in adapter_sources.items():
            self._check(name, source, trained[name])
        self.max_loaded = max_loaded
        self._sources = adapter_sources
        self._tokenizers = {self.base_name: load_tokenizer(base_source)}
        self._tokenizers.update({name: load_tokenizer(source) for name, source in adapter_sources.items()})
        self.model = load_for_inference(base_source, "serve", precision, rope_scaling=self.rope_scaling)
        self._module_names = [n for n, _ in self.model.named_modules()]
        # Each adapter's PEFT config, read once as it joins: later checks compare with the adapters as served,
        # whose folders may have gone from disk meanwhile (a fine-tuned model deleted through the jobs API).
        self._configs = {name: _peft_config(source) for name, source in adapter_sources.items()}
        names = list(adapter_sources)
        for i, name in enumerate(names):
            for other in names[:i]:
                self._check_compatible(name, adapter_sources[name], self._configs[name], other)
        # Adapters in memory, least recently used first, each with the number of its loading (weights loaded again
        # after an eviction may be new files: `cache_model`).
        self._loaded: OrderedDict[str, int] = OrderedDict()
        self._base_names = {self.base_name}
        # What PEFT calls each adapter: PEFT keys its layers by adapter name in torch ModuleDicts, which
        # refuse a '.', so a name as a client gives it (a run folder's) is not used there.
        self._peft_names = {name: f"adapter-{i}" for i, name in enumerate(adapter_sources)}
        self._added = len(adapter_sources)
        self._loads = 0  # adapter weights loaded so far: each loading's number tells it from the others
        self._retiring: set[str] = set()  # names no longer served, deleted once their requests are answered
        self._lock = threading.Lock()

    def add_adapter(self, name: str, spec: str, *, pull_missing: bool = True) -> None:
        """Serve the adapter at `spec` as `name` too (its weights load on first use); a name served already stays.
        Without `pull_missing`, nothing is downloaded or converted for it (`models.resolve`)."""
        if name in self._tokenizers:
            return
        source = _adapter_source(name, spec, pull_missing=pull_missing)
        self._check(name, source, trained_rope_scaling(source.adapter))
        config = _peft_config(source)
        for other in list(self._sources):
            self._check_compatible(name, source, config, other)
        tokenizer = load_tokenizer(source)
        with self._lock:
            self._tokenizers[name] = tokenizer
            self._sources[name] = source
            self._configs[name] = config
            self._peft_names[name] = f"adapter-{self._added}"
            self._added += 1

    def retire(self, name: str) -> None:
        """Stop serving the adapter `name`: `serves` and `names` leave it out from now on; requests taken
        already keep it until `remove` deletes it."""
        if name not in self._sources:
            raise ConfigError(f"'{name}' is not an adapter served here.", code="model_not_found")
        with self._lock:
            self._retiring.add(name)

    def remove(self, name: str) -> None:
        """Delete the retired adapter `name` (its weights too, if loaded), once no request on it is left."""
        if name in self._loaded:
            self.model.delete_adapter(self._peft_name(name))
            if len(self._loaded) == 1:
                # A PeftModel without adapters cannot run: the base goes back to its own layers.
                self.model = self.model.unload()
        with self._lock:
            self._loaded.pop(name, None)
            for held in (self._sources, self._tokenizers, self._peft_names, self._configs):
                del held[name]
            self._retiring.discard(name)

    @property
    def retiring(self) -> list[str]:
        """Adapters `retire`d and not yet removed."""
        with self._lock:
            return list(self._retiring)

    def add_base_name(self, name: str) -> None:
        """Serve the base as `name` too, so answers carry the name their request gave; a name served already stays."""
        with self._lock:
            if name not in self._tokenizers:
                self._tokenizers[name] = self._tokenizers[self.base_name]
                self._base_names.add(name)

    def serves(self, name: str) -> bool:
        """Whether `name` is the base's, one it was given with `add_base_name`, or an adapter's (not retired)."""
        with self._lock:
            return name in self._tokenizers and name not in self._retiring

    def _check(self, name: str, source: ModelSource, scaling: dict | None) -> None:
        """Refuses an adapter the shared base cannot serve; `scaling`: the model.rope_scaling it trained with."""
        _check_name(name, self.base_name)
        refuse_reward_model(source, "serve")
        if source.path.resolve() != self.base_path:
            raise ConfigError(
                f"Adapter '{name}' ({source.adapter}) was trained on {source.path}, but the server's base "
                f"model is {self.base_path}. Serve it from a server of its own on that base: tuneforge serve "
                f"--model {source.path}",
                code="adapter_base_mismatch",
            )
        if scaling != self.rope_scaling:
            # One base in memory has one window: an adapter trained on other rotary positions answers wrongly.
            raise ConfigError(
                f"Adapter '{name}' ({source.adapter}) trained with model.rope_scaling {scaling}, but the server's "
                f"base model runs with {self.rope_scaling}, and the base is shared by every adapter. Serve it from "
                "a server of its own: tuneforge serve --model "
                f"{source.adapter}.",
                code="adapter_base_mismatch",
            )
        saved = adapter_weight_shapes(source.adapter)  # a file that cannot be read is refused
        rows = adapter_embedding_rows(source.adapter, self._embedding_name, saved)
        if rows and rows != self._base_rows:
            # The base in memory is shared: resizing its vocabulary would change what the base and
            # every other adapter answer.
            raise ConfigError(
                f"Adapter '{name}' ({source.adapter}) saves its own embeddings for {rows} tokens (tokens added "
                f"in training), but the server's base model {self.base_path} has {self._base_rows}, and the base "
                f"is shared by every adapter. Serve its merged model instead: tuneforge export {source.adapter} "
                "--format merged --out DIR, then tuneforge serve --model DIR.",
                code="adapter_vocabulary_mismatch",
            )
        grown = adapter_token_rows(source.adapter)
        if grown and self._base_rows and grown > self._base_rows:
            # Its added tokens' rows are saved alone: the shared base would have to grow to hold them.
            raise ConfigError(
                f"Adapter '{name}' ({source.adapter}) trains {grown - self._base_rows} token(s) added in training "
                f"(model.add_tokens), past the {self._base_rows} embedding rows of the server's base model "
                f"{self.base_path}, and the base is shared by every adapter. Serve its merged model instead: "
                f"tuneforge export {source.adapter} --format merged --out DIR, then tuneforge serve --model DIR.",
                code="adapter_vocabulary_mismatch",
            )
        refuse_damaged_adapter(source.adapter, self._base_config, saved=saved)

    def _check_compatible(self, name: str, source: ModelSource, config, other: str) -> None:
        """PEFT holds one kind of adapter layer per module of the shared base: a layer one adapter trains whole
        (modules_to_save) cannot take another adapter's LoRA, so the two cannot be served side by side. `other`
        is served already; `name` (`source`, its PEFT `config`) is served already or joins now."""
        from peft.tuners.tuners_utils import check_target_module_exists

        sources = {name: source, other: self._sources[other]}
        configs = {name: config, other: self._configs[other]}
        for saver, adapted in ((name, other), (other, name)):
            saved = configs[saver].modules_to_save or []
            clash = sorted(
                {
                    module.rsplit(".", 1)[-1]
                    for module in self._module_names
                    if module.rsplit(".", 1)[-1] in saved and check_target_module_exists(configs[adapted], module)
                }
            )
            if clash:
                raise ConfigError(
                    f"Adapter '{saver}' ({sources[saver].adapter}) trains "
                    f"{', '.join(clash)} whole (modules_to_save) and adapter '{adapted}' puts LoRA layers on it: "
                    "the two cannot share one base in memory. Serve them from two servers, or serve one as its "
                    "merged model (tuneforge export RUN --format merged --out DIR, then tuneforge serve --model DIR).",
                    code="invalid_value",
                )

    @property
    def names(self) -> list[str]:
        """What the `model` field may name: the base first, then each adapter (not retired)."""
        with self._lock:
            return [self.base_name, *(name for name in self._sources if name not in self._retiring)]

    def tokenizer(self, name: str):
        """The tokenizer for `name`: a run's own (its chat template may differ) or the base's."""
        return self._tokenizers[name]

    @property
    def loaded(self) -> list[str]:
        """Adapters in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def activate(self, name: str):
        """Make the model run as `name` (the base or an adapter, loading it if need be); returns the model."""
        if name in self._base_names:
            if self._loaded:
                self.model.base_model.disable_adapter_layers()
            return self.model
        if name not in self._loaded:
            self._load(name)
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(self._peft_name(name), inference_mode=True)
        with self._lock:
            self._loaded.move_to_end(name)
        return self.model

    def _load(self, name: str) -> None:
        from peft import PeftModel
        from peft.utils import load_peft_weights

        from ..methods.lora import gate_up_pattern_warning_unsaid

        path = str(self._sources[name].adapter)
        # PEFT injects the adapter's layers before it reads the weights: read them first, so a broken
        # file leaves the model as it was.
        try:
            load_peft_weights(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own kinds
            raise ModelSourceError(
                f"Could not load adapter '{name}' from {path}: {err}", code="model_load_failed"
            ) from err
        # The base in memory is shared: a copy of its weights that the adapter carries must not be written
        # into it, and one that is not the base cannot be served beside it.
        copies, different = base_weight_copies(self.model, self._sources[name].adapter)
        if different:
            raise ModelSourceError(
                f"Adapter '{name}' ({path}) saves its own {', '.join(different)}, which differ from the server's "
                f"base model {self.base_path}, and the base is shared by every adapter. Serve its merged model "
                f"instead: tuneforge export {path} --format merged --out DIR, then tuneforge serve --model DIR.",
                code="adapter_base_mismatch",
            )
        with MODEL_BUILDING, gate_up_pattern_warning_unsaid():
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(
                    path, adapter_name=self._peft_name(name), is_trainable=False, key_mapping=copies
                )
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, path, adapter_name=self._peft_name(name), is_trainable=False, key_mapping=copies
                ).eval()
        with self._lock:
            self._loads += 1
            self._loaded[name] = self._loads
            evicted = list(self._loaded)[: -self.max_loaded] if len(self._loaded) > self.max_loaded else []
            for old in evicted:
                del self._loaded[old]
        for old in evicted:
            self.model.delete_adapter(self._peft_name(old))

    def cache_model(self, name: str) -> Hashable:
        """What the model runs as for `name` (activated), for a `PrefixCache`'s scope: the base for all of its
        names, each loading of an adapter apart (weights loaded again after an eviction may be new files)."""
        return "base" if name in self._base_names else self._loaded[name]

    def cache_models(self) -> set[Hashable]:
        """The `cache_model`s of the base and every adapter in memory now."""
        with self._lock:
            return {"base", *self._loaded.values()}

    def _peft_name(self, name: str) -> str:
        """What PEFT calls the adapter served as `name` (its own for the pool's life: a removed one's is not reused)."""
        with self._lock:
            return self._peft_names[name]


def load_pool(*args, **kwargs) -> AdapterPool:
    """`AdapterPool(*args, **kwargs)`, built in a thread that ends with it, for an `Engine` to decode with.

    torch's OpenMP threads belong to the thread that first computes. While a second team exists (the
    engine's thread computes too), libgomp stops the teams' threads spinning between parallel regions,
    and every one of a decoding step's few hundred small products pays to wake them: batch-1 decoding
    ran at half speed on 2 cores (docs/LOG.md). Loading in a passing thread leaves the engine's team
    the only one."""
    built: dict = {}

    def build() -> None:
        try:
            built["pool"] = AdapterPool(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            built["error"] = err

    loader = threading.Thread(target=build, name="tuneforge-load-model")
    loader.start()
    loader.join()
    if "error" in built:
        raise built["error"]
    return built["pool"]


def _peft_config(source: ModelSource):
    from peft import PeftConfig

    return PeftConfig.from_pretrained(source.adapter)


def _adapter_source(name: str, spec: str, *, pull_missing: bool = True) -> ModelSource:
    source = resolve(spec, pull_missing=pull_missing)
    if source.adapter is None:
        raise ConfigError(
            f"Adapter '{name}' ({spec}) holds a full model, not an adapter: {describe_whole_model(source)}. Serve "
            f"it as the base of a server of its own (tuneforge serve --model {spec}); adapters are LoRA adapters or "
            "LoRA run folders.",
            code="not_an_adapter",
        )
    return source


def _base_source(base: str | None, adapter_sources: dict[str, ModelSource]) -> ModelSource:
    """The base the user named; else the first adapter's base; else the bundled default model."""
    if base:
        return resolve(base)
    if adapter_sources:
        return resolve(str(next(iter(adapter_sources.values())).path))
    return resolve(DEFAULT_MODEL)


def _check_name(name: str, base_name: str) -> None:
    if not name.strip():
        raise ConfigError(f"Adapter name '{name}' must not be empty.", code="invalid_value")
    if name == base_name:
        raise ConfigError(
            f"Adapter name '{name}' is the base model's name; pick another (--adapter OTHER=PATH).",
            code="invalid_value",
        )

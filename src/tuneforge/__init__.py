"""tuneforge: fine-tune open language models from one YAML file, a CLI, Python or HTTP."""

import logging
import os
import warnings
from importlib.metadata import PackageNotFoundError, version

# transformers swaps a model's layers for kernels it downloads from the Hugging Face Hub when the
# `kernels` package is installed (transformers depends on it) and the model is on a GPU; without the
# network that download fails the load, and its kernels are code fetched at run time. tuneforge works
# from local models, so a model keeps its own layers unless the user sets USE_HUB_KERNELS=1.
os.environ.setdefault("USE_HUB_KERNELS", "0")

# bitsandbytes tries, on import on CPUs with AVX512-BF16, to fetch a faster 4-bit kernel from the Hub at run
# time and logs that it could not (`kernels` adds, with HF_HUB_OFFLINE set, that it skipped the publisher
# check); on every 8-bit forward it logs that it casts inputs to float16. Facts about its internals, not
# something a user acts on; PEFT imports it for every adapter, quantized or not, so this is set before
# anything else loads.
for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# pyproject.toml holds the version; a source tree on PYTHONPATH, never installed, has no metadata to read it from.
try:
    __version__ = version("tuneforge")
except PackageNotFoundError:
    __version__ = "0+unknown"

# PEFT reads an attribute that transformers 5 deprecates; the warning is not our users' concern.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# The Python API: each name is the function its CLI command runs, imported on first use, so importing the
# package (the CLI, `tuneforge.errors`) does not load torch; help() and a notebook's completion show its arguments.
_API = {
    "train": ("pipeline", "train"),
    "sweep": ("sweeps", "sweep"),
    "evaluate": ("eval.command", "evaluate_model"),
    "check_data": ("data.check", "check"),
    "load": ("llm", "load"),
    "export": ("exporting", "export_run"),
}


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        module, function = _API[name]
        imported = import_module(f".{module}", __name__)
        return getattr(imported, function)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

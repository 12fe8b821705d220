"""tuneforge: fine-tune open language models from one YAML file, a CLI, Python or HTTP."""

import warnings

__version__ = "0.1.0"

# PEFT reads an attribute that transformers 5 deprecates; the warning is not our users' concern.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def train(config, overrides=(), **kwargs):
    """Fine-tune as `config` (a YAML path, dict or Config) says, then evaluate as its `eval:` section
    asks; returns a `TrainResult`."""
    from .pipeline import train as _train

    return _train(config, list(overrides), **kwargs)

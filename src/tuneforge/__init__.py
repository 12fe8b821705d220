"""tuneforge: fine-tune open language models from one YAML file, a CLI, Python or HTTP."""

__version__ = "0.1.0"


def train(config, overrides=(), **kwargs):
    """Fine-tune as `config` (a YAML path, dict or Config) says; returns a `TrainResult`."""
    from .training import train as _train

    return _train(config, list(overrides), **kwargs)

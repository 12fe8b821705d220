"""tuneforge: fine-tune open language models from one YAML file, a CLI, Python or HTTP."""

__version__ = "0.1.0"

"""Serving's defaults that the command line shows and `serve`'s engine and the jobs service's inference use.

Imports nothing, so `cli` reads them without loading torch or the models.
"""

MAX_BATCH = 32  # rows decoded together, unless the caller says otherwise
MAX_WAITING = 256  # requests waiting for a place before a 429, unless the caller says otherwise

PREFIX_CACHE_MB = 1024
"""Memory for the keys and values of prompts seen before, unless the caller says otherwise: about 45,000 tokens of
SmolLM2-135M in bf16 (23 KB a token), 8,000 of an 8B Llama 3 (128 KB), a few long system prompts and
conversations at any size; small beside the weights of the model it serves."""

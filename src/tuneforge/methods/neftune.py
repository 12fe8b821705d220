"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings of training forwards.

The noise is in ±alpha / sqrt(L · d) per position, d the hidden size and L the length of the
position's own example: packing then gives each example the noise it would get alone (a packed
row's length would shrink it for every example in the row). A forward hook on the input
embeddings adds it while the model trains; validation, generation and a KL term's base model run
in eval mode and see clean embeddings. The noise is drawn from torch's global generator, whose
state checkpoints hold, so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import torch

from ..models import causal_lm
from ..models.attention import segments


def example_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For every position of a batch, the length of the example it belongs to: [batch, seq].

    A packed example that continues a shared prefix counts the prefix (`segments`), so its length is
    its last position id + 1, as it is for an example that stands alone."""
    lengths = torch.empty_like(position_ids)
    for b, row in enumerate(position_ids.tolist()):  # one host sync a step; attention makes one a layer
        for start, end, first, _ in segments(row):
            lengths[b, start:end] = first + end - start
    return lengths


def neftune_noise(alpha: float, position_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    scale = alpha / (example_lengths(position_ids).to(dtype) * hidden_size).sqrt()
    noise = torch.empty(*position_ids.shape, hidden_size, dtype=dtype, device=position_ids.device).uniform_(-1, 1)
    return noise * scale[..., None]


class NEFTune:
    """Attached to a model, its training forwards get NEFTune noise (hooks on the decoder, which
    hands over the position ids, and on the input embeddings, which get the noise)."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.position_ids = None

    def attach(self, model) -> None:
        lm = causal_lm(model)
        lm.get_decoder().register_forward_pre_hook(self._remember_positions, with_kwargs=True)
        lm.get_input_embeddings().register_forward_hook(self._add_noise)

    def _remember_positions(self, module, args, kwargs) -> None:
        positions = kwargs.get("position_ids")
        # M-RoPE's [4, rows, tokens] (`sft.trained_hidden`): the text positions lead.
        self.position_ids = positions[0] if positions is not None and positions.ndim == 3 else positions

    def _add_noise(self, module, args, embeddings: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return embeddings
        positions = self.position_ids
        if positions is None or positions.shape != embeddings.shape[:2]:
            positions = torch.arange(embeddings.shape[1], device=embeddings.device).expand(embeddings.shape[:2])
        return embeddings + neftune_noise(self.alpha, positions, embeddings.shape[-1], module.weight.dtype)

"""Which rows go into which optimizer step, micro-batch and rank.

The schedule is a pure function of (number of rows, batch size, seed, epoch): an exact resume
only needs the step number, and every rank computes the same schedule without talking.
"""

from __future__ import annotations

import math

import numpy as np


def steps_per_epoch(n_rows: int, batch_size: int, n_micro: int) -> int:
    """Optimizer steps in one epoch. A final partial batch is kept when it can still give every
    micro-batch of every rank at least one row (DDP needs every rank to take part in each step)."""
    full, rest = divmod(n_rows, batch_size)
    return full + (1 if rest >= n_micro else 0)


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def step_micro_batches(
    order: np.ndarray,
    step_in_epoch: int,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    rank: int,
    lengths: np.ndarray,
) -> list[list[int]]:
    """Row indices of each micro-batch this rank runs in one optimizer step.

    The step's rows are sorted by length and cut into grad_accum x world_size contiguous chunks,
    so rows of similar length share a micro-batch (less padding); chunk i goes to rank
    i % world_size. A 1-process run with grad_accum=k and a k-process run with grad_accum=1 thus
    compute the very same micro-batches.
    """
    rows = order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    n_chunks = grad_accum * world_size
    bounds = [math.floor(i * len(rows) / n_chunks) for i in range(n_chunks + 1)]
    chunks = [rows[bounds[i] : bounds[i + 1]].tolist() for i in range(n_chunks)]
    return chunks[rank::world_size]

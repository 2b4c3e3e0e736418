"""Which samples each optimizer step sees: a seeded, world-size-independent order.

The sampler deals in *global batches* (`global_batch_size` samples = one optimizer
step over all processes). Every process computes the same order from (seed, epoch);
process `rank` then takes micro-batches `a * world + rank` for a = 0..accum-1 of each
global batch. The samples an optimizer step sees therefore do not depend on how the
batch is split into processes and accumulation steps, and resuming needs only the
step number.

Modality-length grouping (LLaVA): image and text-only samples are shuffled apart,
each filled up to whole global batches by wrapping around (as DistributedSampler pads:
a few samples repeat once per epoch), cut into megabatches of `megabatch` global
batches, and each megabatch sorted by length. Every global batch therefore holds one
modality and similar lengths (little padding). Global batches are then shuffled.
Without grouping, one shuffled order is cut into global batches, the last one filled
by wrapping around. Either way every process gets the same number of micro-batches.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np


class GlobalBatchSampler:
    def __init__(self, lengths, has_image, global_batch_size: int, seed: int = 0,
                 group_by_modality_length: bool = True, megabatch: int = 8):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_image = np.asarray(has_image, dtype=bool)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.group = bool(group_by_modality_length)
        self.megabatch = int(megabatch)
        if len(self.lengths) == 0:
            raise ValueError("no samples to draw batches from")

    @property
    def steps_per_epoch(self) -> int:
        g = self.global_batch_size
        if not self.group:
            return math.ceil(len(self.lengths) / g)
        n_img = int(self.has_image.sum())
        return math.ceil(n_img / g) + math.ceil((len(self.lengths) - n_img) / g)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The global batches of one epoch, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        g = self.global_batch_size
        n = len(self.lengths)
        if not self.group:
            order = rng.permutation(n)
            order = np.concatenate([order, order[:(-n) % g]])
            return [order[k:k + g] for k in range(0, len(order), g)]
        batches = []
        for flag in (True, False):
            idx = np.flatnonzero(self.has_image == flag)
            if not len(idx):
                continue
            idx = idx[rng.permutation(len(idx))]
            # Fill the modality up to whole global batches by wrapping around.
            idx = np.concatenate([idx, idx[np.arange((-len(idx)) % g) % len(idx)]])
            mega = g * self.megabatch
            for start in range(0, len(idx), mega):
                chunk = idx[start:start + mega]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches += [chunk[k:k + g] for k in range(0, len(chunk), g)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def global_batch(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached = self.epoch(epoch)
            self._cached_epoch = epoch
        return self._cached[k]

    def state_dict(self) -> dict:
        """What must match on resume for the order to be the same."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_samples": int(len(self.lengths)), "group": self.group,
                "megabatch": self.megabatch}


def micro_batches(global_batch: np.ndarray, micro_batch_size: int, world_size: int,
                  rank: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch (accumulation order)."""
    chunks = [global_batch[k:k + micro_batch_size].tolist()
              for k in range(0, len(global_batch), micro_batch_size)]
    return chunks[rank::world_size]


class RankBatches:
    """A batch_sampler for DataLoader: this rank's micro-batches from `start_step`
    up to `end_step` (exclusive), across epochs."""

    def __init__(self, sampler: GlobalBatchSampler, micro_batch_size: int, world_size: int,
                 rank: int, start_step: int, end_step: int):
        self.sampler, self.mb = sampler, micro_batch_size
        self.world, self.rank = world_size, rank
        self.start, self.end = start_step, end_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield from micro_batches(self.sampler.global_batch(step), self.mb, self.world, self.rank)

    def __len__(self) -> int:
        accum = self.sampler.global_batch_size // (self.mb * self.world)
        return (self.end - self.start) * accum

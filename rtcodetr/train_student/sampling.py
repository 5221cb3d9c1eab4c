"""Which images each process trains and validates on, in which order: seeded, resumable, independent of workers."""
from __future__ import annotations

import torch


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's batches of a seeded per-epoch permutation, optionally starting mid-epoch.

    The permutation depends only on ``(seed, epoch)``; batch ``j`` of the epoch goes to process ``j % world``. With
    ``start_batch`` the first global batches are skipped, so a resumed run sees exactly the batches the
    uninterrupted one would have seen (``accelerator.skip_first_batches`` cannot promise that once the prepared
    loader's own epoch counter and RNG synchronisation are involved). Incomplete last batches are dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_process(self) -> int:
        return (self.num_samples // self.batch_size) // self.world

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        n = self.batches_per_process() * self.world
        for j in range(self.start_batch * self.world, n):
            if j % self.world == self.rank:
                yield order[j * self.batch_size:(j + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_process() - self.start_batch


class MixedBatchSampler(EpochBatchSampler):
    """Batches of ``labelled_per_batch`` labelled images (indices ``0..num_labelled-1``, in the epoch's seeded
    permutation, exactly as ``EpochBatchSampler``) plus ``unlabelled_per_batch`` unlabelled ones (indices
    ``num_labelled..num_labelled+num_unlabelled-1``).

    Epochs are counted in labelled images. The unlabelled images come from one endless stream of seeded
    permutations (a new one each time the stream has used every image), indexed by the global batch number, so
    which unlabelled images a batch gets depends only on ``(seed, epoch, batch)``: resuming mid-epoch and the process
    count do not change it.
    """

    def __init__(self, num_labelled: int, num_unlabelled: int, labelled_per_batch: int, unlabelled_per_batch: int,
                 seed: int, rank: int = 0, world: int = 1):
        super().__init__(num_labelled, labelled_per_batch, seed, rank, world)
        self.num_unlabelled, self.unlabelled_per_batch = num_unlabelled, unlabelled_per_batch

    def _unlabelled(self, global_batch: int) -> list[int]:
        out = []
        for k in range(self.unlabelled_per_batch):
            cycle, i = divmod(global_batch * self.unlabelled_per_batch + k, self.num_unlabelled)
            if getattr(self, "_cycle", None) != cycle:
                g = torch.Generator().manual_seed((self.seed * 100_003 + cycle) * 2 + 1)
                self._cycle, self._perm = cycle, torch.randperm(self.num_unlabelled, generator=g).tolist()
            out.append(self.num_samples + self._perm[i])
        return out

    def __iter__(self):
        per_epoch = self.batches_per_process() * self.world
        for j, labelled in zip(range(self.start_batch * self.world + self.rank, per_epoch, self.world),
                               super().__iter__()):
            yield labelled + self._unlabelled(self.epoch * per_epoch + j)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Validation images for this process: a strided shard, no padding (the evaluator gathers them)."""
    return list(range(rank, n, world))

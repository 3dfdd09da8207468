"""A training DataLoader that resumes mid-epoch exactly.

Lightning restores its loop counters from a checkpoint but restarts a plain ``DataLoader`` from the
beginning of the epoch with a fresh shuffle, so a run killed mid-epoch and resumed sees other batches than
an uninterrupted one (Lightning warns about it). This loader makes the order a pure function of
``(seed, epoch)`` (a sampler seeded per epoch, independent of the global RNG) and, when a fit is resumed,
skips the batches the restored loop already completed in that epoch. It implements ``state_dict`` /
``load_state_dict``, which is how Lightning recognises a resumable loader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochSeededSampler", "ResumableDataLoader"]


class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(len(data))`` drawn from ``seed + epoch``; ``skip`` leading indices."""

    def __init__(self, data: Sized, seed: int) -> None:
        self.data, self.seed = data, seed
        self.epoch = 0
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.order(generator)
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def order(self, generator: torch.Generator) -> list[int]:
        """This epoch's full index order (a random permutation; subclasses may group it)."""
        return torch.randperm(len(self.data), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.data)


class ResumableDataLoader(DataLoader):
    """Shuffled DataLoader whose epoch order is reproducible and which resumes mid-epoch.

    Args:
        dataset: a map-style dataset.
        seed: base seed of the per-epoch permutation.
        trainer_ref: a zero-argument callable returning the running ``Trainer`` (or None); the loader
            reads the current epoch and, after a restore, how many batches of it were already trained.
        sampler: an `EpochSeededSampler` (subclass) to use instead of a plain shuffle with ``seed``.
        **kwargs: passed to ``DataLoader`` (``batch_size``, ``collate_fn``, ``num_workers``, ...).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        trainer_ref: Any,
        sampler: EpochSeededSampler | None = None,
        **kwargs: Any,
    ) -> None:
        self._sampler = sampler if sampler is not None else EpochSeededSampler(dataset, seed)
        # DataLoader draws a base seed for its iterator from `generator`, or from the global RNG when there
        # is none: a private generator keeps a resumed run's global RNG (dropout) in step with the original.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, sampler=self._sampler, **kwargs)
        self._trainer_ref = trainer_ref
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        trainer = self._trainer_ref()
        if trainer is not None:
            self._sampler.epoch = trainer.current_epoch
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == self._sampler.epoch and resume["trained"] < len(self):
            self._sampler.skip = resume["trained"] * (self.batch_size or 1)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """Where training stands: the epoch and how many of its batches were trained.

        The count comes from the trainer's progress, not from this loader's iterator, because Lightning
        prefetches a batch ahead of the one being trained.
        """
        trainer = self._trainer_ref()
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        return {"epoch": self._sampler.epoch, "trained": int(trained), "seed": self._sampler.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict.get("seed", self._sampler.seed) != self._sampler.seed:
            raise ValueError(
                f"resuming with data seed {self._sampler.seed}, but the checkpoint was trained with seed "
                f"{state_dict['seed']}: the remaining batches of the epoch would differ"
            )
        self._resume = {"epoch": int(state_dict["epoch"]), "trained": int(state_dict.get("trained", 0))}

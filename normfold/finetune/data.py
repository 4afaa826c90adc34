"""Token streams for fine-tuning: deterministic batches, identical on every rank.

Training batch of step s: `global_batch` windows of seq + 1 tokens at offsets drawn from a generator
seeded by (seed, s); rank r of w takes rows [r * global_batch / w, (r + 1) * global_batch / w). A run
resumed at step s, or split over ranks, therefore sees exactly the tokens of an uninterrupted run.
Validation and calibration batches are fixed, evenly spaced windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenData:
    """Training and validation token ids (1-D int64 arrays)."""

    train: np.ndarray
    val: np.ndarray

    def check(self, seq: int) -> None:
        for name, ids in (("training", self.train), ("validation", self.val)):
            if len(ids) < seq + 2:
                raise ValueError(f"the {name} data has {len(ids)} tokens, fewer than one window of {seq + 1}")

    def train_batch(self, step: int, global_batch: int, seq: int, *, seed: int = 0, rank: int = 0,
                    world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of step `step`'s global batch: (inputs, targets), each (global_batch / world, seq)."""
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - seq - 1, size=global_batch)
        share = global_batch // world
        return _windows(self.train, starts[rank * share:(rank + 1) * share], seq)

    def val_batches(self, batches: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`batches` fixed validation batches of `batch` windows spread evenly over the validation data."""
        return _fixed(self.val, batches, batch, seq)

    def calibration_batches(self, batches: int, batch: int, seq: int) -> list[torch.Tensor]:
        """Fixed training windows (inputs only) for calibration."""
        return [inputs for inputs, _ in _fixed(self.train, batches, batch, seq)]


def _fixed(ids: np.ndarray, batches: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    starts = np.linspace(0, len(ids) - seq - 1, batches * batch).astype(np.int64)
    return [_windows(ids, starts[i * batch:(i + 1) * batch], seq) for i in range(batches)]


def _windows(ids: np.ndarray, starts: np.ndarray, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int64)
    tensor = torch.from_numpy(rows)
    return tensor[:, :-1], tensor[:, 1:]


def byte_ids(data: bytes, vocab: int) -> np.ndarray:
    """Byte-level token ids: each byte, modulo `vocab` (identity when vocab >= 256)."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) % vocab


def split_documents(documents: list[np.ndarray], val_fraction: float) -> TokenData:
    """Concatenates documents; the last documents (at least one, about val_fraction of the tokens) are validation.

    A single document is split by tokens instead.
    """
    if not documents:
        raise ValueError("no data")
    if len(documents) == 1:
        ids = documents[0]
        cut = int(len(ids) * (1 - val_fraction))
        return TokenData(ids[:cut], ids[cut:])
    total = sum(len(d) for d in documents)
    val, size = [], 0
    for doc in reversed(documents[1:]):
        if val and size >= val_fraction * total:
            break
        val.insert(0, doc)
        size += len(doc)
    train = documents[:len(documents) - len(val)]
    return TokenData(np.concatenate(train), np.concatenate(val))

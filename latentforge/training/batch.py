"""What the loader hands a training step: a Batch of tensors, the latent normaliser, and the checks a decoded
sample's text and REPA members pass before samples are stacked into one (so that a bad member names its shard
and sample rather than failing inside np.stack)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from latentforge.datasets.compat import merged_latent_stats
from latentforge.datasets.shards import ShardFormatError


@dataclass
class Batch:
    latent: torch.Tensor  # (B, C, T, H, W), normalised
    text: torch.Tensor  # (B, L, D)
    text_mask: torch.Tensor  # (B, L) bool
    modality: torch.Tensor  # (B,) int64
    captions: list[str]
    repa: torch.Tensor | None = None  # (B, N, D) float16 REPA target features, when the stage uses REPA

    def to(self, device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))  # asynchronous from pinned memory

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) pins custom types through this method only; without it a Batch came back
        unpinned and every host-to-device copy was synchronous."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        return Batch(fn(self.latent), fn(self.text), fn(self.text_mask), fn(self.modality), self.captions,
                     None if self.repa is None else fn(self.repa))


class LatentNormalizer:
    """Per-channel standardisation with the dataset cards' statistics, per latent family."""

    def __init__(self, cards: dict | list[dict]):
        cards = [cards] if isinstance(cards, dict) else cards
        stats = merged_latent_stats(cards) if len(cards) > 1 else cards[0]["latent_stats"]
        self.stats = {
            family: (np.asarray(s["mean"], np.float32), np.asarray(s["std"], np.float32))
            for family, s in stats.items()
        }

    @staticmethod
    def family(modality: str) -> str:
        return "audio" if modality == "audio" else "visual"

    def normalize(self, latent: np.ndarray, modality: str) -> np.ndarray:
        """(C, T, H, W) or a batch (B, C, T, H, W) of one family."""
        mean, std = self.stats[self.family(modality)]
        return (latent - mean[:, None, None, None]) / std[:, None, None, None]

    def denormalize(self, latent: np.ndarray, modality: str) -> np.ndarray:
        mean, std = self.stats[self.family(modality)]
        return latent * std[:, None, None, None] + mean[:, None, None, None]


class Decoded(NamedTuple):
    latent: np.ndarray
    text: np.ndarray
    text_mask: np.ndarray
    caption: str
    repa: np.ndarray | None


@dataclass(frozen=True)
class MemberFormat:
    """The text and REPA members every sample must have where the dataset cards say: text (L, D) from
    `encoders.text` (max_len, dim), the REPA width D from `encoders.repa.dim`; None where no card says. The
    REPA token count N follows the latent shape and the REPA encoder's grid, so it is checked against the
    rest of the batch (`check_alike`) only."""

    text: tuple[int | None, int | None] = (None, None)
    repa_dim: int | None = None

    @classmethod
    def of(cls, cards: list[dict]) -> MemberFormat:
        """What all the cards agree on (open_datasets has refused cards whose text encoders differ)."""
        encoders = [c.get("encoders", {}) for c in cards]

        def agreed(family: str, field: str) -> int | None:
            values = {e.get(family, {}).get(field) for e in encoders}
            return int(values.pop()) if len(values) == 1 and None not in values else None

        return cls((agreed("text", "max_len"), agreed("text", "dim")), agreed("repa", "dim"))

    def check(self, sample: Decoded, where: str) -> None:
        """Raise ShardFormatError(`where`: ...) for a text, text mask or REPA member of the wrong kind or shape."""
        text, mask, repa = sample.text, sample.text_mask, sample.repa
        if text.ndim != 2 or text.dtype.kind != "f" or any(e not in (None, n) for e, n in zip(self.text, text.shape)):
            shape = ", ".join(str(n) if n is not None else axis for n, axis in zip(self.text, "LD"))
            wanted = ("text embeddings are float (L, D)" if self.text == (None, None)
                      else f"the dataset card's text encoder gives float ({shape})")
            raise ShardFormatError(f"{where}: text {text.dtype} {text.shape}, but {wanted}")
        if mask.shape != text.shape[:1] or mask.dtype.kind not in "biu":
            raise ShardFormatError(f"{where}: text_mask {mask.dtype} {mask.shape}, but its text has {len(text)} "
                                   f"tokens (a bool ({len(text)},) mask)")
        if repa is not None and (repa.ndim != 2 or repa.dtype.kind != "f"
                                 or self.repa_dim not in (None, repa.shape[1])):
            wanted = (f"the dataset card's REPA encoder gives float (N, {self.repa_dim})" if self.repa_dim
                      else "REPA features are float (N, D)")
            raise ShardFormatError(f"{where}: repa {repa.dtype} {repa.shape}, but {wanted}")


def check_alike(samples: list[Decoded], where: Callable[[int], str]) -> None:
    """Before samples are stacked into one batch: every text (L, D) and REPA (N, D) shape is the one most of the
    batch has; raise ShardFormatError naming (`where(i)`, built only then: this runs on every batch) the first
    sample that differs."""
    for name in ("text", "repa"):
        shapes = [None if getattr(s, name) is None else getattr(s, name).shape for s in samples]
        if shapes.count(shapes[0]) == len(shapes):
            continue
        common, count = Counter(shapes).most_common(1)[0]
        i = next(i for i, shape in enumerate(shapes) if shape != common)
        others = f"the {count} other samples of its batch have" if count > 1 else "another sample of its batch has"
        raise ShardFormatError(f"{where(i)}: {name} {shapes[i]}, but {others} {common}")

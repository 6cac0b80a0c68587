"""Whether latents of several datasets can be mixed: same encoders, same text encoder, merged statistics."""
from __future__ import annotations

import numpy as np

IDENTITY_FIELDS = {
    "visual": ("kind", "model", "revision", "config_hash", "channels", "scale", "shift"),
    "audio": ("kind", "model", "revision", "config_hash", "channels", "scale", "shift", "sample_rate"),
    "text": ("kind", "model", "revision", "config_hash", "dim", "max_len"),
}


class IncompatibleDatasets(ValueError):
    """Datasets whose latents or text embeddings come from different encoders."""


def check_compatible(cards: list[dict], names: list[str] | None = None) -> None:
    """Raise naming each field that differs, for every encoder family present in more than one card."""
    names = names or [c.get("name", f"dataset{i}") for i, c in enumerate(cards)]
    problems = []
    for family, fields in IDENTITY_FIELDS.items():
        present = [(n, c["encoders"][family]) for n, c in zip(names, cards) if family in c.get("encoders", {})]
        if len(present) < 2:
            continue
        ref_name, ref = present[0]
        for name, desc in present[1:]:
            for f in fields:
                if desc.get(f) != ref.get(f):
                    problems.append(f"{family}.{f}: {ref_name} has {ref.get(f)!r}, {name} has {desc.get(f)!r}")
    if problems:
        raise IncompatibleDatasets("datasets were encoded differently and cannot be mixed:\n  " + "\n  ".join(problems))


def merged_latent_stats(cards: list[dict]) -> dict[str, dict]:
    """Per family, per-channel mean/std over all cards, weighted by each card's element count."""
    out = {}
    families = sorted({f for c in cards for f in c["latent_stats"]})
    for family in families:
        parts = [c["latent_stats"][family] for c in cards if family in c["latent_stats"]]
        counts = np.array([p["count"] for p in parts], np.float64)[:, None]
        means = np.array([p["mean"] for p in parts], np.float64)
        second = np.array([p["std"] for p in parts], np.float64) ** 2 + means**2
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = np.maximum((counts * second).sum(0) / total - mean**2, 1e-12)
        out[family] = {"mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": int(total)}
    return out

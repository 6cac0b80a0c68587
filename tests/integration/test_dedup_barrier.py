"""The dedup barrier on a real local Ray: the scanned blocks' hash columns fetched as Arrow, an earlier run's
settled representative voting beside them, and the marks applied by the function the next map runs."""
from __future__ import annotations

import numpy as np

from latentforge.pipelines.duplicates import HASH_COLUMNS, SETTLED, find_duplicates


def corpus(seed: int, n: int) -> list[dict]:
    """Images with exact copies, near copies and ties in score; audio without a pHash."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = int(rng.integers(0, 2**63))
        rows.append({"id": f"r{i:03d}", "status": "ok", "modality": "image", "content_sha256": f"s{i}",
                     "phash": f"{base:016x}", "score_resolution": float(rng.integers(0, 3))})
        if i % 3 == 0:
            flipped = base ^ (1 << int(rng.integers(64)))
            rows.append({**rows[-1], "id": f"n{i:03d}", "content_sha256": f"t{i}", "phash": f"{flipped:016x}"})
        if i % 5 == 0:
            rows.append({**rows[-1], "id": f"e{i:03d}"})
    return rows + [{"id": "a1", "status": "ok", "modality": "audio", "content_sha256": "a", "phash": "",
                    "score_resolution": 0.0}]


def test_the_barrier_on_ray_reads_blocks_as_arrow(ray_local):
    import ray.data

    from latentforge.pipelines import curate
    from latentforge.pipelines.config import CurationConfig

    rows = [{**r, "relpath": f"{r['id']}.png"} for r in corpus(3, n=60)]
    ds = ray.data.from_items(rows, override_num_blocks=5)
    cfg = CurationConfig(input_dir=".")
    earlier = {**rows[0], "id": "z-earlier", "status": "filtered", "stage": "filter_sharpness", "duplicate_of": ""}
    fn, kwargs = curate.dedup(ds, cfg, done=[earlier], settled=True)
    # as dedup saw it: ok (filtered by a later stage), and settled (a representative whose group stays)
    expected = find_duplicates(rows + [{**earlier, "status": "ok", SETTLED: True}], cfg.dedup)
    marks = kwargs["marks"]
    assert dict(zip([i.decode() for i in marks.ids.tolist()], [r.decode() for r in marks.representatives.tolist()])) \
        == {d: rep for d, (rep, _) in expected.items()}
    assert "z-earlier" in {rep for rep, _ in expected.values()}  # the settled earlier row leads its copies
    batch = {k: np.array([r.get(k, "") for r in rows], dtype=object) for k in (*HASH_COLUMNS, "reason", "stage",
                                                                              "message")}
    out = fn(batch, **kwargs)
    assert sorted(out["id"][out["status"] == "filtered"].tolist()) == sorted(d for d in expected if d != "z-earlier")

"""How a curated dataset is recorded as an MLflow dataset input (`tracking.dataset_record`)."""
from __future__ import annotations

import hashlib
import json
import warnings

from latentforge.orchestration.tracking import dataset_record


def test_a_local_dataset_is_recorded_as_a_local_source_without_a_warning(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"id": "0123abcd" * 6, "name": "demo", "num_samples": 3}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = dataset_record("r1", tmp_path, "training")
    assert [str(w.message) for w in caught] == []  # MLflow's "interpreted in multiple ways" warned every time
    # an id longer than MLflow's 36-character digest is hashed whole, not cut (a cut loses the id's hash part)
    digest = hashlib.sha256(("0123abcd" * 6).encode()).hexdigest()[:36]
    assert record["source_type"] == "local" and record["name"] == "demo" and record["digest"] == digest
    assert json.loads(record["source"])["uri"] == str((tmp_path / "manifest.parquet").resolve())
    assert json.loads(record["profile"]) == {"num_samples": 3, "dataset_id": "0123abcd" * 6}

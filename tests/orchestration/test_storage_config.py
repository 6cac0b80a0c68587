"""The root config's `storage` section and data locations given as URIs."""
from __future__ import annotations

from pathlib import Path

import pytest

from latentforge.orchestration.config import ConfigError, load_config, resolve_paths

PLAN = ["training.stages=[{name: s, modalities: [image]}]"]


def test_uris_survive_loading_and_path_resolution(tmp_path):
    cfg = load_config(None, [*PLAN, "curation.input_dir=s3://raw/corpus", "curation.output_dir=s3://lake/ds",
                             "training.datasets=[s3://lake/ds, local/ds]", "storage.checkpoint_uri=s3://lake/ckpt",
                             "storage.endpoint_url=http://127.0.0.1:9000", "storage.cache_dir=cache"])
    cfg = resolve_paths(cfg, tmp_path)
    assert cfg.curation.input_dir == "s3://raw/corpus" and cfg.curation.output_dir == "s3://lake/ds"
    assert cfg.training.datasets == ["s3://lake/ds", (tmp_path / "local/ds").resolve()]
    assert cfg.storage.checkpoint_uri == "s3://lake/ckpt" and cfg.storage.cache_dir == (tmp_path / "cache").resolve()
    assert cfg.dataset_dirs() == ["s3://lake/ds", (tmp_path / "local/ds").resolve()]


def test_local_locations_still_resolve_against_the_base(tmp_path):
    cfg = resolve_paths(load_config(None, ["curation.input_dir=corpus", "storage.checkpoint_uri=ck"]), tmp_path)
    assert cfg.curation.input_dir == (tmp_path / "corpus").resolve()
    assert cfg.curation.output_dir == (tmp_path / "lf-work/datasets/dataset").resolve()
    assert cfg.storage.checkpoint_uri == str((tmp_path / "ck").resolve())


@pytest.mark.parametrize("override, path, says", [
    ("storage.endpoint=http://x", "storage.endpoint", "unknown key"),
    ("storage.anonymous=maybe", "storage.anonymous", "boolean"),
    ("workdir=s3://lake/work", "workdir", "must be a local directory"),
])
def test_bad_storage_settings_name_their_key(override, path, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith(path + ":"))
    assert says in line


def test_workdir_stays_a_path():
    assert load_config(None, ["workdir=some/dir"]).workdir == Path("some/dir")

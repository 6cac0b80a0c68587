"""Config mistakes are reported where the user made them: a key written twice in the YAML, an unknown key inside
a union section (encoders) or the model overrides, an override of a list item the config does not have; and the
`ui` URL of an IPv6 host is a valid URL."""
from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest
from typer.testing import CliRunner

from latentforge.orchestration.cli import app
from latentforge.orchestration.config import ConfigError, apply_override, load_config, load_yaml, parse_override

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

DUPLICATES = """\
name: dup
curation:
  name: demo
  image_size: 64
training:
  stages:
    - name: s1
      modalities: [image]
      steps: 1000
      batch_size: 8
      steps: 10
curation:
  samples_per_shard: 16
"""


def error_of(path: Path | None, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------- 1. duplicate keys


def test_a_key_written_twice_is_refused_with_its_path_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATES)
    text = error_of(path)
    assert "duplicate key curation at line 12 (first at line 2)" in text
    assert "duplicate key training.stages[0].steps at line 11 (first at line 9)" in text
    assert str(path) in text


def test_cli_validate_refuses_duplicate_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dup.yaml").write_text(DUPLICATES)
    result = CliRunner().invoke(app, ["validate", "dup.yaml"])
    assert result.exit_code == 2, result.output
    assert "duplicate key curation" in result.output


def test_a_duplicate_key_in_an_override_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate key seed"):
        parse_override("training={seed: 1, seed: 2}")


def test_the_duplicate_check_keeps_safe_load_semantics() -> None:
    # merge keys may be overridden by the mapping's own keys: that is what `<<` is for, not a duplicate
    text = "base: &b {lr: 0.1, warmup_steps: 5}\nother:\n  <<: *b\n  lr: 0.2\nsame: {a: 1}\nalso: {a: 1}\n"
    assert load_yaml(text) == {"base": {"lr": 0.1, "warmup_steps": 5}, "other": {"lr": 0.2, "warmup_steps": 5},
                               "same": {"a": 1}, "also": {"a": 1}}
    assert load_yaml("") is None and load_yaml("[1, {x: 2}]") == [1, {"x": 2}]
    import yaml

    with pytest.raises(yaml.YAMLError):  # still no Python objects
        load_yaml("x: !!python/object/apply:os.getcwd []")
    assert load_config(QUICKSTART) == load_config(QUICKSTART)  # a real config has no false positives


# ---------------------------------------------------------------- 3. error paths in unions and model overrides


def test_a_union_section_without_its_kind_names_the_kinds_and_the_unknown_key() -> None:
    text = error_of(QUICKSTART, "curation.encoders.visual.tilling=true")
    line = next(line for line in text.splitlines() if "curation.encoders.visual" in line)
    assert "Unable to extract tag" not in text
    assert "tilling" in line
    for kind in ("haar", "autoencoder_kl", "ltx_video", "wan", "cogvideox"):
        assert repr(kind) in line


def test_an_invalid_kind_is_reported_at_its_key_with_the_kinds() -> None:
    text = error_of(QUICKSTART, "curation.encoders.visual={kind: vae}")
    assert "curation.encoders.visual.kind: 'vae' is not a valid kind" in text
    assert "'autoencoder_kl'" in text and "'haar'" in text


def test_a_union_tag_is_not_part_of_the_reported_path() -> None:
    text = error_of(QUICKSTART, "curation.encoders.visual={kind: autoencoder_kl, model: some/vae, tilling: true}")
    assert "  curation.encoders.visual.tilling: unknown key" in text
    assert "did you mean 'tiling'?" in text  # a key of the union member the section is
    assert "autoencoder_kl.tilling" not in text
    text = error_of(QUICKSTART, "curation.encoders.audio={kind: log_mel, n_ffft: 256}")
    assert "  curation.encoders.audio.n_ffft: unknown key" in text and "log_mel." not in text


def test_the_alternatives_of_a_plain_union_are_one_problem_at_the_field() -> None:
    text = error_of(QUICKSTART, "training.stages.0.timestep_shift=autoo")
    assert text.splitlines()[0].endswith("1 problem(s)")
    assert "  training.stages[0].timestep_shift: " in text
    assert ".float" not in text and "literal[" not in text
    assert "'auto'" in text


def test_an_unknown_model_override_is_reported_at_its_key() -> None:
    text = error_of(QUICKSTART, "training.model.overrides.depthh=3")
    assert "  training.model.overrides.depthh: unknown DiTConfig key" in text
    assert "depth" in text.split("known:")[1]  # the valid keys are listed
    text = error_of(QUICKSTART, "training.model.overrides={depthh: 3, headz: 2}")
    assert "training.model.overrides.depthh" in text and "training.model.overrides.headz" in text
    assert "training.model.preset: unknown preset 'DiT-Q'" in error_of(QUICKSTART, "training.model.preset=DiT-Q")


# ---------------------------------------------------------------- 4. overrides of list items that do not exist


@pytest.mark.parametrize("override, where", [
    ("training.stages.0.steps=5", "no list item 0 under training.stages to override"),
    ("curation.buckets.0.height=3", "no list item 0 under curation.buckets to override"),
    ("curation.buckets.0=3", "no list item 0 under curation.buckets to override"),
])
def test_an_override_of_a_list_item_the_config_lacks_says_so(tmp_path: Path, override: str, where: str) -> None:
    path = tmp_path / "notrain.yaml"
    path.write_text("name: n\ncuration: {name: demo}\n")
    text = error_of(path, override)
    assert where in text
    assert "valid list" not in text


def test_an_override_past_the_end_of_a_list_says_so() -> None:
    text = error_of(QUICKSTART, "training.stages.9.steps=5")
    assert "no list item 9 under training.stages to override" in text
    with pytest.raises(ConfigError, match="training.model.overrides is a section, not a list"):
        apply_override({"training": {"model": {"overrides": {"depth": 2}}}},
                       ["training", "model", "overrides", "0"], 1)


# ---------------------------------------------------------------- 5. ui URL


@pytest.mark.parametrize("host, url", [("::1", "http://[::1]:5000"), ("127.0.0.1", "http://127.0.0.1:5000"),
                                       ("0.0.0.0", "http://127.0.0.1:5000"), ("localhost", "http://localhost:5000"),
                                       ("fe80::1%eth0", "http://[fe80::1%25eth0]:5000")])
def test_the_ui_url_brackets_an_ipv6_host(tmp_path: Path, host: str, url: str) -> None:
    from latentforge.orchestration.ui import server_command

    server = server_command(tmp_path, 5000, host=host, backend_store_uri=f"sqlite:///{tmp_path / 'm.db'}",
                            environ={})
    assert server.url == url
    assert urllib.parse.urlsplit(server.url).port == 5000
    assert server.argv[server.argv.index("--host") + 1] == host  # mlflow itself takes the bare address


def test_an_unknown_key_close_to_a_known_one_is_named_with_it() -> None:
    text = error_of(QUICKSTART, "curation.sampels_per_shard=16", "training.stages.0.optim.warmup_step=3",
                    "training.stages.1.zzz=1")
    assert "curation.sampels_per_shard: unknown key (not a field of this section); did you mean " \
           "'samples_per_shard'?" in text
    assert "training.stages[0].optim.warmup_step: unknown key (not a field of this section); did you mean " \
           "'warmup_steps'?" in text
    assert "training.stages[1].zzz: unknown key (not a field of this section)\n" in text + "\n"

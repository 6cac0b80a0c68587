"""The root config and the CLI's config handling: strict keys with paths, overrides, safe YAML, resolved paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from latentforge.orchestration.cli import app
from latentforge.orchestration.config import (
    ConfigError,
    LatentforgeConfig,
    apply_override,
    load_config,
    parse_override,
    resolve_paths,
)
from latentforge.pipelines.curate import STAGES, active_stages

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def quickstart_data() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # relative paths resolve (and anything written lands) under tmp_path
    return CliRunner()


# ---------------------------------------------------------------- loading


def test_quickstart_loads_with_its_values() -> None:
    cfg = load_config(QUICKSTART)
    assert isinstance(cfg, LatentforgeConfig)
    assert cfg.name == "quickstart" and cfg.curation.name == "demo"
    assert cfg.curation.image_size == 32 and cfg.curation.samples_per_shard == 32
    assert [s.name for s in cfg.training.stages] == ["image_pretrain", "video_pretrain", "finetune"]
    assert cfg.training.stages[0].video_frames_as_images is True
    assert cfg.training.stages[2].where.startswith("score_caption_words >=")
    assert cfg.training.stages[1].optim.lr == pytest.approx(0.0005)
    assert cfg.training.model.preset == "DiT-T"


def test_no_path_gives_defaults() -> None:
    cfg = load_config(None)
    assert cfg == LatentforgeConfig() and cfg.training is None


def test_a_misspelled_nested_key_is_an_error_with_its_path(tmp_path: Path) -> None:
    data = quickstart_data()
    data["training"]["stages"][0]["stpes"] = data["training"]["stages"][0].pop("steps")
    path = write_yaml(tmp_path / "typo.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "training.stages[0].stpes" in message and "unknown key" in message
    assert str(path) in message and "1 problem(s)" in message


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    data = quickstart_data()
    data["curation"]["imag_size"] = 64
    data["ray"] = {"num_cpus": 0}
    data["training"]["stages"][1]["batch_size"] = 0
    data["training"]["stages"][2]["modalities"] = ["image", "sound"]
    data["trainig"] = {}
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path / "bad.yaml", data))
    message = str(info.value)
    assert "5 problem(s)" in message
    for path in ("curation.imag_size", "ray.num_cpus", "training.stages[1].batch_size",
                 "training.stages[2].modalities[1]", "trainig"):
        assert f"  {path}: " in message, path


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_non_mapping_yaml_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write_yaml(tmp_path / "list.yaml", text))


def test_an_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == LatentforgeConfig()


def test_invalid_yaml_and_unreadable_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path / "broken.yaml", "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_python_tags_are_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed.marker"
    text = (f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
            f"workdir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path / "evil.yaml", text))
    assert not marker.exists()
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path / "obj.yaml", "curation: !!python/object:argparse.Namespace {a: 1}\n"))


def test_duplicate_stage_names_are_refused(tmp_path: Path) -> None:
    data = quickstart_data()
    data["training"]["stages"][2]["name"] = "image_pretrain"
    with pytest.raises(ConfigError, match="stage names must be unique") as info:
        load_config(write_yaml(tmp_path / "dup.yaml", data))
    assert "training.stages" in str(info.value)


def test_unknown_preset_and_unknown_model_override_are_refused(tmp_path: Path) -> None:
    data = quickstart_data()
    data["training"]["model"] = {"preset": "DiT-XXL"}
    with pytest.raises(ConfigError, match="unknown preset 'DiT-XXL'") as info:
        load_config(write_yaml(tmp_path / "preset.yaml", data))
    assert "training.model" in str(info.value) and "DiT-T" in str(info.value)  # the valid choices are listed
    data["training"]["model"] = {"preset": "DiT-T", "overrides": {"depht": 2}}
    with pytest.raises(ConfigError, match="depht"):
        load_config(write_yaml(tmp_path / "override.yaml", data))


def test_a_known_model_override_is_accepted(tmp_path: Path) -> None:
    data = quickstart_data()
    data["training"]["model"] = {"preset": "DiT-S", "overrides": {"depth": 2, "mlp_ratio": 2.0}}
    cfg = load_config(write_yaml(tmp_path / "ok.yaml", data))
    assert cfg.training.model.preset == "DiT-S"
    assert cfg.training.model.overrides == {"depth": 2, "mlp_ratio": 2.0}


def test_an_inconsistent_model_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not divisible by heads=3"):
        load_config(QUICKSTART, ["training.model.overrides={hidden: 100, heads: 3}"])


@pytest.mark.parametrize("preset, overrides", [
    ("DiT-S", "{hidden: 256}"),  # 256 % DiT-S's 6 heads != 0: only fails later, when the model is built
    ("DiT-T", "{heads: 0}"),
    ("DiT-T", "{hidden: null}"),
])
def test_a_model_override_that_cannot_build_is_a_config_error(preset: str, overrides: str) -> None:
    with pytest.raises(ConfigError):
        load_config(QUICKSTART, [f"training.model.preset={preset}", f"training.model.overrides={overrides}"])


def test_configs_are_frozen() -> None:
    cfg = load_config(QUICKSTART)
    with pytest.raises(Exception):
        cfg.curation.image_size = 64  # type: ignore[misc]


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "text, parts, value",
    [
        ("training.stages.0.steps=50", ["training", "stages", "0", "steps"], 50),
        ("curation.audio_seconds=0.5", ["curation", "audio_seconds"], 0.5),
        ("training.stages.1.modalities=[image, audio]", ["training", "stages", "1", "modalities"], ["image", "audio"]),
        ("training.stages.2.where=score_caption_words >= 6", ["training", "stages", "2", "where"],
         "score_caption_words >= 6"),
        ("training.use_gpu=true", ["training", "use_gpu"], True),
        ("name=a=b", ["name"], "a=b"),
        (" ray.address = ", ["ray", "address"], ""),
        ("tracking.uri=null", ["tracking", "uri"], None),
    ],
)
def test_parse_override(text: str, parts: list[str], value) -> None:
    assert parse_override(text) == (parts, value)


@pytest.mark.parametrize("text", ["no_equals_sign", "a..b=1", ".a=1", "a.=1", "=1"])
def test_parse_override_refuses_malformed_keys(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(text)


def test_apply_override_sets_nested_dicts_and_list_items() -> None:
    data = quickstart_data()
    before = copy.deepcopy(data)
    apply_override(data, ["training", "stages", "1", "steps"], 7)
    apply_override(data, ["training", "stages", "0", "optim", "lr"], 0.1)
    apply_override(data, ["training", "stages", "2", "modalities", "0"], "audio")
    apply_override(data, ["ray", "num_cpus"], 4)  # a section the file does not have is created
    apply_override(data, ["curation", "image_size"], 64)
    assert data["training"]["stages"][1]["steps"] == 7
    assert data["training"]["stages"][0]["optim"] == {"lr": 0.1, "warmup_steps": 20}
    assert data["training"]["stages"][2]["modalities"] == ["audio", "video", "audio"]
    assert data["ray"] == {"num_cpus": 4} and data["curation"]["image_size"] == 64
    assert data["training"]["stages"][0]["steps"] == before["training"]["stages"][0]["steps"]


@pytest.mark.parametrize("parts", [["training", "stages", "3", "steps"], ["training", "stages", "-1", "steps"],
                                   ["training", "stages", "x", "steps"], ["training", "stages", "9"],
                                   ["training", "stages", "0", "modalities", "5"]])
def test_apply_override_refuses_a_bad_index(parts: list[str]) -> None:
    with pytest.raises(ConfigError, match="is not an index below"):
        apply_override(quickstart_data(), parts, 1)


def test_apply_override_refuses_descending_into_a_scalar() -> None:
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_override(quickstart_data(), ["name", "x"], 1)


def test_apply_override_refuses_descending_into_a_scalar_list_item() -> None:
    with pytest.raises(ConfigError):
        apply_override(quickstart_data(), ["training", "stages", "0", "modalities", "0", "x"], 1)


@pytest.mark.parametrize("text", ["curation.name=[unclosed", "curation.name=!!python/object/apply:os.getcwd []"])
def test_parse_override_refuses_a_bad_value_as_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(text)


def test_load_config_applies_overrides_then_validates() -> None:
    cfg = load_config(QUICKSTART, ["training.stages.0.steps=5", "curation.image_size=64", "training.seed=3"])
    assert cfg.training.stages[0].steps == 5 and cfg.curation.image_size == 64 and cfg.training.seed == 3
    with pytest.raises(ConfigError, match=r"training\.stages\[0\]\.stpes"):
        load_config(QUICKSTART, ["training.stages.0.stpes=3"])
    with pytest.raises(ConfigError, match=r"training\.stages\[0\]\.steps"):
        load_config(QUICKSTART, ["training.stages.0.steps=0"])


def test_overrides_do_not_leak_between_loads() -> None:
    load_config(QUICKSTART, ["training.stages.0.steps=5"])
    assert load_config(QUICKSTART).training.stages[0].steps == yaml.safe_load(QUICKSTART.read_text())["training"]["stages"][0]["steps"]


# ---------------------------------------------------------------- paths


def test_resolve_paths_makes_paths_absolute_with_defaults(tmp_path: Path) -> None:
    cfg = resolve_paths(load_config(QUICKSTART), tmp_path)
    work = (tmp_path / "lf-work").resolve()
    assert cfg.workdir == work
    assert cfg.curation.input_dir == work / "corpus"
    assert cfg.curation.output_dir == work / "datasets" / "demo"
    assert cfg.training.datasets == [cfg.curation.output_dir] == cfg.dataset_dirs()
    # Idempotent: resolving an already resolved config changes nothing.
    assert resolve_paths(cfg, tmp_path / "elsewhere") == cfg


def test_resolve_paths_keeps_explicit_and_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "data"
    cfg = load_config(QUICKSTART, [f"curation.output_dir={absolute}", "training.datasets=[../shared/ds, /data/b]",
                                   "workdir=runs/../w"])
    out = resolve_paths(cfg, tmp_path / "base")
    assert out.curation.output_dir == absolute
    assert out.training.datasets == [(tmp_path / "shared" / "ds").resolve(), Path("/data/b")]
    assert out.workdir == (tmp_path / "base" / "w").resolve()
    assert out.dataset_dirs() == out.training.datasets


def test_resolve_paths_without_training(tmp_path: Path) -> None:
    cfg = resolve_paths(load_config(None, ["curation.name=mine", "curation.input_dir=raw"]), tmp_path)
    assert cfg.training is None
    assert cfg.curation.input_dir == tmp_path.resolve() / "raw"
    assert cfg.curation.output_dir == tmp_path.resolve() / "lf-work" / "datasets" / "mine"
    assert cfg.dataset_dirs() == [cfg.curation.output_dir]


# ---------------------------------------------------------------- CLI


def test_cli_validate_quickstart(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "image_pretrain" in result.output and "finetune" in result.output
    assert list(tmp_path.iterdir()) == []  # validating writes nothing


def test_cli_validate_reports_a_bad_override_with_its_path(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(QUICKSTART), "--set", "training.stages.0.stpes=3"])
    assert result.exit_code == 2, result.output
    assert "config error" in result.output and "training.stages[0].stpes" in result.output


def test_cli_validate_applies_several_overrides(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(QUICKSTART), "--set", "training.stages.0.name=warmup",
                                 "--set", "name=other"])
    assert result.exit_code == 0, result.output
    assert "'other'" in result.output and "warmup" in result.output


def test_cli_validate_refuses_a_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2


def test_cli_curate_dry_run_prints_every_stage(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["curate", str(QUICKSTART), "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    chain = active_stages(STAGES, load_config(QUICKSTART).curation)
    assert 0 < len(chain) < len(STAGES)  # optional stages (captioners, aesthetic, REPA) are off in the quickstart
    for stage in chain:
        assert stage.name in result.output
    for stage in set(STAGES) - set(chain):
        assert stage.name not in result.output
    lines = [line for line in result.output.splitlines() if any(s.name in line for s in STAGES)]
    assert [next(s.name for s in STAGES if s.name in line) for line in lines] == [s.name for s in chain]
    assert "go through them again, up to 3 rounds" in " ".join(result.output.split())  # readmission (readmit.py)
    assert list(tmp_path.iterdir()) == []  # a dry run neither generates a corpus nor starts anything


def test_cli_curate_dry_run_shows_resource_overrides(runner: CliRunner) -> None:
    result = runner.invoke(app, ["curate", str(QUICKSTART), "--dry-run",
                                 "--set", "curation.resources={probe: {num_cpus: 3.5}, "
                                 "encode_text: {num_cpus: 2.5, num_gpus: 1, pool: 7}}"], terminal_width=200)
    assert result.exit_code == 0, result.output
    probe_line = next(line for line in result.output.splitlines() if "probe" in line)
    assert "3.5" in probe_line and "tasks" in probe_line  # the scan chain asks for its largest member's CPUs
    # A stage on a GPU is a map of its own, with its own resources, apart from the fused CPU stages.
    text_line = next(line for line in result.output.splitlines() if "encode_text" in line)
    assert all(f" {v} " in text_line for v in ("2.5", "1", "7", "actors")), text_line


def test_cli_train_without_training_section_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "curate_only.yaml", {"name": "x", "curation": {"name": "d"}})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "training" in result.output


def test_cli_every_command_has_help(runner: CliRunner) -> None:
    group = typer.main.get_command(app)
    names = sorted(group.commands)
    assert {"validate", "curate", "train", "run", "ui", "demo-corpus"} <= set(names)
    for name in [None, *names]:
        result = runner.invoke(app, [name, "--help"] if name else ["--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output
    for name, command in group.commands.items():  # typer's command list keeps a first paragraph's line breaks
        first = (command.help or "").strip().split("\n\n")[0]
        assert first and "\n" not in first, f"{name}: the first paragraph of its help spans lines: {first!r}"


def test_cli_ui_without_a_store_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["ui", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "no MLflow store" in result.output


def test_cli_prints_a_config_error_verbatim(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(QUICKSTART), "--set", "training[/b]"])
    assert result.exit_code == 2 and "training[/b]" in result.output


def test_pretrained_example_config_validates() -> None:
    cfg = load_config(QUICKSTART.parent / "pretrained.yaml")
    enc = cfg.curation.encoders
    assert (enc.visual.kind, enc.audio.kind, enc.text.kind) == ("ltx_video", "oobleck", "t5")
    assert all(b.frames % 8 == 1 for b in cfg.curation.buckets)

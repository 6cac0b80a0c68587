"""What `latentforge submit` hands to Ray's Jobs API: the entrypoint, the runtime env, the config's path."""
from __future__ import annotations

import shlex

import pytest

from latentforge.orchestration.submit import JobSpec, forwarded_env, job_config_path


def test_the_entrypoint_is_a_quoted_latentforge_command_with_its_overrides():
    spec = JobSpec(config="configs/my run.yaml", command="curate", overrides=("curation.name=a b", "workdir=/x"))
    argv = shlex.split(spec.entrypoint())
    assert argv == ["latentforge", "curate", "configs/my run.yaml", "--set", "curation.name=a b", "--set", "workdir=/x"]
    with pytest.raises(ValueError, match="cannot run as a job"):
        JobSpec(config="c.yaml", command="ui").entrypoint()


def test_the_runtime_env_carries_working_dir_pip_and_env_only_when_given(tmp_path):
    assert JobSpec(config="c.yaml").runtime_env() == {"env_vars": {}}
    env = JobSpec(config="c.yaml", working_dir=tmp_path, pip=("pkg==1",), env={"A": "1"}).runtime_env()
    assert env == {"env_vars": {"A": "1"}, "working_dir": str(tmp_path), "pip": ["pkg==1"]}


def test_a_config_inside_the_working_dir_is_passed_relative_else_absolute(tmp_path):
    (tmp_path / "configs").mkdir()
    inside = tmp_path / "configs" / "q.yaml"
    outside = tmp_path.parent / "elsewhere.yaml"
    assert job_config_path(inside, tmp_path) == "configs/q.yaml"
    assert job_config_path(outside, tmp_path) == str(outside.resolve())
    assert job_config_path(inside, None) == str(inside.resolve())


def test_mlflow_settings_are_forwarded_and_env_pairs_win():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HOME": "/root", "MLFLOW_TRACKING_PASSWORD": ""}
    assert forwarded_env(None, environ) == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert forwarded_env(["MLFLOW_TRACKING_URI=http://other:5000", "X=a=b"], environ) == {
        "MLFLOW_TRACKING_URI": "http://other:5000", "X": "a=b"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        forwarded_env(["novalue"], environ)

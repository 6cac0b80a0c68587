"""What the whole-plan tests (test_quickstart, test_plan_resume) read back from the MLflow server about a plan's
runs: its parent and children, the datasets each run took as inputs, its tags and system metrics."""
from __future__ import annotations


def parents_and_children(client, summary) -> tuple[list[str], list[str], set[str]]:
    """(ids of the experiment's runs without a parent, sorted names of the plan run's children, every run's status)."""
    runs = client.search_runs([summary.experiment_id], "")
    parents = [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.parent_run_id)
    return parents, children, {r.info.status for r in runs}


def dataset_inputs(client, run_id: str) -> dict:
    """A run's MLflow dataset inputs by their context tag (curation_output, training, validation)."""
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
            for i in client.get_run(run_id).inputs.dataset_inputs}


def assert_commit_and_config_hash(client, run_ids: list[str], config_hash: str) -> None:
    for run_id in run_ids:
        tags = client.get_run(run_id).data.tags
        assert len(tags["mlflow.source.git.commit"]) == 40, run_id
        assert tags["latentforge.config_hash"] == config_hash, run_id


def assert_system_metrics(client, run_ids: list[str]) -> None:
    for run_id in run_ids:
        metrics = client.get_run(run_id).data.metrics
        assert "system/cpu_utilization_percentage" in metrics, run_id
        assert metrics["system/system_memory_usage_megabytes"] > 0, run_id

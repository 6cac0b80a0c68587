"""Stages fused into chains (Ray Data never fuses two actor maps): which stages share a map, with what
resources, and that a chain gives exactly what the stages give one after another."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lf_batches import to_batch

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import SCAN_STAGES, STAGES, active_stages, config_hash, stage_graph
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stage import TIMING_COLUMN, Segment, cpu_scale, in_slices, segments, stage_resources
from latentforge.pipelines.stages.dedup import ContentHash
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.probe_media import ProbeMedia


def names(parts: list[Segment]) -> list[list[str]]:
    return [[s.name for s in p.stages] for p in parts]


def test_cpu_stages_fuse_into_one_map_and_a_gpu_stage_splits_the_chain() -> None:
    cfg = CurationConfig()
    stages = active_stages(STAGES, cfg)
    assert names(segments(stages, cfg)) == [[s.name for s in stages]]
    assert names(segments(SCAN_STAGES, cfg)) == [[s.name for s in SCAN_STAGES]]

    gpu = CurationConfig(resources={"encode_latents": {"num_gpus": 1, "batch_size": 64, "pool": 2}})
    stages = [s.name for s in active_stages(STAGES, gpu)]
    at = stages.index("encode_latents")
    parts = segments(active_stages(STAGES, gpu), gpu)
    # The CPU work before and after the GPU stage are chains of their own (the GPU never waits on decoding).
    assert names(parts) == [stages[:at], ["encode_latents"], stages[at + 1:]]
    assert parts[1].resources == gpu.resources["encode_latents"]  # a stage alone keeps its own resources


def test_without_fusion_every_stage_is_its_own_map_with_its_declared_resources() -> None:
    cfg = CurationConfig(fusion={"enabled": False})
    stages = active_stages(STAGES, cfg)
    parts = segments(stages, cfg, cluster_cpus=64)
    assert names(parts) == [[s.name] for s in stages]
    assert [p.resources for p in parts] == [stage_resources(s, cfg) for s in stages]


def test_a_chain_asks_for_its_largest_member_and_its_cpu_pool_fills_the_cluster() -> None:
    cfg = CurationConfig()
    stages = active_stages(STAGES, cfg)
    declared = [stage_resources(s, cfg) for s in stages]
    (chain,) = segments(stages, cfg)
    assert chain.resources.num_cpus == max(r.num_cpus for r in declared)
    assert chain.resources.batch_size == max(r.batch_size for r in declared)
    assert chain.resources.pool == max(r.pool for r in declared)  # no cluster given
    # 16 CPUs: 0.5 kept for tasks, the rest in 1-CPU actors.
    assert segments(stages, cfg, cluster_cpus=16)[0].resources.pool == 15
    assert segments(stages, cfg, cluster_cpus=1)[0].resources.pool == chain.resources.pool  # never below declared
    pinned = CurationConfig(fusion={"pool": 3})
    assert segments(stages, pinned, cluster_cpus=16)[0].resources.pool == 3
    # Never more actors than batches to come: 40 rows in batches of the chain's size.
    batches = -(-40 // chain.resources.batch_size)
    assert segments(stages, cfg, cluster_cpus=16, rows=40)[0].resources.pool == min(15, batches)
    assert segments(stages, cfg, cluster_cpus=16, rows=1)[0].resources.pool == 1
    # Beside a GPU stage's pool (2 actors x 1 CPU), the CPU chains share what is left.
    gpu = CurationConfig(resources={"encode_latents": {"num_gpus": 1, "num_cpus": 1, "pool": 2}})
    parts = segments(active_stages(STAGES, gpu), gpu, cluster_cpus=16)
    assert [p.resources.pool for p in parts] == [6, 2, 6]  # (16 - 0.5 - 2) / 2 chains, rounded down
    assert cpu_scale(parts, 16) == 1.0 and cpu_scale(parts, 8) == pytest.approx(7.5 / 14)


def test_a_task_map_takes_larger_batches_while_each_cpu_keeps_four_tasks() -> None:
    """The scan's stateless chain runs as Ray tasks of up to TASK_BATCH_ROWS rows (each member still slices its
    own batch size inside the chain), as long as every CPU gets 4 tasks; actor chains keep their largest
    member's batch; unfused stages their own."""
    from latentforge.pipelines.stage import TASK_BATCH_ROWS

    cfg = CurationConfig()
    declared = max(stage_resources(s, cfg).batch_size for s in SCAN_STAGES)
    assert declared < TASK_BATCH_ROWS

    def batch(config: CurationConfig, rows: int | None, cpus: float | None = 4) -> int:
        (scan,) = segments(SCAN_STAGES, config, cluster_cpus=cpus, rows=rows)
        assert not scan.holds_state
        return scan.resources.batch_size

    assert batch(cfg, 100_000) == TASK_BATCH_ROWS
    assert batch(cfg, 900) == 900 // 16  # 16 tasks for 4 CPUs
    assert batch(cfg, 100) == declared and batch(cfg, None) == declared and batch(cfg, 10**6, None) == declared
    big = CurationConfig(resources={ProbeMedia.name: {"batch_size": 4 * TASK_BATCH_ROWS}})
    assert batch(big, 100_000) == 4 * TASK_BATCH_ROWS  # a larger declared batch stays
    (chain,) = segments(active_stages(STAGES, cfg), cfg, cluster_cpus=4, rows=100_000)
    assert chain.holds_state and chain.resources.batch_size < TASK_BATCH_ROWS
    unfused = CurationConfig(fusion={"enabled": False})
    assert [p.resources.batch_size for p in segments(SCAN_STAGES, unfused, cluster_cpus=4, rows=10**5)] == [
        stage_resources(s, unfused).batch_size for s in SCAN_STAGES]


def test_a_chain_gives_what_its_stages_give_one_after_another(tmp_path: Path) -> None:
    generate_demo_corpus(tmp_path, DemoCorpusSpec(num_images=5, num_videos=3, num_audio=3))
    cfg = CurationConfig(input_dir=tmp_path)
    batch = to_batch(discover(tmp_path, 64))
    stages = (ProbeMedia, FilterBasic, ContentHash)
    (segment,) = segments(stages, cfg)
    chained = segment.callable()(cfg)(batch)
    expected = batch
    for stage_cls in stages:
        expected = stage_cls(cfg)(expected)
    timing = [json.loads(t) for t in chained.pop(TIMING_COLUMN)]  # what each stage cost, per row
    assert all(list(t) == ["probe", "filter_basic", "content_hash"] for t in timing)
    assert sum(t["probe"][0] for t in timing) > 0
    assert chained.keys() == expected.keys()
    for key in expected:
        assert list(chained[key]) == list(expected[key]), key
    assert segment.callable().__name__ == "ProbeMedia+FilterBasic+ContentHash"
    assert {"ok", "rejected"} <= set(chained["status"])  # the corpus's broken files were rejected on the way


def test_slices_of_a_batch_are_joined_back_in_order_with_their_types() -> None:
    batch = {"id": np.array(["a", "b", "c", "d", "e"], dtype=object), "x": np.arange(5.0),
             "v": np.arange(10).reshape(5, 2)}
    seen = []

    def stage(b):
        seen.append(len(b["id"]))
        return {**b, "x2": b["x"] * 2, "tag": np.array([f"t{i}" for i in b["id"]], dtype=object)}

    out = in_slices(stage, batch, 2)
    assert seen == [2, 2, 1]
    assert list(out["id"]) == list("abcde") and out["x2"].dtype == np.float64 and list(out["x2"]) == [0, 2, 4, 6, 8]
    assert out["v"].shape == (5, 2) and list(out["tag"]) == ["ta", "tb", "tc", "td", "te"]


def test_how_the_job_runs_does_not_change_what_it_is(tmp_path: Path) -> None:
    base = CurationConfig()
    assert config_hash(CurationConfig(fusion={"enabled": False, "pool": 4})) == config_hash(base)
    assert config_hash(CurationConfig(resources={"probe": {"num_cpus": 2}})) == config_hash(base)
    assert config_hash(CurationConfig(filters={"min_side": 48})) != config_hash(base)


def test_a_code_change_that_alters_the_output_changes_the_config_hash(monkeypatch) -> None:
    """Groups written by an older version (here: before anti-aliased audio) are not trusted on resume."""
    from latentforge.pipelines import card

    now = config_hash(CurationConfig())
    monkeypatch.setattr(card, "OUTPUT_VERSION", card.OUTPUT_VERSION - 1)
    assert config_hash(CurationConfig()) != now


def test_the_dry_run_graph_lists_each_map_with_its_stages() -> None:
    graph = stage_graph(CurationConfig(), cluster_cpus=4)
    assert [row["stages"] for row in graph][0] == [s.name for s in SCAN_STAGES]
    assert graph[1]["stage"].startswith("dedup") and graph[2]["actors"] and graph[2]["pool"] == 3
    assert not graph[0]["actors"]


def test_an_unknown_fusion_key_is_refused_with_its_path() -> None:
    with pytest.raises(ValueError, match="fusion.pools"):
        CurationConfig.model_validate({"fusion": {"pools": 2}})



def test_a_misspelt_stage_in_resources_is_refused_naming_it() -> None:
    """Stages look their own name up in `resources`, so a typo would silently leave the declared resources."""
    with pytest.raises(ValueError, match=r"resources\n.*unknown stage 'probe_media' \(stages: .*\bprobe\b"):
        CurationConfig.model_validate({"resources": {"probe_media": {"batch_size": 512}, "probe": {}}})
    assert CurationConfig.model_validate({"resources": {"probe": {"batch_size": 512}}}).resources["probe"].batch_size == 512

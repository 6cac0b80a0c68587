"""Each run's description in the MLflow UI (the `mlflow.note.content` tag, shown as markdown on the run's page):
what the run did and where to look, in a few lines, for a reader who opens it among many."""
from __future__ import annotations

from collections.abc import Mapping

NOTE_TAG = "mlflow.note.content"


def _counts(counts: Mapping[str, int], most: int | None = None) -> str:
    """"a 5, b 2, c 2": the `most` largest counts (all when None), ties by name."""
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:most])


def curation_note(result) -> str:
    """`result`: a CurationResult."""
    left_out = result.rejected + result.filtered
    samples = result.samples or result.inputs
    clips = f" (clips of {result.inputs} inputs)" if samples != result.inputs else ""
    lines = [f"**Curated {result.kept} of {samples} samples**{clips} into `{result.dataset_dir}`, dataset id "
             f"`{result.card.get('id', '?')}`.",
             "",
             f"- kept: {_counts(result.by_modality) or 'none'}; {len(result.card.get('shards', []))} shards"]
    if left_out:
        more = len(result.reasons) - 5
        lines.append(f"- left out: {result.rejected} rejected, {result.filtered} filtered; most often "
                     f"{_counts(result.reasons, 5)}"
                     + (f" (and {more} more reasons)" if more > 0 else ""))
    if result.readmitted:
        lines.append(f"- readmitted: {result.readmitted} near duplicates curated in place of a filtered copy")
    lines.append("- look at: `dataset/report.html` (score histograms, thumbnails of kept and left-out samples), "
                 "`dataset/rejects.parquet` (every sample left out, with its stage and reason)")
    return "\n".join(lines)


def stage_note(stage, lineage: Mapping, metrics: Mapping, previous) -> str:
    """A training stage's run: what it trained on, from where, and how it ended."""
    datasets = ", ".join(f"`{d.get('id', '?')}`" for d in lineage.get("datasets", [])) or "?"
    start = f"the previous stage's final checkpoint (`{previous}`)" if previous else "scratch"
    lines = [f"**Stage `{stage.name}`**: {stage.steps} steps of batch {stage.batch_size} on "
             f"{', '.join(stage.modalities)} from {datasets}, starting from {start}.", ""]
    if stage.where:
        lines.append(f"- samples chosen by `{stage.where}`")
    if "loss" in metrics:
        held_out = "; held-out samples: `val_loss`" if stage.val_fraction > 0 else ""
        lines.append(f"- final loss {float(metrics['loss']):.4f} (per modality: `loss/<modality>`{held_out})")
    lines.append("- look at: `samples/` (a real sample beside a generated one, per modality), `model/` (EMA weights "
                 "as safetensors, model config, dataset card, sampler settings), `lineage.json` (the exact shards "
                 "read)")
    return "\n".join(lines)


def plan_note(name: str, curation_run: str | None, stages: list[str], registered: tuple[str, str] | None) -> str:
    parts = ([f"curation `{curation_run}`"] if curation_run else []) + [f"`{s}`" for s in stages]
    lines = [f"**Plan `{name}`**: {' -> '.join(parts) or 'nothing yet'}, one nested run each."]
    if registered:
        lines += ["", f"- registered model `{registered[0]}` version {registered[1]}"]
    return "\n".join(lines)

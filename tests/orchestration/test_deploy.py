"""The KubeRay manifests in deploy/: valid resources, one image everywhere, GPUs on the workers only, shared
storage and MLflow from a Secret, no service exposed outside the cluster, and a RayJob entrypoint that the CLI
and the config loader both accept."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import typer.main
import yaml

from latentforge.orchestration.cli import app
from latentforge.orchestration.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def cluster_specs() -> list[dict]:
    return [d["spec"] for d in by_kind("RayCluster")] + [d["spec"]["rayClusterSpec"] for d in by_kind("RayJob")]


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    head = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return head + [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def test_the_expected_resources_with_their_api_versions():
    kinds = {(d["apiVersion"], d["kind"]) for d in documents()}
    assert kinds == {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "PersistentVolumeClaim")}
    assert all(re.fullmatch(r"[a-z0-9-]+", d["metadata"]["name"]) for d in documents())


def test_every_container_runs_the_one_image_with_bounded_resources():
    images = set()
    for spec in cluster_specs():
        assert spec["rayVersion"] == ray.__version__  # KubeRay needs the image's Ray to be the spec's Ray
        for group, pod in pod_specs(spec):
            (container,) = pod["containers"]
            images.add(container["image"])
            res = container["resources"]
            assert res["requests"]["cpu"] and res["limits"]["memory"]
            gpus = res["limits"].get("nvidia.com/gpu")
            assert (gpus is None) == (group == "head"), group  # GPUs on the worker group only
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            assert claims[mounts["/data"]] == "latentforge-data"  # the shared volume, declared in storage.yaml
            env = {e["name"]: e for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "latentforge-mlflow"
            assert not any("value" in e and "PASSWORD" in e["name"] for e in container["env"])  # secrets only
    (image,) = images
    assert ":" in image and not image.endswith(":latest")
    assert by_kind("PersistentVolumeClaim")[0]["metadata"]["name"] == "latentforge-data"


def test_the_dockerfile_matches_the_cluster_ray_version():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M).group(1)
    assert base.startswith(f"{ray.__version__}-py311")
    assert re.search(r"^WORKDIR /app$", text, re.M) and re.search(r"^COPY configs \./configs$", text, re.M)


def test_nothing_is_exposed_outside_the_cluster():
    for spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no NodePort / LoadBalancer by accident
        assert not head.get("enableIngress", False)
        for _, pod in pod_specs(spec):
            assert not pod.get("hostNetwork", False)
            for port in pod["containers"][0].get("ports", []):
                assert "hostPort" not in port


@pytest.mark.parametrize("job", by_kind("RayJob"), ids=lambda j: j["metadata"]["name"])
def test_the_rayjob_entrypoint_is_a_latentforge_command_with_a_valid_config(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "latentforge"
    assert argv[1] in typer.main.get_command(app).commands
    config = Path(argv[2])
    assert config.parts[:3] == ("/", "app", "configs")  # the Dockerfile copies configs/ to /app/configs
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert len(overrides) == argv.count("--set") and len(argv) == 3 + 2 * len(overrides)
    cfg = load_config(REPO / "configs" / config.name, overrides)  # raises naming any bad key
    assert str(cfg.workdir).startswith("/data/")  # outputs on the shared volume, not in the pod

"""cluster/: the launcher YAML passes Ray's own schema; the KubeRay manifests, the Dockerfile
and the README agree on one image and one entrypoint, and that entrypoint is a valid job."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ravfm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
README = (CLUSTER / "README.md").read_text()


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec["template"]["spec"]["containers"]


def _cluster_specs() -> list[dict]:
    return [
        _load("kuberay-raycluster.yaml")["spec"],
        _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"],
    ]


def _images() -> set[str]:
    images = set()
    for spec in _cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images |= {c["image"] for g in groups for c in _containers(g)}
    return images


def test_launcher_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load("aws-gpu.yaml")
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_has_a_gpu_worker_type_and_token_auth():
    config = _load("aws-gpu.yaml")
    workers = [
        t for n, t in config["available_node_types"].items() if n != config["head_node_type"]
    ]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in config[key]), key
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_launcher_installs_torch_before_ravfm():
    setup = _load("aws-gpu.yaml")["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    ravfm_at = next(i for i, c in enumerate(setup) if "ravfm" in c)
    assert torch_at < ravfm_at


def test_manifests_are_kuberay_v1_with_token_auth():
    assert _load("kuberay-raycluster.yaml")["kind"] == "RayCluster"
    assert _load("kuberay-rayjob.yaml")["kind"] == "RayJob"
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        assert _load(name)["apiVersion"] == "ray.io/v1"
    for spec in _cluster_specs():
        assert spec["authOptions"]["mode"] == "token"
        gpu = [
            g
            for g in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]
        ]
        assert gpu, "a GPU worker group"


def test_one_image_everywhere():
    images = _images()
    assert len(images) == 1, images
    (image,) = images
    assert f"\n{image}\n" in README
    assert f"-t {image} " in (CLUSTER / "Dockerfile").read_text()


def test_ray_versions_agree():
    base = re.search(r"^FROM rayproject/ray:(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base and _load("aws-gpu.yaml")["docker"]["image"] == f"rayproject/ray:{base[1]}"
    version = base[1].split("-")[0]
    assert {s["rayVersion"] for s in _cluster_specs()} == {version}


def test_rayjob_entrypoint_is_in_the_readme_and_is_a_valid_job():
    entrypoint = _load("kuberay-rayjob.yaml")["spec"]["entrypoint"]
    assert f"\n{entrypoint}\n" in README
    argv = shlex.split(entrypoint)
    assert argv[:5] == ["python", "-m", "ravfm", "train", "--config"]
    job = ROOT / Path(argv[5]).relative_to("/home/ray/ravfm")  # the image's checkout
    cfg = load_config(job, argv[6:])
    assert cfg.train.use_gpu and cfg.data.source.startswith("s3://")
    assert cfg.runs_dir.startswith("/mnt/ravfm") and cfg.data.shards.startswith("/mnt/ravfm")


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_every_pod_mounts_the_shared_volume(name):
    spec = _load(name)["spec"]
    spec = spec.get("rayClusterSpec", spec)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        mounts = _containers(group)[0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/mnt/ravfm"} in mounts

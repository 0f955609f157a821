"""The deployment files parse, and the commands they run are commands this code accepts."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from jobs import crawl

INFRA = Path(__file__).parent.parent / "infra"


def crawl_args(entrypoint: str) -> argparse.Namespace:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "jobs.crawl"]
    parser = argparse.ArgumentParser()
    crawl.add_arguments(parser)
    return parser.parse_args(words[3:])


def test_rayjob_runs_the_crawl_with_flags_it_knows():
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob-nightly.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    args = crawl_args(job["spec"]["entrypoint"])
    assert args.source == "hf://" and args.index.startswith("s3://") and args.timeout > 0
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = [c.get("env", []) for c in [worker, cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]]
    assert env == [[], []] and "secretRef" in str(worker["envFrom"])  # tokens by reference, never inline


def test_cluster_yaml_has_a_cpu_head_and_gpu_workers():
    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith("g")


def test_dockerfile_installs_the_package():
    text = (INFRA / "Dockerfile").read_text()
    assert "pip install" in text and "COPY pipeline" in text and "COPY jobs" in text

"""Run by test_crawl_faults.py in its own process: a crawl on a `ray.cluster_utils.Cluster` whose worker
node is killed mid-crawl and replaced. Writes the crawl summary as JSON to a file: the cluster's own
processes share this process's stdout, and a raylet line can come after anything printed there."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from jobs.crawl import crawl


def main(source: str, index: str, report: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20})
    worker = cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(asdict(crawl(source, index, progress=False, max_in_flight=4, checkpoint_rows=5)))
    )
    thread.start()
    runs = Path(index) / "runs"
    deadline = time.monotonic() + 60
    while not (runs.exists() and any(runs.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster.remove_node(worker, allow_graceful=False)
    killed_at = sum(1 for _ in runs.iterdir()) if runs.exists() else 0
    time.sleep(1)
    cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    thread.join(timeout=240)
    Path(report).write_text(json.dumps({"summary": result, "runs_before_kill": killed_at,
                                        "finished": not thread.is_alive()}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

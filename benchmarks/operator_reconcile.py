"""How fast the operator takes a burst of TrainingRuns: 200 applied at once against the API emulator.

    .venv/bin/python benchmarks/operator_reconcile.py            # N=200
    .venv/bin/python benchmarks/operator_reconcile.py --runs 50

The emulator (tests/fixtures/k8s.py) runs in its own process, like a real API server; the operator runs
here (kopf + the flashops reconcilers). All runs are created by 8 concurrent clients, then we measure
the time until every TrainingRun has its PyTorchJob and a Pending condition, the watch events the
operator had to digest per second, the API requests it made, and whether any run got two children.
Baseline in the same run: one run alone (its latency), so the burst figure reads as a ratio too.
Target (issue 7): under 30 s for 200 runs on 2 cores, no duplicates.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
GV = "flashops.dev/v1alpha1"


def start_api(workdir: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fixtures" / "k8s.py"), str(workdir)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the API emulator did not start")
    return proc, json.loads(line)


def run_body(name: str) -> dict:
    return {"apiVersion": GV, "kind": "TrainingRun", "metadata": {"name": name, "namespace": "default"},
            "spec": {"stage": "pretrain", "training": {"steps": 10}}}


def pending_with_child(http: httpx.Client, names: set[str]) -> tuple[int, dict[str, int]]:
    runs = http.get(f"/apis/{GV}/namespaces/default/trainingruns").json()["items"]
    jobs = http.get("/apis/kubeflow.org/v1/namespaces/default/pytorchjobs").json()["items"]
    per_owner: dict[str, int] = {}
    for j in jobs:
        owner = j["metadata"]["labels"].get("flashops.dev/owner", "")
        per_owner[owner] = per_owner.get(owner, 0) + 1
    ready = 0
    for r in runs:
        name = r["metadata"]["name"]
        conds = {c["type"]: c["status"] for c in (r.get("status") or {}).get("conditions") or []}
        if name in names and conds.get("Pending") == "True" and per_owner.get(name, 0) >= 1:
            ready += 1
    return ready, per_owner


def measure(http: httpx.Client, names: list[str], timeout: float) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for r in pool.map(lambda n: http.post(f"/apis/{GV}/namespaces/default/trainingruns", json=run_body(n)), names):
            r.raise_for_status()
    created = time.perf_counter() - t0
    while True:
        ready, _ = pending_with_child(http, set(names))
        if ready == len(names):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"only {ready}/{len(names)} runs reached Pending with a child in {timeout} s "
                               f"(creation took {created:.1f} s)")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flashops-bench-"))
    proc, info = start_api(work)
    os.environ["KUBECONFIG"] = info["kubeconfig"]
    import logging

    logging.getLogger("kopf").setLevel(logging.WARNING)
    from flashops.operator.config import OperatorConfig
    from flashops.operator.main import start_in_thread

    http = httpx.Client(base_url=info["url"], timeout=60)
    config = OperatorConfig(s3_endpoint="http://minio:9000", checkpoint_root="file:///tmp/flashops-bench-store",
                            resync_seconds=600, retry_seconds=2, workers=16)
    op = start_in_thread(config)
    try:
        warm = measure(http, ["warmup-0"], 60)  # imports, connection pools, discovery
        single = measure(http, ["single-0"], 60)
        rv0 = int(http.get(f"/apis/{GV}/namespaces/default/trainingruns").json()["metadata"]["resourceVersion"])
        reconciles0 = op.operator.reconciles
        names = [f"bench-{i:04d}" for i in range(args.runs)]
        burst = measure(http, names, args.timeout)
        rv1 = int(http.get(f"/apis/{GV}/namespaces/default/trainingruns").json()["metadata"]["resourceVersion"])
        time.sleep(2.0)  # let stragglers land: a late duplicate would show up here
        _, per_owner = pending_with_child(http, set(names))
        duplicates = sorted(n for n in names if per_owner.get(n, 0) > 1)
        missing = sorted(n for n in names if per_owner.get(n, 0) == 0)
        events = rv1 - rv0  # every write the server accepted is one watch event
        print(f"operator_reconcile: {args.runs} TrainingRuns applied at once (emulator in its own process, "
              f"operator with {config.workers} workers, {os.cpu_count()} cores)")
        print(f"  first run after start (warm-up):           {warm:.3f} s")
        print(f"  one run alone (baseline latency):          {single:.3f} s")
        print(f"  all {args.runs} with child + Pending:              {burst:.2f} s   "
              f"({burst / single:.1f}x the single-run latency, {args.runs / burst:.1f} runs/s)")
        print(f"  watch events during the burst:             {events}  ({events / burst:.0f} events/s)")
        print(f"  reconciles:                                {op.operator.reconciles - reconciles0}")
        print(f"  duplicate children: {len(duplicates)}   runs without a child: {len(missing)}")
        print(f"  target: < 30 s, no duplicates -> {'MET' if burst < 30 and not duplicates and not missing else 'MISSED'}")
    finally:
        op.stop()
        http.close()
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()

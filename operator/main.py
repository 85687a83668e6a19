"""Run the flashops operator: in a pod (in-cluster config) or against a kubeconfig.

    flashops operator                                   # the CLI wraps run_operator()
    KUBECONFIG=~/.kube/config FLASHOPS_S3_ENDPOINT=http://minio:9000 flashops operator --namespace ml

`start_in_thread` runs it on its own event loop in a background thread (tests, benchmarks): stop it with
the returned handle; a new start is an operator restart (state lives in the objects' status, not here).
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import kopf

from flashops.operator.config import OperatorConfig
from flashops.operator.handlers import FlashopsOperator


def run_operator(config: OperatorConfig, stop_flag: threading.Event | None = None,
                 ready_flag: threading.Event | None = None, liveness: str | None = None,
                 operator: FlashopsOperator | None = None) -> None:
    """Blocks until stop_flag is set (or SIGINT/SIGTERM when run in the main thread)."""
    registry = kopf.OperatorRegistry()
    operator = operator or FlashopsOperator(config)
    operator.register(registry)
    try:
        asyncio.run(kopf.operator(
            registry=registry, standalone=True, stop_flag=stop_flag, ready_flag=ready_flag,
            clusterwide=config.namespace is None, namespaces=[config.namespace] if config.namespace else (),
            liveness_endpoint=liveness,
        ))
    finally:
        operator.close()


@dataclass
class RunningOperator:
    operator: FlashopsOperator
    thread: threading.Thread
    stop_flag: threading.Event = field(default_factory=threading.Event)

    def stop(self, timeout: float = 30) -> None:
        self.stop_flag.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the operator did not stop within {timeout} s")


def start_in_thread(config: OperatorConfig, ready_timeout: float = 60) -> RunningOperator:
    """Start the operator in a daemon thread and wait until kopf says it is ready."""
    operator = FlashopsOperator(config)
    ready = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_operator(config, stop_flag=stop, ready_flag=ready, operator=operator)
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller below
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=target, name="flashops-operator", daemon=True)
    thread.start()
    if not ready.wait(ready_timeout) or errors:
        stop.set()
        raise RuntimeError(f"the operator did not become ready: {errors[0] if errors else 'timeout'}")
    return RunningOperator(operator, thread, stop)

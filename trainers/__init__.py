"""flashops.trainers: the training engine (pretrain, sft, dpo, rl with FiberPO/GRPO/GSPO), its data,
losses and local runner.

    torchrun --nproc-per-node 2 -m flashops.trainers --spec examples/pretrain.yaml
    python -m flashops.trainers --spec examples/sft.yaml
    from flashops.trainers import run_training, run_pipeline

Importing the package is cheap; the engine (torch) loads on first use of these names.
"""
_LAZY = {
    "run_training": "flashops.trainers.runner",
    "run_pipeline": "flashops.trainers.runner",
    "export_model": "flashops.trainers.runner",
    "Trainer": "flashops.trainers.engine",
    "RunResult": "flashops.trainers.engine",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashops.trainers' has no attribute {name!r}")

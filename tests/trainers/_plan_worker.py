"""One rank of the plan-vs-measured test (tests/trainers/test_plan.py), CPU + gloo.

    python tests/trainers/_plan_worker.py RANK WORLD PORT SPEC.yaml OUT_DIR

Sets up the real Trainer (FSDP2 + EP through trainers/parallel.py), runs one training step and writes what
this rank holds: parameter, gradient (just before the optimizer step) and optimizer-state bytes of its local
shards, and the bytes autograd saved for backward during the step's forward (unique storages, parameters
and their gathered copies excluded): the quantities `flashops plan` predicts.
"""
import json
import os
import sys

import torch


def main(rank: int, world: int, port: int, spec_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from flashops.api.spec import load_file
    from flashops.trainers.engine import Trainer
    from flashops.trainers.plan import measure_state_bytes

    trainer = Trainer(load_file(spec_path)[0], store=None)
    trainer.setup()
    model = trainer.model
    before_step = {}
    trainer.optimizers[0].register_step_pre_hook(
        lambda *a: before_step.update(measure_state_bytes(model, trainer.optimizers)))

    saved: dict[int, int] = {}

    def address(t):  # FSDP2 frees a gathered parameter's storage after use: such a storage has no address
        try:
            storage = t.untyped_storage()
            return storage.data_ptr() if storage.nbytes() else None
        except RuntimeError:
            return None

    from torch.distributed.tensor import DTensor

    def weights():  # parameters, and the local (expert-parallel) part of a gathered DTensor parameter
        return {address(p.to_local() if isinstance(p, DTensor) else p) for p in model.parameters()}

    def pack(t):
        key = address(t)
        if key is not None and key not in weights():
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with trainer.compute_precision(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.stage.train_step(0)
    after = measure_state_bytes(model, trainer.optimizers)
    result = {"params": after["params"], "grads": before_step["grads"], "optimizer": after["optimizer"],
              "activations": sum(saved.values())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

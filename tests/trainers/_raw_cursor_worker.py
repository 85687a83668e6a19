"""One rank of the raw-rows cursor test (tests/trainers/test_raw_streams.py), CPU + gloo.

    python tests/trainers/_raw_cursor_worker.py RANK WORLD PORT DATA_URI OUT_DIR

Builds the real PretrainStage on raw rows, takes 3 batches, and writes its rows and the checkpoint's data
cursor table (Stage.state_dict: each rank fills its row streams, one all-reduce makes the table whole).
"""
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int, uri: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from flashops.api.spec import parse_object
    from flashops.trainers.corpora import open_dataset
    from flashops.trainers.stages import PretrainStage

    spec = parse_object({"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "r"},
                         "spec": {"stage": "pretrain", "training": {"batchSize": 4, "seqLen": 12, "seed": 2}}}).spec

    def all_sum(v):
        t = torch.tensor([float(v)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    tr = SimpleNamespace(spec=spec, dist=SimpleNamespace(rank=rank, world_size=world), all_sum=all_sum,
                         device=torch.device("cpu"),
                         plan=SimpleNamespace(micro_batch_size=2, dataset=open_dataset(uri, "pretrain", seed=2)))
    stage = PretrainStage(tr)
    rows = [stage.local_batch().tokens.numpy() for _ in range(3)]
    table = stage.state_dict()["data_streams"].numpy()
    np.savez(f"{out}/rank{rank}.npz", rows=np.stack(rows), table=table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

"""One rank of the FSDP2 + expert-parallel test (tests/model/test_distributed.py), CPU + gloo.

    python tests/model/_fsdp_ep_worker.py RANK WORLD PORT DIR    # DIR holds ref.pt written by the test

Parallelism is applied by torchtitan's own `parallelize_deepseekv3` (the function its DeepSeek-V3 model spec
registers): EP through the model's sharding configs + `model.parallelize`, then FSDP2 (`fully_shard`) on every
block, the MTP block included, with the routed experts on the expert-FSDP mesh. Each rank trains on its own
slice of the batch; results go to DIR/rank{RANK}.pt for the test to compare with a single process.
"""
import os
import sys

import torch
import torch.nn.functional as F


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.tensor import DTensor
        from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed.utils import set_spmd_backend
        from torchtitan.models.deepseek_v3 import parallelize_deepseekv3
        from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

        from flashops.model import JoyAIFlash
        from flashops.model import torchtitan_compat as compat
        from flashops.model.config import JoyAIConfig
        from flashops.model.model import torchtitan_config

        data = torch.load(os.path.join(out_dir, "ref.pt"))
        # "partial_dtensor": DTensors on the model-parallel axes (here EP), FSDP2 for the data-parallel ones.
        parallelism = ParallelismConfig(data_parallel_shard_degree=world, expert_parallel_degree=world,
                                        spmd_backend="partial_dtensor")
        set_spmd_backend(parallelism.spmd_backend)  # what torchtitan's Trainer does before parallelizing
        dims = ParallelDims.from_config(parallelism, world)
        compat.build_device_mesh(dims)  # torchtitan assumes CUDA when no accelerator is visible
        tt_cfg = torchtitan_config(JoyAIConfig.from_dict(data["config"]))
        set_deepseek_v3_sharding_config(tt_cfg, enable_sp=False, enable_ep=True)
        model = JoyAIFlash(tt_cfg)
        model.load_state_dict(data["state"])
        model.train()
        parallelize_deepseekv3(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
                               parallelism=parallelism, compile_config=CompileConfig(), ac_config=None,
                               dump_folder=out_dir)
        compat.sum_reductions_for_gloo(model)  # gloo has no PREMUL_SUM

        experts = {}
        for i, moe in enumerate(model.moe_layers):
            w1 = moe.routed_experts.inner_experts.w1_EFD
            local = w1.to_local() if isinstance(w1, DTensor) else w1
            ep_dim = w1.device_mesh.mesh_dim_names.index("ep")
            experts[i] = (w1.placements[ep_dim].is_shard(0), w1.device_mesh.size(ep_dim), local.detach().clone())
        dense = model.layers["0"].attention.wkv_a.weight
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = data["tokens"][rank:: world]  # this rank's share of the global batch
        losses, loads, grads = [], [], {}
        for _ in range(2):
            out = model(tokens[:, :-1])
            main = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
            mtp = F.cross_entropy(out.mtp_logits[:, 1:].flatten(0, 1), tokens[:, 2:].flatten(), reduction="sum")
            # torchtitan's convention: FSDP sums gradients over ranks (gradient_divide_factor 1), the loss is
            # normalised by the GLOBAL token count (all-reduced), so the summed gradients are the global mean's
            counts = torch.tensor([tokens[:, 1:].numel(), tokens[:, 2:].numel()], dtype=torch.float32)
            global_counts = counts.clone()
            torch.distributed.all_reduce(global_counts)
            loss = main / global_counts[0] + 0.1 * mtp / global_counts[1]
            opt.zero_grad()
            loss.backward()
            if not grads:  # first step: gradients as the whole model sees them (expert grads: this rank's experts)
                for name, param in model.named_parameters():
                    g = param.grad
                    if isinstance(g, DTensor):
                        g = g.to_local() if ".inner_experts." in name else g.full_tensor()
                    grads[name] = g.detach().clone()
            opt.step()
            loads.append(model.update_router_bias())  # counts summed over the ranks
            losses.append((main / counts[0] + 0.1 * mtp / counts[1]).detach())  # this rank's mean loss
        torch.save({"losses": torch.stack(losses), "grads": grads, "loads": torch.stack(loads), "experts": experts,
                    "dense_is_dtensor": isinstance(dense, DTensor),
                    "dense_local_rows": (dense.to_local() if isinstance(dense, DTensor) else dense).shape[0],
                    "bias": torch.stack([m.expert_bias_E.full_tensor() if isinstance(m.expert_bias_E, DTensor)
                                         else m.expert_bias_E for m in model.moe_layers])},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

"""FSDP2 + expert parallelism on CPU: 2 processes (gloo), joyai-flash-debug, parallelized by torchtitan's own
`parallelize_deepseekv3` (EP=2 over the routed experts with torchtitan's all-to-all dispatch, FSDP2 over
dp_shard=2). Two AdamW steps on each rank's half of the batch must reproduce a single process training on the
whole batch: same gradients, losses, expert loads and router bias. As in torchtitan's trainer, FSDP sums the
gradients over ranks and each rank normalises its loss by the GLOBAL token count (a per-rank mean loss would
give world-size times the gradient).

    .venv/bin/pytest tests/model/test_distributed.py -q
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(model, tokens, steps):
    """Single process: the mean of the per-slice losses is the global-batch loss the ranks optimise together."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, loads, grads = [], [], None
    for _ in range(steps):
        per_rank = []
        for r in range(WORLD):
            part = tokens[r::WORLD]
            out = model(part[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), part[:, 1:].flatten())
            per_rank.append(loss + 0.1 * F.cross_entropy(out.mtp_logits[:, 1:].flatten(0, 1), part[:, 2:].flatten()))
        opt.zero_grad()
        (sum(per_rank) / WORLD).backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        loads.append(model.update_router_bias())
        losses.append(torch.stack([loss.detach() for loss in per_rank]))
    return torch.stack(losses), torch.stack(loads), grads  # (steps, WORLD), (steps, layers, experts), step 1


@pytest.mark.slow
def test_fsdp2_with_expert_parallel_matches_a_single_process(tmp_path):
    from flashops.model import JoyAIFlash, get_config

    cfg = get_config("joyai-flash-debug")
    torch.manual_seed(0)
    ref = JoyAIFlash(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (WORLD, 33), generator=torch.Generator().manual_seed(4))
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.save({"config": cfg.to_dict(), "state": init, "tokens": tokens}, tmp_path / "ref.pt")

    worker, port = Path(__file__).with_name("_fsdp_ep_worker.py"), str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(WORLD), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    ref_losses, ref_loads, ref_grads = _reference(ref, tokens, steps=2)
    per_expert = cfg.num_experts // WORLD
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        # experts are split over the ranks: rank r holds experts r*E/2 .. (r+1)*E/2 - 1 of every MoE layer
        for i, (sharded_on_ep, ep_size, local) in got["experts"].items():
            assert sharded_on_ep and ep_size == WORLD and local.shape[0] == per_expert
            full = init[f"layers.{i + cfg.n_dense_layers}.moe.routed_experts.inner_experts.w1_EFD"]
            assert torch.equal(local, full[r * per_expert:(r + 1) * per_expert])
        # dense weights are FSDP2-sharded over the 2 ranks
        assert got["dense_is_dtensor"] and got["dense_local_rows"] < init["layers.0.attention.wkv_a.weight"].shape[0]
        # the gradients of the global batch (expert weights: this rank's experts); checked directly because
        # AdamW's update hardly depends on the gradient's scale
        assert set(got["grads"]) == set(ref_grads)
        for name, grad in got["grads"].items():
            want = ref_grads[name]
            if ".inner_experts." in name:
                want = want[r * per_expert:(r + 1) * per_expert]
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        # same losses before and after an optimizer step, same summed expert load, same router bias
        torch.testing.assert_close(got["losses"], ref_losses[:, r], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["loads"], ref_loads)
        torch.testing.assert_close(got["bias"], torch.stack([m.expert_bias_E for m in ref.moe_layers]))
    assert not torch.allclose(ref_losses[0], ref_losses[1])  # the step changed the model

"""Peak memory of a joyai-flash-small forward + backward without and with activation checkpointing, in one
fresh process (tests/trainers/test_activation_checkpointing.py). Prints JSON: per mode the growth of the peak
RSS over the step (VmHWM reset through /proc/self/clear_refs before it), the loss, and each parameter's
gradient norm and first elements. A small warm-up step pays the process's one-time costs first; run with
MALLOC_MMAP_THRESHOLD_=65536 so freed blocks go back to the OS between the two measured steps.

    python tests/trainers/_ac_worker.py
"""
import json
import sys

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    from flashops.model import JoyAIFlash, get_config
    from flashops.trainers.losses import masked_ce
    from flashops.trainers.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = get_config("joyai-flash-small")
    tokens = torch.randint(3, cfg.vocab_size, (2, 257), generator=torch.Generator().manual_seed(1))
    inp, tgt, mask = tokens[:, :-1], tokens[:, 1:], torch.ones(2, 256, dtype=torch.long)
    warm = JoyAIFlash(cfg)  # one-time costs (kernel JIT, thread pools, allocator arenas) before measuring
    warm(inp[:1, :32], mtp=True).logits.sum().backward()
    state = warm.state_dict()
    del warm
    results = {}
    for mode in ("none", "full"):
        model = JoyAIFlash(cfg)
        model.load_state_dict(state)
        apply_activation_checkpointing(model, mode)
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        out = model(inp, mtp=True)
        loss = masked_ce(out.logits, tgt, mask)[0] / 512 + 0.1 * masked_ce(out.mtp_logits[:, 1:], tgt[:, 1:], mask[:, 1:])[0] / 510
        loss.backward()
        peak = _rss_kib("VmHWM")
        results[mode] = {"loss": loss.item(), "peak_growth": (peak - base) * 1024,
                         "grads": {n.replace("._checkpoint_wrapped_module", ""): [p.grad.norm().item(),
                                                                                  p.grad.flatten()[:64].tolist()]
                                   for n, p in model.named_parameters() if p.grad is not None}}
        del model, out, loss
    print(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
    sys.exit(0)

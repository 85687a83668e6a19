"""INT4 serving loads the packed export and stays within the logit tolerance measured at export; the
continuous-batching backend (per-row positions and cache slots) equals JoyAIFlash.forward row by row."""
from __future__ import annotations

import torch

from flashops.model.export import Int4Experts
from flashops.model.qat import disable_qat, enable_qat
from flashops.serving.backend import JoyAIBackend
from flashops.serving.loading import ServeOptions, load_predictor


def test_int4_predictor_keeps_experts_packed_and_logits_within_export_tolerance(trained, int4_tolerance, tmp_path):
    model, _, tok, uri = trained
    predictor = load_predictor(ServeOptions(model_uri=uri, quantization="int4", max_len=64, cache_dir=str(tmp_path)))
    served = predictor.engine.backend.model
    experts = [m for m in served.modules() if isinstance(m, Int4Experts)]
    assert experts and all(e.kernel == "int4pack" for e in experts)  # tests/conftest.py: the packed CPU kernel
    assert all(b.dtype == torch.uint8 for n, b in served.named_buffers() if n.endswith("_packed"))
    assert not any("routed_experts" in n for n, _ in served.named_parameters())  # no float expert weights
    assert not (tmp_path / "letters-v1" / "model.safetensors.index.json").exists()  # only int4/ was fetched
    tolerance, ids = int4_tolerance
    logits, _ = predictor.engine.backend.forward([0], torch.tensor([ids]), [0])
    with torch.inference_mode():
        full = model(torch.tensor([ids]), mtp=False).logits
        enable_qat(model)  # the same rounded weights, dequantized up front
        fake_quant = model(torch.tensor([ids]), mtp=False).logits
        disable_qat(model)
    # The packed kernel computes in bf16: it adds a little to INT4's own change (the tolerance, measured with
    # exact fake quantization). Measured here: served - full 0.0413 vs tolerance 0.0407 (+1.5%), served - fake
    # quant 0.0048 (12% of the tolerance); FLASHOPS_CPU_INT4=dequant serves the exact INT4 logits.
    assert 0 < (logits - full).abs().max() <= tolerance * 1.05 + 1e-5
    assert (logits - fake_quant).abs().max() <= 0.2 * tolerance + 1e-4


def test_backend_batches_rows_at_different_positions_like_the_model(trained):
    model = trained[0]
    backend = JoyAIBackend(model, slots=3, max_len=48)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 259, (1, 12), generator=g), torch.randint(3, 259, (1, 7), generator=g)
    with torch.inference_mode():
        ref_a, ref_b = model(a, mtp=False), model(b, mtp=False)
        full_mtp = model(a).mtp_logits
    backend.forward([2], a[:, :9], [0])  # slot 2 at position 9, slot 0 at position 5: one batched pass
    backend.forward([0], b[:, :5], [0])
    logits, hidden = backend.forward([2, 0], torch.cat([a[:, 9:11], b[:, 5:7]]), [9, 5])
    assert torch.allclose(logits[0], ref_a.logits[0, 9:11], atol=1e-4)
    assert torch.allclose(logits[1], ref_b.logits[0, 5:7], atol=1e-4)
    mtp_logits, _ = backend.mtp([1], ref_a.hidden[:, :-1], a[:, 1:], [0])
    assert torch.allclose(mtp_logits[0], full_mtp[0, 1:], atol=1e-4)


def test_backend_logits_at_projects_only_the_chosen_position_of_each_row(trained):
    """What prefill and the MTP catch-up use: one position per row, same logits as the full projection."""
    model = trained[0]
    backend = JoyAIBackend(model, slots=2, max_len=32)
    tokens = torch.randint(3, 259, (2, 6), generator=torch.Generator().manual_seed(2))
    at = torch.tensor([5, 2])
    full, hidden = backend.forward([0, 1], tokens, [0, 0])
    picked, _ = backend.forward([0, 1], tokens, [0, 0], logits_at=at)
    assert picked.shape == (2, 1, full.shape[-1])
    assert torch.allclose(picked[:, 0], full[torch.arange(2), at], atol=1e-5)
    full_mtp, _ = backend.mtp([0, 1], hidden[:, :-1], tokens[:, 1:], [0, 0])
    picked_mtp, _ = backend.mtp([0, 1], hidden[:, :-1], tokens[:, 1:], [0, 0], logits_at=at - 1)
    assert torch.allclose(picked_mtp[:, 0], full_mtp[torch.arange(2), at - 1], atol=1e-5)


def test_served_logits_equal_the_full_forward_for_rows_at_different_positions(trained):
    """Serving runs the model's own cached forward: three rows in shuffled slots, each at its own position,
    verified k+1 = 3 tokens at once (the speculative step's shape), give the full forward's logits."""
    model = trained[0]
    backend = JoyAIBackend(model, slots=4, max_len=40)
    seqs = torch.randint(3, 259, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(seqs, mtp=False).logits
    slots, starts = [3, 0, 2], [10, 4, 7]
    for i, (slot, n) in enumerate(zip(slots, starts)):
        backend.forward([slot], seqs[i : i + 1, :n], [0])
    step = torch.stack([seqs[i, s : s + 3] for i, s in enumerate(starts)])
    logits, _ = backend.forward(slots, step, starts)
    want = torch.stack([full[i, s : s + 3] for i, s in enumerate(starts)])
    assert logits.shape == (3, 3, full.shape[-1])
    assert torch.allclose(logits, want, atol=1e-4)

"""The backend's device/dtype switch (what `benchmarks/serving_decode.py --device cuda --dtype bfloat16` and
gpu_check.sh use): weights and KV cache in the given dtype on the given device, token tensors moved in, logits
back on the CPU in float32 for the sampler. No GPU here, so the dtype half runs on the CPU: a bfloat16 backend
gives the fp32 model's logits to bf16 precision, and speculative decoding runs through it. A small untrained
debug model is enough (and fast): the checks compare two precisions of the same weights."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from flashops.serving.backend import JoyAIBackend
from flashops.serving.engine import Engine
from flashops.serving.metrics import ModelMetrics
from flashops.serving.sampling import SamplingParams


def small_model():
    from flashops.model import JoyAIFlash, get_config

    torch.manual_seed(0)
    return JoyAIFlash(get_config("joyai-flash-debug", {"vocab_size": 512, "max_seq_len": 128})).eval()


def test_bfloat16_backend_matches_fp32_logits_and_hands_the_sampler_cpu_float32():
    model = small_model()
    tokens = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(4))
    ref, _ = JoyAIBackend(model, slots=2, max_len=32).forward([0, 1], tokens, [0, 0])
    bf16 = JoyAIBackend(copy.deepcopy(model), slots=2, max_len=32, device="cpu", dtype=torch.bfloat16)
    assert bf16.cache.layers[0].c_kv.dtype == torch.bfloat16 and bf16.cache.layers[0].k_pe.dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.device == torch.device("cpu")
    logits, hidden = bf16.forward([0, 1], tokens, [0, 0])
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and hidden.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert 0 < (logits - ref).abs().max() <= 0.05 * scale  # bf16 rounding, nothing worse
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    rope = [b for n, b in bf16.model.named_buffers() if n.endswith("rope.cache")]
    assert rope and all(b.dtype == torch.complex64 for b in rope)  # model.to(bfloat16) would make them real
    mtp, _ = bf16.mtp([0, 1], hidden[:, :-1], tokens[:, 1:], [0, 0], logits_at=torch.tensor([4, 6]))
    assert mtp.shape == (2, 1, logits.shape[-1]) and mtp.dtype == torch.float32


def test_placing_the_model_keeps_rope_complex_where_module_to_would_not():
    """Why backend.place exists: the plain cast silently breaks positions, and the logits show it."""
    from flashops.serving.backend import place

    model = small_model()
    tokens = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model(tokens, mtp=False).logits
        good = place(copy.deepcopy(model), dtype=torch.bfloat16)(tokens, mtp=False).logits.float()
        with pytest.warns(UserWarning, match="discards the imaginary part"):
            bad = copy.deepcopy(model).to(dtype=torch.bfloat16)(tokens, mtp=False).logits.float()
    assert (good - ref).abs().max() < (bad - ref).abs().max()


def test_speculative_decoding_through_a_bfloat16_backend():
    model = small_model()
    prompt = list(range(3 + ord("a"), 3 + ord("e")))

    async def run(backend, k):
        engine = Engine(backend, lambda ids: "", None, k, ModelMetrics(f"device-k{k}"))
        try:
            out = []
            async for chunk in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0)):
                out += chunk.token_ids
            return out, engine.metrics.mean_acceptance_length
        finally:
            await engine.aclose()

    plain, _ = asyncio.run(run(JoyAIBackend(copy.deepcopy(model), slots=1, max_len=64, dtype=torch.bfloat16), 0))
    spec, accept = asyncio.run(run(JoyAIBackend(copy.deepcopy(model), slots=1, max_len=64, dtype=torch.bfloat16), 2))
    assert len(spec) == len(plain) == 12 and accept >= 1.0
    # greedy speculative decoding emits the plain greedy tokens; in bf16 a batched verify may flip a near-tie
    assert sum(a == b for a, b in zip(spec, plain)) >= 10

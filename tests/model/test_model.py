"""JoyAI-Flash model: configs, shapes, causality, KV cache, MTP drafting, routing and balancing, training."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flashops.api.spec import MODEL_PRESETS
from flashops.model import PRESETS, ConfigError, JoyAIFlash, count_params, get_config

V = 4096


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return JoyAIFlash(get_config("joyai-flash-debug")).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))


def test_presets_match_the_spec_and_reject_bad_combinations():
    assert set(PRESETS) == set(MODEL_PRESETS)
    assert get_config("joyai-flash-debug", {"vocab_size": 2048}).vocab_size == 2048
    with pytest.raises(ConfigError) as e:
        get_config("joyai-flash-debug", {"top_k": 9})
    assert e.value.field == "top_k" and e.value.value == 9 and "num_experts (8)" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'vocab_size'"):
        get_config("joyai-flash-debug", {"vocab_sise": 10})
    with pytest.raises(ConfigError, match="must divide"):
        get_config("joyai-flash-debug", {"qat_group_size": 48})
    with pytest.raises(ConfigError, match="expected a int"):
        get_config("joyai-flash-debug", {"dim": "big"})


def test_param_counts_match_the_paper_within_one_percent():
    counts = count_params(get_config("joyai-flash-48b-a3b"))  # meta device
    assert counts == get_config("joyai-flash-48b-a3b").param_counts()  # independent closed form
    assert abs(counts["total_params"] / 48.9e9 - 1) < 0.01
    assert abs(counts["active_params"] / 2.75e9 - 1) < 0.01
    assert abs(counts["active_params_with_embeddings"] / 3.28e9 - 1) < 0.01
    debug = count_params(get_config("joyai-flash-debug"))
    assert 1e6 < debug["total_params"] < 10e6
    assert 100e6 <= count_params(get_config("joyai-flash-small"))["total_params"] <= 300e6


def test_shapes_and_paper_structure(model, tokens):
    out = model(tokens)
    assert out.logits.shape == out.mtp_logits.shape == (2, 24, V)
    assert out.hidden.shape == (2, 24, 128)
    assert torch.all(out.mtp_logits[:, 0] == 0)
    blocks = list(model.layers.values())
    assert not blocks[0].moe_enabled and all(b.moe_enabled for b in blocks[1:])
    assert model.mtp.feed_forward is not None and not model.mtp.moe_enabled  # dense MTP
    assert model.mtp_layers[0].eh_proj.weight.shape == (128, 256)


def test_causal_including_mtp(model, tokens):
    t = 10
    changed = tokens.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 7) % V
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    for name in ("logits", "mtp_logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x[:, : t + 1], y[:, : t + 1], atol=1e-5), name
        assert not torch.allclose(x[:, t + 1], y[:, t + 1], atol=1e-3), name  # and it does depend on t+1


def test_an_mtp_loss_without_trunk_grad_trains_the_mtp_layer_and_not_the_trunk(tokens):
    """mtp_trunk_grad=False (post-training's MTP loss): the trunk's layers get no gradient from an MTP loss, the
    MTP layer does; with the default (pretraining, SFT) the loss reaches the trunk too. The logits are the same."""
    torch.manual_seed(0)
    m = JoyAIFlash(get_config("joyai-flash-debug"))
    grads = {}
    for trunk_grad in (True, False):
        m.zero_grad(set_to_none=True)
        out = m(tokens, mtp_trunk_grad=trunk_grad)
        F.cross_entropy(out.mtp_logits[:, 1:-1].flatten(0, 1), tokens[:, 2:].flatten()).backward()
        grads[trunk_grad] = {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
                             for n, p in m.named_parameters()}
    trunk = [n for n in grads[True] if n.startswith("layers.")]
    own = [n for n in grads[True] if n.startswith("mtp_layers.") and "expert_bias" not in n]
    assert trunk and own
    assert any(grads[True][n] > 0 for n in trunk)  # the default: the MTP loss shapes the trunk too
    assert all(grads[False][n] == 0 for n in trunk)
    assert all(grads[False][n] > 0 for n in own if grads[True][n] > 0)
    assert sum(grads[False][n] > 0 for n in own) > len(own) // 2


def test_kv_cache_gives_the_full_forward_logits(model, tokens):
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(batch=2, max_len=32)
        parts = [model(tokens[:, :9], cache=cache, start_pos=0).logits]
        for p in range(9, 24):
            parts.append(model(tokens[:, p : p + 1], cache=cache, start_pos=p).logits)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-4)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens, cache=model.new_cache(2, 8))


def test_cached_forward_places_each_row_at_its_own_position_and_slot(model):
    """Continuous batching through the model's public cached forward: rows in different cache slots at
    different positions, decoded in one pass, give the full forward's logits (main and MTP heads)."""
    seqs = torch.randint(3, V, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(seqs)
        cache = model.new_cache(batch=4, max_len=32)
        prefix = {3: 11, 0: 4, 2: 8}  # slot -> prompt length; sequence i lives in slot list(prefix)[i]
        for i, (slot, n) in enumerate(prefix.items()):
            h = model.forward_cached(seqs[i : i + 1, :n], cache, [0], [slot])
            assert torch.allclose(model.logits(h), full.logits[i : i + 1, :n], atol=1e-4)
        starts = list(prefix.values())
        step = torch.stack([seqs[i, s : s + 2] for i, s in enumerate(starts)])
        h = model.forward_cached(step, cache, starts, list(prefix))
        want = torch.stack([full.logits[i, s : s + 2] for i, s in enumerate(starts)])
        assert torch.allclose(model.logits(h), want, atol=1e-4)
        # the MTP layer the same way: pairs (hidden at p-1, token p) -> logits for token p+1
        m = model.mtp_forward_cached(full.hidden[:, :-1], seqs[:, 1:], cache, [0, 0, 0], [1, 2, 3])
        assert torch.allclose(model.mtp_logits(m), full.mtp_logits[:, 1:], atol=1e-4)
        with pytest.raises(ValueError, match="its own slot"):
            model.forward_cached(step, cache, starts, [3, 3, 0])
        with pytest.raises(ValueError, match="max_len"):
            model.forward_cached(step, cache, [31, 0, 0], [0, 1, 2])


@pytest.mark.parametrize("mask_form", ["causal prefill", "one mask for all rows", "a mask per row"])
def test_absorbed_attention_is_the_expanded_attention_reassociated(mask_form):
    """Decoding attends in the latent space (wkv_b folded into query and output); the same products as
    expanding the cache through wkv_b, at float64 precision, for each mask form the cache produces."""
    torch.manual_seed(0)
    attn = JoyAIFlash(get_config("joyai-flash-small")).layers["1"].attention.double()
    bsz, heads, nope, rope, r = 2, attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    q_len, kv_len = (9, 9) if mask_form == "causal prefill" else (3, 11)
    q_nope, q_pe = torch.randn(bsz, q_len, heads, nope).double(), torch.randn(bsz, q_len, heads, rope).double()
    c_kv, k_pe = torch.randn(bsz, kv_len, r).double(), torch.randn(bsz, kv_len, 1, rope).double()
    mask, is_causal = None, mask_form == "causal prefill"
    if mask_form == "one mask for all rows":  # rows at the same start: (L, S)
        mask = torch.arange(kv_len).unsqueeze(0) <= torch.arange(8, 11).unsqueeze(1)
    elif mask_form == "a mask per row":  # rows at their own positions: (B, 1, L, S)
        mask = (torch.arange(kv_len).view(1, 1, -1) <= torch.tensor([[4, 5, 6], [8, 9, 10]]).unsqueeze(2)).unsqueeze(1)
    kv = attn.wkv_b(c_kv).view(bsz, kv_len, heads, nope + attn.v_head_dim)
    k_nope, v = kv.split([nope, attn.v_head_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], -1).transpose(1, 2)
    want = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
                                          scale=attn.softmax_scale).transpose(1, 2)
    got = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask, is_causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_absorbing_is_chosen_where_it_costs_less():
    attn = JoyAIFlash(get_config("joyai-flash-small")).layers["1"].attention  # r 128, nope 64, v 64
    assert attn.absorb_pays(1) and attn.absorb_pays(4) and attn.absorb_pays(127)  # decode, MTP verify
    assert not attn.absorb_pays(128) and not attn.absorb_pays(2048)  # long prefills expand the cache once


def test_draft_reproduces_mtp_logits_and_recurses(model, tokens):
    n = 15
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 32)
        prefix = model(tokens[:, :n], cache=cache, start_pos=0)
    d = model.draft(prefix.hidden, tokens[:, 1 : n + 1], k=3, cache=cache, start_pos=0)
    assert d.tokens.shape == (2, 3) and d.logits.shape == (2, 3, V)
    assert torch.allclose(d.logits[:, 0], full.mtp_logits[:, n], atol=1e-4)
    assert torch.equal(d.tokens[:, 0], full.mtp_logits[:, n].argmax(-1))
    # recursion: draft 2 is the MTP applied to its own hidden state and draft 1
    no_cache = model.draft(full.hidden[:, :n], tokens[:, 1 : n + 1], k=3)
    assert torch.equal(no_cache.tokens, d.tokens)


@pytest.mark.slow  # ~10-20 s: building torchtitan's block mask and eager flex on CPU
def test_flex_attention_path_matches_sdpa(model, tokens):
    flex = JoyAIFlash(get_config("joyai-flash-debug", {"attention": "flex"})).eval()
    flex.load_state_dict(model.state_dict())
    with torch.no_grad(), pytest.warns(UserWarning):  # flex runs unfused (eager) on CPU
        a, b = model(tokens[:1, :16]), flex(tokens[:1, :16])
    assert torch.allclose(a.logits, b.logits, atol=1e-4) and torch.allclose(a.mtp_logits, b.mtp_logits, atol=1e-4)


def test_packed_documents_do_not_see_each_other(model, tokens):
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    with torch.no_grad():
        packed = model(tokens, positions=positions).logits
        second_alone = model(tokens[:, 10:]).logits
    assert torch.allclose(packed[:, 10:], second_alone, atol=1e-4)


def test_router_bias_changes_selection_not_weights(model):
    moe = model.moe_layers[0]
    router = moe.router
    x = torch.randn(1, 16, 128)
    scores0, ids0, raw = router(x, torch.zeros(8))
    bias = torch.zeros(8)
    bias[ids0[0, 0, 0]] = -10.0  # push the first token's first expert out
    scores1, ids1, raw1 = router(x, bias)
    assert torch.equal(raw, raw1)  # raw scores do not see the bias
    assert ids0[0, 0, 0] not in ids1[0, 0]
    # the weights are the raw sigmoid scores of the chosen experts, renormalised, times 2.5
    chosen = raw1.gather(-1, ids1)
    assert torch.allclose(scores1, chosen / chosen.sum(-1, keepdim=True) * 2.5, atol=1e-6)
    assert torch.allclose(scores1.sum(-1), torch.full((1, 16), 2.5), atol=1e-5)


def test_balancing_update_moves_a_skewed_load_toward_uniform():
    torch.manual_seed(0)
    m = JoyAIFlash(get_config("joyai-flash-debug", {"bias_update_rate": 0.02})).train()
    with torch.no_grad():
        m.moe_layers[0].expert_bias_E[:2] = 0.5  # experts 0 and 1 win (top-2) for every token
    moe = m.moe_layers[0]
    x = torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(2))

    def imbalance():
        with torch.no_grad():
            moe(x)  # training mode: counts tokens per expert
        load = m.update_router_bias()[0]
        return (load.max() / load.mean()).item()

    first = imbalance()
    for _ in range(40):
        last = imbalance()
    assert first == pytest.approx(4.0)  # all 2 x 256 picks on 2 of 8 experts
    assert last < 2.0
    assert m.moe_layers[0].expert_bias_E[0] < 0.5
    assert m.expert_load().sum() == 0  # counts reset by the update


def test_short_training_loop_lowers_the_loss():
    torch.manual_seed(0)
    m = JoyAIFlash(get_config("joyai-flash-debug")).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    seq = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(3))  # a small repeated vocab
    losses = []
    for _ in range(12):
        out = m(seq[:, :-1])
        main = F.cross_entropy(out.logits.flatten(0, 1), seq[:, 1:].flatten())
        mtp = F.cross_entropy(out.mtp_logits[:, 1:].flatten(0, 1), seq[:, 2:].flatten())
        loss = main + 0.1 * mtp
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_router_bias()
        losses.append(main.item())
    assert losses[-1] < losses[0] - 1.0
    assert all(p.grad is not None for n, p in m.named_parameters() if "mtp_layers" in n)


def test_config_dict_round_trip():
    cfg = get_config("joyai-flash-small")
    assert dataclasses.asdict(type(cfg).from_dict(cfg.to_dict())) == dataclasses.asdict(cfg)


def test_cpu_moe_dispatch_matches_torchtitans_moe_forward():
    """The CPU dispatch (compat.moe_forward_cpu) against torchtitan's MoE.forward on the same module:
    same outputs, gradients and load counts, with a router bias that changes the routing and QAT on."""
    from torchtitan.models.common.moe import MoE

    from flashops.model.qat import enable_qat

    torch.manual_seed(0)
    m = JoyAIFlash(get_config("joyai-flash-debug")).train()
    enable_qat(m)
    moe = m.moe_layers[0]
    moe.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, moe.expert_bias_E.numel()))
    x = torch.randn(2, 20, m.arch.dim, requires_grad=True)
    wrt = [x, moe.routed_experts.inner_experts.w2_EDF, moe.router.gate.weight]
    results = []
    for forward in (moe.forward, lambda inp: MoE.forward(moe, inp)):
        moe.tokens_per_expert_E.zero_()
        y = forward(x)
        results.append((y, torch.autograd.grad(y.square().sum(), wrt), moe.tokens_per_expert_E.clone()))
    (y_fast, g_fast, n_fast), (y_tt, g_tt, n_tt) = results
    torch.testing.assert_close(y_fast, y_tt, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_tt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(n_fast, n_tt) and n_fast.sum() == 2 * 20 * m.arch.top_k

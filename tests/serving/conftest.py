"""Serving fixtures: a debug JoyAIFlash (MTP on) trained for a few dozen steps on a letter-walk language
(each letter is followed by the next one with p=0.7 or the one after with p=0.3), exported with a
byte-level tokenizer to a file:// store exactly as the serving path loads it."""
from __future__ import annotations

import string

import pytest
import torch

ALPHABET = string.ascii_lowercase
P_SKIP = 0.3
SPECIALS = ["<bos>", "<eos>", "<pad>"]


def byte_tokenizer():
    """256 byte tokens after 3 specials: ids bos=0, eos=1 like the model config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: bytes_to_unicode_inverse()[c])
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def bytes_to_unicode_inverse() -> dict[str, int]:
    # GPT-2's byte -> printable character table, inverted
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def letter_walk(n_seqs: int, length: int, generator: torch.Generator) -> list[str]:
    out = []
    for _ in range(n_seqs):
        i = int(torch.randint(0, 26, (), generator=generator))
        s = []
        for _ in range(length):
            s.append(ALPHABET[i % 26])
            i += 2 if float(torch.rand((), generator=generator)) < P_SKIP else 1
        out.append("".join(s))
    return out


def train_debug_model(steps: int = 30, seed: int = 0):
    from flashops.model import JoyAIFlash, get_config

    torch.manual_seed(seed)
    cfg = get_config("joyai-flash-debug", {"vocab_size": 512, "max_seq_len": 256})
    model = JoyAIFlash(cfg)
    tok = byte_tokenizer()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        batch = torch.tensor([tok.encode(t).ids for t in letter_walk(8, 33, g)])
        inp, tgt = batch[:, :-1], batch[:, 1:]
        out = model(inp)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tgt.flatten())
        mtp = torch.nn.functional.cross_entropy(out.mtp_logits[:, 1:].flatten(0, 1), tgt[:, 1:].flatten())
        (loss + 0.5 * mtp).backward()
        opt.step()
        opt.zero_grad()
        model.update_router_bias()
        losses.append((loss.item(), mtp.item()))
    return model.eval(), cfg, tok, losses


CALIBRATION = "abcdefghijklmnopqrstuvwxyzabcdefghij"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(model, cfg, tokenizer, model_uri) of the trained debug model, saved as a checkpoint and exported by the
    real export (flashops.trainers.runner.export_model: HF layout, plus int4/) to a file:// store."""
    from flashops.storage import open_store
    from flashops.trainers.runner import export_model

    model, cfg, tok, losses = train_debug_model()
    assert losses[-1][0] < 1.0, f"the debug model did not learn the letter walk: {losses[-1]}"
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(d / "tokenizer.json"))
    store = open_store(f"file://{tmp_path_factory.mktemp('store')}")
    ref = store.save_checkpoint("letters", 30, {"model": model.state_dict()}, {"model_config": cfg.to_dict()})
    uri = export_model(store, None, ref.uri, "letters", "v1", int4=True, tokenizer=d / "tokenizer.json")
    return model, cfg, tok, uri


@pytest.fixture(scope="session")
def int4_tolerance(trained):
    """(max |logit| change of INT4 round-to-nearest on the calibration text, its token ids), measured in memory
    (export_int4 + load_int4), independently of the export files."""
    from flashops.model.export import export_int4, load_int4

    model, cfg, tok, _ = trained
    calib = torch.tensor([tok.encode(CALIBRATION).ids])
    tensors, _ = export_int4(model)
    with torch.inference_mode():
        # exact INT4 weights (the dequantizing kernel = fake quantization), not the bf16 serving kernel
        delta = load_int4(tensors, cfg, kernel="dequant")(calib, mtp=False).logits - model(calib, mtp=False).logits
    return float(delta.abs().max()), calib[0].tolist()


@pytest.fixture(scope="session")
def untrained_exports(tmp_path_factory):
    """Two serving exports (v1, v2) of one untrained debug model through the real export: for tests about which
    model is served (promotion gates), not what it answers. Seconds, where `trained` trains first."""
    from flashops.model import JoyAIFlash, get_config
    from flashops.storage import open_store
    from flashops.trainers.runner import export_model

    torch.manual_seed(0)
    cfg = get_config("joyai-flash-debug", {"vocab_size": 512, "max_seq_len": 256})
    model = JoyAIFlash(cfg)
    d = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer().save(str(d / "tokenizer.json"))
    store = open_store(f"file://{tmp_path_factory.mktemp('store')}")
    ref = store.save_checkpoint("untrained", 1, {"model": model.state_dict()}, {"model_config": cfg.to_dict()})
    return [export_model(store, None, ref.uri, "untrained", v, tokenizer=d / "tokenizer.json") for v in ("v1", "v2")]

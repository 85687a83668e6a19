"""Serving fixtures: a debug JoyAIFlash (MTP on) trained for a few dozen steps on a letter-walk language
(each letter is followed by the next one with p=0.7 or the one after with p=0.3), exported with a
byte-level tokenizer to a file:// store exactly as the serving path loads it."""
from __future__ import annotations

import json
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
    """(model, cfg, tokenizer, model_uri) of the trained debug model, exported to a file:// store with
    full-precision and INT4 weights; int4.json records the logit change measured at export."""
    from safetensors.torch import save_file

    from flashops.model.export import read_int4, save_int4
    from flashops.storage import open_store

    model, cfg, tok, losses = train_debug_model()
    assert losses[-1][0] < 1.0, f"the debug model did not learn the letter walk: {losses[-1]}"
    d = tmp_path_factory.mktemp("export")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    tok.save(str(d / "tokenizer.json"))
    report = save_int4(d / "model-int4.safetensors", model)
    calib = torch.tensor([tok.encode(CALIBRATION).ids])
    with torch.inference_mode():
        delta = (read_int4(d / "model-int4.safetensors")(calib, mtp=False).logits - model(calib, mtp=False).logits)
    (d / "int4.json").write_text(json.dumps({"logit_tolerance": float(delta.abs().max()), "calibration": CALIBRATION,
                                             "relative_rmse": report["relative_rmse"]}))
    store_dir = tmp_path_factory.mktemp("store")
    files = ("model.safetensors", "config.json", "tokenizer.json", "model-int4.safetensors", "int4.json")
    ref = open_store(f"file://{store_dir}").export_model("letters", "v1", {f: d / f for f in files})
    return model, cfg, tok, ref.uri

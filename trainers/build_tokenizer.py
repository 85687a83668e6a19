"""Train the project's tokenizer on the builtin corpora and write model/assets/tokenizer.json (committed).

    .venv/bin/python -m flashops.trainers.build_tokenizer [--vocab-size 2048]

Deterministic: the same corpora (fixed seeds) give the same file, so rebuilding changes nothing unless
the generators or the template changed.
"""
from __future__ import annotations

import argparse
import random

from flashops.model.tokenizer import TOKENIZER_FILE, chat_template, train_tokenizer
from flashops.trainers.corpora import dpo_example, pretrain_document, sft_example


def corpus_texts(n: int = 6000, seed: int = 1234):
    rng = random.Random(seed)
    for _ in range(n):
        yield pretrain_document(rng)
        ex = sft_example(rng)
        yield chat_template(ex["messages"], ex["thinking"])
        d = dpo_example(rng)
        yield d["chosen"] + " " + d["rejected"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--out", default=str(TOKENIZER_FILE))
    args = p.parse_args()
    tok = train_tokenizer(corpus_texts(), args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()

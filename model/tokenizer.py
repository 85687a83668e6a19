"""The project's tokenizer and its one chat template (thinking on/off), shared by training and serving.

    from flashops.model.tokenizer import load_tokenizer, chat_template
    tok = load_tokenizer()                                   # model/assets/tokenizer.json (committed)
    prompt = chat_template([{"role": "user", "content": "What is 2 + 3?"}], thinking=False)
    ids = tok.encode(prompt).ids                             # then generate until EOS (id 1)
    codec = TokenizerCodec()                                 # the codec training and serving both use
    ids, mask = codec.chat(messages, thinking=True)          # ids + loss mask on the assistant's output

The tokenizer is a byte-level BPE (every string encodes; digits are split one per token so numbers
stay learnable by a tiny model) with a vocabulary of at most 4096, trained on flashops' builtin corpora
by `python -m flashops.trainers.build_tokenizer` and committed. Ids 0/1/2 are <bos>/<eos>/<pad>, as in
the model config (bos_id 0, eos_id 1).

Chat layout (one template, a `thinking` switch):

    <bos><|system|>...<|end|><|user|>...<|end|><|assistant|><think>reasoning</think>answer<eos>

In non-thinking mode the assistant turn carries an empty reasoning block (`<think></think>answer`), so
the switch lives in the prompt and the model never has to guess the mode. An assistant message may
carry its reasoning under the key "reasoning"; it is rendered only in thinking mode.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # dropped by decode(skip_special_tokens=True)
CHAT_TOKENS = [SYSTEM, USER, ASSISTANT, END, THINK, END_THINK]  # kept in decoded text
MAX_VOCAB = 4096  # the debug preset's vocab_size: the tokenizer must fit every preset
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def chat_segments(messages: list[dict], thinking: bool, add_generation_prompt: bool | None = None
                  ) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces, in order.

    Training uses the flags to put the loss on what the assistant writes (its reasoning, answer and
    closing <eos>) and nowhere else. `add_generation_prompt` defaults to True when the last message is
    not the assistant's; the prompt then ends where the model starts writing."""
    if not messages:
        raise ValueError("messages is empty: pass at least one {'role': 'user', 'content': ...}")
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1].get("role") != "assistant"
    out: list[tuple[str, bool]] = [(BOS, False)]
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role = {role!r}: use one of {', '.join(ROLES)}")
        content = str(m.get("content", ""))
        if role != "assistant":
            out.append((f"{ROLES[role]}{content}{END}", False))
            continue
        reasoning = str(m.get("reasoning") or "") if thinking else ""
        out.append((f"{ASSISTANT}{THINK}" if thinking else f"{ASSISTANT}{THINK}{END_THINK}", False))
        out.append((f"{reasoning}{END_THINK}{content}{EOS}" if thinking else f"{content}{EOS}", True))
    if add_generation_prompt:
        out.append((f"{ASSISTANT}{THINK}" if thinking else f"{ASSISTANT}{THINK}{END_THINK}", False))
    return out


def chat_template(messages: list[dict], thinking: bool) -> str:
    """The prompt text for `messages` (ending with the assistant's opening when the last turn is not
    the assistant's). Serving encodes it and generates until <eos>."""
    return "".join(text for text, _ in chat_segments(messages, thinking))


def split_answer(completion: str) -> tuple[str, str]:
    """(reasoning, answer) of a generated assistant turn: the answer is what follows the last </think>."""
    text = completion.split(EOS, 1)[0]
    if END_THINK in text:
        reasoning, answer = text.rsplit(END_THINK, 1)
        return reasoning.replace(THINK, "").strip(), answer.strip()
    return "", text.strip()


@lru_cache(maxsize=4)
def load_tokenizer(path: str | Path | None = None):
    """The committed tokenizer (a `tokenizers.Tokenizer`), or the one at `path`."""
    from tokenizers import Tokenizer

    path = Path(path) if path is not None else TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer missing; rebuild it with `python -m flashops.trainers.build_tokenizer`")
    return Tokenizer.from_file(str(path))


class TokenizerCodec:
    """A tokenizer with the project's id conventions and chat template: the one codec training (stages,
    RL rewards) and serving (the predictor's TextCodec) use. `tokenizer` defaults to the committed one;
    decode drops <bos>/<eos>/<pad> when skip_special_tokens (serving's streamed text) and keeps them
    otherwise (training reads the <eos> a completion ended with)."""

    def __init__(self, tokenizer: Any = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.skip_special_tokens = skip_special_tokens
        self.bos, self.eos, self.pad = (self.tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return list(ids.ids if hasattr(ids, "ids") else ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def documents(self, texts: list[str]) -> list[list[int]]:
        """Pretraining documents as <bos> text <eos> (batched where the tokenizer can: it encodes in parallel)."""
        if hasattr(self.tokenizer, "encode_batch"):
            return [[self.bos] + e.ids + [self.eos] for e in self.tokenizer.encode_batch(texts)]
        return [[self.bos] + self.encode(t) + [self.eos] for t in texts]

    def chat_prompt(self, messages: list[dict], thinking: bool) -> str:
        """The prompt text (chat_template)."""
        return chat_template(messages, thinking)

    def prompt(self, messages: list[dict], thinking: bool = False) -> list[int]:
        """The prompt's ids, ending where the assistant starts writing (even after an assistant turn)."""
        return self.encode("".join(t for t, _ in chat_segments(messages, thinking, add_generation_prompt=True)))

    def chat(self, messages: list[dict], thinking: bool) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a rendered conversation: mask 1 on what the assistant writes."""
        ids, mask = [], []
        for text, is_out in chat_segments(messages, thinking, add_generation_prompt=False):
            piece = self.encode(text)
            ids += piece
            mask += [int(is_out)] * len(piece)
        return ids, mask


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE trained on `texts`: <bos>/<eos>/<pad> at ids 0/1/2, chat markers as whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 + len(SPECIAL_TOKENS) + len(CHAT_TOKENS) < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: use a value in (265, {MAX_VOCAB}] (bytes + special tokens "
                         f"must fit, and every model preset has at least {MAX_VOCAB} embeddings)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS), special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Chat markers are single tokens everywhere but are not "special": decoded text keeps them.
    tok.add_tokens(CHAT_TOKENS)
    return tok

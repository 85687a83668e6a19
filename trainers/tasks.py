"""Tasks with verifiable answers, in four domains and three difficulty levels. They feed every builtin
corpus (pretraining text, SFT chats, DPO pairs, RL prompts), so what a stage learns is what the next
one is measured on; RL rewards come from `reward()`.

    from flashops.trainers.tasks import make_task, reward
    import random
    t = make_task("arithmetic", 2, random.Random(0))   # Task(question='What is 41 + 7?', answer='48', ...)
    reward(t, "<think></think>48")                       # 1.0

Held-out split: a fixed 1/16 of all prompts (by a hash of the question, so it holds in every process and for
every seed) is never generated for training: `make_task` redraws them. `builtin:rl-heldout` (the evaluation
suite) and the RL stage's before/after set are drawn from that split only (`heldout_tasks`), so what they
measure is answering prompts the model never saw.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from flashops.model.tokenizer import split_answer

DOMAINS = ("arithmetic", "sorting", "counting", "string")
LEVELS = (1, 2, 3)
_LETTERS = "abc"
_WORD_LETTERS = "abcdefghij"


@dataclass(frozen=True)
class Task:
    domain: str
    level: int
    question: str
    answer: str
    reasoning: str

    def to_dict(self) -> dict:
        return {"domain": self.domain, "level": self.level, "question": self.question, "answer": self.answer,
                "reasoning": self.reasoning}


def _arithmetic(level: int, rng: random.Random) -> Task:
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
    elif level == 2:
        a, b = rng.randint(10, 49), rng.randint(0, 9)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Task("arithmetic", level, f"What is {a} + {b}?", str(a + b), column_sum(a, b))


def column_sum(a: int, b: int) -> str:
    """The sum worked digit by digit from the units, with the carry: '7+8=15, 4+3+1=8' for 47 + 38 (no spaces:
    each costs a token, and a thinking answer has to fit the evaluation's maxTokens)."""
    if a < 10 and b < 10:
        return f"{a}+{b}={a + b}"
    units = a % 10 + b % 10
    carry = "+1" if units >= 10 else ""
    return f"{a % 10}+{b % 10}={units}, {a // 10}+{b // 10}{carry}={a // 10 + b // 10 + units // 10}"


def _sorting(level: int, rng: random.Random) -> Task:
    xs = [rng.randint(0, 9) for _ in range(level + 2)]
    s = sorted(xs)
    return Task("sorting", level, "Sort: " + " ".join(map(str, xs)), " ".join(map(str, s)), ",".join(map(str, s)))


def _counting(level: int, rng: random.Random) -> Task:
    letter = rng.choice(_LETTERS)
    word = "".join(rng.choice(_LETTERS) for _ in range(2 * level + 2))
    marks = " ".join(str(i + 1) for i, _ in enumerate(c for c in word if c == letter)) or "none"
    return Task("counting", level, f"Count {letter} in: {word}", str(word.count(letter)),
                f"{letter} at {marks}")


def _string(level: int, rng: random.Random) -> Task:
    word = "".join(rng.choice(_WORD_LETTERS) for _ in range(level + 2))
    return Task("string", level, f"Reverse: {word}", word[::-1], f"{' '.join(word)}; {' '.join(reversed(word))}")


_MAKERS = {"arithmetic": _arithmetic, "sorting": _sorting, "counting": _counting, "string": _string}


HELDOUT_BUCKETS = 16  # one bucket of 16 is held out
SPLITS = ("train", "heldout")


def is_heldout(question: str) -> bool:
    """Is this prompt in the held-out split (never generated for training)?"""
    return hashlib.sha256(question.encode()).digest()[0] % HELDOUT_BUCKETS == 0


def make_task(domain: str, level: int, rng: random.Random, split: str = "train") -> Task:
    """A task of the domain and level from the split: training draws never return a held-out prompt."""
    if domain not in _MAKERS:
        raise ValueError(f"domain {domain!r} is not one of {', '.join(DOMAINS)}")
    if level not in LEVELS:
        raise ValueError(f"level {level} is not one of {LEVELS}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    while True:
        task = _MAKERS[domain](level, rng)
        if is_heldout(task.question) == (split == "heldout"):
            return task


def random_task(rng: random.Random, domains: tuple[str, ...] = DOMAINS) -> Task:
    return make_task(rng.choice(domains), rng.choice(LEVELS), rng)


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer (the DPO 'rejected' side): off by one, unsorted, or unreversed."""
    if task.domain in ("arithmetic", "counting"):
        n = int(task.answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    if task.domain == "sorting":
        xs = task.answer.split()
        if len(set(xs)) == 1:
            return " ".join(xs[:-1])
        while (ys := rng.sample(xs, len(xs))) == xs:
            pass
        return " ".join(ys)
    word = task.question.split(": ", 1)[1]
    return word if word != task.answer else word + word[0]


def correct(task: Task, completion: str) -> bool:
    """Does the answer after the reasoning block equal the expected answer? (What accuracy counts.)"""
    _, answer = split_answer(completion)
    return " ".join(answer.split()) == task.answer


def closeness(task: Task, answer: str) -> float:
    """How near a wrong answer is, in [0, 1): numbers by 1 / (1 + |error|); lists and words by the share of
    positions (digits, letters) that match, over the longer of the two. 0 for an answer of the wrong kind."""
    answer = " ".join(answer.split())
    if task.domain in ("arithmetic", "counting"):
        if not answer.isdigit():
            return 0.0
        return 1.0 / (1.0 + abs(int(answer) - int(task.answer)))
    got, want = (answer.split(), task.answer.split()) if task.domain == "sorting" else (list(answer), list(task.answer))
    if not got:
        return 0.0
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def reward(task: Task, completion: str, partial_credit: float = 0.0) -> float:
    """1.0 when the answer after the reasoning block equals the expected answer; else partial_credit x how
    near it is (`closeness`, below 1), 0.0 with the default partial_credit 0 (the binary verifiable reward).
    Partial credit gives a small policy that rarely answers exactly a gradient toward near answers
    (rl.partialCredit); accuracy never counts it (`correct`)."""
    if correct(task, completion):
        return 1.0
    if partial_credit <= 0:
        return 0.0
    _, answer = split_answer(completion)
    return partial_credit * min(closeness(task, answer), 0.999)


def task_pool(n_per_domain_level: int, seed: int, domains: tuple[str, ...] = DOMAINS) -> list[Task]:
    """A fixed training prompt set (the RL curriculum's pool)."""
    rng = random.Random(seed)
    return [make_task(d, lvl, rng) for d in domains for lvl in LEVELS for _ in range(n_per_domain_level)]


def heldout_tasks(n_per_domain_level: int, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> list[Task]:
    """Distinct held-out prompts, n per (domain, level) where the split has that many (level-1 arithmetic has
    only a few): what evaluation measures, never what training samples."""
    rng = random.Random(f"heldout:{seed}")
    out = []
    for d in domains:
        for lvl in LEVELS:
            seen: set[str] = set()
            for _ in range(50 * n_per_domain_level):
                if len(seen) == n_per_domain_level:
                    break
                t = make_task(d, lvl, rng, "heldout")
                if t.question not in seen:
                    seen.add(t.question)
                    out.append(t)
    return out


HELDOUT_SUITE_PER_LEVEL = 2  # builtin:rl-heldout: 4 domains x 3 levels x 2 = 24 tasks, both modes


def heldout_suite_rows(n_per_domain_level: int = HELDOUT_SUITE_PER_LEVEL) -> list[dict]:
    """builtin:rl-heldout in the suite format (flashops.api.evaluation): numbers compared as numbers, lists and
    words exactly, in both modes."""
    return [{"prompt": t.question, "answer": t.answer, "domain": t.domain, "thinking": None,
             "match": "number" if t.domain in ("arithmetic", "counting") else "exact"}
            for t in heldout_tasks(n_per_domain_level)]

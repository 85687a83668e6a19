"""Tasks with verifiable answers, in four domains and three difficulty levels. They feed every builtin
corpus (pretraining text, SFT chats, DPO pairs, RL prompts), so what a stage learns is what the next
one is measured on; RL rewards come from `reward()`.

    from flashops.trainers.tasks import make_task, reward
    import random
    t = make_task("arithmetic", 2, random.Random(0))   # Task(question='What is 41 + 7?', answer='48', ...)
    reward(t, "<think></think>48")                       # 1.0
"""
from __future__ import annotations

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
    return Task("arithmetic", level, f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}")


def _sorting(level: int, rng: random.Random) -> Task:
    xs = [rng.randint(0, 9) for _ in range(level + 2)]
    s = sorted(xs)
    steps = ", ".join(f"{x}" for x in s)
    return Task("sorting", level, "Sort: " + " ".join(map(str, xs)), " ".join(map(str, s)),
                f"in order: {steps}")


def _counting(level: int, rng: random.Random) -> Task:
    letter = rng.choice(_LETTERS)
    word = "".join(rng.choice(_LETTERS) for _ in range(2 * level + 2))
    marks = " ".join(str(i + 1) for i, _ in enumerate(c for c in word if c == letter)) or "none"
    return Task("counting", level, f"Count {letter} in: {word}", str(word.count(letter)),
                f"{letter} at {marks}")


def _string(level: int, rng: random.Random) -> Task:
    word = "".join(rng.choice(_WORD_LETTERS) for _ in range(level + 2))
    return Task("string", level, f"Reverse: {word}", word[::-1], " ".join(reversed(word)))


_MAKERS = {"arithmetic": _arithmetic, "sorting": _sorting, "counting": _counting, "string": _string}


def make_task(domain: str, level: int, rng: random.Random) -> Task:
    if domain not in _MAKERS:
        raise ValueError(f"domain {domain!r} is not one of {', '.join(DOMAINS)}")
    if level not in LEVELS:
        raise ValueError(f"level {level} is not one of {LEVELS}")
    return _MAKERS[domain](level, rng)


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


def reward(task: Task, completion: str) -> float:
    """1.0 when the answer after the reasoning block equals the expected answer, else 0.0."""
    _, answer = split_answer(completion)
    return 1.0 if " ".join(answer.split()) == task.answer else 0.0


def task_pool(n_per_domain_level: int, seed: int, domains: tuple[str, ...] = DOMAINS) -> list[Task]:
    """A fixed prompt set (the RL curriculum's pool, or an evaluation set with another seed)."""
    rng = random.Random(seed)
    return [make_task(d, lvl, rng) for d in domains for lvl in LEVELS for _ in range(n_per_domain_level)]

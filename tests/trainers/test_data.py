"""Tokenizer + chat template, builtin corpora, user data, rewards, the curriculum formula, schedules."""
import json
import math
import random

import pytest

from flashops.model.tokenizer import (ASSISTANT, EOS, END_THINK, THINK, chat_segments, chat_template,
                                      load_tokenizer, split_answer)
from flashops.trainers.corpora import BuiltinDataset, eval_tasks, open_dataset
from flashops.trainers.curriculum import CurriculumSampler, prompt_weight, target_pass_rate
from flashops.trainers.errors import DataError
from flashops.trainers.tasks import DOMAINS, Task, correct, make_task, reward, task_pool, wrong_answer


def test_committed_tokenizer_fits_the_debug_vocab_and_roundtrips():
    tok = load_tokenizer()
    assert tok.get_vocab_size() <= 4096
    assert [tok.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")] == [0, 1, 2]
    text = "Sort: 3 1 2 -> Grüße ✓ 12345"
    assert tok.decode(tok.encode(text).ids) == text
    digits = tok.encode("12345").tokens
    assert len(digits) == 5  # digits one per token: numbers stay learnable
    for marker in (THINK, END_THINK, ASSISTANT):
        assert len(tok.encode(marker).ids) == 1


def test_chat_template_thinking_switch():
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    assert chat_template(msgs, thinking=False).endswith(f"{ASSISTANT}{THINK}{END_THINK}")
    assert chat_template(msgs, thinking=True).endswith(f"{ASSISTANT}{THINK}")
    full = msgs + [{"role": "assistant", "content": "5", "reasoning": "2 + 3 = 5"}]
    think = "".join(t for t, _ in chat_segments(full, thinking=True))
    plain = "".join(t for t, _ in chat_segments(full, thinking=False))
    assert "2 + 3 = 5" in think and "2 + 3 = 5" not in plain
    assert think.endswith(f"{END_THINK}5{EOS}") and plain.endswith(f"{END_THINK}5{EOS}")
    assert split_answer(f"2 + 3 = 5{END_THINK} 5{EOS}junk") == ("2 + 3 = 5", "5")
    with pytest.raises(ValueError, match="role"):
        chat_template([{"role": "robot", "content": "x"}], thinking=False)


def test_sft_loss_mask_covers_exactly_the_assistant_output():
    from flashops.model.tokenizer import TokenizerCodec

    codec = TokenizerCodec(skip_special_tokens=False)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse: abc"},
            {"role": "assistant", "content": "cba", "reasoning": "c b a"}]
    for thinking in (False, True):
        ids, mask = codec.chat(msgs, thinking)
        assert len(ids) == len(mask)
        learned = codec.decode([i for i, m in zip(ids, mask) if m])
        assert learned == (f"c b a{END_THINK}cba{EOS}" if thinking else f"cba{EOS}")
        # the prompt the model sees at inference is exactly the unmasked prefix
        prefix = codec.decode(ids[: mask.index(1)])
        assert prefix == chat_template(msgs[:2], thinking)


def test_best_fit_packing_fills_rows_without_splitting_conversations():
    from types import SimpleNamespace

    from flashops.api.spec import SFTRunSpec
    from flashops.trainers.stages import SFTStage

    spec = SFTRunSpec(training={"steps": 1, "batchSize": 3, "seqLen": 64})
    plan = SimpleNamespace(micro_batch_size=3, dataset=BuiltinDataset("sft-chat", 0))
    stage = SFTStage(SimpleNamespace(spec=spec, plan=plan))
    batch = stage.pack()
    assert batch.tokens.shape == (3, 65)
    used = 0
    for row, pos, mask in zip(batch.tokens, batch.positions, batch.mask):
        starts = (row == 0).nonzero().flatten().tolist()  # <bos> starts each conversation
        assert starts[0] == 0 and all(pos[s] == 0 for s in starts)
        assert mask.sum() > 0
        used += len(starts)
    assert used == stage.cursor  # every conversation taken was packed whole, none dropped
    # the next conversation did not fit in any row: it starts the next batch
    nxt = stage.encode(stage.dataset[stage.cursor])[0]
    free = [(65 - int((r != 2).sum())) for r in batch.tokens]
    assert all(len(nxt) > f for f in free)


def test_builtin_corpora_are_deterministic_and_stage_checked():
    a, b = open_dataset("builtin:pretrain-text", "pretrain", seed=3), open_dataset("builtin:pretrain-text", "pretrain", 3)
    assert a[17] == b[17] and a[17] != a[18]
    pairs = open_dataset("builtin:dpo-pairs", "dpo", 0)
    for i in range(20):
        assert pairs[i]["chosen"] != pairs[i]["rejected"]
    with pytest.raises(DataError, match="use builtin:sft-chat"):
        open_dataset("builtin:pretrain-text", "sft")
    with pytest.raises(DataError, match="no such builtin corpus"):
        open_dataset("builtin:wikipedia", "pretrain")


def test_dpo_pairs_in_thinking_mode_share_the_reasoning_and_differ_in_the_answer():
    """dpo.thinkingRatio: that share of the builtin pairs is in thinking mode, where chosen and rejected carry the
    same worked reasoning (learned, in the mask) and differ after </think>; user rows may give a response as an
    assistant message; a response of another type is refused naming the row and the side."""
    from types import SimpleNamespace

    from flashops.api.spec import DPOParams
    from flashops.model.tokenizer import TokenizerCodec
    from flashops.trainers.corpora import check_row
    from flashops.trainers.stages import DPOStage

    codec = TokenizerCodec(skip_special_tokens=False)
    stage = SimpleNamespace(codec=codec)
    pairs = open_dataset("builtin:dpo-pairs", "dpo", 0, params=DPOParams(thinkingRatio=0.5))
    rows = [pairs[i] for i in range(200)]
    assert 70 < sum(bool(r.get("thinking")) for r in rows) < 130
    assert not any(open_dataset("builtin:dpo-pairs", "dpo", 0, params=DPOParams(thinkingRatio=0))[i].get("thinking")
                   for i in range(50))
    for row in [r for r in rows if r.get("thinking")][:20]:
        (c, cm), (r, rm) = DPOStage.encode_pair(stage, row)
        learned_c = codec.decode([i for i, m in zip(c, cm) if m])
        learned_r = codec.decode([i for i, m in zip(r, rm) if m])
        reasoning = row["chosen"]["reasoning"]
        assert learned_c == f"{reasoning}{END_THINK}{row['chosen']['content']}{EOS}"
        assert learned_r == f"{reasoning}{END_THINK}{row['rejected']['content']}{EOS}"
        assert codec.decode(c[: cm.index(1)]).endswith(f"{ASSISTANT}{THINK}")  # the thinking-mode prompt
    plain = next(r for r in rows if not r.get("thinking"))
    (c, cm), _ = DPOStage.encode_pair(stage, plain)
    assert codec.decode([i for i, m in zip(c, cm) if m]) == f"{plain['chosen']}{EOS}"
    check_row({"prompt": "p", "chosen": [{"role": "assistant", "content": "y"}], "rejected": {"content": "n"}},
              "dpo", "row 1")
    check_row({"prompt": "What is 2 + 3?", "chosen": 5, "rejected": 6.0}, "dpo", "row 2")  # numeric columns
    with pytest.raises(DataError, match=r"row 3: rejected: NoneType None is not a response: use a string"):
        check_row({"prompt": "p", "chosen": "y", "rejected": None}, "dpo", "row 3")


def test_user_data_jsonl_and_parquet(tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "capital of France?", "answer": "Paris"}]
    p = tmp_path / "rl.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ds = open_dataset(f"file://{p}", "rl")
    assert ds.rows == rows  # streamed from the one object (the RL pool is held whole)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "hello"}, {"text": "world"}]), tmp_path / "pt.parquet")
    assert open_dataset(f"file://{tmp_path}/pt.parquet", "pretrain").rows[1] == {"text": "world"}
    with pytest.raises(DataError, match="no such file"):
        open_dataset(f"file://{tmp_path}/missing.jsonl", "sft")
    with pytest.raises(DataError, match=r"row 0: missing key\(s\) \['prompt', 'chosen', 'rejected'\]"):
        open_dataset(f"file://{p}", "dpo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2: not JSON"):
        open_dataset(f"file://{bad}", "pretrain")


def test_rewards_verify_every_domain():
    rng = random.Random(0)
    for domain in DOMAINS:
        for level in (1, 2, 3):
            t = make_task(domain, level, rng)
            assert reward(t, f"{THINK}{t.reasoning}{END_THINK}{t.answer}{EOS}") == 1.0
            assert reward(t, f"{END_THINK}{wrong_answer(t, rng)}{EOS}") == 0.0
    t = make_task("sorting", 1, random.Random(1))
    assert reward(t, " " + t.answer.replace(" ", "  ") + " ") == 1.0  # whitespace is not the point
    assert [x.question for x in eval_tasks(2, 0)] != [x.question for x in task_pool(2, 0)]  # another seed


def test_worked_reasoning_computes_the_answer_and_fits_the_evaluation_budget():
    """The thinking traces SFT teaches: the sum digit by digit with its carry, the word spelled before it is
    reversed; every one (with </think>, the answer and <eos>) fits the quickstart eval's maxTokens of 24."""
    import re

    from flashops.model.tokenizer import TokenizerCodec
    from flashops.trainers.tasks import column_sum

    assert column_sum(47, 38) == "7+8=15, 4+3+1=8" and column_sum(41, 7) == "1+7=8, 4+0=4"
    assert column_sum(3, 9) == "3+9=12"
    assert make_task("string", 3, random.Random(0)).reasoning.count(";") == 1
    codec, rng = TokenizerCodec(skip_special_tokens=False), random.Random(0)
    for domain in DOMAINS:
        for level in (1, 2, 3):
            for _ in range(300):
                t = make_task(domain, level, rng)
                assert len(codec.encode(f"{t.reasoning}{END_THINK}{t.answer}")) + 1 <= 24, t
                if domain == "arithmetic":  # the last step's sum, then the units of the first: the answer
                    sums = [int(x) for x in re.findall(r"=(\d+)", t.reasoning)]
                    assert int(t.answer) == (sums[0] if len(sums) == 1 else sums[1] * 10 + sums[0] % 10), t
                if domain == "string":
                    spelled, backwards = t.reasoning.split("; ")
                    assert spelled.replace(" ", "") == t.question.split(": ")[1] and backwards.replace(" ", "") == t.answer


def test_partial_credit_ranks_near_misses_below_exact_answers():
    add = Task("arithmetic", 3, "What is 40 + 17?", "57", "")
    sort = Task("sorting", 1, "Sort: 3 1 2", "1 2 3", "")
    rev = Task("string", 1, "Reverse: abc", "cba", "")
    # binary by default (the papers' verifiable reward); accuracy never counts partial credit
    assert reward(add, f"{END_THINK}56{EOS}") == 0.0 and not correct(add, f"{END_THINK}56{EOS}")
    pc = lambda t, a: reward(t, f"{END_THINK}{a}{EOS}", partial_credit=0.5)
    assert pc(add, "57") == 1.0
    assert pc(add, "56") == pytest.approx(0.25) and pc(add, "60") == pytest.approx(0.125)  # 0.5 / (1 + |error|)
    assert pc(add, "fifty") == 0.0 and pc(add, "") == 0.0  # an answer of the wrong kind earns nothing
    assert pc(sort, "1 3 2") == pytest.approx(0.5 / 3) and pc(sort, "1 2") == pytest.approx(0.5 * 2 / 3)
    assert pc(rev, "cbb") == pytest.approx(0.5 * 2 / 3) and pc(rev, "cbaa") == pytest.approx(0.5 * 3 / 4)
    for t, near in ((add, "56"), (sort, "1 2"), (rev, "cbaa")):
        assert 0 < pc(t, near) < 0.5 < pc(t, t.answer) == 1.0  # any wrong answer below partialCredit


def test_curriculum_weights_follow_the_formula():
    # steps are 0..T-1: mu_t is 0.8 at the first step and reaches 0.2 at the last one (t = T - 1)
    assert target_pass_rate(0, 100) == pytest.approx(0.8)
    assert target_pass_rate(99, 100) == pytest.approx(0.2)
    assert target_pass_rate(33, 67) == pytest.approx(0.5)
    assert target_pass_rate(98, 100) > 0.2 + 1e-3
    assert target_pass_rate(0, 1) == pytest.approx(0.8)  # one step: no schedule to follow
    assert [round(target_pass_rate(t, 4), 6) for t in range(4)] == [0.8, 0.6, 0.4, 0.2]
    for p, mu in ((0.8, 0.8), (0.5, 0.8), (0.1, 0.3)):
        assert prompt_weight(p, mu) == pytest.approx(math.exp(-0.5 * ((p - mu) / 0.15) ** 2))
    groups = ["a"] * 16 + ["b"] * 4
    s = CurriculumSampler(groups, total_steps=10)
    assert s.group_probs() == pytest.approx({"a": 4 / 6, "b": 2 / 6})  # sqrt(16) : sqrt(4)
    s.update(list(range(20)), [0.8 if i % 2 else 0.0 for i in range(20)])
    picks = [i for step in range(40) for i in s.sample(0, 25, seed=step)]
    # at t = 0 the target is 0.8: prompts with pass rate 0.8 get weight 1, those at 0.0 ~ e^-14
    assert sum(1 for i in picks if i % 2) / len(picks) > 0.99
    share_a = sum(1 for i in picks if groups[i] == "a") / len(picks)
    assert share_a == pytest.approx(4 / 6, abs=0.05)
    state = s.state_dict()
    s2 = CurriculumSampler(groups, total_steps=10)
    s2.load_state_dict(state)
    assert s2.sample(3, 8, seed=1) == s.sample(3, 8, seed=1)


def test_curriculum_profile_drops_solved_prompts_and_keeps_updating():
    groups = ["a"] * 6 + ["b"] * 3
    s = CurriculumSampler(groups, total_steps=5)
    rates = [1.0, 0.9, 1.0, 0.2, 0.0, 0.5, 1.0, 1.0, 0.3]
    assert s.set_profile(rates, rollouts=10, drop_solved=True) == 4
    assert s.profiled and s.active.tolist() == [r < 1.0 for r in rates]
    assert s.group_probs() == pytest.approx({"a": 2 / 3, "b": 1 / 3})  # sqrt(4) : sqrt(1) active prompts
    picks = {i for step in range(5) for seed in range(20) for i in s.sample(step, 8, seed=seed)}
    assert picks == {1, 3, 4, 5, 8}  # every active prompt, never a solved one
    s.enabled = False  # uniform sampling still skips the dropped prompts
    assert {i for seed in range(50) for i in s.sample(0, 8, seed=seed)} == {1, 3, 4, 5, 8}
    # online update: the profile counts as its 10 rollouts, a group of 4 all right moves 0.2 to 6/14
    s.update([3], [1.0], rollouts=4)
    assert float(s.pass_rate[3]) == pytest.approx((0.2 * 10 + 4) / 14)
    # the profile is in the state: a fresh sampler restored from it samples the same and is profiled
    s2 = CurriculumSampler(groups, total_steps=5, enabled=False)
    s2.load_state_dict(s.state_dict())
    assert s2.profiled and s2.active.tolist() == s.active.tolist()
    assert s2.sample(2, 16, seed=3) == s.sample(2, 16, seed=3)
    # without dropSolved the solved prompts stay; a profile of a subset keeps only that subset
    keep = CurriculumSampler(groups, total_steps=5)
    assert keep.set_profile(rates, rollouts=10, drop_solved=False) == 0 and bool(keep.active.all())
    sub = CurriculumSampler(groups, total_steps=5)
    assert sub.set_profile([0.5, 1.0, 0.4], rollouts=2, indices=[2, 7, 8]) == 1
    assert sub.active.nonzero().flatten().tolist() == [2, 8] and sub.names == ["a", "b"]


def test_curriculum_profile_can_drop_never_solved_prompts_too():
    groups = ["a"] * 4 + ["b"] * 3
    rates = [0.0, 0.25, 1.0, 0.0, 0.0, 0.0, 0.5]
    s = CurriculumSampler(groups, total_steps=5)
    assert s.set_profile(rates, rollouts=4, drop_solved=True, drop_unsolved=True) == 5
    assert s.active.nonzero().flatten().tolist() == [1, 6]
    assert {i for seed in range(30) for i in s.sample(4, 8, seed=seed)} == {1, 6}
    only_unsolved = CurriculumSampler(groups, total_steps=5)
    assert only_unsolved.set_profile(rates, rollouts=4, drop_solved=False, drop_unsolved=True) == 4
    assert only_unsolved.active.nonzero().flatten().tolist() == [1, 2, 6]
    # each group keeps prompts, so both are still drawn (sqrt(1) : sqrt(1)); a profile nothing would survive
    # drops nothing
    assert only_unsolved.names == ["a", "b"] and s.group_probs() == pytest.approx({"a": 0.5, "b": 0.5})
    none_left = CurriculumSampler(["a", "b"], total_steps=3)
    assert none_left.set_profile([0.0, 1.0], rollouts=4, drop_solved=True, drop_unsolved=True) == 0
    assert bool(none_left.active.all())


def test_curriculum_never_drops_the_whole_pool():
    s = CurriculumSampler(["a", "b"], total_steps=3)
    assert s.set_profile([1.0, 1.0], rollouts=4, drop_solved=True) == 0
    assert bool(s.active.all())


def test_schedules():
    from flashops.api.spec import OptimizerSpec
    from flashops.trainers.schedules import lr_at

    wsd = OptimizerSpec(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    lrs = [lr_at(s, 110, wsd) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10:89] == [1.0] * 79 and lrs[-1] == pytest.approx(0.1) and lrs[95] < 1.0
    cos = OptimizerSpec(lr=1.0, min_lr=0.0, schedule="cosine")
    assert lr_at(0, 100, cos) == 1.0 and lr_at(50, 100, cos) == pytest.approx(0.5, abs=0.02) and lr_at(100, 100, cos) < 1e-9

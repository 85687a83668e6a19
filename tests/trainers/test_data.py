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
from flashops.trainers.tasks import DOMAINS, make_task, reward, task_pool, wrong_answer


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
    from flashops.trainers.stages import Codec

    codec = Codec()
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


def test_user_data_jsonl_and_parquet(tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "capital of France?", "answer": "Paris"}]
    p = tmp_path / "rl.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ds = open_dataset(f"file://{p}", "rl")
    assert len(ds) == 2 and ds[1]["answer"] == "Paris"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "hello"}, {"text": "world"}]), tmp_path / "pt.parquet")
    assert open_dataset(f"file://{tmp_path}/pt.parquet", "pretrain")[1] == {"text": "world"}
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


def test_curriculum_weights_follow_the_formula():
    assert target_pass_rate(0, 100) == pytest.approx(0.8)
    assert target_pass_rate(50, 100) == pytest.approx(0.5)
    assert target_pass_rate(100, 100) == pytest.approx(0.2)
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


def test_schedules():
    from flashops.api.spec import OptimizerSpec
    from flashops.trainers.schedules import lr_at

    wsd = OptimizerSpec(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    lrs = [lr_at(s, 110, wsd) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10:89] == [1.0] * 79 and lrs[-1] == pytest.approx(0.1) and lrs[95] < 1.0
    cos = OptimizerSpec(lr=1.0, min_lr=0.0, schedule="cosine")
    assert lr_at(0, 100, cos) == 1.0 and lr_at(50, 100, cos) == pytest.approx(0.5, abs=0.02) and lr_at(100, 100, cos) < 1e-9

"""Each stage runs a few steps on the debug model through the real store and lineage (SQLite); resume is
exact; bad specs and missing data fail before any compute."""
import json
import math

import pytest
import torch

from flashops.trainers.corpora import eval_tasks
from flashops.trainers.errors import DataError, ResumeError, SpecValueError
from flashops.trainers.runner import run_training


def _lineage(home):
    from flashops.api.lineage import open_lineage

    return open_lineage(f"sqlite:///{home}/lineage.db")


@pytest.mark.slow
def test_four_stages_chain_through_store_and_lineage(home, store, tiny_run):
    lin = _lineage(home)
    pre = run_training(tiny_run("t-pre", "pretrain", pretrain={"mtpFromStep": 1}), store, lin)
    assert pre.steps == 2 and pre.checkpoint_uri.endswith("runs/t-pre/step-2")
    assert "mtp_loss" in pre.history[-1] and "mtp_loss" not in pre.history[0]  # MTP from step 1 (0-based)
    for row in pre.history:
        assert {"loss", "lr", "grad_norm", "expert_imbalance", "tokens_per_s"} <= set(row)
        assert math.isfinite(row["loss"]) and row["expert_imbalance"] >= 1.0
    sft = run_training(tiny_run("t-sft", "sft", initFrom="t-pre"), store, lin)  # a run name, via lineage
    dpo = run_training(tiny_run("t-dpo", "dpo", initFrom=sft.checkpoint_uri), store, lin)
    assert dpo.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert {"reward_margin", "reward_accuracy"} <= set(dpo.history[0])
    rpo = run_training(tiny_run("t-rpo", "dpo", initFrom=sft.checkpoint_uri, dpo={"nllWeight": 1.0}), store, False)
    first = rpo.history[0]  # at step 1 the DPO term is log 2, and the rest is the chosen answers' per-token NLL
    assert first["chosen_nll"] > 0 and first["loss"] == pytest.approx(math.log(2) + first["chosen_nll"], abs=1e-4)
    rl_run = tiny_run("t-rl", "rl", initFrom=dpo.checkpoint_uri, training={"steps": 1, "seqLen": 32},
                      rl={"groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 4, "updatesPerBatch": 2,
                          "klCoef": 0.01, "curriculum": {"profileRollouts": 2, "profileMaxPrompts": 8}})
    rl = run_training(rl_run, store, lin)
    assert {"reward", "ratio_mean", "ratio_max", "entropy", "kl"} <= set(rl.history[0])
    # the held-out split: 4 per (domain, level) where it has 4 (level-1 arithmetic has fewer distinct prompts)
    heldout = len(eval_tasks(4, rl_run.spec.training.seed))
    assert 40 <= heldout <= 48
    assert rl.metrics["eval_before"]["prompts"] == rl.metrics["eval_after"]["prompts"] == heldout
    # lineage: the rl run descends from the pretrain checkpoint through sft and dpo
    ancestors = json.dumps(lin.ancestors(lin.find(rl.checkpoint_uri), depth=20))
    assert pre.checkpoint_uri in ancestors and "builtin:rl-tasks" in ancestors
    # the store holds verified checkpoints with the model config
    assert store.meta(rl.checkpoint_uri).model_config["preset"] == "joyai-flash-debug"


def _losses(result):
    return [(r["step"], r["loss"]) for r in result.history]


@pytest.mark.slow
@pytest.mark.parametrize("stage,optimizer,extra", [
    ("pretrain", "muon", {"training": {"steps": 4, "batchSize": 4, "microBatchSize": 2, "seqLen": 32},
                          "pretrain": {"mtpFromStep": 2}}),
])
def test_killed_run_resumes_exactly(home, store, stage, optimizer, extra, tiny_run):
    """Uninterrupted run vs one that dies after step 3 (checkpoint at step 2) and is started again."""
    from flashops.storage import open_store

    spec = dict(extra, optimizer={"name": optimizer, "lr": 3e-3, "schedule": "wsd", "warmupSteps": 1},
                checkpoint={"every": 2, "keep": 3})
    full = run_training(tiny_run("whole", stage, **spec), store, False)
    crashed_store = open_store(f"file://{home}/store2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_run("whole", stage, **spec), crashed_store, False, crash_after=3)
    assert crashed_store.latest("whole").step == 2
    resumed = run_training(tiny_run("whole", stage, **spec), crashed_store, False)
    assert resumed.resumed_from == 2
    got, want = dict(_losses(resumed)), dict(_losses(full))
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got[step], want[step])
    # the final weights agree too (router biases included)
    a, b = {"model": {}}, {"model": {}}
    from flashops.model import JoyAIFlash, get_config

    m1, m2 = JoyAIFlash(get_config("joyai-flash-debug")), JoyAIFlash(get_config("joyai-flash-debug"))
    store.load_checkpoint(full.checkpoint_uri, {"model": m1.state_dict()})
    crashed_store.load_checkpoint(resumed.checkpoint_uri, {"model": m2.state_dict()})
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(v1, v2, atol=1e-6), k
    assert any("expert_bias" in k and v.abs().sum() > 0 for k, v in m1.state_dict().items())


@pytest.mark.slow
def test_rl_resume_restores_curriculum_and_rollouts(home, store, tiny_run, monkeypatch):
    """The curriculum's profile (pass rates from K rollouts, solved prompts dropped) is checkpointed state:
    profiling runs once per run, before step 1, and a resumed run samples from the saved profile."""
    from flashops.trainers.rl import RLStage

    profiled = []  # (run's store, prompts profiled) per call
    real_profile = RLStage.profile

    def counting_profile(self):
        stats = real_profile(self)
        profiled.append(stats["profile_prompts"])
        return stats

    monkeypatch.setattr(RLStage, "profile", counting_profile)
    spec = dict(training={"steps": 2, "seqLen": 32}, checkpoint={"every": 1, "keep": 3},
                rl={"groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 4, "domains": ["counting"],
                    "curriculum": {"profileRollouts": 2, "profileMaxPrompts": 8}})  # one domain: a short eval
    base = run_training(tiny_run("rl-base", "pretrain", training={"steps": 1}), store, False)
    progress = []
    full = run_training(tiny_run("rl-x", "rl", initFrom=base.checkpoint_uri, **spec), store, False,
                        on_progress=lambda *a: progress.append(a))
    assert profiled == [8] and progress[0] == ("profiling", 0, 8) and progress[-1] == ("profiling", 8, 8)
    first = full.history[0]
    assert first["profile_prompts"] == 8 and first["profile_rollouts"] == 16
    assert first["pool_active"] == 8 - first["profile_dropped"]
    assert "profile_prompts" not in full.history[1]
    from flashops.storage import open_store

    s2 = open_store(f"file://{home}/store2")
    with pytest.raises(RuntimeError):
        run_training(tiny_run("rl-x", "rl", initFrom=base.checkpoint_uri, **spec), s2, False, crash_after=1)
    assert profiled == [8, 8]
    resumed = run_training(tiny_run("rl-x", "rl", initFrom=base.checkpoint_uri, **spec), s2, False)
    assert resumed.resumed_from == 1
    assert profiled == [8, 8]  # the resumed run did not profile again: the profile came with the checkpoint
    assert all("profile_prompts" not in row for row in resumed.history)
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-6)
    assert resumed.history[-1]["reward"] == full.history[-1]["reward"]
    # the restored profile is the one that run saved: same pass rates, same active prompts
    from flashops.trainers.curriculum import CurriculumSampler  # noqa: F401  (the state's owner)

    pool = 72  # the builtin pool's counting prompts
    state = {"trainer": {"curriculum": {"pass_rate": torch.zeros(pool, dtype=torch.float64),
                                        "seen": torch.zeros(pool, dtype=torch.float64),
                                        "active": torch.zeros(pool, dtype=torch.bool),
                                        "profiled": torch.tensor(0)}}}
    s2.load_checkpoint(s2.latest("rl-x"), state)
    cur = state["trainer"]["curriculum"]
    assert int(cur["profiled"]) == 1 and int(cur["active"].sum()) == first["pool_active"]


def test_rl_profile_with_drop_unsolved_trains_on_the_prompts_the_policy_sometimes_solves(home, store, tiny_run,
                                                                                        monkeypatch, caplog):
    """rl.curriculum.dropUnsolved: prompts no profiling rollout solved leave the pool, and the steps sample only
    the rest. Which prompts are "solved" is fixed here (answers 2 and 3 count as right, whatever the tiny policy
    says), so the profile is known; a profile that would drop everything drops nothing and says so."""
    import logging

    import flashops.trainers.rl as rl_module

    solvable = {"2", "3"}
    monkeypatch.setattr(rl_module, "correct", lambda task, completion: task.answer in solvable)
    sampled: list[str] = []
    real_train_step = rl_module.RLStage.train_step

    def recording_train_step(self, step):
        sampled.extend(self.pool[i].answer for i in self.sampler.sample(step, self.p.prompts_per_step, self.seed))
        return real_train_step(self, step)

    monkeypatch.setattr(rl_module.RLStage, "train_step", recording_train_step)
    rl = {"groupSize": 2, "promptsPerStep": 4, "maxNewTokens": 2, "domains": ["counting"],
          "curriculum": {"profileRollouts": 2, "profileMaxPrompts": 16, "dropSolved": False, "dropUnsolved": True}}
    base = run_training(tiny_run("rl-du-base", "pretrain", training={"steps": 1}), store, False)
    run = run_training(tiny_run("rl-du", "rl", initFrom=base.checkpoint_uri, rl=rl,
                                training={"steps": 2, "seqLen": 32}), store, False)
    first = run.history[0]
    assert 0 < first["profile_unsolved"] < 16 and first["profile_dropped"] == first["profile_unsolved"]
    assert first["pool_active"] == 16 - first["profile_unsolved"]
    assert sampled and set(sampled) <= solvable  # the steps never drew a dropped prompt

    monkeypatch.setattr(rl_module, "correct", lambda task, completion: False)  # nothing solved: keep everything
    with caplog.at_level(logging.WARNING, logger="flashops.trainers"):
        none_solved = run_training(tiny_run("rl-du-none", "rl", initFrom=base.checkpoint_uri, rl=rl,
                                            training={"steps": 1, "seqLen": 32}), store, False)
    assert none_solved.history[0]["profile_dropped"] == 0 and none_solved.history[0]["pool_active"] == 16
    assert "would empty the pool" in caplog.text


def test_rl_thinking_ratio_poses_that_share_of_each_steps_prompts_in_thinking_mode(home, store, tiny_run,
                                                                                    monkeypatch):
    """rl.thinkingRatio 0.5 with 4 prompts a step: 2 of them open <think> for the policy to reason in (the other
    2 close it at once), a seeded choice that differs between steps; each mode's solved share is reported. The
    curriculum's profile poses half of each prompt's rollouts in thinking mode."""
    import flashops.trainers.rl as rl_module
    from flashops.model.tokenizer import END_THINK, THINK, TokenizerCodec

    codec = TokenizerCodec()
    think, end_think = codec.encode(THINK), codec.encode(END_THINK)
    posed: list[list[bool]] = []
    profiled: list[list[bool]] = []
    real_generate = rl_module.generate

    def recording_generate(model, prompts, n, max_new, temperature, *args, **kwargs):
        modes = [p[-len(think):] == think for p in prompts]
        assert all(p[-len(think):] == think or p[-len(end_think):] == end_think for p in prompts)
        if n == 2:  # a training step's rollouts (groupSize 2); evaluation samples 4 or 1 (greedy)
            posed.append(modes)
        elif n == 1 and temperature > 0:  # the curriculum's profiling: one row per rollout
            profiled.append(modes)
        return real_generate(model, prompts, n, max_new, temperature, *args, **kwargs)

    monkeypatch.setattr(rl_module, "generate", recording_generate)
    rl = {"groupSize": 2, "promptsPerStep": 4, "maxNewTokens": 3, "thinkingRatio": 0.5,
          "curriculum": {"profileRollouts": 2, "profileMaxPrompts": 4, "dropSolved": False}}
    base = run_training(tiny_run("rl-th-base", "pretrain", training={"steps": 1}), store, False)
    run = run_training(tiny_run("rl-th", "rl", initFrom=base.checkpoint_uri, rl=rl,
                                training={"steps": 3, "seqLen": 32}), store, False)
    # profiling poses each prompt's 2 rollouts in both modes, as the steps will: its pass rate is the mixture's
    assert profiled == [[True, False] * 4]
    assert len(posed) == 3 and all(sum(step) == 2 for step in posed)
    assert len({tuple(step) for step in posed}) > 1  # not the same two slots every step
    assert all(0 <= row[f"solved_{m}"] <= 1 for row in run.history for m in ("thinking", "non_thinking"))
    assert "reference_nll" not in run.history[0]  # rl.nllWeight 0: no reference answers are trained
    assert rl_module.thinking_modes(4, 0.5, 0, 1) == rl_module.thinking_modes(4, 0.5, 0, 1)  # a rerun poses the same
    assert rl_module.thinking_modes(8, 0.0, 0, 1) == [False] * 8 and rl_module.thinking_modes(8, 1.0, 0, 1) == [True] * 8


@pytest.mark.slow
def test_rl_nll_weight_trains_the_reference_answers_in_the_mode_each_prompt_is_posed(home, store, tiny_run,
                                                                                      monkeypatch):
    """rl.nllWeight adds the NLL of the step's prompts' reference answers (the worked reasoning, then the answer,
    in thinking mode; the answer alone otherwise) to the policy loss. From a start that answers nothing every
    reward is 0, so the policy gradient is 0 and that NLL is all that trains: it falls step by step."""
    import flashops.trainers.rl as rl_module

    rendered = []
    real = rl_module.RLStage.reference_answers

    def recording(self, tasks, thinking):
        tokens, mask, count = real(self, tasks, thinking)
        rendered.append([(t, th, self.codec.decode([i for i, m in zip(row[1:].tolist(), mrow.tolist()) if m]))
                         for t, th, row, mrow in zip(tasks, thinking, tokens, mask)])
        return tokens, mask, count

    monkeypatch.setattr(rl_module.RLStage, "reference_answers", recording)
    rl = {"groupSize": 2, "promptsPerStep": 4, "maxNewTokens": 2, "thinkingRatio": 0.5, "nllWeight": 1.0,
          "curriculum": {"profile": False}}
    base = run_training(tiny_run("nll-base", "pretrain", training={"steps": 1}), store, False)
    run = run_training(tiny_run("nll-rl", "rl", initFrom=base.checkpoint_uri, rl=rl, optimizer={"lr": 3e-3},
                                training={"steps": 4, "seqLen": 48}), store, False)
    assert all(row["reward"] == 0 for row in run.history)
    nll = [row["reference_nll"] for row in run.history]
    assert nll[-1] < 0.8 * nll[0], nll
    for task, thinking, target in rendered[0]:
        assert target == (f"{task.reasoning}</think>{task.answer}<eos>" if thinking else f"{task.answer}<eos>")


def test_rl_reference_answers_skip_a_thinking_reference_without_reasoning():
    """rl.nllWeight's reference of a user row without reasoning: its answer in non-thinking mode, nothing in
    thinking mode (an empty <think></think> would teach the policy to skip the reasoning it is asked for)."""
    from types import SimpleNamespace

    from flashops.model.tokenizer import TokenizerCodec
    from flashops.trainers.rl import RLStage
    from flashops.trainers.tasks import Task

    codec = TokenizerCodec(skip_special_tokens=False)
    worked = Task("arithmetic", 3, "What is 27 + 82?", "109", "7+2=9, 2+8=10")
    bare = Task("custom", 1, "Capital of France?", "Paris", "")
    stage = SimpleNamespace(codec=codec, seq_len=64)
    tokens, mask, count = RLStage.reference_answers(stage, [worked, bare, bare], [True, True, False])
    targets = [codec.decode([i for i, m in zip(row[1:].tolist(), mrow.tolist()) if m]) for row, mrow in zip(tokens, mask)]
    assert targets == ["7+2=9, 2+8=10</think>109<eos>", "", "Paris<eos>"]
    assert count == mask.sum()


def test_rl_log_probs_are_of_the_distribution_the_rollouts_are_drawn_from():
    """At rl.temperature T the rollouts are drawn from softmax(logits / T) (model.sampling.token_probs), so the
    update's log-probs must be of that distribution, not of the model's own: else on-policy importance ratios
    and the policy gradient are those of another policy."""
    from flashops.model import JoyAIFlash, get_config
    from flashops.model.sampling import token_probs
    from flashops.trainers.stages import policy_forward

    torch.manual_seed(0)
    model = JoyAIFlash(get_config("joyai-flash-debug"))
    tokens = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
        for t in (1.0, 0.5, 1.7):
            lp, out = policy_forward(model, tokens, temperature=t)
            drawn_from = token_probs(logits, t).gather(-1, tokens[:, 1:, None]).squeeze(-1).log()
            assert torch.allclose(lp, drawn_from, atol=1e-5), t
            assert torch.equal(out.logits, logits)  # the output keeps the model's own logits
        assert not torch.allclose(policy_forward(model, tokens, temperature=0.5)[0],
                                  policy_forward(model, tokens)[0], atol=1e-3)


@pytest.mark.slow
def test_post_training_trains_the_mtp_layer_only_where_its_mtp_setting_says(home, store, tiny_run):
    """sft.mtp and rl.mtp on by default, dpo.mtp off: a stage with it off leaves the MTP layer's weights
    bit-identical to its start and reports no mtp_loss; with it on they move and the stage reports mtp_loss.
    Asking for it on a model without an MTP layer is refused before any step; SFT's default is not."""
    from flashops.serving.loading import load_checkpoint_model

    def mtp_weights(uri):
        model, _ = load_checkpoint_model(uri)
        return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mtp_layers.")}

    def moved(start, result):
        after = mtp_weights(result.checkpoint_uri)
        assert start.keys() == after.keys() and start
        return any(not torch.equal(start[k], after[k]) for k in start)

    base = run_training(tiny_run("mtp-base", "pretrain", training={"steps": 1}), store, False)
    start = mtp_weights(base.checkpoint_uri)
    rl = {"groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 4, "curriculum": {"profile": False}}
    runs = {
        ("sft", True): tiny_run("mtp-sft-on", "sft", initFrom=base.checkpoint_uri, training={"steps": 1}),
        ("sft", False): tiny_run("mtp-sft-off", "sft", initFrom=base.checkpoint_uri, training={"steps": 1},
                                 sft={"mtp": {"train": False}}),
        ("dpo", False): tiny_run("mtp-dpo-off", "dpo", initFrom=base.checkpoint_uri, training={"steps": 1}),
        ("dpo", True): tiny_run("mtp-dpo-on", "dpo", initFrom=base.checkpoint_uri, training={"steps": 1},
                                dpo={"mtp": {"train": True, "weight": 0.5}}),
        ("rl", False): tiny_run("mtp-rl-off", "rl", initFrom=base.checkpoint_uri, rl={**rl, "mtp": {"train": False}},
                                training={"steps": 1, "seqLen": 32}),
        ("rl", True): tiny_run("mtp-rl-on", "rl", initFrom=base.checkpoint_uri, rl=rl, training={"steps": 1, "seqLen": 32}),
    }
    for (stage, on), run in runs.items():
        result = run_training(run, store, False)
        assert moved(start, result) == on, (stage, on)
        assert ("mtp_loss" in result.history[-1]) == on, (stage, on)
        if on:
            assert math.isfinite(result.history[-1]["mtp_loss"]) and result.history[-1]["mtp_loss"] > 0
    no_mtp = {"preset": "joyai-flash-debug", "overrides": {"numMtpLayers": 0}}
    with pytest.raises(SpecValueError, match=r"spec.rl.mtp.train = True: the model has no MTP layer.*set train: false"):
        run_training(tiny_run("mtp-none", "rl", initFrom=base.checkpoint_uri, model=no_mtp,
                              rl={**rl, "mtp": {"train": True}}), store, False)
    assert store.latest("mtp-none") is None
    # SFT's default (on) trains the MTP layer where there is one, and is no error where there is none
    plain = run_training(tiny_run("sft-no-mtp", "sft", model=no_mtp, training={"steps": 1}), store, False)
    assert "mtp_loss" not in plain.history[-1]


def test_resume_refuses_a_changed_spec(home, store, tiny_run):
    run_training(tiny_run("same-name", "pretrain", training={"steps": 1}), store, False)
    with pytest.raises(ResumeError, match="different spec"):
        run_training(tiny_run("same-name", "pretrain", training={"steps": 1}, optimizer={"lr": 0.5}), store, False)


@pytest.mark.parametrize("spec,error,match", [
    ({"training": {"seqLen": 4096}}, SpecValueError, "training.seqLen"),
    ({"model": {"overrides": {"vocabSize": 512}}}, SpecValueError, "vocabSize"),
    ({"model": {"overrides": {"topK": 16}}}, SpecValueError, "top_k cannot exceed num_experts"),
    ({"model": {"overrides": {"numLayer": 2}}}, SpecValueError, "did you mean 'n_layers'"),
    ({"optimizer": {"lr": 1e-3, "minLr": 1e-2}}, SpecValueError, "optimizer.minLr"),
    ({"parallelism": {"procsPerNode": 2}}, SpecValueError, "torchrun --nproc-per-node 2"),
    ({"data": {"uri": "file:///nonexistent/corpus.jsonl"}}, DataError, "no such file"),
    ({"data": {"uri": "builtin:sft-chat"}}, DataError, "builtin:pretrain-text"),
    ({"initFrom": "no-such-run"}, DataError, "no checkpoint found"),
])
def test_bad_specs_fail_before_any_compute(home, store, spec, error, match, monkeypatch, tiny_run):
    import flashops.model.model as model_module

    def no_model(*a, **k):
        raise AssertionError("the model was built before the spec was checked")

    monkeypatch.setattr(model_module.JoyAIFlash, "__init__", no_model)
    with pytest.raises(error, match=match):
        run_training(tiny_run("bad", "pretrain", **spec), store, False)
    assert store.latest("bad") is None


def test_a_run_may_change_how_it_trains_but_not_the_shapes_of_its_checkpoint(home, store, tiny_run):
    """initFrom a checkpoint: a different dim is refused before any step, naming the field and both values; a
    different biasUpdateRate (0: the router bias frozen, e.g. for post-training) is accepted and freezes it."""
    import torch

    base = run_training(tiny_run("shape-base", "pretrain", training={"steps": 1}), store, False)
    with pytest.raises(SpecValueError, match=r"differs in dim \(checkpoint \[128\] vs spec \[64\]\)"):
        run_training(tiny_run("wider", "sft", initFrom=base.checkpoint_uri,
                              model={"preset": "joyai-flash-debug", "overrides": {"dim": 64}}), store, False)
    assert store.latest("wider") is None  # refused before any step
    frozen = run_training(tiny_run("frozen-bias", "sft", initFrom=base.checkpoint_uri,
                                   model={"preset": "joyai-flash-debug", "overrides": {"biasUpdateRate": 0}}),
                          store, False)

    def router_biases(uri):
        from flashops.serving.loading import load_checkpoint_model

        model, _ = load_checkpoint_model(uri)
        return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("expert_bias_E")}

    before, after = router_biases(base.checkpoint_uri), router_biases(frozen.checkpoint_uri)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    moved = run_training(tiny_run("moving-bias", "sft", initFrom=base.checkpoint_uri), store, False)
    assert any(not torch.equal(before[k], v) for k, v in router_biases(moved.checkpoint_uri).items())


def test_rl_and_dpo_need_a_starting_policy(home, store, tiny_run):
    with pytest.raises(SpecValueError, match="initFrom"):
        run_training(tiny_run("lonely", "rl"), store, False)
    with pytest.raises(SpecValueError, match="rl.domains"):
        run_training(tiny_run("x", "rl", initFrom="file:///nope/runs/a/step-1", rl={"domains": ["poetry"]}), store, False)

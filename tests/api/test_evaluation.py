"""Evaluation suites (issue 15): the four matching rules, thinking modes, suite lines that name the file, the
line, the field and the fix; builtin:rl-heldout is drawn from prompts no training corpus generates; and the
pipeline rule for eval stages (they evaluate the previous training stage's checkpoint, never export, and do not
change what the next stage starts from)."""
import json
import random

import pytest

from flashops.api.evaluation import (MODES, SuiteError, chat_smoke, matches, mode_figures, parse_suite,
                                     suite_from_rows)
from flashops.api.pipeline import (LABEL_FINAL_STAGE, EvaluationJob, StageOutcome, advance, exports)
from flashops.api.spec import SpecError, load_text


@pytest.mark.parametrize("rule, generated, expected, ok", [
    ("exact", "  1 2 3 \n", "1 2 3", True),
    ("exact", "1 2 3 4", "1 2 3", False),
    ("exact", "1  2 3", "1 2 3", False),             # only the ends are trimmed
    ("number", "The answer is 5.", "5", True),
    ("number", "5.0 apples", "5", True),
    ("number", "-3", "3", False),
    ("number", "12 then 5", "5", False),             # the FIRST number counts
    ("number", "no number", "5", False),
    ("regex", " cba ", "c.a", True),
    ("regex", "xcba", "c.a", False),                 # a full match, not a search
    ("contains", "so it is 4 4 7 9 indeed", "4 4 7 9", True),
    ("contains", "4 7 9", "4 4 7 9", False),
])
def test_matching_rules(rule, generated, expected, ok):
    assert matches(rule, generated, expected) is ok


def test_thinking_null_runs_both_modes_and_true_or_false_one():
    suite = parse_suite("file:///s.jsonl", b"\n".join(json.dumps(r).encode() for r in [
        {"prompt": "a", "answer": "1", "thinking": None}, {"prompt": "b", "answer": "2", "thinking": True},
        {"prompt": "c", "answer": "3", "thinking": False}, {"prompt": "d", "answer": "4"}]))
    assert [t.modes for t in suite.tasks] == [MODES, ("thinking",), ("non-thinking",), MODES]
    assert [t.prompt for t in suite.tasks_in("thinking")] == ["a", "b", "d"]
    assert [t.prompt for t in suite.tasks_in("non-thinking")] == ["a", "c", "d"]
    assert [t.line for t in suite.tasks] == [1, 2, 3, 4] and suite.tasks[0].domain == "default"


def test_the_thinking_answer_is_what_follows_the_reasoning_block():
    from flashops.serving.openai_routes import split_reasoning

    assert split_reasoning("<think>5 + 3 = 8</think>8", True) == ("5 + 3 = 8", "8")
    assert split_reasoning("5 + 3 = 8", True) == ("5 + 3 = 8", "")       # no answer yet: nothing to compare
    assert split_reasoning("8", False) == ("", "8")


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "a", "answer": "1", "match": "fuzzy"}', "line 2: field 'match': 'fuzzy' is not a match rule: use one of exact, number, regex, contains"),
    ('{"prompt": "a"}', "line 2: field 'answer': missing: give the answer as a string"),
    ('{"prompt": "a", "answer": "1", "thinking": "yes"}', "line 2: field 'thinking': 'yes' is not true, false or null"),
    ('{"prompt": "a", "answer": "1", "reasoning": "x"}', "line 2: field 'reasoning' is not a task field"),
    ('{"prompt": "a", "answer": "(", "match": "regex"}', "line 2: field 'answer': '(' is not a valid regular expression"),
    ('{"prompt": "a", "answer": "many", "match": "number"}', "line 2: field 'answer': 'many' holds no number"),
    ('{"prompt": "a", "answer": 1}', "line 2: field 'answer': 1 is not a non-empty string"),
    ('{"prompt": "a", "answer": "1",', "line 2: not valid JSON"),
    ('["a", "1"]', "line 2: a list, not an object"),
])
def test_a_malformed_line_names_the_file_the_line_the_field_and_the_fix(line, needle):
    data = ('{"prompt": "ok", "answer": "1"}\n' + line + "\n").encode()
    with pytest.raises(SuiteError) as e:
        parse_suite("file:///data/qa.jsonl", data)
    assert str(e.value).startswith("file:///data/qa.jsonl line 2") and needle in str(e.value)


def test_suites_are_hashed_by_content():
    a = suite_from_rows("file:///a.jsonl", [{"prompt": "p", "answer": "1"}])
    b = suite_from_rows("file:///a.jsonl", [{"prompt": "p", "answer": "2"}])
    assert a.sha256 != b.sha256 and a.sha256.startswith("sha256:") and chat_smoke().sha256 == chat_smoke().sha256
    with pytest.raises(SuiteError, match="empty"):
        parse_suite("file:///e.jsonl", b"\n\n")


def test_rl_heldout_prompts_are_never_generated_for_training():
    from flashops.trainers.corpora import BuiltinDataset, eval_tasks
    from flashops.trainers.suites import load_suite
    from flashops.trainers.tasks import DOMAINS, is_heldout, random_task, task_pool

    suite = load_suite("builtin:rl-heldout")
    held = {t.prompt for t in suite.tasks}
    assert len(suite.tasks) == 24 and all(is_heldout(p) for p in held)
    assert {t.domain for t in suite.tasks} == set(DOMAINS)
    assert {t.match for t in suite.tasks} == {"number", "exact"}
    assert load_suite("builtin:rl-heldout").sha256 == suite.sha256  # the same suite in every process
    rng = random.Random(0)
    seen = {random_task(rng).question for _ in range(20_000)}
    seen |= {t.question for t in task_pool(24, 0)}
    seen |= {BuiltinDataset("rl-tasks", 3)[i]["question"] for i in range(50)}
    for name in ("sft-chat", "dpo-pairs"):
        ds = BuiltinDataset(name, 0)
        for i in range(2000):
            row = ds[i]
            seen.add(row["messages"][-2]["content"] if "messages" in row else row["prompt"][0]["content"])
    assert not seen & held and len(seen) > 1000
    assert not any(is_heldout(q) for q in seen)
    assert all(is_heldout(t.question) for t in eval_tasks(4, 0))  # RL's own before/after set is held out too
    with pytest.raises(SuiteError, match="no such builtin suite"):
        load_suite("builtin:mmlu")


PIPELINE = """
apiVersion: flashops.dev/v1alpha1
kind: TrainingPipeline
metadata: {name: p}
spec:
  stages:
  - {name: pre, spec: {stage: pretrain}}
  - {name: eval-pre, spec: {stage: eval, eval: {suites: ["builtin:chat-smoke"]}}}
  - {name: sft, spec: {stage: sft}}
  - {name: eval-sft, spec: {stage: eval, eval: {suites: ["builtin:chat-smoke", "file:///s.jsonl"], maxTokens: 8}}}
"""


class Recorder:
    def __init__(self):
        self.started = []

    def outcome(self, run):
        return None

    def start(self, run):
        self.started.append(run)
        if isinstance(run, EvaluationJob):
            return StageOutcome("Succeeded", run.model)
        return StageOutcome("Succeeded", f"file:///s/runs/{run.name}/step-1")


def test_an_eval_stage_evaluates_the_previous_checkpoint_and_changes_nothing_downstream():
    pipeline = load_text(PIPELINE)[0]
    backend = Recorder()
    state = advance(pipeline, backend)
    kinds = [(type(r).__name__, r.name) for r in backend.started]
    assert kinds == [("TrainingRun", "p-pre"), ("EvaluationJob", "p-eval-pre"), ("TrainingRun", "p-sft"),
                     ("EvaluationJob", "p-eval-sft")]
    pre, eval_pre, sft, eval_sft = backend.started
    assert eval_pre.model == "file:///s/runs/p-pre/step-1" and eval_pre.stage == "eval-pre"
    assert sft.spec.init_from == "file:///s/runs/p-pre/step-1"  # not the evaluation
    assert eval_sft.model == "file:///s/runs/p-sft/step-1" and eval_sft.spec.eval.max_tokens == 8
    # the last TRAINING stage exports, though an eval stage is last
    assert exports(sft) and not exports(pre) and sft.metadata.labels[LABEL_FINAL_STAGE] == "true"
    assert state.done and state.final_checkpoint == "file:///s/runs/p-sft/step-1"
    assert state.model_uri == "file:///s/models/p/step-1"


@pytest.mark.parametrize("stages, needle", [
    ('[{name: e, spec: {stage: eval, eval: {suites: ["builtin:chat-smoke"]}}}, {name: a, spec: {stage: sft}}]',
     "there is no checkpoint to evaluate"),
    ('[{name: a, spec: {stage: sft}}, {name: e, spec: {stage: eval, eval: {suites: ["http://x/s.jsonl"]}}}]',
     "suite 'http://x/s.jsonl': use builtin:rl-heldout"),
    ('[{name: a, spec: {stage: sft}}, {name: e, spec: {stage: eval, eval: {suites: []}}}]', "suites"),
    ('[{name: a, spec: {stage: sft}}, {name: e, spec: {stage: eval, eval: {suites: ["builtin:chat-smoke"], mtpTokens: 4}}}]',
     "mtpTokens"),
])
def test_bad_eval_stages_are_refused_when_the_file_loads(stages, needle):
    text = f"apiVersion: flashops.dev/v1alpha1\nkind: TrainingPipeline\nmetadata: {{name: p}}\nspec:\n  stages: {stages}\n"
    with pytest.raises(SpecError) as e:
        load_text(text)
    assert needle in str(e.value)


def test_mode_figures_finds_a_suite_and_mode():
    result = {"suites": [{"name": "s", "modes": [{"mode": "thinking", "accuracy": 0.5}]}]}
    assert mode_figures(result, "s", "thinking") == {"mode": "thinking", "accuracy": 0.5}
    assert mode_figures(result, "s", "non-thinking") is None and mode_figures(result, "t", "thinking") is None

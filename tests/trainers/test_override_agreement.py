"""`flashops validate`, the operator's admission and `flashops run` (the trainer's preflight) agree on every model
override: each JoyAIConfig field, in snake_case and camelCase, is accepted by all or refused by all, and a refusal's
hint names a field that is itself accepted."""
from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from flashops.api.architecture import FIELDS, PRESETS, camel
from flashops.api.loader import SpecError, check_architecture
from flashops.api.spec import parse_object
from flashops.cli.app import app
from flashops.trainers import checks
from flashops.trainers.errors import SpecValueError

DEBUG = PRESETS["joyai-flash-debug"]
# a valid value different from the debug preset's where one exists (so "applied" is visible), else its own
CHANGED = {"n_layers": 3, "n_dense_layers": 2, "vocab_size": 8192, "top_k": 4, "max_seq_len": 1024, "dim": 192,
           "norm_eps": 1e-5, "rope_theta": 5e5, "attention": "sdpa", "route_scale": 2.0,
           "init_std": 0.01, "bias_update_rate": 0.0, "num_experts": 16, "num_shared_experts": 0, "eos_id": 2}
SCALAR_FIELDS = [f for f in FIELDS if f != "extra"]  # `extra` is a dict: the spec's override type refuses it
CASES = sorted({(f, spelling) for f in SCALAR_FIELDS for spelling in (f, camel(f))})


def _doc(overrides: dict) -> dict:
    return {"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "agree"},
            "spec": {"stage": "pretrain", "training": {"steps": 2, "batchSize": 2, "seqLen": 32},
                     "model": {"preset": "joyai-flash-debug", "overrides": overrides}}}


def _validate(tmp_path, overrides: dict) -> tuple[int, str]:
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(_doc(overrides)))
    out = CliRunner().invoke(app, ["validate", "-f", str(f)])
    return out.exit_code, out.output


def _admit(overrides: dict) -> str | None:
    """The operator's admission path (reconcile._parse): parse_object + check_architecture."""
    try:
        check_architecture(parse_object(_doc(overrides)))
    except SpecError as e:
        return str(e)
    return None


def _run(overrides: dict):
    """What `flashops run` checks before compute: the trainer's preflight (model config, tokenizer, data)."""
    return checks.preflight(parse_object(_doc(overrides))).model_config


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("field,spelling", CASES)
def test_every_override_is_accepted_by_validate_admission_and_run(tmp_path, field, spelling):
    value = CHANGED.get(field, getattr(DEBUG, field))
    code, output = _validate(tmp_path, {spelling: value})
    assert code == 0 and ": OK" in output, output
    assert _admit({spelling: value}) is None
    assert getattr(_run({spelling: value}), field) == value


@pytest.mark.parametrize("field,spelling", CASES)
def test_a_wrong_type_is_refused_by_all_three_naming_the_key(tmp_path, field, spelling):
    bad = 3 if isinstance(getattr(DEBUG, field), str) else "three"
    code, output = _validate(tmp_path, {spelling: bad})
    assert code == 2 and f"spec.model.overrides.{spelling}: {bad!r}" in output, output
    assert f"spec.model.overrides.{spelling}" in _admit({spelling: bad})
    with pytest.raises(SpecValueError, match=re.escape(f"'{spelling}'")):
        _run({spelling: bad})


@pytest.mark.parametrize("typo", ["numLayers", "numLayer", "n_layer", "maxSeqLength", "topk", "qLoraRnk"])
def test_an_unknown_name_is_refused_everywhere_with_a_hint_that_is_accepted(tmp_path, typo):
    code, output = _validate(tmp_path, {typo: 2})
    assert code == 2 and "unknown field" in output, output
    assert "unknown field" in _admit({typo: 2})
    with pytest.raises(SpecValueError, match="unknown field") as refused:
        _run({typo: 2})
    hints = re.findall(r"did you mean '(\w+)'(?: \('(\w+)'\))?", str(refused.value))
    assert hints, str(refused.value)
    for hint in filter(None, hints[0]):
        field = hint if hint in FIELDS else next(f for f in FIELDS if camel(f) == hint)
        value = CHANGED.get(field, getattr(DEBUG, field))
        assert _validate(tmp_path, {hint: value})[0] == 0 and _admit({hint: value}) is None
        assert getattr(_run({hint: value}), field) == value


@pytest.mark.parametrize("overrides,line", [
    ({"topK": 20}, "spec.model.overrides.topK: 20: top_k cannot exceed num_experts (8)"),
    ({"numMtpLayers": 0}, "spec.pretrain.mtpWeight: 0.1: the model has no MTP layer"),
    ({"maxSeqLen": 16}, "spec.training.seqLen: 32: longer than the model's max_seq_len 16"),
    ({"vocab_size": 512}, "spec.model.overrides.vocab_size: 512: the tokenizer has 2048 tokens; use vocab_size >= 2048"),
])
def test_a_combination_the_model_refuses_is_refused_by_all_three(tmp_path, overrides, line):
    code, output = _validate(tmp_path, overrides)
    assert code == 2 and line in " ".join(output.split()), output
    assert line in _admit(overrides)
    with pytest.raises(SpecValueError, match=re.escape(line.split(": ", 1)[1].split(": ", 1)[1])):
        _run(overrides)


def test_the_tokenizer_size_the_api_checks_against_is_the_committed_tokenizers():
    from flashops.api.architecture import TOKENIZER_VOCAB_SIZE
    from flashops.model.tokenizer import load_tokenizer

    assert TOKENIZER_VOCAB_SIZE == load_tokenizer().get_vocab_size()


def test_the_crd_rule_lists_exactly_the_accepted_names():
    from flashops.api.architecture import OVERRIDE_NAMES
    from flashops.api.crds import crd

    schema = crd("TrainingRun")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    overrides = schema["properties"]["spec"]["properties"]["model"]["properties"]["overrides"]
    rule = overrides["x-kubernetes-validations"][0]["rule"]
    assert set(re.findall(r"'(\w+)'", rule)) == set(OVERRIDE_NAMES)
    assert {"nLayers", "n_layers", "maxSeqLen"} <= set(OVERRIDE_NAMES) and "numLayers" not in OVERRIDE_NAMES

"""Parse YAML job specs into typed objects, with errors a person can act on.

Every error names the file, the object, the field path, the bad value and what is allowed:

    quickstart.yaml: TrainingRun/pretrain-a: spec.stage: 'pretrian' is not one of pretrain, sft, dpo, rl
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from flashops.api import spec as S


class SpecError(ValueError):
    """Bad input in a job spec. `problems` holds one line per problem; str() joins them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_file(path: str | Path) -> list[S.SpecObject]:
    """All flashops objects in a (multi-document) YAML file. Raises SpecError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"{p}: cannot read the file: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{p}: not a YAML text file (byte {e.start} is not UTF-8): pass the spec's .yaml file"]) from None
    if "\x00" in text:
        raise SpecError([f"{p}: not a YAML text file (it contains NUL bytes): pass the spec's .yaml file"])
    return load_text(text, source=p.name)


def load_text(text: str, source: str = "<input>") -> list[S.SpecObject]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError([f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not docs:
        raise SpecError([f"{source}: no objects found (the file is empty)"])
    objects, problems = [], []
    for i, doc in enumerate(docs):
        try:
            obj = parse_object(doc, source=source, index=i)
            check_architecture(obj, source)
            objects.append(obj)
        except SpecError as e:
            problems.extend(e.problems)
    if problems:
        raise SpecError(problems)
    return objects


def parse_object(doc: Any, source: str = "<input>", index: int = 0) -> S.SpecObject:
    """One dict (a YAML document or a Kubernetes object body) -> TrainingRun | TrainingPipeline | ModelDeployment."""
    if not isinstance(doc, dict):
        raise SpecError([f"{source}: document {index + 1}: expected a mapping with apiVersion, kind, metadata, spec"])
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", f"<document {index + 1}>") if isinstance(doc.get("metadata"), dict) else f"<document {index + 1}>"
    where = f"{source}: {kind or '<no kind>'}/{name}"
    if kind not in S.KINDS:
        raise SpecError([f"{where}: kind: {kind!r} is not one of {', '.join(S.KINDS)}"])
    if doc.get("apiVersion") != S.API_GROUP_VERSION:
        raise SpecError([f"{where}: apiVersion: {doc.get('apiVersion')!r} is not {S.API_GROUP_VERSION}: "
                         f"set apiVersion: {S.API_GROUP_VERSION}"])
    body = {k: v for k, v in doc.items() if k != "status"} | ({"status": doc["status"]} if isinstance(doc.get("status"), dict) else {})
    try:
        return S.KINDS[kind].model_validate(body)
    except ValidationError as e:
        raise SpecError([f"{where}: {line}" for line in format_errors(e, S.KINDS[kind])]) from None


def architecture_problems(obj: S._Object, source: str = "<input>") -> list[str]:
    """Each `model:` block checked by the one model-config validator (flashops.api.architecture.get_config):
    unknown override names (with a hint that is itself accepted), wrong types, combinations the model refuses."""
    from flashops.api.architecture import ConfigError, get_config

    if isinstance(obj, S.TrainingRun):
        specs = [("spec", obj.spec)]
    elif isinstance(obj, S.TrainingPipeline):
        specs = [(f"spec.stages[{i}].spec", s.spec) for i, s in enumerate(obj.spec.stages) if not s.is_eval]
    else:
        return []
    problems = []
    for path, spec in specs:
        try:
            cfg = get_config(spec.model.preset, spec.model.overrides)
        except ConfigError as e:
            problems.append(f"{source}: {obj.kind}/{obj.name}: {path}.model.overrides.{e.field}: {e.value!r}: {e.fix}")
            continue
        problems += [f"{source}: {obj.kind}/{obj.name}: {path}.{field}: {value!r}: {fix}"
                     for field, value, fix in model_fit_problems(spec, cfg)]
    return problems


def model_fit_problems(spec: Any, cfg: Any) -> list[tuple[str, Any, str]]:
    """(field, value, fix) for run settings the model config cannot serve; the trainer's preflight raises the
    first of these, so `flashops validate` and `flashops run` refuse the same specs."""
    from flashops.api.architecture import TOKENIZER_VOCAB_SIZE

    out = []
    vocab_key = next((k for k in spec.model.overrides if k in ("vocabSize", "vocab_size")), "vocabSize")
    if cfg.vocab_size < TOKENIZER_VOCAB_SIZE:
        out.append((f"model.overrides.{vocab_key}", cfg.vocab_size,
                    f"the tokenizer has {TOKENIZER_VOCAB_SIZE} tokens; use {vocab_key} >= {TOKENIZER_VOCAB_SIZE}"))
    if spec.training.seq_len > cfg.max_seq_len:
        out.append(("training.seqLen", spec.training.seq_len, f"longer than the model's max_seq_len "
                    f"{cfg.max_seq_len}; lower seqLen or set model.overrides.maxSeqLen"))
    if spec.stage == "pretrain" and spec.pretrain.mtp_weight > 0 and cfg.num_mtp_layers == 0:
        out.append(("pretrain.mtpWeight", spec.pretrain.mtp_weight,
                    "the model has no MTP layer (numMtpLayers: 0); set mtpWeight: 0"))
    params = spec.stage_params
    mtp = getattr(params, "mtp", None)
    # SFT's default-on setting trains the MTP layer where there is one; asking for it explicitly needs one
    if mtp is not None and mtp.train and cfg.num_mtp_layers == 0 and "train" in mtp.model_fields_set:
        out.append((f"{spec.stage}.mtp.train", True, "the model has no MTP layer (numMtpLayers: 0); set train: false"))
    if spec.parallelism.ep > 1 and cfg.num_experts % spec.parallelism.ep:
        out.append(("parallelism.ep", spec.parallelism.ep, f"must divide the model's {cfg.num_experts} experts"))
    return out


def check_architecture(obj: S._Object, source: str = "<input>") -> S._Object:
    """Raise SpecError if a model block does not make a valid model (load_text and the operator call this)."""
    problems = architecture_problems(obj, source)
    if problems:
        raise SpecError(problems)
    return obj


def format_errors(e: ValidationError, model: type[BaseModel]) -> list[str]:
    lines = []
    for err in e.errors():
        loc = _clean_loc(err["loc"])
        path = _join(loc)
        typ, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
        if typ == "union_tag_invalid":
            disc = ctx.get("discriminator", "").strip("'")
            allowed = _unquote_list(ctx.get("expected_tags", ""))
            lines.append(f"{_join(loc + [disc])}: {ctx.get('tag')!r} is not one of {allowed}")
        elif typ == "union_tag_not_found":
            disc = ctx.get("discriminator", "").strip("'")
            lines.append(f"{_join(loc + [disc])}: is required")
        elif typ == "literal_error":
            lines.append(f"{path}: {value!r} is not one of {_unquote_list(ctx.get('expected', ''))}")
        elif typ == "extra_forbidden":
            field = str(loc[-1]) if loc else "?"
            known = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(field, known, n=1)
            fix = f"; did you mean '{hint[0]}'?" if hint else (f"; allowed: {', '.join(sorted(known))}" if known else "")
            lines.append(f"{path}: unknown field{fix}")
        elif typ == "missing":
            lines.append(f"{path}: is required")
        elif typ in ("value_error", "assertion_error"):
            msg = str(ctx.get("error", err["msg"]))
            lines.append(f"{path}: {msg}" if path else msg)
        else:
            msg = err["msg"]
            msg = msg[0].lower() + msg[1:] if msg else msg
            lines.append(f"{path}: {value!r} is invalid: {msg.replace('input ', '')}")
    return lines


def _clean_loc(loc: Iterable[Any]) -> list[Any]:
    """Drop the union tags pydantic inserts after a discriminated field (spec -> 'rl' -> ...)."""
    out: list[Any] = []
    loc = list(loc)
    i = 0
    while i < len(loc):
        out.append(loc[i])
        if loc[i] == "spec" and i + 1 < len(loc) and loc[i + 1] in S.STAGES:
            i += 1  # the tag; the real field (e.g. spec.rl.eps) keeps its own 'rl' after it
        i += 1
    return out


def _join(loc: list[Any]) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s


def _unquote_list(s: str) -> str:
    items = re.findall(r"'([^']*)'", s)
    return ", ".join(items) if items else s


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """camelCase field names of the model reached by `loc` (for 'did you mean')."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        candidates = cur if isinstance(cur, list) else [cur]
        field = next(
            (f for m in candidates if isinstance(m, type) and issubclass(m, BaseModel)
             for n, f in m.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return []
        cur = _model_of(field.annotation)
    if isinstance(cur, list):  # a union of spec variants: the union of their fields
        return sorted({f.alias or n for m in cur for n, f in m.model_fields.items()})
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [f.alias or n for n, f in cur.model_fields.items()]
    return []


def _model_of(annotation: Any) -> Any:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = []
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            models.append(a)
        else:
            stack.extend(get_args(a))
    if len(models) == 1:
        return models[0]
    return models or None

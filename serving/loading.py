"""From a model URI to a ready predictor: fetch the export (manifest verified), build the model,
load full-precision or INT4 weights, wrap it in the engine, the limiter and the KServe model.

    predictor = load_predictor(ServeOptions(model_uri="file:///home/me/.flashops/store/models/chat/v1"))

An export (flashops.trainers.runner.export_model; the layout is flashops.model.export's) is a Hugging Face
DeepSeek-V3 folder, the one vLLM and SGLang load too:
    config.json, model-*.safetensors, model.safetensors.index.json   full precision (HF names)
    tokenizer.json        a `tokenizers` file (else the committed tokenizer)
    int4/                 (QAT exports) the same with compressed-tensors INT4 routed experts
Only the files of the asked quantization are fetched.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashops.api.pipeline import INT4_DIR

log = logging.getLogger("flashops.serving")

CONFIG_FILE, TOKENIZER_FILE = "config.json", "tokenizer.json"


class LoadError(ValueError):
    """The model cannot be served as asked: names the file or option and the fix."""


@dataclass
class ServeOptions:
    model_uri: str
    name: str | None = None  # served model name; default: the export's name
    quantization: str = "none"  # "none" | "int4"
    mtp_tokens: int = 0
    thinking: bool = False
    max_concurrency: int = 8
    max_queue: int | None = None
    max_len: int | None = None  # context per sequence; default min(model max_seq_len, 4096)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "int4"):
            raise LoadError(f"quantization={self.quantization!r}: use 'none' or 'int4'")
        if not 0 <= self.mtp_tokens <= 3:
            raise LoadError(f"mtp_tokens={self.mtp_tokens}: use 0 (off) to 3")
        if self.max_concurrency < 1:
            raise LoadError(f"max_concurrency={self.max_concurrency}: must be >= 1")

    @classmethod
    def from_deployment(cls, deployment: Any, model_uri: str | None = None, **overrides: Any) -> "ServeOptions":
        """From a flashops.api.spec.ModelDeployment. Run/pipeline names and lineage:<id> resolve through
        lineage when `model_uri` is not given."""
        spec = deployment.spec
        uri = model_uri or resolve_source(spec.source)
        # speculative.mtpTokens: auto is resolved by the caller (flashops serve -f, the operator) from the model's
        # recorded evaluation (flashops.api.promotion.choose_mtp_tokens); until then it serves with 0
        values = dict(model_uri=uri, name=deployment.metadata.name, quantization=spec.quantization,
                      mtp_tokens=0 if spec.speculative.mtp_tokens == "auto" else spec.speculative.mtp_tokens,
                      thinking=spec.thinking, max_concurrency=spec.max_concurrency)
        return cls(**{**values, **overrides})


def resolve_source(source: str) -> str:
    """The model URI to serve for a deployment's source (flashops.api.references: the one resolver)."""
    from flashops.api.lineage import LineageError
    from flashops.api.references import UnresolvedReference, is_uri, resolve_reference

    lineage = None
    if not is_uri(source):
        try:
            from flashops.api.lineage import open_lineage

            lineage = open_lineage()
        except ImportError:
            raise LoadError(f"source '{source}' names a run or lineage entry, but lineage is not available here: "
                            "pass the model URI (--model s3://.../models/<name>/<version>)") from None
        except (LineageError, OSError) as e:
            raise LoadError(f"source '{source}' needs lineage, which cannot be opened ({e}): check "
                            "$FLASHOPS_LINEAGE_URL or pass --model URI") from None
    try:
        found = resolve_reference(source, lineage=lineage)
    except UnresolvedReference as e:  # e.g. a pipeline that has not finished: nothing to serve yet
        raise LoadError(f"{e}; or pass --model URI") from None
    except (LineageError, OSError) as e:  # lineage down or misconfigured: say so, no traceback
        raise LoadError(f"source '{source}' cannot be resolved through lineage ({e}): check $FLASHOPS_LINEAGE_URL "
                        "or pass --model URI") from None
    if not found.model_uri:
        raise LoadError(f"'{source}' resolves to checkpoint {found.checkpoint_uri}, which was never exported for "
                        "serving (only a standalone run or a pipeline's final stage exports): serve that run or "
                        "pipeline instead, or pass --model URI")
    return found.model_uri


def fetch(uri: str, cache_dir: str | None = None, quantization: str | None = None) -> Path:
    """The export's files in a local directory, every file checked against the manifest; with a
    quantization, only that variant's files (int4: int4/, none: the full-precision files)."""
    from flashops.storage import fetch_model

    root = Path(cache_dir or os.environ.get("FLASHOPS_SERVING_CACHE") or tempfile.mkdtemp(prefix="flashops-model-"))
    dest = root / uri.rstrip("/").rsplit("/models/", 1)[-1].replace("/", "-")
    only = None
    if quantization is not None:
        in_int4 = INT4_DIR + "/"
        only = (lambda rel: rel.startswith(in_int4)) if quantization == "int4" else (lambda rel: "/" not in rel)
    return fetch_model(uri, dest, only)


def read_config(directory: Path):
    from flashops.model.export import read_hf_config

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise LoadError(f"{path}: missing; an export needs {CONFIG_FILE}: export the checkpoint with "
                        "`flashops checkpoints export URI --name NAME`")
    return read_hf_config(directory)[0]


def load_model(directory: Path, quantization: str = "none"):
    """JoyAIFlash with the export's weights; INT4 routed experts (kept packed) when asked and present."""
    from flashops.model.export import load_export

    folder = directory / INT4_DIR if quantization == "int4" else directory
    if not (folder / CONFIG_FILE).is_file():
        if quantization == "int4":
            raise LoadError(f"quantization int4 asked but {folder} is missing: the run trained without QAT; "
                            "export with `flashops checkpoints export URI --name NAME --int4`, or serve with "
                            "quantization: none")
        raise LoadError(f"{folder / CONFIG_FILE}: missing; this is not a flashops export (re-export it with "
                        "`flashops checkpoints export URI --name NAME`)")
    data = json.loads((folder / CONFIG_FILE).read_text())
    if "model_type" not in data:
        raise LoadError(f"{folder / CONFIG_FILE} is an export of an older flashops (flashops names, no HF "
                        "layout): re-export the checkpoint with `flashops checkpoints export URI --name NAME`")
    try:
        model, cfg = load_export(directory, quantization)
    except ValueError as e:
        raise LoadError(f"{folder}: {e}; re-export the model") from None
    return model.eval(), cfg


# ---------------------------------------------------------------------- tokenizer


def load_codec(directory: Path):
    """The export's tokenizer.json (else the committed one) as the project's TokenizerCodec."""
    from flashops.model import tokenizer as project_tokenizer

    path = directory / TOKENIZER_FILE
    if not path.is_file():
        path = directory / INT4_DIR / TOKENIZER_FILE
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    else:
        tok = project_tokenizer.load_tokenizer()
    return project_tokenizer.TokenizerCodec(tok)


# ---------------------------------------------------------------------- the predictor


def build_predictor(model, cfg, codec, options: ServeOptions, name: str):
    from flashops.serving.backend import JoyAIBackend
    from flashops.serving.engine import Engine
    from flashops.serving.limiter import RequestLimiter
    from flashops.serving.metrics import ModelMetrics
    from flashops.serving.predictor import FlashPredictor

    max_len = options.max_len or min(cfg.max_seq_len, 4096)
    backend = JoyAIBackend(model, slots=options.max_concurrency, max_len=max_len)
    if options.mtp_tokens and not backend.has_mtp:
        raise LoadError(f"mtp_tokens={options.mtp_tokens} but the model has no MTP layer (num_mtp_layers=0): "
                        "set speculative.mtpTokens: 0")
    metrics = ModelMetrics(name)
    engine = Engine(backend, codec.decode, cfg.eos_id, options.mtp_tokens, metrics)
    return FlashPredictor(name, engine, codec, RequestLimiter(options.max_concurrency, options.max_queue),
                          thinking_default=options.thinking, metrics=metrics)


def load_predictor(options: ServeOptions):
    directory = fetch(options.model_uri, options.cache_dir, options.quantization)
    name = options.name or options.model_uri.rstrip("/").split("/")[-2]
    model, cfg = load_model(directory, options.quantization)
    log.info("loaded %s (%s, quantization=%s, mtp_tokens=%d)", options.model_uri, cfg.preset,
             options.quantization, options.mtp_tokens)
    return build_predictor(model, cfg, load_codec(directory), options, name)


def load_checkpoint_model(checkpoint_uri: str):
    """JoyAIFlash with a training checkpoint's weights (full precision), for evaluating a pipeline stage that
    was never exported; its config comes from the checkpoint's manifest."""
    from flashops.model import JoyAIFlash
    from flashops.model.config import JoyAIConfig
    from flashops.storage import load_checkpoint, open_store, split_checkpoint_uri

    root, _, _ = split_checkpoint_uri(checkpoint_uri)
    cfg = JoyAIConfig.from_dict(open_store(root).meta(checkpoint_uri).model_config)
    model = JoyAIFlash(cfg)
    load_checkpoint(checkpoint_uri, {"model": model.state_dict()})  # in place, tensor by tensor
    return model.eval(), cfg

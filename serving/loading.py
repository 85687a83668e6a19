"""From a model URI to a ready predictor: fetch the export (manifest verified), build the model,
load full-precision or INT4 weights, wrap it in the engine, the limiter and the KServe model.

    predictor = load_predictor(ServeOptions(model_uri="file:///home/me/.flashops/store/models/chat/v1"))

An export (flashops.storage `export_model`) holds:
    config.json           the JoyAIConfig (`JoyAIConfig.to_dict()`, or {"model": {...}})
    model.safetensors     full-precision weights, JoyAIFlash state_dict names
    model-int4.safetensors  (optional) INT4 routed experts from the QAT export (flashops.model.export.save_int4:
                          packed weights + fp32 group scales, config and error report in its metadata)
    int4.json             (optional) {"logit_tolerance": ...}: max |logit| change measured at export
    tokenizer.json        (optional) a `tokenizers` file; else the committed tokenizer
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("flashops.serving")

CONFIG_FILE, WEIGHTS_FILE, INT4_FILE, INT4_REPORT, TOKENIZER_FILE = (
    "config.json", "model.safetensors", "model-int4.safetensors", "int4.json", "tokenizer.json")


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
        return cls(model_uri=uri, name=deployment.metadata.name, quantization=spec.quantization,
                   mtp_tokens=spec.speculative.mtp_tokens, thinking=spec.thinking,
                   max_concurrency=spec.max_concurrency, **overrides)


def resolve_source(source: str) -> str:
    if source.startswith(("s3://", "file://")):
        return source
    try:
        from flashops.api.lineage import open_lineage
    except ImportError:
        raise LoadError(f"source '{source}' names a run or lineage entry, but lineage is not available here: "
                        "pass the model URI (--model s3://.../models/<name>/<version>)") from None
    found = open_lineage().resolve(source)
    uri = found.get("uri") if isinstance(found, dict) else None
    if not uri:
        raise LoadError(f"lineage has no model or checkpoint for '{source}': export one or pass --model URI")
    return uri


def fetch(uri: str, cache_dir: str | None = None) -> Path:
    """The export's files in a local directory, every file checked against the manifest."""
    from flashops.storage import fetch_model

    root = Path(cache_dir or os.environ.get("FLASHOPS_SERVING_CACHE") or tempfile.mkdtemp(prefix="flashops-model-"))
    dest = root / uri.rstrip("/").rsplit("/models/", 1)[-1].replace("/", "-")
    return fetch_model(uri, dest)


def read_config(directory: Path):
    from flashops.model.config import JoyAIConfig

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise LoadError(f"{path}: missing; an export needs {CONFIG_FILE} (JoyAIConfig.to_dict())")
    data = json.loads(path.read_text())
    return JoyAIConfig.from_dict(data.get("model", data))


def load_model(directory: Path, quantization: str = "none"):
    """JoyAIFlash with the export's weights; INT4 routed experts when asked and present."""
    from safetensors.torch import load_file

    from flashops.model import JoyAIFlash

    weights = directory / WEIGHTS_FILE
    if quantization == "int4":
        if not (directory / INT4_FILE).is_file():
            raise LoadError(f"quantization int4 asked but {directory / INT4_FILE} is missing: "
                            "export the QAT model with save_int4(), or serve with quantization: none")
        from flashops.model.export import read_int4

        model = read_int4(directory / INT4_FILE)  # experts stay packed; dequantized per group in the matmul
        return model.eval(), model.arch
    cfg = read_config(directory)
    model = JoyAIFlash(cfg)  # real init: builds the non-persistent buffers (RoPE tables) the file lacks
    if not weights.is_file():
        raise LoadError(f"{weights}: missing; an export needs {WEIGHTS_FILE}")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LoadError(f"{weights} does not fit the config in {CONFIG_FILE}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; re-export the model")
    return model.eval(), cfg


# ---------------------------------------------------------------------- tokenizer


class TokenizerCodec:
    """tokenizers.Tokenizer + the project's chat template as the predictor's TextCodec."""

    def __init__(self, tokenizer: Any, chat_template: Any):
        self.tokenizer, self._chat_template = tokenizer, chat_template

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return list(ids.ids if hasattr(ids, "ids") else ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def chat_prompt(self, messages: list[dict[str, str]], thinking: bool) -> str:
        return self._chat_template(messages, thinking)


def load_codec(directory: Path) -> TokenizerCodec:
    from flashops.model import tokenizer as project_tokenizer

    path = directory / TOKENIZER_FILE
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    else:
        tok = project_tokenizer.load_tokenizer()
    return TokenizerCodec(tok, project_tokenizer.chat_template)


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
    directory = fetch(options.model_uri, options.cache_dir)
    name = options.name or options.model_uri.rstrip("/").split("/")[-2]
    model, cfg = load_model(directory, options.quantization)
    log.info("loaded %s (%s, quantization=%s, mtp_tokens=%d)", options.model_uri, cfg.preset,
             options.quantization, options.mtp_tokens)
    return build_predictor(model, cfg, load_codec(directory), options, name)

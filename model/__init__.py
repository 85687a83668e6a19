"""flashops.model: the JoyAI-Flash model family (configs, model, MTP drafting, QAT, INT4 export, HF adapter).

Importing this package loads no torch; `JoyAIFlash` and friends are resolved lazily on first use.

    from flashops.model import JoyAIFlash, get_config
    model = JoyAIFlash(get_config("joyai-flash-debug"))
"""
from flashops.model.config import PRESETS, ConfigError, JoyAIConfig, get_config

_LAZY = {
    "JoyAIFlash": "flashops.model.model",
    "ModelOutput": "flashops.model.model",
    "DraftOutput": "flashops.model.model",
    "KVCache": "flashops.model.model",
    "count_params": "flashops.model.model",
}

__all__ = ["PRESETS", "ConfigError", "JoyAIConfig", "get_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashops.model' has no attribute {name!r}")

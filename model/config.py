"""JoyAI-Flash architecture configs and presets: they live in flashops.api.architecture (torch-free, so the spec
loader, `flashops validate`, the operator and the trainer share one validator); re-exported here for the model.

    from flashops.model.config import get_config
    cfg = get_config("joyai-flash-debug", {"vocab_size": 2048})
"""
from flashops.api.architecture import (  # noqa: F401 - the public re-export
    FIELDS,
    MODEL_PRESETS,
    OVERRIDE_NAMES,
    PRESETS,
    ConfigError,
    JoyAIConfig,
    get_config,
    override_field,
)

__all__ = ["FIELDS", "MODEL_PRESETS", "OVERRIDE_NAMES", "PRESETS", "ConfigError", "JoyAIConfig", "get_config",
           "override_field"]

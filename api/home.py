"""Where flashops keeps local state: $FLASHOPS_HOME, default ~/.flashops (the store, lineage.db, logs, caches).
The one default; storage, lineage and the CLI ask here."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.flashops"


def flashops_home() -> Path:
    return Path(os.environ.get("FLASHOPS_HOME") or Path(DEFAULT_HOME).expanduser())

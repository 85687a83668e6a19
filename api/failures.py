"""What a trainer failure means, decided once: the exit codes, and the termination message through which a
trainer pod tells the operator why it stopped. Torch-free; the trainer writes, the operator reads.

    write_termination_message(EXIT_INVALID_SPEC, "spec.data.uri: file:///x does not exist; ...")   # trainer
    failure = trainer_failure(pod)          # operator: TrainerFailure(exit_code=2, permanent=True, ...) | None

Exit code 2 means "bad spec or data: retrying cannot help" (the operator marks the run Failed, reason
InvalidSpec, and spends no retry). Anything else (1, OOMKilled 137, a lost node) is retried up to backoffLimit.

Why a file and not only the exit code: `torchrun` turns any child's exit code into its own 1, so the
container's code alone cannot carry the 2. Rank 0 writes `flashops exit 2 InvalidSpec: <message>` to the
container's termination message file (/dev/termination-log, which the kubelet creates and copies into
`status.containerStatuses[].state.terminated.message`); a plain container exit code 2 counts as well.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # anything unexpected: worth a retry
EXIT_INVALID_SPEC = 2  # bad spec or data: permanent
PERMANENT_EXIT_CODES = {EXIT_INVALID_SPEC: "InvalidSpec"}

TERMINATION_LOG_ENV = "FLASHOPS_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath
TERMINATION_MESSAGE_LIMIT = 4000  # the kubelet keeps 4096 bytes of it
_MESSAGE = re.compile(r"^flashops exit (\d+) (\w+): (.*)$", re.S)


@dataclass(frozen=True)
class TrainerFailure:
    """Why a trainer container stopped: its exit code, a CamelCase reason and the trainer's own words."""

    exit_code: int
    reason: str
    message: str

    @property
    def permanent(self) -> bool:
        return self.exit_code in PERMANENT_EXIT_CODES


def termination_message(exit_code: int, message: str) -> str:
    reason = PERMANENT_EXIT_CODES.get(exit_code, "TrainerFailed")
    text = f"flashops exit {exit_code} {reason}: {message.strip()}"
    return text if len(text) <= TERMINATION_MESSAGE_LIMIT else text[: TERMINATION_MESSAGE_LIMIT - 3] + "..."


def write_termination_message(exit_code: int, message: str) -> Path | None:
    """Write the message where Kubernetes picks it up: $FLASHOPS_TERMINATION_LOG, else /dev/termination-log
    when it exists (inside a pod). Outside a pod there is nowhere to write; returns the path written or None."""
    path = Path(os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)
    if TERMINATION_LOG_ENV not in os.environ and not path.exists():
        return None
    try:
        path.write_text(termination_message(exit_code, message))
    except OSError:
        return None  # a read-only or missing file must not hide the real error
    return path


def parse_termination_message(text: str | None) -> TrainerFailure | None:
    m = _MESSAGE.match((text or "").strip())
    return TrainerFailure(int(m.group(1)), m.group(2), m.group(3)) if m else None


def trainer_failure(pod: dict[str, Any]) -> TrainerFailure | None:
    """The failure a pod's terminated containers report, a permanent one first; None if none failed."""
    found: list[TrainerFailure] = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        done = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not done or not done.get("exitCode"):
            continue
        code, text = int(done["exitCode"]), done.get("message") or ""
        parsed = parse_termination_message(text)
        if parsed is not None:
            found.append(parsed)
        else:
            found.append(TrainerFailure(code, PERMANENT_EXIT_CODES.get(code, done.get("reason") or "Error"),
                                        text.strip() or f"container {cs.get('name')} exited with code {code}"))
    found.sort(key=lambda f: not f.permanent)
    return found[0] if found else None

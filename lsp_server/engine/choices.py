"""What the fast engine's start-up timing decided, kept between starts on the same machine.

The numerical checks of every GPU path are cheap and run at every start; the timings that pick
between correct paths (the one-row GEMVs, the prefill attention, the sampling kernels, the
cache write in the attention kernel, the L2 prefetch) take seconds, and their answer does not
change while the GPU, the software and the engine's shape stay the same. So the answers are
kept in a small JSON file, one entry per fingerprint of those, and a second start reuses them
(part of getting ``ready`` fast on a second start).

``STARCHAT_FAST_CHOICES`` names the file; ``0`` turns the memory off. Default:
``$XDG_CACHE_HOME/starchat-lsp/fast-engine-choices.json`` (``~/.cache`` without XDG).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def default_path() -> Path | None:
    env = os.environ.get("STARCHAT_FAST_CHOICES")
    if env == "0":
        return None
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "starchat-lsp" / "fast-engine-choices.json"


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Choices:
    """The remembered answers for one fingerprint. ``ask(question, decide)`` returns the
    remembered answer, or ``decide()``'s (remembered from then on); ``save()`` writes the file
    when something new was decided. A file that cannot be read or written only means that the
    timings run again."""

    def __init__(self, path: Path | None, key: str, describe: dict[str, Any] | None = None):
        self.path, self.key = path, key
        self.describe = describe or {}
        self.answers: dict[str, Any] = {}
        self.reused: list[str] = []
        self._new = False
        if path is not None:
            try:
                entry = json.loads(path.read_text()).get(key) or {}
                self.answers = dict(entry.get("answers") or {})
            except FileNotFoundError:
                pass
            except Exception as exc:  # unreadable: decide again, overwrite on save
                log.warning("ignoring the fast engine's remembered choices in %s: %s", path, exc)

    def recall(self, question: str) -> Any:
        """The remembered answer, or None."""
        if question in self.answers:
            self.reused.append(question)
            return self.answers[question]
        return None

    def remember(self, question: str, answer: Any) -> None:
        self.answers[question] = answer
        self._new = True

    def ask(self, question: str, decide: Callable[[], Any]) -> Any:
        """The remembered answer, else ``decide()``'s (remembered from now on). ``decide``
        returns something JSON can hold, never None (None means "not remembered")."""
        answer = self.recall(question)
        if answer is None:
            answer = decide()
            self.remember(question, answer)
        return answer

    def forget(self, question: str) -> None:
        """A remembered answer that no longer passes its check: decided again next start."""
        if self.answers.pop(question, None) is not None:
            self._new = True

    def save(self) -> None:
        if self.path is None or not self._new:
            return
        try:
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    data = {}
            except Exception:
                data = {}
            data[self.key] = {"answers": self.answers, "for": self.describe}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
            tmp.replace(self.path)
            self._new = False
        except OSError as exc:
            log.warning("could not remember the fast engine's choices in %s: %s", self.path, exc)

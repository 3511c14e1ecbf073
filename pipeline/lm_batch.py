"""One LM pass for the audio codes of several jobs (issue 18): `run_batch` plans each job's LM stage in
a thread of its own with its LM backend wrapped (`CodesBatcher.wrap`); a job's `generate_codes` call
waits until every job still planning has made its own (or finished), and then one call per backend
and `cfg_scale` runs the rows of all of them, each row with its own prompt, seed and length. The
metadata and text calls (one sequence each) run one at a time, as before. Each row's result is what
its job alone gets, up to the floating-point rounding of a batch with other prompt lengths."""

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.lm.backend import CodesRequest, TokenReport


@dataclass(eq=False)
class _Pending:
    backend: Any
    requests: list[CodesRequest]
    report: TokenReport | None
    result: list[str] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class CodesBatcher:
    """`participants`: the planning threads; each calls `leave()` when its planning is over."""

    participants: int
    calls: list[int] = field(default_factory=list)  # rows of every merged generate_codes call made

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._serial = threading.Lock()  # the single-sequence calls, one at a time
        self._active = self.participants
        self._pending: list[_Pending] = []

    def wrap(self, backend: Any) -> "BatchedLM":
        return BatchedLM(backend, self)

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._flush_when_all_wait()

    def codes(self, backend: Any, requests: Sequence[CodesRequest], report: TokenReport | None) -> list[str]:
        entry = _Pending(backend, list(requests), report)
        with self._cond:
            self._pending.append(entry)
            self._flush_when_all_wait()
            while not entry.done:
                self._cond.wait()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _flush_when_all_wait(self) -> None:
        """With the lock held: once every active planner waits here, run their calls merged."""
        if not self._pending or len(self._pending) < self._active:
            return
        pending, self._pending = self._pending, []
        groups: dict[tuple, list[_Pending]] = {}
        for entry in pending:
            cfg = entry.requests[0].cfg_scale if entry.requests else None
            groups.setdefault((id(entry.backend), cfg), []).append(entry)
        for members in groups.values():
            merged = [request for entry in members for request in entry.requests]
            try:
                made = members[0].backend.generate_codes(merged, members[0].report) if merged else []
                self.calls.append(len(merged))
                start = 0
                for entry in members:
                    entry.result, start = made[start:start + len(entry.requests)], start + len(entry.requests)
            except BaseException as exc:  # noqa: BLE001 - each job of the pass gets the failure
                for entry in members:
                    entry.error = exc
            for entry in members:
                entry.done = True
        self._cond.notify_all()


class BatchedLM:
    """An LM backend whose `generate_codes` goes through a CodesBatcher; the rest is the backend's."""

    def __init__(self, backend: Any, batcher: CodesBatcher):
        self._backend, self._batcher = backend, batcher

    def generate_codes(self, requests: list[CodesRequest], report: TokenReport | None = None) -> list[str]:
        return self._batcher.codes(self._backend, requests, report)

    def generate_metadata(self, request, report: TokenReport | None = None) -> str:
        with self._batcher._serial:
            return self._backend.generate_metadata(request, report)

    def generate_text(self, request, report: TokenReport | None = None) -> str:
        with self._batcher._serial:
            return self._backend.generate_text(request, report)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


__all__ = ["BatchedLM", "CodesBatcher"]

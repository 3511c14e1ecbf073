"""One LM pass for the audio codes of several jobs (issue 18): `run_batch` plans each job's LM stage in
a thread of its own with its LM backend wrapped (`CodesBatcher.wrap`); a job's `generate_codes` call
waits until every job still planning has made its own (or finished), and then one call per backend
and `cfg_scale` runs the rows of all of them, each row with its own prompt, seed and length. The
metadata and text calls (one sequence each) run one at a time, as before. Each row's result is what
its job alone gets, up to the floating-point rounding of a batch with other prompt lengths."""

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.lm.backend import CodesRequest, TokenReport
from pipeline.rendezvous import Rendezvous


@dataclass(eq=False)
class _Pending:
    backend: Any
    requests: list[CodesRequest]
    report: TokenReport | None
    result: list[str] | None = None
    error: BaseException | None = None
    done: bool = False


class CodesBatcher(Rendezvous):
    """The audio-code calls of `participants` planning threads (`pipeline.rendezvous`), merged per
    backend and cfg_scale."""

    def __init__(self, participants: int):
        super().__init__(participants)
        self.calls: list[int] = []  # rows of every merged generate_codes call made
        self.serial = threading.Lock()  # the single-sequence calls (BatchedLM), one at a time

    def wrap(self, backend: Any) -> "BatchedLM":
        return BatchedLM(backend, self)

    def codes(self, backend: Any, requests: Sequence[CodesRequest], report: TokenReport | None) -> list[str]:
        return self.submit(_Pending(backend, list(requests), report))

    def run_together(self, pending: list[_Pending]) -> None:
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
            except BaseException as exc:  # noqa: BLE001 - each job of this pass gets the failure
                for entry in members:
                    entry.error = exc


class BatchedLM:
    """An LM backend whose `generate_codes` goes through a CodesBatcher; the rest is the backend's."""

    def __init__(self, backend: Any, batcher: CodesBatcher):
        self._backend, self._batcher = backend, batcher

    def generate_codes(self, requests: list[CodesRequest], report: TokenReport | None = None) -> list[str]:
        return self._batcher.codes(self._backend, requests, report)

    def generate_metadata(self, request, report: TokenReport | None = None) -> str:
        with self._batcher.serial:
            return self._backend.generate_metadata(request, report)

    def generate_text(self, request, report: TokenReport | None = None) -> str:
        with self._batcher.serial:
            return self._backend.generate_text(request, report)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


__all__ = ["BatchedLM", "CodesBatcher"]

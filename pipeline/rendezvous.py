"""Work of several jobs done together by threads that meet (issue 18): each job runs its own code in a
thread of its own (`each_in_a_thread`), and where that code makes the expensive call (the LM's audio
codes, the DiT's decoder) it hands the call to a `Rendezvous`, which runs the calls of all jobs as one
once every job still running has made its own (`run_together`), and hands each its part back."""

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch


class Rendezvous:
    """The calls of `participants` threads, run together. Each thread calls `leave()` when its work is
    over (its calls no longer awaited) and `fail()` when it crashed (the others' calls raise it)."""

    def __init__(self, participants: int):
        self._cond = threading.Condition()
        self._active = participants
        self._pending: list[Any] = []
        self._failed: BaseException | None = None

    def run_together(self, pending: list[Any]) -> None:
        """Set each entry's `result` (subclasses); what it raises goes to every entry."""
        raise NotImplementedError

    def submit(self, entry: Any) -> Any:
        """Wait for `entry`'s turn (entries have `result`, `error`, `done`) and return its result."""
        with self._cond:
            if self._failed is not None:
                raise self._failed
            self._pending.append(entry)
            self._run_when_all_wait()
            while not entry.done:
                self._cond.wait()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._run_when_all_wait()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._failed = error
            for entry in self._pending:
                entry.error, entry.done = error, True
            self._pending = []
            self._cond.notify_all()

    def _run_when_all_wait(self) -> None:
        """With the lock held: once every active thread waits here, run their calls."""
        if not self._pending or len(self._pending) < self._active:
            return
        pending, self._pending = self._pending, []
        try:
            self.run_together(pending)
        except BaseException as exc:  # noqa: BLE001 - every entry of the call gets the failure
            for entry in pending:
                entry.error = exc
        for entry in pending:
            entry.done = True
        self._cond.notify_all()


def each_in_a_thread(items: Sequence[Any], work: Callable[[Any], Any], rendezvous: Rendezvous) -> list[Any]:
    """`work(item)` for every item, each in a thread of its own (in inference mode, which is per
    thread), meeting at `rendezvous`; their results in order. What one raises stops the others at
    their next call and is raised here."""
    results: list[Any] = [None] * len(items)
    crashed: list[BaseException] = []

    def run(index: int, item: Any) -> None:
        try:
            with torch.inference_mode():
                results[index] = work(item)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
            crashed.append(exc)
            rendezvous.fail(exc)
        finally:
            rendezvous.leave()

    threads = [threading.Thread(target=run, args=(i, item), daemon=True) for i, item in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if crashed:
        raise crashed[0]
    return results


__all__ = ["Rendezvous", "each_in_a_thread"]

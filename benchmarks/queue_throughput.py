"""Queue throughput and latency: our job store against pgqueuer and procrastinate, side by side.

For each system, on its own fresh database of one Postgres server:
  * submit/s (single): P processes each submit jobs one statement at a time (how the API submits);
  * submit/s (batch):  one process submits batches of --batch jobs;
  * drain/s:           W worker processes claim and complete --jobs no-op jobs, batch --batch;
  * latency:           W idle worker processes; one submitter paces --paced jobs --interval ms
                       apart; the time from the submit call to the job starting (p50, p99).
Our figures use the real statements: claim with leases and attempts, fenced batch completion.

    python benchmarks/queue_throughput.py [--url postgresql://...] [--workers 2] [--jobs 20000] [--rounds 3]
"""

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import JobStore, JobWakeups, NewJob, make_engine  # noqa: E402
from migrations import upgrade  # noqa: E402
from scratch_database import bench_server, scratch_database  # noqa: E402

ENTRYPOINT = "noop"


# --- our job store -------------------------------------------------------------------------------


class Ours:
    name = "acestep (ours)"

    @staticmethod
    def setup(url: str) -> None:
        upgrade(url)

    @staticmethod
    def submit_single(url: str, n: int, gate: "Gate") -> None:
        store = JobStore(make_engine(url, pool_size=1))
        store.stats()
        gate.start()
        for _ in range(n):
            store.submit(NewJob(request={}))
        gate.finish(n)

    @staticmethod
    def submit_batches(url: str, n: int, batch: int) -> None:
        store = JobStore(make_engine(url, pool_size=1))
        for start in range(0, n, batch):
            store.submit_many([NewJob(request={}) for _ in range(min(batch, n - start))])

    @staticmethod
    def drain(url: str, batch: int, gate: "Gate") -> None:
        store = JobStore(make_engine(url, pool_size=1, index_plans=True))  # as the worker's store is
        worker = f"bench-{os.getpid()}"
        store.stats()  # opens the connection before the clock starts
        gate.start()
        processed = 0
        while jobs := store.claim(worker, batch):
            processed += len(store.complete_many([(job, {}) for job in jobs], worker))
        gate.finish(processed)

    @staticmethod
    def listen(url: str, batch: int, ready, latencies) -> None:
        store = JobStore(make_engine(url, pool_size=1, index_plans=True))  # as the worker's store is
        worker = f"bench-{os.getpid()}"
        with JobWakeups(url) as wakeups:
            store.stats()
            ready.put(1)
            while True:
                jobs = store.claim(worker, batch)
                started = time.monotonic()
                for job in jobs:
                    latencies.put(started - job.request["t"])
                store.complete_many([(job, {}) for job in jobs], worker)
                if not jobs:
                    wakeups.wait(1.0)

    @staticmethod
    def paced(url: str, count: int, interval: float) -> None:
        store = JobStore(make_engine(url, pool_size=1))
        for _ in range(count):
            store.submit(NewJob(request={"t": time.monotonic()}))
            time.sleep(interval)


# --- pgqueuer -------------------------------------------------------------------------------------


class PgQueuer:
    name = "pgqueuer"

    @staticmethod
    async def _queries(url: str):
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        return Queries(AsyncpgDriver(await asyncpg.connect(url)))

    @classmethod
    def setup(cls, url: str) -> None:
        async def main():
            await (await cls._queries(url)).install()

        asyncio.run(main())

    @classmethod
    def submit_single(cls, url: str, n: int, gate: "Gate") -> None:
        async def main():
            queries = await cls._queries(url)
            await asyncio.to_thread(gate.start)
            for _ in range(n):
                await queries.enqueue(ENTRYPOINT, None)

        asyncio.run(main())
        gate.finish(n)

    @classmethod
    def submit_batches(cls, url: str, n: int, batch: int) -> None:
        async def main():
            queries = await cls._queries(url)
            for start in range(0, n, batch):
                size = min(batch, n - start)
                await queries.enqueue([ENTRYPOINT] * size, [None] * size, [0] * size)

        asyncio.run(main())

    @staticmethod
    async def _manager(url: str, on_job):
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries, QueueManager

        manager = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(url))))
        manager.entrypoint(ENTRYPOINT)(on_job)
        return manager

    @classmethod
    def drain(cls, url: str, batch: int, gate: "Gate") -> None:
        from pgqueuer.types import QueueExecutionMode

        processed = 0

        async def on_job(job) -> None:
            nonlocal processed
            processed += 1

        async def main():
            manager = await cls._manager(url, on_job)
            await asyncio.to_thread(gate.start)
            await manager.run(batch_size=batch, mode=QueueExecutionMode.drain)

        asyncio.run(main())
        gate.finish(processed)

    @classmethod
    def listen(cls, url: str, batch: int, ready, latencies) -> None:
        async def on_job(job) -> None:
            latencies.put(time.monotonic() - float(job.payload.decode()))

        async def main():
            manager = await cls._manager(url, on_job)
            ready.put(1)
            await manager.run(batch_size=batch)

        asyncio.run(main())

    @classmethod
    def paced(cls, url: str, count: int, interval: float) -> None:
        async def main():
            queries = await cls._queries(url)
            for _ in range(count):
                await queries.enqueue(ENTRYPOINT, str(time.monotonic()).encode())
                await asyncio.sleep(interval)

        asyncio.run(main())


# --- procrastinate --------------------------------------------------------------------------------


class Procrastinate:
    name = "procrastinate"

    @staticmethod
    def _app(url: str, on_job=None):
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        app.task(name=ENTRYPOINT)(on_job or (lambda **kwargs: None))
        return app

    @classmethod
    def setup(cls, url: str) -> None:
        async def main():
            app = cls._app(url)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(main())

    @classmethod
    def submit_single(cls, url: str, n: int, gate: "Gate") -> None:
        async def main():
            app = cls._app(url)
            async with app.open_async():
                task = app.tasks[ENTRYPOINT]
                await asyncio.to_thread(gate.start)
                for _ in range(n):
                    await task.defer_async()

        asyncio.run(main())
        gate.finish(n)

    @classmethod
    def submit_batches(cls, url: str, n: int, batch: int) -> None:
        async def main():
            app = cls._app(url)
            async with app.open_async():
                task = app.tasks[ENTRYPOINT]
                for start in range(0, n, batch):
                    await task.batch_defer_async(*({} for _ in range(min(batch, n - start))))

        asyncio.run(main())

    @classmethod
    def drain(cls, url: str, batch: int, gate: "Gate") -> None:
        processed = 0

        def on_job(**kwargs) -> None:
            nonlocal processed
            processed += 1

        async def main():
            app = cls._app(url, on_job)
            async with app.open_async():
                await asyncio.to_thread(gate.start)
                await app.run_worker_async(concurrency=min(batch, 10), wait=False)

        asyncio.run(main())
        gate.finish(processed)

    @classmethod
    def listen(cls, url: str, batch: int, ready, latencies) -> None:
        def on_job(t: float) -> None:
            latencies.put(time.monotonic() - t)

        async def main():
            app = cls._app(url, on_job)
            async with app.open_async():
                ready.put(1)
                await app.run_worker_async(concurrency=min(batch, 10))

        asyncio.run(main())

    @classmethod
    def paced(cls, url: str, count: int, interval: float) -> None:
        async def main():
            app = cls._app(url)
            async with app.open_async():
                task = app.tasks[ENTRYPOINT]
                for _ in range(count):
                    await task.defer_async(t=time.monotonic())
                    await asyncio.sleep(interval)

        asyncio.run(main())


SYSTEMS = {"ours": Ours, "pgqueuer": PgQueuer, "procrastinate": Procrastinate}


# --- harness --------------------------------------------------------------------------------------


@dataclass
class Figures:
    submit_single: float = 0.0
    submit_batch: float = 0.0
    drain: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    notes: list[str] = field(default_factory=list)


def analyze(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def queued_count(url: str, system: str) -> int:
    table = {"ours": "jobs WHERE status = 'queued'", "pgqueuer": "pgqueuer", "procrastinate": "procrastinate_jobs WHERE status = 'todo'"}
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table[system]}").fetchone()[0]


class Gate:
    """Starts the clock once every process is connected and ready; collects their counts."""

    def __init__(self, ctx):
        self._ready, self._done, self._go = ctx.Queue(), ctx.Queue(), ctx.Event()

    def start(self) -> None:
        self._ready.put(1)
        self._go.wait()

    def finish(self, count: int) -> None:
        self._done.put(count)

    def run(self, ctx, target, arg_lists) -> tuple[int, float]:
        """Run one process per argument list; returns (total count, seconds from go to last finish)."""
        procs = [ctx.Process(target=target, args=(*args, self)) for args in arg_lists]
        for p in procs:
            p.start()
        for _ in procs:
            self._ready.get(timeout=120)
        start = time.perf_counter()
        self._go.set()
        count = sum(self._done.get(timeout=600) for _ in procs)
        elapsed = time.perf_counter() - start
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"{target.__qualname__} exited with {p.exitcode}")
        return count, elapsed


def measure(system: str, server_url: str, args, ctx) -> Figures:
    impl = SYSTEMS[system]
    figures = Figures()
    with scratch_database(server_url, f"bench_{system}", migrate=False) as url:
        impl.setup(url)
        # Submit, one statement per job, from W processes at once.
        count, elapsed = Gate(ctx).run(ctx, impl.submit_single, [(url, args.single_jobs // args.workers)] * args.workers)
        figures.submit_single = count / elapsed
        # Batch submit: these are the jobs the drain phase works through.
        start = time.perf_counter()
        impl.submit_batches(url, args.jobs, args.batch)
        figures.submit_batch = args.jobs / (time.perf_counter() - start)
        total = queued_count(url, system)
        if args.analyze:
            analyze(url)  # a live queue has statistics; a table filled a second ago does not

        processed, elapsed = Gate(ctx).run(ctx, impl.drain, [(url, args.batch)] * args.workers)
        figures.drain = processed / elapsed
        if processed != total or queued_count(url, system) != 0:
            figures.notes.append(f"drain processed {processed} of {total} queued jobs")

        ready, latencies = ctx.Queue(), ctx.Queue()
        listeners = [ctx.Process(target=impl.listen, args=(url, args.batch, ready, latencies)) for _ in range(args.workers)]
        for p in listeners:
            p.start()
        for _ in listeners:
            ready.get(timeout=120)
        time.sleep(1.0)
        impl.paced(url, args.paced, args.interval / 1000)
        samples = sorted(latencies.get(timeout=60) for _ in range(args.paced))
        for p in listeners:
            p.terminate()
            p.join()
        figures.p50_ms = 1000 * statistics.median(samples)
        figures.p99_ms = 1000 * samples[min(len(samples) - 1, int(0.99 * len(samples)))]
    return figures


def report(results: dict[str, Figures], args) -> None:
    print()
    print(f"medians of {args.rounds} rounds: workers={args.workers} jobs={args.jobs} batch={args.batch} "
          f"single={args.single_jobs} paced={args.paced}@{args.interval}ms  ({os.cpu_count()} CPUs)")
    header = f"{'system':<16}{'submit/s single':>16}{'submit/s batch':>16}{'drain jobs/s':>14}{'p50 ms':>9}{'p99 ms':>9}"
    print(header)
    print("-" * len(header))
    for system, f in results.items():
        print(f"{SYSTEMS[system].name:<16}{f.submit_single:>16.0f}{f.submit_batch:>16.0f}{f.drain:>14.0f}"
              f"{f.p50_ms:>9.2f}{f.p99_ms:>9.2f}")
        for note in f.notes:
            print(f"  ! {note}")
    ours = results.get("ours")
    if ours is None:
        return
    for system, f in results.items():
        if system == "ours":
            continue
        print(f"ours / {SYSTEMS[system].name}: submit single x{ours.submit_single / f.submit_single:.2f}, "
              f"batch x{ours.submit_batch / f.submit_batch:.2f}, drain x{ours.drain / f.drain:.2f}, "
              f"p50 latency x{f.p50_ms / ours.p50_ms:.2f} faster, p99 x{f.p99_ms / ours.p99_ms:.2f} faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Postgres server URL (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=20000, help="jobs drained")
    parser.add_argument("--single-jobs", type=int, default=4000, help="jobs submitted one statement at a time")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--paced", type=int, default=300, help="jobs in the latency run")
    parser.add_argument("--interval", type=float, default=10.0, help="ms between paced submits")
    parser.add_argument("--systems", default="ours,pgqueuer,procrastinate")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, systems interleaved; medians reported")
    parser.add_argument("--no-analyze", dest="analyze", action="store_false",
                        help="drain right after the burst, before any ANALYZE (the tables' statistics as autovacuum left them)")
    args = parser.parse_args()

    server_url = bench_server(args.url)
    ctx = mp.get_context("spawn")
    rounds: dict[str, list[Figures]] = {system: [] for system in args.systems.split(",")}
    for round_no in range(1, args.rounds + 1):
        for system, figures in rounds.items():
            figures.append(measure(system, server_url, args, ctx))
            f = figures[-1]
            print(f"round {round_no} {system}: submit {f.submit_single:.0f}/s, batch {f.submit_batch:.0f}/s, "
                  f"drain {f.drain:.0f}/s, p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms", flush=True)
    report({system: median_figures(figures) for system, figures in rounds.items()}, args)


def median_figures(runs: list[Figures]) -> Figures:
    """Each figure's median over the rounds (notes from every round kept)."""
    return Figures(
        submit_single=statistics.median(f.submit_single for f in runs),
        submit_batch=statistics.median(f.submit_batch for f in runs),
        drain=statistics.median(f.drain for f in runs),
        p50_ms=statistics.median(f.p50_ms for f in runs),
        p99_ms=statistics.median(f.p99_ms for f in runs),
        notes=[note for f in runs for note in f.notes],
    )


if __name__ == "__main__":
    main()

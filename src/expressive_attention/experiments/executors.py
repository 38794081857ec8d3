"""Where the ladder's runs execute: in this process ("serial"), in a local process pool ("pool"), or as
Ray tasks on a local or remote Ray cluster ("ray"). Every executor has one method,

    executor.run(jobs, finish, progress)

which trains each Job and calls finish(index, record, error) in the driver as runs complete (record
None and error a traceback for a failed run). The driver alone writes results.jsonl, so resume,
skip-finished, the report and the plot do not depend on the executor. Ray is imported only by
RayExecutor.run (it is the optional extra `expressive-attention[ray]`).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import torch

from ..tasks import import_task_modules
from .train import RunConfig, train_run

EXECUTORS = ("serial", "pool", "ray")

Finish = Callable[[int, "dict | None", "str | None"], None]


@dataclass
class Job:
    index: int  # position in the preset's grid (passed back to finish)
    config: dict  # RunConfig.to_dict()
    checkpoint: str | None  # where the driver wants the checkpoint (None: no checkpoint)
    label: str  # for progress lines


def _tqdm():
    from tqdm.auto import tqdm
    return tqdm


# worker state: where progress messages go (set per process / per run)
_progress_q = None


def _init_worker(progress_q, threads: int | None, imports: Sequence[str], sys_path: Sequence[str],
                 ignore_sigint: bool = False) -> None:
    """Set up a worker process (pool) or a Ray task: the driver's import path, user modules that
    register their own tasks, torch threads."""
    global _progress_q
    _progress_q = progress_q
    if ignore_sigint:  # a pool worker: Ctrl-C is the parent's to handle (it ends the pool)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    import_task_modules(imports)
    if threads:
        torch.set_num_threads(threads)


def _run_point(index: int, cfg_dict: dict, checkpoint: str | None, worker: str | None = None,
               device: str = "cpu") -> tuple[int, dict | None, str | None]:
    """Train one grid point; never raises: (index, record, error traceback)."""
    worker = worker or str(os.getpid())

    def progress(step, total, loss):
        if _progress_q is not None:
            try:
                _progress_q.put((index, worker, step, total, loss))
            except Exception:  # progress is best effort; never fail a run over it
                pass

    try:
        cfg = RunConfig.from_dict(cfg_dict)
        return index, train_run(cfg, checkpoint=checkpoint, progress=progress, device=device), None
    except Exception:  # reported by the driver; the sweep goes on
        return index, None, traceback.format_exc()


class RunBars:
    """One tqdm line per worker under the sweep's bar: the steps and loss of the run it is on."""

    def __init__(self, labels: dict[int, str], enabled: bool):
        self.labels, self.enabled, self.bars = labels, enabled, {}

    def update(self, msgs) -> None:
        """msgs: (index, worker, step, total, loss) tuples, in arrival order."""
        tqdm = _tqdm()
        for index, worker, step, total, loss in msgs:
            b = self.bars.get(worker)
            if b is None:
                b = self.bars[worker] = tqdm(total=total, position=len(self.bars) + 1, leave=False,
                                             disable=not self.enabled, dynamic_ncols=True)
                b.run = None
            if b.run != index:  # this worker started another run
                b.reset(total=total)
                b.run = index
                b.set_description_str(self.labels.get(index, str(index)), refresh=False)
            b.n = step
            b.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        for b in self.bars.values():
            b.refresh()

    def close(self) -> None:
        for b in self.bars.values():
            b.close()
        self.bars = {}


class SerialExecutor:
    """Every run in this process, one after the other."""

    name = "serial"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def describe(self) -> str:
        return "serial (in-process)"

    def run(self, jobs: Sequence[Job], finish: Finish, progress: bool = True) -> None:
        global _progress_q
        if self.threads:
            torch.set_num_threads(self.threads)
        bars = RunBars({j.index: j.label for j in jobs}, progress)

        class _Direct:  # in-process stand-in for the progress queue
            @staticmethod
            def put(msg):
                bars.update([msg])

        try:
            for job in jobs:
                _progress_q = _Direct()
                try:
                    result = _run_point(job.index, job.config, job.checkpoint, worker="main")
                finally:
                    _progress_q = None
                finish(*result)
        finally:
            bars.close()


class PoolExecutor:
    """`workers` spawned processes on this machine, `threads` torch threads each."""

    name = "pool"

    def __init__(self, workers: int, threads: int = 1, imports: Sequence[str] = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads, self.imports = workers, threads, tuple(imports)

    def describe(self) -> str:
        return f"pool of {self.workers} workers"

    def run(self, jobs: Sequence[Job], finish: Finish, progress: bool = True) -> None:
        ctx = mp.get_context("spawn")
        progress_q = ctx.Queue()
        # The workers are started with SIGINT ignored (an ignored signal stays ignored across exec, and Python
        # then installs no KeyboardInterrupt handler): a Ctrl-C that reaches a worker still starting up, before
        # its initializer, would otherwise kill it, and the pool would start a replacement that terminate()
        # can miss (a sweep that never ends). Ctrl-C is the parent's to handle.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            pool = ctx.Pool(self.workers, initializer=_init_worker,
                            initargs=(progress_q, self.threads, self.imports, tuple(sys.path), True))
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        bars = RunBars({j.index: j.label for j in jobs}, progress)
        try:
            pending = [pool.apply_async(_run_point, (j.index, j.config, j.checkpoint)) for j in jobs]
            while pending:
                msgs = []
                try:  # wait briefly for progress, then take what is queued (bounded: results are not starved)
                    msgs.append(progress_q.get(timeout=0.2))
                    while len(msgs) < 1000:
                        msgs.append(progress_q.get_nowait())
                except queue_mod.Empty:
                    pass
                bars.update(msgs)
                still = []
                for r in pending:
                    if r.ready():
                        finish(*r.get())
                    else:
                        still.append(r)
                pending = still
            pool.close()
        except BaseException:
            pool.terminate()  # Ctrl-C: what is in results.jsonl stays; a rerun resumes
            raise
        finally:
            pool.join()
            bars.close()


class _ProgressLog:
    """A Ray actor holding the runs' progress messages until the driver drains them."""

    def __init__(self):
        self.msgs: list = []

    def put(self, msg) -> None:
        self.msgs.append(msg)

    def drain(self) -> list:
        out, self.msgs = self.msgs, []
        return out


class _SendProgress:
    """What a Ray task's progress callback puts into: a fire-and-forget actor call. (A blocking
    ray.get inside a task would lend the task's CPU to the scheduler meanwhile, which then starts
    more runs than --cpus-per-run allows.)"""

    def __init__(self, log):
        self.log = log

    def put(self, msg) -> None:
        self.log.put.remote(msg)


def _ray_task(index: int, cfg_dict: dict, checkpoint: str | None, ship_checkpoint: bool, progress_log,
              threads: int | None, imports: Sequence[str], sys_path: Sequence[str], device: str):
    """The body of one Ray task: (index, record, error, checkpoint bytes or None). device "cuda" is
    the GPU Ray gave the task (it sets CUDA_VISIBLE_DEVICES).

    ship_checkpoint: train into a temporary file on the worker's node and return its bytes (the
    driver writes them to `checkpoint`); otherwise write `checkpoint` directly (shared storage)."""
    import ray

    ctx = ray.get_runtime_context()
    worker = f"{ctx.get_node_id()[:6]}:{os.getpid()}"
    _init_worker(None if progress_log is None else _SendProgress(progress_log), threads, imports, sys_path)
    if checkpoint is None or not ship_checkpoint:
        return (*_run_point(index, cfg_dict, checkpoint, worker, device), None)
    with tempfile.TemporaryDirectory(prefix="ea-ckpt-") as tmp:
        path = Path(tmp) / Path(checkpoint).name
        index, record, error = _run_point(index, cfg_dict, str(path), worker, device)
        return index, record, error, (path.read_bytes() if error is None else None)


def _write_atomic(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)


class RayExecutor:
    """Each run a Ray task (`cpus_per_run` CPUs, `gpus_per_run` GPUs, as many torch threads as CPUs);
    records stream back to the driver as tasks finish. With gpus_per_run > 0 the runs train on the GPU.

    address: a Ray cluster ("host:port", "ray://host:10001", "auto"); None means Ray's default:
      RAY_ADDRESS if set, else a Ray instance already started on this machine, else a new local one.
    ship_checkpoints: each task trains into a temporary file on its node and returns the checkpoint's
      bytes, which the driver writes to the path it asked for (under --out). False when the
      checkpoint paths are on storage every node can write (run_ladder's storage=, --storage): the
      tasks then write there directly.
    max_retries: Ray re-runs a task whose worker process or node died, up to this many times; a run
      that raises (a bug, a diverging loss) is not retried: it is deterministic, so it would fail again.
    init_kwargs: passed to ray.init (e.g. num_cpus=2 for a small local instance). If Ray is already
      initialised in this process, it is used as it is (and not shut down afterwards).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
                 ship_checkpoints: bool = True, max_retries: int = 3, imports: Sequence[str] = (),
                 init_kwargs: dict | None = None):
        if not cpus_per_run > 0:
            raise ValueError(f"cpus_per_run must be > 0, got {cpus_per_run!r}")
        if not gpus_per_run >= 0:
            raise ValueError(f"gpus_per_run must be >= 0, got {gpus_per_run!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        self.address, self.cpus_per_run, self.gpus_per_run = address, cpus_per_run, gpus_per_run
        self.ship_checkpoints = ship_checkpoints
        self.max_retries, self.imports, self.init_kwargs = max_retries, tuple(imports), dict(init_kwargs or {})

    def describe(self) -> str:
        where = self.address or os.environ.get("RAY_ADDRESS") or "local instance"
        gpus = f", {self.gpus_per_run:g} GPU" if self.gpus_per_run else ""
        return f"ray ({where}; {self.cpus_per_run:g} CPU{gpus} per run)"

    @staticmethod
    def _ray():
        from ..extras import require
        require("ray", "the ray executor")  # MissingExtra (an ImportError) naming the pip command
        import ray
        return ray

    def run(self, jobs: Sequence[Job], finish: Finish, progress: bool = True) -> None:
        ray = self._ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, **self.init_kwargs)
        try:
            self._run(ray, jobs, finish, progress)
        finally:
            if started:
                ray.shutdown()

    def _check_resources(self, ray) -> None:
        """Warn when no run fits in the cluster as it is (Ray would wait for nodes to join)."""
        have = ray.cluster_resources()
        if have.get("CPU", 0) < self.cpus_per_run or have.get("GPU", 0) < self.gpus_per_run:
            warnings.warn(f"each run asks Ray for {self.cpus_per_run:g} CPUs and {self.gpus_per_run:g} GPUs, but the "
                          f"cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs now: the runs "
                          "wait until nodes that fit join (an autoscaling cluster); Ctrl-C if none will",
                          RuntimeWarning, stacklevel=4)

    def _run(self, ray, jobs, finish, progress) -> None:
        task = ray.remote(_ray_task).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                             max_retries=self.max_retries, retry_exceptions=False)
        threads = max(1, int(self.cpus_per_run))
        if jobs:
            self._check_resources(ray)
        progress_log = ray.remote(num_cpus=0)(_ProgressLog).remote() if progress else None
        by_ref = {task.remote(j.index, j.config, j.checkpoint, self.ship_checkpoints, progress_log, threads,
                              self.imports, tuple(sys.path), "cuda" if self.gpus_per_run else "cpu"): j
                  for j in jobs}
        bars = RunBars({j.index: j.label for j in jobs}, progress)
        try:
            while by_ref:
                ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0.2)
                if progress_log is not None:
                    bars.update(ray.get(progress_log.drain.remote()))
                for ref in ready:
                    job = by_ref.pop(ref)
                    try:
                        index, record, error, blob = ray.get(ref)
                    except ray.exceptions.RayError:  # lost more than max_retries times, or unschedulable
                        finish(job.index, None, traceback.format_exc())
                        continue
                    if record is not None and blob is not None:
                        _write_atomic(Path(job.checkpoint), blob)
                        record["checkpoint"] = job.checkpoint
                    finish(index, record, error)
        except BaseException:
            for ref in by_ref:  # Ctrl-C: stop what is running; results.jsonl keeps what finished
                ray.cancel(ref, force=True)
            raise
        finally:
            bars.close()
            if progress_log is not None:
                ray.kill(progress_log)


def make_executor(name: str, *, workers: int = 1, threads: int | None = None, imports: Sequence[str] = (),
                  **ray_options) -> SerialExecutor | PoolExecutor | RayExecutor:
    """An executor by name; ray_options (address, cpus_per_run, gpus_per_run, ship_checkpoints,
    max_retries, init_kwargs) belong to "ray" only."""
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")
    if name == "ray":
        return RayExecutor(imports=imports, **ray_options)
    if ray_options:
        raise ValueError(f"{sorted(ray_options)} apply to the ray executor only, not {name!r}")
    if name == "pool":
        return PoolExecutor(workers, threads or 1, imports)
    return SerialExecutor(threads)

"""Run the per-image function over many inputs, results in input order.

``local``: a process pool (OpenCV's selective search scales with processes, not threads). A worker
that dies (OpenCV can abort or crash on pathological inputs) does not stop the build: the items
that were in flight are retried one at a time in a fresh process and the one that kills it again
becomes a ``worker_crashed`` reject.

``ray``: the same function as Ray tasks, on a local instance or a cluster (``address``); every
node needs ssl-cli installed in the same environment. A Ray worker process runs background
threads that call the C library's ``rand()``, which OpenCV's selective search also draws its rank
order from; so each Ray worker hands the image to one clean child process of its own (started
once, reused), which keeps the output byte-identical to the local engine and isolates crashes.

A Ray-level failure is never an image's fault: a lost node, a killed Ray worker or a lost result
object (the image crashing its clean child is handled inside the task). The engine resubmits such
an item, up to :data:`RAY_RESUBMITS` times, to whatever nodes remain, so a build that loses a node
finishes on the others with every image accounted for once. Past that, or when the driver loses
the cluster itself (the head node), the build stops with :class:`ClusterLost`; the shards finished
so far are kept and a rerun resumes from them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .process import Reject
from .sources import SourceItem

ENGINES = ("local", "ray")

ItemFn = Callable[[SourceItem, Any], Any]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _crash_reject(item: SourceItem, what: str) -> Reject:
    return Reject(item.key, item.source, "worker_crashed", what)


def _init_worker() -> None:
    # one OpenCV thread per process: parallelism comes from the processes
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _exit_with_parent()


_PARENT_POLL_S = 1.0


def _exit_with_parent() -> None:
    """A worker ends when the process that started it dies, also by ``kill -9`` (which runs no
    clean-up in the parent): on Linux the kernel sends SIGTERM at once (``prctl
    PR_SET_PDEATHSIG``); everywhere a daemon thread sees the parent change and exits within
    :data:`_PARENT_POLL_S`."""

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # no prctl here: the watch thread below is the guarantee

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class LocalEngine:
    def __init__(self, workers: int | None = None, window: int | None = None):
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.window = window or 4 * self.workers
        self._ctx = multiprocessing.get_context("spawn")

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=self._ctx, initializer=_init_worker)

    def _isolated(self, fn: ItemFn, item: SourceItem, params: Any) -> Any:
        """``item`` alone in a fresh process: the retry of an image whose worker died."""
        with self._pool(1) as pool:
            try:
                return pool.submit(fn, item, params).result()
            except BrokenProcessPool:
                return _crash_reject(
                    item,
                    "the worker process died while processing this image, also when retried alone",
                )

    def map(self, fn: ItemFn, items: Iterable[SourceItem], params: Any) -> Iterator[Any]:
        it = iter(items)
        pool = self._pool(self.workers)
        pending: deque[tuple[SourceItem, Future]] = deque()
        try:
            while True:
                while len(pending) < self.window:
                    item = next(it, None)
                    if item is None:
                        break
                    pending.append((item, pool.submit(fn, item, params)))
                if not pending:
                    return
                item, fut = pending[0]
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    # some in-flight item killed its worker: find it by running each alone
                    pool.shutdown(wait=False, cancel_futures=True)
                    suspects = [i for i, _ in pending]
                    pending.clear()
                    for suspect in suspects:
                        yield self._isolated(fn, suspect, params)
                    pool = self._pool(self.workers)
                    continue
                pending.popleft()
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_ray_child: ProcessPoolExecutor | None = None


class _NotVisible:
    """A Ray worker's answer for an input file it cannot see (a node without the source)."""

    def __init__(self, host: str):
        self.host = host


def _in_clean_child(fn: ItemFn, item: SourceItem, params: Any) -> Any:
    """Run ``fn`` in this process's single spawned child (no foreign threads there)."""
    global _ray_child
    if item.data is None and not os.path.exists(item.path):
        return _NotVisible(socket.gethostname())
    if _ray_child is None:
        _ray_child = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
        )
    for _ in range(2):  # a crash is retried once, in a fresh child
        try:
            return _ray_child.submit(fn, item, params).result()
        except BrokenProcessPool:
            _ray_child = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
            )
    return _crash_reject(item, "the worker process died twice while processing this image")


RAY_RESUBMITS = 3


RAY_HEALTH_EVERY_S = 2.0
RAY_HEAD_GRACE_S = 15.0  # Ray's own driver ends after 60 s without its GCS


def _gcs_address(ray: Any) -> str | None:
    try:
        return ray._private.worker.global_worker.node.gcs_address
    except AttributeError:  # a Ray client (ray://) connection, or an API that moved
        return None


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
        return True
    except (OSError, ValueError):
        return False


class ClusterLost(RuntimeError):
    """The Ray cluster lost the work for an item more often than the engine resubmits it."""


class RayEngine:
    def __init__(self, address: str | None = None, window: int | None = None):
        try:
            import ray
        except ImportError:
            raise RuntimeError(
                "--engine ray needs Ray: pip install 'ssl-cli[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        self.address = address
        self.window = window
        # one build's watch of the head node, set by map
        self._gcs: str | None = None  # the head's control store (None: not watched)
        self._lost_head = False
        self._head_asked: float | None = None  # when the head's control store was last asked
        self._head_silent_since: float | None = None  # since when it has not answered

    def _get(self, ref: Any, item: SourceItem) -> Any:
        """``ray.get`` that notices a lost head node: Ray itself ends the driver's process a
        minute after its cluster's control store (GCS, on the head) stops answering, with a
        message about GCS; this raises :class:`ClusterLost` naming the build's state first.
        The head is watched while results keep coming too: the nodes that remain may go on
        returning them without a head, and the build then stops on the same clock."""
        while True:
            ready, _ = self.ray.wait([ref], timeout=RAY_HEALTH_EVERY_S)
            if self._gcs is not None:
                self._watch_head(item)
            if ready:
                return self.ray.get(ref)

    def _watch_head(self, item: SourceItem) -> None:
        """Ask the head's control store at most every :data:`RAY_HEALTH_EVERY_S`; once it has
        not answered for :data:`RAY_HEAD_GRACE_S` in a row, across items, raise
        :class:`ClusterLost`."""
        gcs = self._gcs
        now = time.monotonic()
        if self._head_asked is not None and now - self._head_asked < RAY_HEALTH_EVERY_S:
            return
        self._head_asked = now
        if _reachable(gcs):
            self._head_silent_since = None
            return
        if self._head_silent_since is None:
            self._head_silent_since = now
        if now - self._head_silent_since >= RAY_HEAD_GRACE_S:
            self._lost_head = True
            raise ClusterLost(
                f"the Ray head node at {gcs} stopped answering for "
                f"{RAY_HEAD_GRACE_S:.0f} s while {item.source} was in flight; the build "
                "stops here, keeps its finished shards, and a rerun with the same command "
                "(on a working cluster, or --engine local) resumes from them"
            )

    def map(self, fn: ItemFn, items: Iterable[SourceItem], params: Any) -> Iterator[Any]:
        ray = self.ray
        self._lost_head = False
        self._head_asked = self._head_silent_since = None
        started_here = not ray.is_initialized()
        if started_here:
            # no address: RAY_ADDRESS when set (a job on a cluster), else a new instance on this
            # machine, never a cluster some other `ray start` left running here
            address = self.address or os.environ.get("RAY_ADDRESS") or "local"
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            self._gcs = _gcs_address(ray)
            window = self.window or 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
            # Ray's own retries are off: a lost task is resubmitted by _result, counted and said
            task = ray.remote(num_cpus=1, max_retries=0)(_in_clean_child)
            params_ref = ray.put(params)

            def submit(item: SourceItem) -> Any:
                return task.remote(fn, item, params_ref)

            pending: deque[tuple[SourceItem, Any]] = deque()
            it = iter(items)
            while True:
                while len(pending) < window:
                    item = next(it, None)
                    if item is None:
                        break
                    pending.append((item, submit(item)))
                if not pending:
                    return
                item, ref = pending.popleft()
                result = self._result(ref, item, submit)
                if isinstance(result, _NotVisible):
                    if os.path.exists(item.path):
                        raise ClusterLost(
                            f"a Ray worker on host {result.host} cannot see {item.path}, which "
                            "this process reads: every node needs the source at the same path "
                            "(a shared filesystem or the same mounted bucket); the build stops "
                            "here and a rerun resumes from its finished shards"
                        )
                    result = fn(item, params)  # gone for everyone: the usual reject
                yield result
        finally:
            if started_here and not self._lost_head:  # shutting down waits on the lost head
                ray.shutdown()

    def _result(self, ref: Any, item: SourceItem, submit: Callable[[SourceItem], Any]) -> Any:
        """The result of ``item``'s task; a task a lost worker or node held is submitted again,
        up to :data:`RAY_RESUBMITS` times, each said on stderr."""
        errors = self.ray.exceptions
        lost = (
            errors.WorkerCrashedError,
            errors.NodeDiedError,
            errors.ObjectLostError,  # ObjectReconstructionFailedError among them
        )
        gone = (errors.LocalRayletDiedError, errors.RaySystemError)
        for attempt in range(RAY_RESUBMITS + 1):
            try:
                return self._get(ref, item)
            except lost as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if attempt == RAY_RESUBMITS:
                    raise ClusterLost(
                        f"the Ray cluster lost the task for {item.source} {RAY_RESUBMITS + 1} "
                        f"times (last: {why}); the build stops here, keeps its finished "
                        "shards, and a rerun resumes from them"
                    ) from e
                print(
                    f"ssl-cli: a Ray worker or node was lost while processing {item.source} "
                    f"({type(e).__name__}); resubmitting ({attempt + 1} of {RAY_RESUBMITS})",
                    file=sys.stderr,
                    flush=True,
                )
                ref = submit(item)
            except gone as e:
                raise ClusterLost(
                    f"the driver lost the Ray cluster while processing {item.source} "
                    f"({type(e).__name__}: {e}); the build stops here, keeps its finished "
                    "shards, and a rerun resumes from them"
                ) from e
        raise AssertionError("unreachable")  # the last attempt returns or raises


def make_engine(name: str, workers: int | None = None, address: str | None = None):
    if name == "local":
        if address:
            raise ValueError("--ray-address is only used with --engine ray")
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(address)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")

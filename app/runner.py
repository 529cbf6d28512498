"""One heavy job per kind at a time, run in a thread and streamed to the page of the visitor who
started it.

Runner.start returns a Job: the thread, its own queue of the library's callback events, its own
StopFlag (the training loops poll it every step) and its own result or error. A page holds on to
its Job, so what it shows is always its own run, even when another visitor's run starts the moment
it ends. The page's generator drains the job's queue every `interval` seconds.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time

from comcat.core.loop import StopFlag

from . import common


class Busy(Exception):
    """Another job of this kind is running."""


class Job:
    """One run: fn(callback, should_stop) in a thread, for the session `owner`."""

    def __init__(self, kind: str, owner: str | None):
        self.kind, self.owner = kind, owner
        self.stop_flag = StopFlag()
        self.events: queue.Queue = queue.Queue()
        self.result = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self.stop_flag()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def stream(self, interval: float = 0.5):
        """Yield lists of new events (possibly empty) until the job ends, then one last list."""
        while True:
            alive = self.running
            time.sleep(0 if not alive else interval)
            batch = []
            while True:
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if not alive:
                return


class Runner:
    """At most one Job of this kind at a time, for all visitors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._lock = threading.Lock()
        self.current: Job | None = None  # the job running now, or the last one

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.running

    def start(self, fn, owner: str | None = None) -> Job:
        """Run fn(callback, should_stop) in a thread for session `owner` and return its Job; raises
        Busy when a job of this kind is already running."""
        if not self._lock.acquire(blocking=False):
            mine = self.current is not None and owner == self.current.owner
            whose = "your" if mine else "another visitor's"
            raise Busy(
                f"{whose} {self.kind} job is already running: "
                "wait for it to finish" + (" or press Stop" if mine else "")
            )
        job = Job(self.kind, owner)
        busy = common.busy_name(owner)
        common.BUSY.add(busy)  # the visitor's folder does not expire while the run goes

        def work():
            try:
                job.result = fn(job.events.put, job.stop_flag)
            except BaseException as e:  # reported to the page by its stream
                job.error = e
            finally:
                common.BUSY.discard(busy)
                self._lock.release()

        context = contextvars.copy_context()  # the job runs as its visitor (common.OWNER: their folders)
        job.thread = threading.Thread(target=context.run, args=(work,), name=f"comcat-{self.kind}", daemon=True)
        self.current = job
        job.thread.start()
        return job

    def stop(self, owner: str | None = None) -> str:
        """Ask the running job to stop at its next step, if `owner` started it: 'stopping',
        'idle' (nothing runs) or 'other' (another session's job: left running)."""
        job = self.current
        if job is None or not job.running:
            return "idle"
        if owner != job.owner:
            return "other"
        job.stop_flag.set()
        return "stopping"

    def wait(self, timeout: float | None = None) -> None:
        """Until the running job (if any) ends, at most `timeout` seconds."""
        if self.current is not None:
            self.current.wait(timeout)

"""One heavy job per kind at a time, run in a thread and streamed to the page.

A Runner owns the thread, a queue of the library's callback events and the library's StopFlag,
which the training loops poll every step (should_stop). The page's generator drains the queue every `interval` seconds.
"""

from __future__ import annotations

import queue
import threading
import time

from comcat.core.loop import StopFlag


class Busy(Exception):
    """Another job of this kind is running."""


class Runner:
    def __init__(self, kind: str):
        self.kind = kind
        self._lock = threading.Lock()
        self._stop = StopFlag()
        self._events: queue.Queue = queue.Queue()
        self.result = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.owner: str | None = None  # the session that started the running job

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, fn, owner: str | None = None) -> None:
        """Run fn(callback, should_stop) in a thread for session `owner`; raises Busy when one is
        already running."""
        if not self._lock.acquire(blocking=False):
            whose = "your" if owner == self.owner else "another visitor's"
            raise Busy(
                f"{whose} {self.kind} job is already running: wait for it to finish"
                + (" or press Stop" if owner == self.owner else "")
            )
        self.owner = owner
        self._stop.clear()
        self._events = queue.Queue()
        self.result, self.error = None, None

        def work():
            try:
                self.result = fn(self._events.put, self._stop)
            except BaseException as e:  # reported to the page by stream()
                self.error = e
            finally:
                self._lock.release()

        self._thread = threading.Thread(target=work, name=f"comcat-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, owner: str | None = None) -> str:
        """Ask the running job to stop at its next step, if `owner` started it: 'stopping',
        'idle' (nothing runs) or 'other' (another session's job: left running)."""
        if not self.running:
            return "idle"
        if owner != self.owner:
            return "other"
        self._stop.set()
        return "stopping"

    def wait(self, timeout: float | None = None) -> None:
        """Until the running job (if any) ends, at most `timeout` seconds."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop()

    def stream(self, interval: float = 0.5):
        """Yield lists of new events (possibly empty) until the job ends, then one last list."""
        while True:
            alive = self.running
            time.sleep(0 if not alive else interval)
            batch = []
            while True:
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if not alive:
                return

"""One model job at a time: a FIFO queue that never drops a request, with visible position and progress.

Steering loads a model and runs it; two at once would only halve each one's
speed and double the memory, so jobs run one after another in a single worker
thread. A job is a list of steps; each step's result is visible as soon as it is
done (the clamp numbers arrive before the generations).
"""

from __future__ import annotations

import atexit

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from neuronmap.core.errors import NeuronmapError

KEEP = 200  # finished jobs kept for their pages to read


@dataclass
class Job:
    """A queued, running or finished job.

    Attributes:
        id: its number, as a string (``/api/jobs/ID``).
        steps: (label, fn) pairs; ``fn(results)`` gets the results so far and returns its own (a JSON dict).
        state: ``queued``, ``running``, ``done`` or ``error``.
        step: index of the step running (or of the last one, when finished).
        results: step key -> result, filled as each step finishes.
        error: the one-line message of a failed step.
    """

    id: str
    request: dict
    steps: list[tuple[str, str, Callable[[dict], dict]]]
    state: str = "queued"
    step: int = 0
    results: dict = field(default_factory=dict)
    error: str | None = None
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


class JobQueue:
    """A FIFO of jobs run by one worker thread (started on the first submission)."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: list[str] = []
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._closed = False

    def submit(self, request: dict, steps: list[tuple[str, str, Callable[[dict], dict]]]) -> Job:
        """Queue a job; returns at once."""
        with self._cv:
            job = Job(str(next(self._ids)), request, steps)
            self._jobs[job.id] = job
            self._pending.append(job.id)
            self._trim()
            if self._closed:
                raise NeuronmapError("the viewer is stopping: it takes no new jobs")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="neuronmap-jobs", daemon=True)
                self._worker.start()
                # Python kills daemon threads at exit; one caught inside torch aborts the process ("terminate called
                # without an active exception"), so the exit waits for the running step instead.
                atexit.register(self.close)
            self._cv.notify()
            return job

    def status(self, job_id: str) -> dict:
        """The job's state as JSON: ``{"id", "state", "position", "step", "steps", "results", "error", ...}``.

        ``position`` is the number of jobs ahead of it (0 when running or finished).

        Raises:
            NeuronmapError: no such job (finished jobs are kept up to ``KEEP``).
        """
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None:
                raise NeuronmapError(f"no job {job_id!r}: jobs are numbered from 1 and the last {KEEP} finished are kept; "
                                     "submit the request again")
            position = self._pending.index(job_id) if job_id in self._pending else 0
            now = time.time()
            return {"id": job.id, "state": job.state, "position": position, "queued": len(self._pending),
                    "step": job.step, "steps": [label for _, label, _ in job.steps],
                    "request": dict(job.request), "results": dict(job.results), "error": job.error,
                    "seconds": round((job.finished_at or now) - (job.started_at or now), 3)}

    def close(self, timeout: float | None = None) -> None:
        """Take no more jobs, drop the queued ones, let the running step finish, and stop the worker."""
        with self._cv:
            self._closed = True
            for jid in self._pending[1:] if self._worker is not None else self._pending:
                self._jobs[jid].state, self._jobs[jid].error = "error", "the viewer stopped before this job ran"
            self._pending[1:] = []
            self._cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def _trim(self) -> None:
        done = [k for k, j in self._jobs.items() if j.state in ("done", "error")]
        for k in done[: max(0, len(done) - KEEP)]:
            del self._jobs[k]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:  # closed with nothing to run
                    return
                job = self._jobs[self._pending[0]]
                job.state, job.started_at = "running", time.time()
            try:
                for i, (key, _label, fn) in enumerate(job.steps):
                    with self._cv:
                        if self._closed:
                            raise NeuronmapError("the viewer stopped before this job finished")
                        job.step = i
                    result = fn(dict(job.results))
                    with self._cv:
                        job.results[key] = result
                state, error = "done", None
            except NeuronmapError as e:
                state, error = "error", str(e)
            except Exception as e:  # a bug must not stop the queue; it is shown as one line and logged
                import traceback

                traceback.print_exc()
                state, error = "error", f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            with self._cv:
                job.state, job.error, job.finished_at = state, error, time.time()
                self._pending.remove(job.id)
                if self._closed:
                    return

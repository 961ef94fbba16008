"""Reward calls in worker processes, so that a call past its time limit really stops.

A Python thread cannot be stopped: a CPU-bound reward that times out in one keeps running, and
every later step gets slower (seen: 0.2 s -> 31 s a step within 8 steps). A process can. Each
reward (`scoring.isolation: process`, the default) gets a pool of worker processes, started as
calls need them (at most `scoring.concurrency` at once), each loading the reward by its spec once
and then serving calls over a pipe. A call that outlives its limit has its worker killed, with
everything the worker started (its own process group), and the next call gets a fresh one.

Workers come from a fork server, not from the trainer: forking a process that holds an inference
engine's threads and GPU context is unsafe, and a fork server forks from a small clean process.
Each worker's address space is capped (`scoring.memory_mb`), and it dies with the fork server,
which dies with the trainer, so no reward outlives the run.

The same machinery runs an agent's tools (`rft.agents.tools`): a `FunctionPool` serves a plain
function by spec, `run(kwargs, timeout_s)` -> its value.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import inspect
import multiprocessing
import os
import pickle
import resource
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from rft.reward_context import RewardLog, RewardState, accepted_context, call_reward
from rft.reward_loading import build_reward, load_function

# Worker start (fork, import the reward's module, build it) is not counted in a call's time limit.
START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1

# Built in the worker, once: answers one call's payload. A `Server` is what a worker is started with
# (a picklable module-level function bound by functools.partial); it returns the `Serve`.
Serve = Callable[[Any], Any]
Server = Callable[[], Serve]


class WorkerTimeout(Exception):
    """A call (a reward's, a tool's) outlived its limit; its worker was killed."""


class WorkerCrashed(Exception):
    """A worker died during a call (killed by the memory cap, a signal, or `os._exit`)."""


class WorkerStartError(Exception):
    """A worker could not load its function: every call would fail the same way."""


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    # The fork server imports only this module (and what it imports): not the trainer's __main__.
    context.set_forkserver_preload(["rft.reward_workers", "rft.reward_loading", "rft.reward_context"])
    return context


def _portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError that keeps its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _reward_server(spec: str, kwargs: dict[str, Any], build: dict[str, Any] | None) -> Serve:
    """Load a reward; its calls take `(request, state)` and give `(value, what it logged)`."""
    _, function = build_reward(spec, kwargs, build)
    accepted = accepted_context(function)

    def serve(payload: tuple[dict[str, Any], RewardState]) -> tuple[Any, RewardLog]:
        request, state = payload
        value, log = call_reward(function, accepted, request, state)
        if inspect.isawaitable(value):
            value = asyncio.run(value)
        # What the reward logged travels back with its value: the trainer's own log is not reachable here.
        return value, log

    return serve


def _function_server(spec: str) -> Serve:
    """Load a plain function (`load_function`); its calls take keyword arguments and give its value."""
    function = load_function(spec)

    def serve(kwargs: dict[str, Any]) -> Any:
        value = function(**kwargs)
        return asyncio.run(value) if inspect.isawaitable(value) else value

    return serve


def _serve(connection: Connection, server: Server, memory_mb: int | None) -> None:
    """The worker: own process group, capped memory, then load what it serves and answer calls until EOF."""
    os.setsid()
    # Die with the fork server (which dies with the trainer) even while stuck in a call; where prctl is
    # missing (not Linux) the closed pipe still ends a worker waiting for its next call.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if memory_mb:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        serve = server()
    except BaseException as error:
        connection.send(("start_error", _portable(error)))
        return
    connection.send(("ready", None))
    while True:
        try:
            payload = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", serve(payload))
            pickle.dumps(reply)
        except BaseException as error:
            reply = ("error", _portable(error))
        connection.send(reply)


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext, server: Server, memory_mb: int | None):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, server, memory_mb), daemon=True)
        self.process.start()
        child.close()
        if not self.connection.poll(START_TIMEOUT_S):
            self.kill()
            raise WorkerStartError(f"its worker did not start within {START_TIMEOUT_S:g} s")
        try:
            status, error = self._receive()
        except WorkerCrashed as exc:
            raise WorkerStartError(f"{exc} while starting; its error is printed above") from None
        if status == "start_error":
            self.kill()
            raise WorkerStartError(f"its worker could not load it: {type(error).__name__}: {error}")

    def _receive(self) -> tuple[str, Any]:
        try:
            return self.connection.recv()
        except (EOFError, OSError) as exc:
            raise WorkerCrashed(f"its worker died (exit code {self._exit_code()})") from exc

    def _exit_code(self) -> int | None:
        self.process.join(timeout=1)
        return self.process.exitcode

    def call(self, payload: Any, timeout_s: float) -> Any:
        self.connection.send(payload)
        if not self.connection.poll(timeout_s):
            self.kill()
            raise WorkerTimeout(f"timed out after {timeout_s:g} s; its worker was killed")
        status, value = self._receive()
        if status == "error":
            raise value
        return value

    def kill(self) -> None:
        """The worker and everything it started: it leads its own process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=5)
        self.connection.close()


class ProcessPool:
    """Up to `size` idle workers started with `server`; a call takes an idle worker or starts one."""

    def __init__(self, server: Server, memory_mb: int | None, size: int):
        self.server, self.memory_mb, self.size = server, memory_mb, size
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._context = _context()

    def run(self, payload: Any, timeout_s: float) -> Any:
        """What the served function gives for `payload`; raises what it raised, or a Worker* error."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self._context, self.server, self.memory_mb)
        try:
            return worker.call(payload, timeout_s)
        except (WorkerTimeout, WorkerCrashed):
            worker.kill()
            raise
        finally:
            # Also when the function raised: its worker is fine and serves the next call.
            if worker.process.is_alive():
                self._release(worker)

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            keep = len(self._idle) < self.size
            if keep:
                self._idle.append(worker)
        if not keep:
            worker.kill()

    def close(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for worker in workers:
            worker.kill()


class WorkerPool(ProcessPool):
    """Workers for one reward (`scoring.isolation: process`)."""

    def __init__(
        self,
        spec: str,
        kwargs: dict[str, Any],
        memory_mb: int | None,
        size: int,
        build: dict[str, Any] | None = None,
    ):
        super().__init__(functools.partial(_reward_server, spec, kwargs, build), memory_mb, size)

    def call(self, request: dict[str, Any], state: RewardState, timeout_s: float) -> tuple[Any, RewardLog]:
        """The reward's value for one call and what it logged; raises what the reward raised, or a
        Worker* error."""
        return self.run((request, state), timeout_s)


class FunctionPool(ProcessPool):
    """Workers for one plain function loaded by spec (an agent's tool): `run(kwargs, timeout_s)`."""

    def __init__(self, spec: str, memory_mb: int | None, size: int):
        super().__init__(functools.partial(_function_server, spec), memory_mb, size)

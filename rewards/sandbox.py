"""The sandbox `rewards.code` runs completions' code in: bubblewrap, limits, a wall clock, capped output.

Each completion runs under bubblewrap (`bwrap`, package `bubblewrap` in Debian, Ubuntu and Fedora), which
builds the sandbox from Linux namespaces, with no daemon and no setuid helper. A maintained tool (it is
Flatpak's sandbox) rather than hand-written `unshare` and `mount` calls, which missed the PID namespace,
the teardown of everything inside and the capabilities. Under it:

- new user, PID, network, IPC, UTS and cgroup namespaces: no network at all, and the trainer and every
  other process of the machine are out of reach (they have no PID there, so cannot be signalled);
- a file system holding only what the interpreter needs, read-only (`/usr`, the Python installation and
  its virtual environment), the solution and the harness read-only in `/code`, and a private, size-limited
  `/tmp` as working directory: nothing the trainer owns is visible or writable;
- resource limits, set inside the sandbox: CPU time, address space (`memory_mb`), file size, and at most
  `MAX_PROCESSES` processes and threads: RLIMIT_NPROC, which counts per user namespace and so bounds
  the sandbox alone, and a fresh pids cgroup per run where one is writable (RLIMIT_NPROC does not bind
  a trainer run as root);
- a wall-clock limit (`timeout_s`) that kills the whole sandbox: killing bwrap kills its PID namespace's
  init (`--die-with-parent`), and with it every process inside, even one that called `setsid` and holds
  the output pipes, so the call returns on time;
- output read as it comes, at most `MAX_OUTPUT_BYTES` (more kills the sandbox and fails the run);
- a bare environment (no credentials, no PYTHONPATH) and Python's isolated mode (`-I`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_OUTPUT_BYTES = 1 << 20
MAX_PROCESSES = 32
ISOLATIONS = ("bwrap", "none")
_MAX_STDERR_BYTES = 4096
_FILE_MB = 16
_TMP_MB = 64
_CODE_DIR = "/code"  # where the sandbox sees the solution and the harness

# Runs first in the sandbox (after bwrap made the user namespace: RLIMIT_NPROC set before it would also
# count every process the trainer's user has on the machine), sets the limits, then execs the harness.
_LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
limits = [(resource.RLIMIT_AS, cfg["memory_mb"] << 20), (resource.RLIMIT_FSIZE, cfg["file_mb"] << 20),
          (resource.RLIMIT_CORE, 0)]
if cfg["processes"]:
    limits.append((resource.RLIMIT_NPROC, cfg["processes"]))
for limit, value in limits:
    resource.setrlimit(limit, (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
harness = os.path.join(cfg["code_dir"], "harness.py")
os.execv(sys.executable, [sys.executable, "-I", harness, cfg["code_dir"]])
"""


@dataclass
class Run:
    """How one sandboxed run ended and what it printed."""

    returncode: int | None  # None: killed, at the time limit or for too much output
    stdout: str
    stderr: str
    timed_out: bool


def _bwrap_command(bwrap: str, directory: Path) -> list[str]:
    """bwrap's arguments: every namespace new, only the interpreter's files visible, all read-only."""
    command = [
        bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",  # bwrap keeps them when started by root: they could remount /usr read-write
        "--proc", "/proc", "--dev", "/dev", "--size", str(_TMP_MB << 20), "--tmpfs", "/tmp",
    ]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # The interpreter's installation and its virtual environment, wherever they live (/opt, ~/.pyenv).
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    for prefix in sorted(prefixes):
        if prefix != "/" and not prefix.startswith("/usr/") and prefix != "/usr":
            command += ["--ro-bind", prefix, prefix]
    command += ["--ro-bind", str(directory), _CODE_DIR, "--chdir", "/tmp", "--clearenv"]
    # bwrap's own root is a writable tmpfs holding the mount points (e.g. /work/main for a venv there):
    # read-only too, so that only the private /tmp takes writes.
    command += ["--remount-ro", "/"]
    return command


def _communicate(process: subprocess.Popen, stdin: bytes, deadline: float) -> tuple[bytes, bytes, bool]:
    """Feed stdin and read stdout and stderr as they come until both close, the deadline passes or
    stdout exceeds `MAX_OUTPUT_BYTES`: (stdout, stderr's tail, finished). Never holds more than the
    cap, and never waits on a pipe past the deadline (a grandchild may keep it open)."""
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    pending = memoryview(stdin)
    os.set_blocking(process.stdin.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, stdout)
        selector.register(process.stderr, selectors.EVENT_READ, stderr)
        if pending:
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        reading = 2
        while reading:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(stdout), bytes(stderr), False
            for key, _ in selector.select(remaining):
                if key.fileobj is process.stdin:
                    pending = _feed(process, selector, pending)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    reading -= 1
                    continue
                key.data.extend(chunk)
                if key.data is stderr:
                    del stderr[:-_MAX_STDERR_BYTES]
                elif len(stdout) > MAX_OUTPUT_BYTES:
                    return bytes(stdout), bytes(stderr), False
    return bytes(stdout), bytes(stderr), True


def _feed(process: subprocess.Popen, selector: selectors.BaseSelector, pending: memoryview) -> memoryview:
    """Write what the pipe takes of `pending` to the process's stdin; close it when all is written."""
    assert process.stdin is not None
    try:
        pending = pending[os.write(process.stdin.fileno(), pending[: 1 << 16]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:  # it stopped reading: the rest of its input is moot
        pending = memoryview(b"")
    if not pending:
        selector.unregister(process.stdin)
        process.stdin.close()
    return pending


@functools.cache
def _pids_cgroup_parent() -> Path | None:
    """A pids cgroup this process may make children in (cgroup v1's `pids` hierarchy, or v2's root with
    pids delegated), or None. RLIMIT_NPROC does not bind a trainer run as root: this does."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
        elif controllers == "" and path == "/":  # v2 forbids children beside processes below the root
            candidate = Path("/sys/fs/cgroup")
            with contextlib.suppress(OSError):
                if "pids" not in (candidate / "cgroup.subtree_control").read_text().split():
                    continue
        else:
            continue
        if (candidate / "cgroup.procs").is_file() and os.access(candidate, os.W_OK):
            return candidate
    return None


@contextlib.contextmanager
def _pids_cgroup() -> Iterator[Path | None]:
    """A fresh cgroup allowing `MAX_PROCESSES` tasks, for one run, or None where none can be made."""
    parent = _pids_cgroup_parent()
    if parent is None:
        yield None
        return
    group = parent / f"rft-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        group.mkdir()
        (group / "pids.max").write_text(str(MAX_PROCESSES))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        yield None
        return
    try:
        yield group
    finally:
        for _ in range(100):  # the namespace's last processes may still be exiting after the kill
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.01)


def _command(
    directory: Path, config: dict[str, Any], environment: dict[str, str], group: Path | None
) -> list[str]:
    command = [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(config)]
    if config["isolation"] == "bwrap":
        tool = shutil.which("bwrap") or "bwrap"
        setenv = [part for item in environment.items() for part in ("--setenv", *item)]
        command = [*_bwrap_command(tool, directory), *setenv, "--", *command]
    if group is not None:  # joins the cgroup before bwrap starts, so everything it starts is counted
        command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *command]
    return command


def run_sandboxed(directory: Path, stdin: str, timeout_s: float, memory_mb: int, isolation: str) -> Run:
    sandboxed = isolation == "bwrap"
    config = {
        "isolation": isolation,
        "memory_mb": memory_mb,
        "cpu_s": max(1, int(timeout_s) + 1),
        "file_mb": _FILE_MB,
        "processes": MAX_PROCESSES if sandboxed else 0,
        "code_dir": _CODE_DIR if sandboxed else str(directory),
    }
    home = "/tmp" if sandboxed else str(directory)
    environment = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    deadline = time.monotonic() + timeout_s
    with _pids_cgroup() if sandboxed else contextlib.nullcontext() as group:
        process = subprocess.Popen(
            _command(directory, config, environment, group), cwd=directory, env=environment,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole at the end
        )
        try:
            stdout, stderr, finished = _communicate(process, stdin.encode(), deadline)
            returncode: int | None = None
            if finished:
                try:
                    returncode = process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    finished = False
        finally:
            # Under bwrap this kills the PID namespace's init, and the kernel then kills all inside it.
            # ProcessLookupError: it exited, and nothing it started is left in its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
    timed_out = not finished and len(stdout) <= MAX_OUTPUT_BYTES
    text = stdout[:MAX_OUTPUT_BYTES].decode(errors="replace")
    return Run(returncode, text, stderr.decode(errors="replace"), timed_out)


def prepare(code: str, harness: str) -> Path:
    """A fresh directory holding the solution and the harness that runs it (the caller removes it)."""
    directory = Path(tempfile.mkdtemp(prefix="rft-code-"))
    (directory / "solution.py").write_text(code)
    (directory / "harness.py").write_text(harness)
    return directory

"""Code: run the completion's Python against the row's tests in a sandbox.

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
  `_MAX_PROCESSES` processes and threads: RLIMIT_NPROC, which counts per user namespace and so bounds
  the sandbox alone, and a fresh pids cgroup per run where one is writable (RLIMIT_NPROC does not bind
  a trainer run as root);
- a wall-clock limit (`timeout_s`) that kills the whole sandbox: killing bwrap kills its PID namespace's
  init (`--die-with-parent`), and with it every process inside, even one that called `setsid` and holds
  the output pipes, so the call returns on time;
- output read as it comes, at most `_MAX_OUTPUT_BYTES` (more kills the sandbox and fails the run);
- a bare environment (no credentials, no PYTHONPATH) and Python's isolated mode (`-I`).

The first call checks, once per process, that the sandbox starts (a trivial solution must pass) and
that forking past the process limit fails. If not (bwrap missing, user namespaces forbidden, as in
containers without CAP_SYS_ADMIN or the right seccomp or AppArmor profile; root without a writable
pids cgroup), the reward raises `RewardContractError`: the run and `rft reward check` stop with
one line naming what is missing, instead of scoring every completion 0. `isolation: none` runs the
code as a plain subprocess with the same limits except the process count, and without any of the
namespaces above: code that forks, calls `setsid` or signals other processes escapes it. Use it
only for code you trust.

Tests (column `tests` by default), in one of three forms:

- a string: a test program run after the solution (e.g. MBPP/HumanEval asserts); 1 or 0;
- a list of strings: separate test snippets (asserts), each passing or failing alone; the score is
  the share passed;
- a list of `{"input": str, "output": str}`: the solution reads stdin and must print the output
  (compared line by line, trailing spaces ignored); the score is the share passed.

Assert tests count only if the harness reaches its end and prints a per-run secret it read from
stdin before the solution ran: a solution that calls `sys.exit(0)` early fails instead of passing.
This guards against accidents, not against code written to attack the harness.

Recipe::

    rewards:
      - fn: rewards.code:code_tests
        kwargs: {timeout_s: 5, memory_mb: 512}
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.base import RewardContractError, RewardValues, column, completion_text

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MAX_OUTPUT_BYTES = 1 << 20
_MAX_STDERR_BYTES = 4096
_MAX_PROCESSES = 32
_FILE_MB = 16
_TMP_MB = 64
_CODE_DIR = "/code"  # where the sandbox sees the solution and the harness
_ISOLATIONS = ("bwrap", "none")

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

# Runs the solution, then the asserts, each in its own try; prints the secret and the result last.
_ASSERT_HARNESS = r"""
import json, sys
secret = sys.stdin.readline().strip()
cases = json.load(open(sys.argv[1] + "/cases.json"))
source = open(sys.argv[1] + "/solution.py").read()
namespace = {"__name__": "__main__"}
try:
    exec(compile(source, "solution.py", "exec"), namespace)
    loaded = True
except BaseException as exc:
    loaded = False
    sys.stderr.write("solution raised %s: %s\n" % (type(exc).__name__, exc))
passed = 0
if loaded:
    for case in cases:
        scope = dict(namespace)
        try:
            exec(compile(case, "test.py", "exec"), scope)
            passed += 1
        except BaseException as exc:
            sys.stderr.write("test failed: %s: %s\n" % (type(exc).__name__, exc))
sys.stdout.write("\n" + secret + " " + str(passed) + "\n")
"""

_STDIO_HARNESS = r"""
import sys
source = open(sys.argv[1] + "/solution.py").read()
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
"""


@dataclass
class _Run:
    returncode: int | None  # None: killed, at the time limit or for too much output
    stdout: str
    stderr: str
    timed_out: bool


def extract_code(text: str) -> str:
    """The last fenced Python block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


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
    stdout exceeds `_MAX_OUTPUT_BYTES`: (stdout, stderr's tail, finished). Never holds more than the
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
                    try:
                        pending = pending[os.write(key.fd, pending[: 1 << 16]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it stopped reading: the rest of its input is moot
                        pending = memoryview(b"")
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    reading -= 1
                    continue
                key.data.extend(chunk)
                if key.data is stderr:
                    del stderr[:-_MAX_STDERR_BYTES]
                elif len(stdout) > _MAX_OUTPUT_BYTES:
                    return bytes(stdout), bytes(stderr), False
    return bytes(stdout), bytes(stderr), True


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
    """A fresh cgroup allowing `_MAX_PROCESSES` tasks, for one run, or None where none can be made."""
    parent = _pids_cgroup_parent()
    if parent is None:
        yield None
        return
    group = parent / f"rft-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        group.mkdir()
        (group / "pids.max").write_text(str(_MAX_PROCESSES))
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


def _command(directory: Path, config: dict[str, Any], environment: dict[str, str], group: Path | None) -> list[str]:
    command = [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(config)]
    if config["isolation"] == "bwrap":
        tool = shutil.which("bwrap") or "bwrap"
        setenv = [part for item in environment.items() for part in ("--setenv", *item)]
        command = [*_bwrap_command(tool, directory), *setenv, "--", *command]
    if group is not None:  # joins the cgroup before bwrap starts, so everything it starts is counted
        command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *command]
    return command


def _run_sandboxed(directory: Path, stdin: str, timeout_s: float, memory_mb: int, isolation: str) -> _Run:
    sandboxed = isolation == "bwrap"
    config = {
        "isolation": isolation,
        "memory_mb": memory_mb,
        "cpu_s": max(1, int(timeout_s) + 1),
        "file_mb": _FILE_MB,
        "processes": _MAX_PROCESSES if sandboxed else 0,
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
            with contextlib.suppress(ProcessLookupError):  # exited, and nothing it started is left in its group
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
    timed_out = not finished and len(stdout) <= _MAX_OUTPUT_BYTES
    text = stdout[:_MAX_OUTPUT_BYTES].decode(errors="replace")
    return _Run(returncode, text, stderr.decode(errors="replace"), timed_out)


def _prepare(code: str, harness: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="rft-code-"))
    (directory / "solution.py").write_text(code)
    (directory / "harness.py").write_text(harness)
    return directory


def _same_output(actual: str, expected: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip().splitlines()]

    return lines(actual) == lines(expected)


@dataclass
class CaseResult:
    passed: int
    total: int
    timed_out: bool


_probe_lock = threading.Lock()
_probed: dict[tuple[str, str, int], str] = {}  # (isolation, bwrap, memory_mb) -> "" when it starts, else why not


def check_sandbox(isolation: str = "bwrap", memory_mb: int = 512) -> None:
    """Raise `RewardContractError` in one line when the sandbox cannot start here, naming what is
    missing and the choices. Probes once per process and setting: a trivial solution must pass."""
    if isolation not in _ISOLATIONS:
        raise RewardContractError(f"code_tests: isolation must be one of {list(_ISOLATIONS)}, got {isolation!r}")
    tool = (shutil.which("bwrap") or "") if isolation == "bwrap" else ""
    key = (isolation, tool, memory_mb)
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(isolation, tool, memory_mb)
    if _probed[key]:
        raise RewardContractError(_probed[key])


# The probe's solution: forks past the process limit; its children sleep until the sandbox is killed.
_PROBE_FORKS = f"""
import os, time
forked = 0
for _ in range({_MAX_PROCESSES + 8}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked += 1
"""


def _probe(isolation: str, tool: str, memory_mb: int) -> str:
    """Run a trivial solution, and under bwrap one forking past the limit: "" when all holds, else why not."""
    if isolation == "bwrap" and not tool:
        return (
            "code_tests cannot sandbox the completions' code: bubblewrap (bwrap) is not on PATH; install it "
            "(apt-get install bubblewrap, dnf install bubblewrap), or set `isolation: none` in the reward's "
            "kwargs for trusted code only"
        )
    solution, test = ("", "assert True") if isolation == "none" else (_PROBE_FORKS, "print('forked', forked)")
    directory = _prepare(solution, _ASSERT_HARNESS)
    (directory / "cases.json").write_text(json.dumps([test]))
    try:
        run = _run_sandboxed(directory, "probe\n", 60.0, memory_mb, isolation)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if run.returncode != 0 or not run.stdout.rstrip("\n").endswith("probe 1"):
        why = " ".join(run.stderr.split()) or f"exit code {run.returncode}, no message"
        if isolation == "none":
            return f"code_tests cannot run Python under its limits (memory_mb: {memory_mb}): {why}"
        return (
            f"code_tests cannot sandbox the completions' code: {tool} failed: {why}; bubblewrap needs user "
            "namespaces: allow them (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; "
            "Ubuntu 24.04: kernel.apparmor_restrict_unprivileged_userns=0; in a container, a seccomp profile "
            "that allows them, e.g. docker run --security-opt seccomp=unconfined), run the trainer as a non-root "
            "user (root without CAP_SYS_ADMIN cannot map its own uid), or set `isolation: none` in the reward's "
            "kwargs for trusted code only"
        )
    if isolation == "bwrap" and f"forked {_MAX_PROCESSES + 8}" in run.stdout:
        return (
            f"code_tests cannot limit the sandbox to {_MAX_PROCESSES} processes: RLIMIT_NPROC does not bind a "
            "trainer run as root, and no pids cgroup is writable here (/sys/fs/cgroup/pids, or cgroup v2 with "
            "pids delegated); run the trainer as a non-root user, or give it a writable pids cgroup, or set "
            "`isolation: none` in the reward's kwargs for trusted code only"
        )
    return ""


def run_tests(
    code: str, tests: Any, timeout_s: float = 5.0, memory_mb: int = 512, isolation: str = "bwrap"
) -> CaseResult:
    """Run `code` against `tests` (see the module docstring) in the sandbox; `RewardContractError`
    when the sandbox cannot start (see `check_sandbox`)."""
    check_sandbox(isolation, memory_mb)
    if isinstance(tests, list) and tests and all(isinstance(t, Mapping) for t in tests):
        passed = 0
        timed_out = False
        for case in tests:
            directory = _prepare(code, _STDIO_HARNESS)
            try:
                run = _run_sandboxed(directory, str(case["input"]), timeout_s, memory_mb, isolation)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            timed_out |= run.timed_out
            passed += int(run.returncode == 0 and _same_output(run.stdout, str(case["output"])))
        return CaseResult(passed, len(tests), timed_out)
    if isinstance(tests, str):
        cases = [tests]
    elif isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        cases = list(tests)
    else:
        raise ValueError("tests must be a string, a list of strings, or a list of {input, output} objects")
    directory = _prepare(code, _ASSERT_HARNESS)
    (directory / "cases.json").write_text(json.dumps(cases))
    secret = secrets.token_hex(16)
    try:
        run = _run_sandboxed(directory, secret + "\n", timeout_s, memory_mb, isolation)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    passed = 0
    if run.returncode == 0:
        last = run.stdout.rstrip("\n").rsplit("\n", 1)[-1].split(" ")
        if len(last) == 2 and last[0] == secret and last[1].isdigit():
            passed = int(last[1])
    return CaseResult(passed, len(cases), run.timed_out)


def code_tests(
    completions: list[Any],
    *,
    tests_column: str = "tests",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int = 2,
    isolation: str = "bwrap",
    **columns: Any,
) -> RewardValues:
    """Share of the row's tests the completion's code passes (see the module docstring); None for
    rows without tests. Component `passed_all`; counter `timeouts`. `isolation`: `bwrap` (default) or
    `none` (no namespaces: trusted code only). Raises `RewardContractError`, which stops the run, when
    the sandbox cannot start."""
    all_tests = column(columns, tests_column, len(completions), "code_tests")
    check_sandbox(isolation, memory_mb)  # before the pool: one error, not one per completion

    def score(index: int) -> CaseResult | None:
        tests = all_tests[index]
        if tests is None or tests == []:
            return None
        code = extract_code(completion_text(completions[index]))
        return run_tests(code, tests, timeout_s, memory_mb, isolation)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(score, range(len(completions))))
    scores = [None if r is None else r.passed / r.total for r in results]
    passed_all = [None if r is None else float(r.passed == r.total) for r in results]
    timeouts = sum(1 for r in results if r is not None and r.timed_out)
    return RewardValues(scores, components={"passed_all": passed_all}, counters={"timeouts": timeouts})


code_tests.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]
# Run by the scorer when it is built, with the recipe's kwargs: a sandbox that cannot start stops
# `rft train` and `rft reward check` before any model loads (see rft.scoring).
code_tests.preflight = check_sandbox  # type: ignore[attr-defined]

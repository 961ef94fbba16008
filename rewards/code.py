"""Code: run the completion's Python against the row's tests in a sandboxed subprocess.

Each completion runs in its own process, in a throwaway directory, with:

- a wall-clock limit (`timeout_s`; the whole process group is killed) and a CPU-time limit;
- an address-space limit (`memory_mb`), a file-size limit and, when run as root, a process limit;
- no network: a fresh network namespace with no interfaces (Linux `unshare`);
- a read-only view of every file system except its directory: a fresh mount namespace in which
  every mount is remounted read-only, so it cannot write the trainer's checkpoints or anything else;
- a bare environment (no credentials, no PYTHONPATH) and Python's isolated mode (`-I`).

When the namespaces cannot be created (they need root or unprivileged user namespaces) the reward
raises, unless `isolate: false`, which keeps the limits and the directory but not the isolation.

The limits are set by a small launcher that runs *after* the fork (not `preexec_fn`, which is unsafe
in the scorer's threads), then execs the test harness. The code can still *read* files the trainer
can read, so it is a sandbox against accidents and damage, not against reading the answers.

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

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.base import RewardValues, column, completion_text

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MAX_OUTPUT_BYTES = 1 << 20

# Runs in the child after exec: resource limits; new mount and network namespaces in which every
# mount is read-only except the throwaway directory and no network interface exists; then the harness.
_LAUNCHER = r"""
import ctypes, json, os, re, resource, sys
cfg = json.loads(sys.argv[1])
mem = cfg["memory_mb"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * 1024 * 1024,) * 2)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

def fail(what):
    sys.stderr.write("rft-sandbox: " + what + ": " + os.strerror(ctypes.get_errno()))
    os._exit(125)

def isolate():
    flags = CLONE_NEWNS | CLONE_NEWNET
    if libc.unshare(flags) != 0 and libc.unshare(flags | CLONE_NEWUSER) != 0:
        fail("cannot create mount and network namespaces")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        fail("cannot make mounts private")
    workdir = os.getcwd().encode()
    if libc.mount(workdir, workdir, None, MS_BIND, None) != 0:
        fail("cannot bind the work directory")
    os.chdir(workdir)  # onto the new mount: the old working directory is the read-only one beneath
    for line in open("/proc/self/mountinfo"):
        point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]).encode()
        if point != workdir and libc.mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
            fail("cannot make " + point.decode() + " read-only")

if cfg["isolate"]:
    isolate()
os.execv(sys.executable, [sys.executable, "-I", "harness.py"])
"""

# Runs the solution, then the asserts, each in its own try; prints the secret and the result last.
_ASSERT_HARNESS = r"""
import json, sys
secret = sys.stdin.readline().strip()
cases = json.load(open("cases.json"))
source = open("solution.py").read()
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
source = open("solution.py").read()
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
"""


@dataclass
class _Run:
    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str


def extract_code(text: str) -> str:
    """The last fenced Python block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _run_sandboxed(
    directory: Path, stdin: str, timeout_s: float, memory_mb: int, isolate: bool
) -> _Run:
    config = {
        "memory_mb": memory_mb,
        "cpu_s": max(1, int(timeout_s) + 1),
        "file_mb": 16,
        "isolate": isolate,
    }
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(directory),
        "TMPDIR": str(directory),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(config)],
        cwd=directory,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so a timeout kills everything it started
    )
    try:
        stdout, stderr = process.communicate(stdin.encode(), timeout=timeout_s)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        returncode = None
    if returncode == 125 and b"rft-sandbox:" in stderr:
        raise RuntimeError(
            stderr.decode(errors="replace").strip() + "; run as root or where user namespaces are allowed, "
            "or set isolate: false"
        )
    return _Run(
        returncode, stdout[:_MAX_OUTPUT_BYTES].decode(errors="replace"), stderr[-4096:].decode(errors="replace")
    )


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


def run_tests(code: str, tests: Any, timeout_s: float = 5.0, memory_mb: int = 512, isolate: bool = True) -> CaseResult:
    """Run `code` against `tests` (see the module docstring) in the sandbox."""
    if isinstance(tests, list) and tests and all(isinstance(t, Mapping) for t in tests):
        passed = 0
        timed_out = False
        for case in tests:
            directory = _prepare(code, _STDIO_HARNESS)
            try:
                run = _run_sandboxed(directory, str(case["input"]), timeout_s, memory_mb, isolate)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            timed_out |= run.returncode is None
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
        run = _run_sandboxed(directory, secret + "\n", timeout_s, memory_mb, isolate)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    passed = 0
    if run.returncode == 0:
        last = run.stdout.rstrip("\n").rsplit("\n", 1)[-1].split(" ")
        if len(last) == 2 and last[0] == secret and last[1].isdigit():
            passed = int(last[1])
    return CaseResult(passed, len(cases), run.returncode is None)


def code_tests(
    completions: list[Any],
    *,
    tests_column: str = "tests",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int = 2,
    isolate: bool = True,
    **columns: Any,
) -> RewardValues:
    """Share of the row's tests the completion's code passes (see the module docstring); None for
    rows without tests. Component `passed_all`; counter `timeouts`."""
    all_tests = column(columns, tests_column, len(completions), "code_tests")

    def score(index: int) -> CaseResult | None:
        tests = all_tests[index]
        if tests is None or tests == []:
            return None
        code = extract_code(completion_text(completions[index]))
        return run_tests(code, tests, timeout_s, memory_mb, isolate)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(score, range(len(completions))))
    scores = [None if r is None else r.passed / r.total for r in results]
    passed_all = [None if r is None else float(r.passed == r.total) for r in results]
    timeouts = sum(1 for r in results if r is not None and r.timed_out)
    return RewardValues(scores, components={"passed_all": passed_all}, counters={"timeouts": timeouts})


code_tests.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]

"""A sandboxed code-execution reward for tasks whose answer is a Python function.

`run_function_tests(code, entry_point, cases)` runs the candidate in a child
process and calls `entry_point(*args)` on each case; the parent compares the
JSON-encoded results with the expected values. `PythonFunctionReward` wraps it
as a reward callable `(prompt, completion) -> float` (fraction of cases passed,
or all-or-nothing). Hostile or broken code scores 0.

Layers, outermost first (each is tested on its own where it can be):

  * a child process (`python -I -S -B`: no site-packages, no PYTHON* variables,
    no bytecode writes) with a scrubbed environment (nothing of the parent's --
    no tokens or keys), stdin closed, only stdout/stderr files open, in its own
    session so the whole process group is killed at the wall-time limit;
  * when the parent is root: the child runs as an unprivileged uid (default
    65534, nobody) with no supplementary groups, so file permissions apply to it
    and RLIMIT_NPROC binds (root ignores both);
  * when `unshare` and unprivileged user namespaces are available: a new user +
    network namespace, so the child has no network interfaces at all (no
    loopback either); `SandboxResult.network_isolated` says whether this held;
  * resource limits set by the child on itself before the candidate runs: CPU
    seconds (SIGXCPU then SIGKILL), address space (MemoryError), file size
    (SIGXFSZ: caps stdout/stderr and every file written), open files, processes
    = 0 (fork and threads fail), no core dumps; plus the parent's wall-time
    limit;
  * a fresh temporary directory owned by the child as its cwd, deleted afterwards;
  * an audit hook (sys.addaudithook, PEP 578) installed before the candidate
    runs; see `_sandbox_child.py` for the list of what it refuses.

Threat model and its limits, plainly:

  * Meant for model-written code that is wrong, greedy or careless (infinite
    loops, memory blow-ups, fork bombs, deleting files, phoning home, printing
    forever, reading secrets from the environment), and for casual attempts
    to escape.
  * The audit hook is not a security boundary: CPython documents that hooks
    can be bypassed by code that reaches native memory. That is why ctypes,
    cffi, mmap, subinterpreters and the other native escape hatches are
    refused, and why the kernel layers (uid, rlimits, namespaces) exist. A
    bug in CPython's C code that corrupts memory (they exist; several crash
    the interpreter from pure Python) could let a determined attacker run
    arbitrary code with the sandbox uid's rights.
  * What then remains: the attacker has uid `nobody` (when the parent is root)
    and can do what nobody can do on this host -- read world-readable files,
    write world-writable places such as /tmp, use up to the CPU/memory/file
    limits until the wall-time kill, and, without a network namespace, open
    network connections. There is no seccomp filter, no mount or PID
    namespace, no cgroup (total memory is bounded per process only), and the
    kernel itself is shared. When the parent is NOT root, no uid change is
    possible: the child runs as the parent's user and only the hook guards
    the parent's files -- run untrusted code from a root or dedicated-user
    trainer, or in a container/VM, for real isolation.
  * Concurrent runs (`PythonFunctionReward.many`) share the sandbox uid, so
    code that got past the hook could signal or trace another candidate's
    process and spoil its score; give each worker its own `user` if that
    matters.
  * Outputs are not trusted: a candidate could print a fake result line, but it
    can only claim values for the inputs it was given and the parent compares
    them with expected values it never sees, so faking a result is no easier
    than computing it. Expected values are never sent to the child.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from m1model.rl.tasks import END

_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text()
MARKER = b"\x00m1-sandbox-result\x00"
NOBODY = 65534


class SandboxError(RuntimeError):
    """The sandbox cannot be set up as asked (e.g. no interpreter the sandbox user can run)."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_time_s: float = 5.0        # the parent kills the process group after this
    cpu_time_s: int = 5             # RLIMIT_CPU (whole seconds)
    memory_bytes: int = 512 << 20   # RLIMIT_AS: virtual address space
    output_bytes: int = 1 << 20     # RLIMIT_FSIZE: stdout, stderr and any file written
    max_files: int = 16             # files the code may create in its directory
    open_files: int = 32            # RLIMIT_NOFILE
    user: int | None = None         # uid to run as; None = 65534 when the parent is root, else unchanged
    network_namespace: bool | None = None   # None = use one when available; True = required
    audit_hook: bool = True         # disable only to test the other layers
    python: str | None = None       # interpreter; None = the first of ours / python3 the sandbox user can run


@dataclass
class SandboxResult:
    status: str          # ok | timeout | cpu_limit | output_limit | killed | error | no_result
    passed: int = 0
    total: int = 0
    outputs: list = field(default_factory=list)   # per case: the decoded value, or None on error
    errors: list = field(default_factory=list)    # per case: None, or the exception's type name
    load_error: str | None = None                 # exception raised while defining the code
    returncode: int | None = None
    stderr_tail: str = ""
    elapsed_s: float = 0.0
    user: int | None = None
    network_isolated: bool = False

    @property
    def score(self) -> float:
        """Fraction of cases passed; 0 unless the run completed."""
        return self.passed / self.total if self.status == "ok" and self.total else 0.0


def _target_user(limits: SandboxLimits) -> int | None:
    if limits.user is not None:
        return limits.user
    return NOBODY if os.geteuid() == 0 else None


def _spawn_kwargs(uid: int | None) -> dict:
    if uid is None or uid == os.geteuid():
        return {}
    return {"user": uid, "group": uid, "extra_groups": []}


@functools.cache
def _interpreter(uid: int | None, requested: str | None) -> str:
    """An interpreter the sandbox user can start (probed once): ours, our base one, or python3."""
    if requested is not None:
        candidates = [requested]
    else:
        candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                      shutil.which("python3") or "", "/usr/bin/python3"]
    tried = []
    for exe in dict.fromkeys(os.path.realpath(c) for c in candidates if c):
        try:
            probe = subprocess.run([exe, "-I", "-S", "-B", "-c", "import sys; assert sys.version_info >= (3, 8)"],
                                   cwd="/", env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                                   check=False, **_spawn_kwargs(uid))
        except OSError as e:   # e.g. the sandbox user may not enter a private directory on the way
            tried.append(f"{exe} ({e.strerror})")
            continue
        if probe.returncode == 0:
            return exe
        tried.append(f"{exe} (exit {probe.returncode})")
    raise SandboxError(f"no Python interpreter that uid {uid} can run; tried {', '.join(tried)}. "
                       "Pass SandboxLimits(python=...) with one outside private directories (e.g. /usr/bin/python3).")


@functools.cache
def _netns_prefix(uid: int | None, python: str) -> tuple[str, ...]:
    """("unshare", "--user", "--net", "--") if the sandbox user can create namespaces here, else ()."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    cmd = [unshare, "--user", "--net", "--", python, "-I", "-S", "-B", "-c", "pass"]
    try:
        probe = subprocess.run(cmd, cwd="/", env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                               check=False, **_spawn_kwargs(uid))
    except OSError:
        return ()
    return (unshare, "--user", "--net", "--") if probe.returncode == 0 else ()


def _json_normalise(value):
    return json.loads(json.dumps(value))


def run_function_tests(
    code: str,
    entry_point: str,
    cases: Sequence[tuple[Sequence, object]],
    limits: SandboxLimits = SandboxLimits(),
) -> SandboxResult:
    """Runs `code` in the sandbox and checks `entry_point(*args) == expected` for each (args, expected).

    args and expected must be JSON-encodable; results are compared after a JSON
    round trip (tuples compare as lists). Returns a SandboxResult whose `score`
    is the fraction passed (0 if the run did not complete).
    """
    cases = list(cases)
    if not isinstance(code, str) or not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise ValueError("run_function_tests: code must be a str and entry_point a Python identifier")
    try:
        inputs = [json.dumps(list(args), allow_nan=False) for args, _ in cases]
        expected = [_json_normalise(exp) for _, exp in cases]
    except (TypeError, ValueError) as e:
        raise ValueError(f"run_function_tests: cases must be (args, expected) pairs of JSON-encodable values: {e}") \
            from None
    uid = _target_user(limits)
    python = _interpreter(uid, limits.python)
    prefix = () if limits.network_namespace is False else _netns_prefix(uid, python)
    if limits.network_namespace and not prefix:
        raise SandboxError("network_namespace=True but this host cannot create user + network namespaces "
                           "(needs `unshare` and unprivileged user namespaces)")
    cfg = {
        "cpu_time_s": max(1, int(limits.cpu_time_s)),
        "memory_bytes": int(limits.memory_bytes),
        "file_bytes": int(limits.output_bytes),
        "open_files": int(limits.open_files),
        "max_files": int(limits.max_files),
        "audit_hook": bool(limits.audit_hook),
    }
    workdir = Path(os.path.realpath(tempfile.mkdtemp(prefix="m1-sandbox-")))
    result = SandboxResult(status="error", total=len(cases), user=uid, network_isolated=bool(prefix))
    try:
        with open(workdir / "payload.json", "w") as f:
            json.dump({"code": code, "entry_point": entry_point, "inputs": inputs}, f)
        if uid is not None and uid != os.geteuid():
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                [*prefix, python, "-I", "-S", "-B", "-c", _CHILD_SOURCE, json.dumps(cfg)],
                cwd=workdir, env={"LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)},
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True, start_new_session=True,
                umask=0o077, **_spawn_kwargs(uid),
            )
            timed_out = _wait_or_kill(proc, limits.wall_time_s)
            result.elapsed_s = time.monotonic() - start
            result.returncode = proc.returncode
            # CPython ignores SIGXFSZ, so writing past RLIMIT_FSIZE fails with EFBIG instead of
            # killing the child: a file at the limit is the sign.
            at_limit = max(os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size) >= limits.output_bytes
            out.seek(0)
            stdout = out.read(limits.output_bytes + 1)
            err.seek(0)
            result.stderr_tail = err.read(limits.output_bytes + 1)[-2000:].decode(errors="replace")
        _fill(result, stdout, expected, timed_out)
        if at_limit and result.status != "ok":
            result.status = "output_limit"
    finally:
        if sys.version_info >= (3, 12):
            shutil.rmtree(workdir, onexc=_force_remove)
        else:
            shutil.rmtree(workdir, onerror=_force_remove)
    return result


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> bool:
    """Waits for the child up to `timeout` seconds, then SIGKILLs its process group; True if killed.

    On Linux a pidfd wakes us the moment the child exits (Popen.wait(timeout)
    polls with sleeps of up to 50 ms, a large share of a ~20 ms run).
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return True
    try:
        exited, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not exited:
        _kill_group(proc)
    proc.wait()
    return not exited


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # not yet reaped, so the group id is still ours
    except ProcessLookupError:
        pass
    proc.wait()


def _force_remove(func, path, _exc) -> None:
    """rmtree error handler: the child may have removed its own permissions; restore and retry once."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError as e:
        warnings.warn(f"sandbox: could not remove {path}: {e}", RuntimeWarning, stacklevel=2)


_SIGNAL_STATUS = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "output_limit"}


def _fill(result: SandboxResult, stdout: bytes, expected: list, timed_out: bool) -> None:
    rc = result.returncode
    if timed_out:
        result.status = "timeout"
        return
    if rc is not None and rc < 0:
        result.status = _SIGNAL_STATUS.get(-rc, "killed")
        return
    if rc != 0:
        result.status = "error"
        return
    pos = stdout.rfind(MARKER)
    if pos < 0:
        result.status = "no_result"
        return
    try:
        report = json.loads(stdout[pos + len(MARKER):].split(b"\n", 1)[0])
    except ValueError:
        result.status = "no_result"
        return
    if not isinstance(report, dict):
        result.status = "no_result"
        return
    if "load_error" in report:
        result.status, result.load_error = "ok", str(report["load_error"])
        result.errors = [result.load_error] * len(expected)
        result.outputs = [None] * len(expected)
        return
    rows = report.get("results")
    if not isinstance(rows, list) or len(rows) != len(expected):
        result.status = "no_result"
        return
    result.status = "ok"
    for row, exp in zip(rows, expected):
        value, error = None, None
        if isinstance(row, dict) and row.get("ok") is True and isinstance(row.get("value"), str):
            try:
                value = json.loads(row["value"])
            except ValueError:
                error = "undecodable"
        else:
            error = str(row.get("error")) if isinstance(row, dict) else "malformed"
        result.outputs.append(value)
        result.errors.append(error)
        result.passed += int(error is None and value == exp)


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, else the completion without a trailing END marker."""
    m = _FENCE.search(completion)
    if m:
        return m.group(1)
    return completion.removesuffix(END)


@dataclass(frozen=True)
class FunctionProblem:
    entry_point: str
    cases: tuple           # ((args, expected), ...), JSON-encodable; never sent to the child with expected


class PythonFunctionReward:
    """reward(prompt, completion) -> float: runs the completion's code against the prompt's tests.

    problems: prompt -> FunctionProblem (a Mapping or a callable). `all_or_nothing`
    gives 1.0 only when every case passes; otherwise the fraction passed.
    """

    def __init__(self, problems: Mapping[str, FunctionProblem] | Callable[[str], FunctionProblem], *,
                 limits: SandboxLimits = SandboxLimits(), all_or_nothing: bool = False):
        self.problems = problems
        self.limits = limits
        self.all_or_nothing = all_or_nothing

    def run(self, prompt: str, completion: str) -> SandboxResult:
        problem = self.problems(prompt) if callable(self.problems) else self.problems[prompt]
        return run_function_tests(extract_code(completion), problem.entry_point, problem.cases, self.limits)

    def __call__(self, prompt: str, completion: str) -> float:
        return self._score(self.run(prompt, completion))

    def _score(self, result: SandboxResult) -> float:
        if self.all_or_nothing:
            return float(result.status == "ok" and result.passed == result.total)
        return result.score

    def many(self, prompts: Sequence[str], completions: Sequence[str], *,
             max_workers: int | None = None) -> list[float]:
        """Rewards of many (prompt, completion) pairs, `max_workers` sandboxes at a time (default:
        the CPU count). Runs share the sandbox uid; see the module docstring."""
        if len(prompts) != len(completions):
            raise ValueError(f"PythonFunctionReward.many: {len(prompts)} prompts but {len(completions)} completions")
        with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
            return list(pool.map(self, prompts, completions))

"""Sandboxed code-execution reward (m1model.rl.sandbox): correct code scores, hostile code is contained."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from m1model.rl import sandbox
from m1model.rl.sandbox import (
    FunctionProblem,
    PythonFunctionReward,
    SandboxLimits,
    extract_code,
    run_function_tests,
)

IS_ROOT = os.geteuid() == 0
FAST = SandboxLimits(wall_time_s=3.0, cpu_time_s=2)

try:
    sandbox._interpreter(sandbox._target_user(FAST), None)
except sandbox.SandboxError as e:   # e.g. root whose only Python lives under /root (mode 0700)
    pytest.skip(f"no interpreter the sandbox user can run: {e}", allow_module_level=True)


def run(code, cases=(((), 1),), limits=FAST, entry="f"):
    return run_function_tests(textwrap.dedent(code), entry, list(cases), limits)


def netns_available():
    uid = sandbox._target_user(FAST)
    return bool(sandbox._netns_prefix(uid, sandbox._interpreter(uid, None)))


# ---------------------------------------------------------------- honest code


def test_correct_partial_and_broken_code():
    cases = [((1, 2), 3), ((2, 2), 4), (("a", "b"), "ab"), (([1], [2]), [1, 2])]
    ok = run("""
        def add(a, b):
            print("debug output does not matter")
            return a + b
    """, cases, entry="add")
    assert (ok.status, ok.passed, ok.score) == ("ok", 4, 1.0)
    assert ok.outputs == [3, 4, "ab", [1, 2]]
    half = run("def add(a, b):\n    return a + b if isinstance(a, int) else None\n", cases, entry="add")
    assert (half.status, half.passed, half.score) == ("ok", 2, 0.5)
    raises = run("def add(a, b):\n    return a // (b - 2)\n", cases, entry="add")
    assert raises.errors[1] == "ZeroDivisionError" and raises.errors[2] == "TypeError"
    syntax = run("def add(a, b:\n    pass\n", cases, entry="add")
    assert (syntax.load_error, syntax.score) == ("SyntaxError", 0.0)
    missing = run("def other(a, b):\n    return a + b\n", cases, entry="add")
    assert (missing.load_error, missing.score) == ("KeyError", 0.0)
    with pytest.raises(ValueError, match="JSON-encodable"):
        run("def f(x):\n    return x\n", [((object(),), 1)])
    with pytest.raises(ValueError, match="entry_point"):
        run("def f():\n    return 1\n", entry="not an identifier")
    # Tuples compare as lists (JSON), expected values never reach the child.
    pair = run("def f():\n    return (1, 2)\n", [((), [1, 2])])
    assert pair.score == 1.0


def test_reward_callable_and_code_extraction():
    problems = {"add two numbers": FunctionProblem("add", (((1, 2), 3), ((5, 5), 10)))}
    reward = PythonFunctionReward(problems, limits=FAST)
    assert reward("add two numbers", "```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert reward("add two numbers", "def add(a, b):\n    return 3\n") == 0.5
    strict = PythonFunctionReward(problems.__getitem__, limits=FAST, all_or_nothing=True)
    assert strict("add two numbers", "def add(a, b):\n    return 3\n") == 0.0
    answers = ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 3\n",
               "import os\ndef add(a, b):\n    os.fork()\n"]
    assert reward.many(["add two numbers"] * 3, answers, max_workers=3) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward.many(["a", "b"], ["c"])
    assert extract_code("def f():\n    return 1\n.") == "def f():\n    return 1\n"    # END marker dropped
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"


def test_runs_as_unprivileged_user_with_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("M1_TEST_SECRET", "hunter2-do-not-leak")
    r = run("""
        import os
        def f():
            return [os.getuid(), os.getgroups(), dict(os.environ)]
    """, [((), None)])
    assert r.status == "ok"
    uid, groups, env = r.outputs[0]
    assert "hunter2-do-not-leak" not in repr(env) and "M1_TEST_SECRET" not in env
    assert set(env) <= {"LANG", "HOME", "TMPDIR"}
    if IS_ROOT:
        assert uid == sandbox.NOBODY and groups == []


@pytest.fixture
def open_dir():
    """A directory anyone may enter and write (in /tmp, unlike pytest's 0700 tmp_path tree), so that
    only the sandbox, not file permissions, keeps the child out of it."""
    path = tempfile.mkdtemp(prefix="m1-sandbox-test-")
    os.chmod(path, 0o777)
    yield Path(path)
    shutil.rmtree(path)


# ---------------------------------------------------------------- hostile code


def test_infinite_loop_is_stopped():
    r = run("def f():\n    while True:\n        pass\n", limits=SandboxLimits(wall_time_s=1.5, cpu_time_s=1))
    assert r.status in ("timeout", "cpu_limit") and r.score == 0.0


def test_runaway_memory_is_stopped():
    r = run("""
        def f():
            hoard = []
            while True:
                hoard.append(bytearray(10 << 20))
    """)
    assert r.errors == ["MemoryError"] and r.score == 0.0
    assert run("def f():\n    return len(bytearray(1 << 34))\n").errors == ["MemoryError"]


FORK_BOMB = """
    import os
    def f():
        while True:
            os.fork()
"""


@pytest.mark.parametrize("code", [
    FORK_BOMB,
    "import subprocess\ndef f():\n    return subprocess.run(['id'], capture_output=True).returncode\n",
    "import os\ndef f():\n    os.system('id')\n",
    "import os\ndef f():\n    os.execv('/bin/sh', ['sh'])\n",
    "import os\ndef f():\n    return os.posix_spawn('/bin/true', ['true'], {})\n",
    "import threading\ndef f():\n    threading.Thread(target=print).start()\n",
    "import os\ndef f():\n    os.kill(os.getppid(), 9)\n",
], ids=["fork_bomb", "subprocess", "system", "exec", "posix_spawn", "thread", "kill_parent"])
def test_no_new_processes_or_signals(code):
    r = run(code)
    assert r.status == "ok" and r.score == 0.0 and r.errors[0] is not None


def test_fork_fails_even_without_the_audit_hook():
    """RLIMIT_NPROC = 0 alone stops fork (as the sandbox uid when root, or for any non-root user)."""
    r = run("""
        import os
        def f():
            try:
                pid = os.fork()
            except OSError as e:
                return type(e).__name__
            if pid == 0:
                os._exit(0)
            return "forked"
    """, [((), "BlockingIOError")], limits=SandboxLimits(audit_hook=False))
    assert r.outputs == ["BlockingIOError"]


@pytest.mark.parametrize("how", ["open", "os_open", "rename", "remove", "str_subclass", "relative_dotdot"])
def test_writes_outside_the_directory_are_refused(open_dir, how):
    victim = open_dir / "victim.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o666)
    target = str(open_dir / "pwned.txt")
    code = {
        "open": f"def f():\n    open({target!r}, 'w').write('x')\n",
        "os_open": f"import os\ndef f():\n    os.close(os.open({target!r}, os.O_CREAT | os.O_WRONLY))\n",
        "rename": f"import os\ndef f():\n    open('a', 'w').close()\n    os.rename('a', {target!r})\n",
        "remove": f"import os\ndef f():\n    os.remove({str(victim)!r})\n",
        "str_subclass": "class S(str):\n    def startswith(self, *a):\n        return True\n"
                        f"def f():\n    open(S({target!r}), 'w').write('x')\n",
        "relative_dotdot": f"def f():\n    open('../../../../../../..' + {target!r}, 'w').write('x')\n",
    }[how]
    r = run(code)
    assert r.status == "ok" and r.score == 0.0 and r.errors == ["PermissionError"]
    assert not os.path.exists(target) and victim.read_text() == "precious"


def test_write_outside_control_without_the_hook(open_dir):
    """The attack above is real: in a world-writable directory only the hook stops it."""
    target = open_dir / "pwned.txt"
    code = f"def f():\n    open({str(target)!r}, 'w').write('x')\n    return 1\n"
    r = run(code, limits=SandboxLimits(audit_hook=False))
    assert r.score == 1.0 and target.read_text() == "x"


@pytest.mark.skipif(not IS_ROOT, reason="file permissions only bind a dropped uid when the parent is root")
def test_writes_outside_fail_even_without_the_audit_hook(tmp_path):
    target = tmp_path / "pwned.txt"      # pytest's tmp_path tree is root's, mode 0700
    r = run(f"def f():\n    open({str(target)!r}, 'w').write('x')\n", limits=SandboxLimits(audit_hook=False))
    assert r.errors == ["PermissionError"] and not target.exists()


class _Listener:
    """A TCP server on 127.0.0.1 that records whether anyone connected."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connected.set()
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("layers", ["all", "hook_only", "namespace_only", "none"])
def test_network_is_unreachable(layers):
    if layers == "namespace_only" and not netns_available():
        pytest.skip("no unprivileged user + network namespaces on this host")
    limits = {"all": FAST, "hook_only": SandboxLimits(network_namespace=False),
              "namespace_only": SandboxLimits(audit_hook=False, network_namespace=True),
              "none": SandboxLimits(audit_hook=False, network_namespace=False)}[layers]
    server = _Listener()
    try:
        r = run(f"""
            import socket
            def f():
                with socket.create_connection(("127.0.0.1", {server.port}), timeout=1) as s:
                    s.sendall(b"exfiltrated")
                return 1
        """, limits=limits)
        if layers == "none":      # the control: with both layers off the connection is made
            assert r.score == 1.0 and server.connected.wait(timeout=5)
            return
    finally:
        server.close()
    assert not server.connected.is_set()
    assert r.score == 0.0 and r.errors[0] is not None


def test_huge_output_is_capped():
    limits = SandboxLimits(output_bytes=64 << 10)
    r = run("""
        import sys
        def f():
            while True:
                sys.stdout.write("x" * 4096)
    """, limits=limits)
    assert (r.status, r.score) == ("output_limit", 0.0)
    big = run("def f():\n    return 'y' * (1 << 20)\n", [((), "y" * (1 << 20))], limits=limits)
    assert (big.status, big.score) == ("output_limit", 0.0)


@pytest.mark.parametrize("code", [
    "import os\ndef f():\n    return open(f'/proc/{os.getppid()}/environ').read()\n",
    "def f():\n    return open('/etc/passwd').read()\n",
    "import os\ndef f():\n    return os.listdir('/')\n",
    "import ctypes\ndef f():\n    return 1\n",
    "import gc\ndef f():\n    return len(gc.get_objects())\n",
    "import sys\ndef f():\n    sys.settrace(lambda *a: None)\n",
    "def g(x=1):\n    return x\ndef f():\n    g.__defaults__ = (2,)\n",
    "import os\ndef f():\n    os.symlink('/', 'root')\n",
    "import os\ndef f():\n    os.mkdir('d')\n",
    "import os\ndef f():\n    os.chdir('/')\n",
    "import mmap\ndef f():\n    return 1\n",
    "def f():\n    for i in range(100):\n        open(f'f{i}', 'w').close()\n",
], ids=["parent_environ", "etc_passwd", "list_root", "ctypes", "gc_walk", "settrace", "rebind_defaults",
        "symlink", "mkdir", "chdir", "mmap", "too_many_files"])
def test_audit_hook_refusals(code):
    r = run(code)
    assert r.status == "ok" and r.score == 0.0
    assert "PermissionError" in (r.errors[0], r.load_error)


NATIVE_COPY = """
    import glob, importlib.machinery, importlib.util, sys
    def f():
        found = [p for d in sys.path for p in glob.glob(d + "/_json*.so")]
        if not found:
            return "no _json extension module to copy"
        open("evil.so", "wb").write(open(found[0], "rb").read())   # a real extension module
        loader = importlib.machinery.ExtensionFileLoader("_json", "evil.so")
        return type(loader.create_module(importlib.util.spec_from_loader("_json", loader))).__name__
"""


def test_native_module_written_by_the_candidate_is_refused():
    """importlib's extension loader dlopens any path; loading one from the work directory is refused."""
    unguarded = run(NATIVE_COPY, limits=SandboxLimits(audit_hook=False))
    if unguarded.outputs == ["no _json extension module to copy"]:
        pytest.skip("the sandbox interpreter has no _json extension module")
    assert unguarded.outputs == ["module"]            # the attack works without the hook ...
    assert run(NATIVE_COPY).errors == ["PermissionError"]   # ... and the hook refuses it


def test_work_directory_is_private_and_removed(monkeypatch):
    created = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*args, **kwargs):
        created.append(real_mkdtemp(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", spy)
    r = run("""
        import os
        def f():
            open("data.txt", "w").write("scratch")
            os.chmod("data.txt", 0)
            return sorted(os.listdir("."))
    """, [((), ["data.txt"])])
    assert r.score == 1.0
    assert created and not os.path.exists(created[0])

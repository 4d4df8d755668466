"""The program m1model.rl.sandbox runs in the sandboxed child (passed with `python -I -S -B -c`).

It runs with an unprivileged uid (when the parent is root), in a fresh
directory it owns, with a scrubbed environment, inherited stdout/stderr files
and nothing else open. In order it:

  1. reads payload.json (candidate code, entry point, test inputs) and deletes it;
  2. lowers its resource limits (CPU time, address space, file size, open files,
     processes = 0 so fork and threads fail, no core dumps);
  3. installs an audit hook (unless disabled) that refuses: process creation and
     signals to others, sockets, ctypes/cffi and other native escape hatches,
     subinterpreters, tracing/profiling hooks, gc object walks, rewriting
     function code/defaults, writes outside the directory, reads outside the
     directory and the standard library, native modules from outside the
     standard library, links, subdirectories, changing directory and more
     than max_files files;
  4. executes the candidate, calls the entry point on each input and writes one
     result line (MARKER + JSON) to a duplicate of stdout.

Standard library only, and nothing the candidate can rebind affects the hook:
the hook sees its helpers and constants only through default arguments
(immutable tuples; rebinding a function's defaults or code is itself refused)
and calls only C functions and methods of built-in types, after copying any
str subclass into an exact str.
"""

import builtins
import json
import os
import posix
import resource
import sys

MARKER = "\x00m1-sandbox-result\x00"


def set_limits(cfg):
    def cap(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))

    cap(resource.RLIMIT_CPU, cfg["cpu_time_s"], cfg["cpu_time_s"] + 1)   # SIGXCPU, then SIGKILL
    cap(resource.RLIMIT_AS, cfg["memory_bytes"])
    cap(resource.RLIMIT_FSIZE, cfg["file_bytes"])                          # SIGXFSZ beyond it
    cap(resource.RLIMIT_NOFILE, cfg["open_files"])
    cap(resource.RLIMIT_NPROC, 0)                                            # no fork, no threads
    cap(resource.RLIMIT_CORE, 0)


BLOCKED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "os.startfile", "_thread.start_new_thread", "os.link", "os.symlink",
    "os.mkdir", "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "resource.setrlimit", "resource.prlimit", "mmap.__new__", "os.chdir", "os.fchdir",
})
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.", "cffi.", "_posixsubprocess.", "winreg.", "msvcrt.")
BLOCKED_MODULES = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "subprocess", "multiprocessing",
    "_multiprocessing", "socket", "_socket", "ssl", "_ssl", "mmap", "resource", "pty", "termios", "fcntl",
    "_posixshmem", "_xxsubinterpreters", "_xxinterpchannels", "_xxsubinterp", "_testcapi", "_testinternalcapi",
    "_testmultiphase", "_testbuffer", "_testimportmultiple", "_testclinic", "_lsprof", "faulthandler",
    "tracemalloc", "_tracemalloc",
})
# Events that modify a path: (indices of path arguments, indices of dir_fd arguments).
PATH_EVENTS = {
    "os.rmdir": ((0,), (1,)), "os.remove": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_hook(workdir, lib_roots, max_files):
    """workdir, lib_roots (the standard library's directories): real absolute paths computed before
    any candidate code ran. Reads are allowed in both, writes in workdir, native modules from lib_roots."""

    def text(p, _type=type, _str=str, _bytes=bytes, _isinstance=isinstance, _add=str.__add__,
             _decode=bytes.decode, _getcwd=posix.getcwd, _err=PermissionError):
        """The absolute, lexically normalised path of a str/bytes path argument (exact str)."""
        if _isinstance(p, _str):
            p = _add("", p)                     # exact copy: a subclass's overrides are never called
        elif _isinstance(p, _bytes):
            p = _decode(p, "utf-8", "surrogateescape")
        else:
            raise _err("sandbox: path of an unsupported type")
        if not p.startswith("/"):
            p = _add(_add(_getcwd(), "/"), p)
        parts = []
        for part in p.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(p, roots):
        for root in roots:
            if p == root or p.startswith(root + "/"):
                return True
        return False

    def hook(event, args, *, _text=text, _inside=inside, _type=type, _int=int, _len=len, _str=str,
             _add=str.__add__, _home=(workdir,), _read=(workdir, *lib_roots), _libs=tuple(lib_roots),
             _max=max_files,
             _listdir=posix.listdir, _events=BLOCKED_EVENTS, _prefixes=BLOCKED_PREFIXES,
             _modules=BLOCKED_MODULES, _paths=PATH_EVENTS, _write=WRITE_FLAGS, _err=PermissionError):
        if event in _events or event.startswith(_prefixes):
            raise _err(f"sandbox: {event} is not allowed")
        if event == "import":
            name = _add("", args[0])
            if name in _modules or name.split(".")[0] in _modules or name.startswith(("_test", "_xx")):
                raise _err(f"sandbox: importing {name} is not allowed")
            # A native module's file (importlib's extension loader also takes one from any path):
            # only the standard library's, never one the candidate wrote.
            if _len(args) > 1 and args[1] is not None and not _inside(_text(args[1]), _libs):
                raise _err(f"sandbox: loading {name} from outside the standard library is not allowed")
        elif event == "open":
            path, mode, flags = args
            if _type(path) is _int:                        # an fd this process already holds
                return
            p = _text(path)
            writing = _type(flags) is _int and flags & _write
            if writing or mode is None:                   # writes and low-level os.open: workdir only
                if not _inside(p, _home) or p == _home[0]:
                    raise _err(f"sandbox: opening {p} is not allowed (only inside {_home[0]})")
                if writing and _len(_listdir(_home[0])) >= _max:
                    raise _err(f"sandbox: at most {_max} files")
            elif not _inside(p, _read):
                raise _err(f"sandbox: reading {p} is not allowed")
        elif event in _paths:
            where, dir_fds = _paths[event]
            for i in dir_fds:
                if args[i] is not None and args[i] != -1:
                    raise _err(f"sandbox: {event} with dir_fd is not allowed")
            for i in where:
                if _type(args[i]) is _int or not _inside(_text(args[i]), _home):
                    raise _err(f"sandbox: {event} outside {_home[0]} is not allowed")
        elif event in ("os.listdir", "os.scandir"):
            if args[0] is not None and _type(args[0]) is not _int:
                p = _text(args[0])
                if not _inside(p, _read):
                    raise _err(f"sandbox: listing {p} is not allowed")
        elif event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
            raise _err(f"sandbox: setting {args[1]} is not allowed")

    sys.addaudithook(hook)


def run_candidate(code, entry_point, inputs):
    """[{"ok": true, "value": <json text>} | {"ok": false, "error": name}] per input; or a load error."""
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    try:
        exec(compile(code, "<candidate>", "exec"), namespace)
        fn = namespace[entry_point]
    except BaseException as e:  # noqa: BLE001 -- any failure of the candidate is its score, not ours
        return {"load_error": type(e).__name__}
    results = []
    for args_text in inputs:
        try:
            value = json.dumps(fn(*json.loads(args_text)))
            results.append({"ok": True, "value": value})
        except BaseException as e:  # noqa: BLE001
            results.append({"ok": False, "error": type(e).__name__})
    return {"results": results}


def main():
    cfg = json.loads(sys.argv[1])
    with open("payload.json") as f:
        payload = json.load(f)
    os.remove("payload.json")
    out = os.dup(1)
    set_limits(cfg)
    del sys.modules["resource"]   # re-importing it is refused (and its setrlimit event too)
    if cfg["audit_hook"]:
        libs = [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
        install_hook(os.path.realpath(os.getcwd()), libs, cfg["max_files"])
    report = run_candidate(payload["code"], payload["entry_point"], payload["inputs"])
    try:
        sys.stdout.flush()   # the candidate's prints come before the result line
    except BaseException:  # noqa: BLE001 -- a candidate may have replaced or closed sys.stdout
        pass
    os.write(out, (MARKER + json.dumps(report) + "\n").encode())
    os._exit(0)


main()

"""Processes forked from a server that has imported torch and ``eggroll_optim`` once.

A fresh interpreter pays ~5 s importing torch and ``eggroll_optim`` and ~2 s tearing them down at
exit on a small CPU; a process forked from multiprocessing's forkserver, after the server imported
them (and nothing else: no torch op has run, no thread has started), costs milliseconds and exits
without the teardown. ``tests/test_distributed.py`` runs its gloo ranks this way, the example and
benchmark tests their scripts (:func:`run_script`).

:func:`run_script` runs a script as ``python SCRIPT ARGS`` would, in its own process: ``__main__``,
``sys.argv``, the script's folder first on ``sys.path``, the working directory, the environment,
the exit status (``sys.exit`` codes and messages, 1 with the traceback for an exception) and stdout
and stderr apart. What differs: the modules above are imported already, with the environment of the
test process when the server started; ``OMP_NUM_THREADS`` is applied with ``torch.set_num_threads``
(OpenMP read it when the server loaded torch); ``sys.path`` also holds the test process's entries.
A test whose point is a fresh interpreter (the console script, an environment read at import) runs
a real subprocess instead.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading

PRELOAD = ["torch", "torch.distributed", "eggroll_optim"]
_START = threading.Lock()  # Process.start from the test modules' thread pools, one at a time


def context():
    """The forkserver context, its server preloading :data:`PRELOAD` (``spawn`` where there is no forkserver).

    The server imports by name, without the caller's ``sys.path``: installed modules only. Preloading
    has no effect once the server runs: slower, the same results.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: a fresh interpreter each time
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start(target, *args):
    """``target(*args)`` in a new process forked from the server (started); join it for its ``exitcode``."""
    with _START:
        process = context().Process(target=target, args=args)
        process.start()
    return process


def _script_main(path: str, args: list, cwd: str, env: dict, stdout: str, stderr: str) -> None:
    """In the forked process: ``python PATH ARGS`` in ``cwd`` with ``env``, output to the two files."""
    for fd, name in ((1, stdout), (2, stderr)):
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    # SystemExit and exceptions: multiprocessing reports them as the interpreter would (status, message,
    # traceback on stderr), flushes stdout and stderr, and exits without tearing the interpreter down
    runpy.run_path(path, run_name="__main__")


def run_script(path, *args, cwd=None, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python PATH ARGS`` in a forked process (see the module's docstring); raises ``TimeoutExpired``."""
    path = os.path.abspath(path)
    args = [str(a) for a in args]
    command = [sys.executable, path, *args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = start(_script_main, path, args, os.path.abspath(cwd or os.getcwd()),
                        dict(os.environ if env is None else env), out, err)
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, open(out).read(), open(err).read())
        return subprocess.CompletedProcess(command, process.exitcode, open(out).read(), open(err).read())

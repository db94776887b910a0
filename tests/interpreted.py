"""Run test code under Triton's CPU interpreter, which is chosen when triton is imported: in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_interpreted(body: str, timeout: int = 300) -> None:
    """Run ``body`` with ``TRITON_INTERPRET=1`` and ``tests/`` importable; it fails the test unless
    ``body`` runs to the end (its asserts hold)."""
    pytest.importorskip("triton")
    code = f"import sys\nsys.path.insert(0, {TESTS!r})\n{textwrap.dedent(body)}\nprint('interpreted ok')\n"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "interpreted ok" in proc.stdout, proc.stderr[-2000:]

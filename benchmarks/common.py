"""Shared benchmark plumbing: arguments, timing, ceilings, floors, correctness checks, JSON, tables.

Method (see the workplace's METHOD.md): every figure is a ratio against a baseline timed in the
same process on the same device. On CUDA a region is timed with ``torch.cuda.Event`` pairs after a
warm-up, the L2 cache is flushed (a 256 MB write, as ``triton.testing.do_bench`` does) before each
repeat, inputs rotate over several sets when asked, and the median is reported. On CPU the
median of ``time.perf_counter`` intervals is reported. The floor of a figure is
``max(FLOPs / measured matmul peak, bytes / measured copy bandwidth)``, both ceilings measured
in-process on the same device.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the device machine has no editable install: import from the checkout
    sys.path.insert(0, ROOT)

# TF32 keeps 10 mantissa bits (unit roundoff ~4.9e-4): two layers of K=784/256 dots land near 1-2e-3,
# the plain cuBLAS inference baseline included (measured on an H100), so TF32-enabled float32 gets 5e-3.
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, "tf32": 5e-3, torch.float32: 5e-3, torch.float64: 1e-9}


# ----- arguments / device ---------------------------------------------------------------------
def make_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: runs on CPU in seconds (tests)")
    p.add_argument("--out", default=None, help="write every figure to this JSON file")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    return p


def parse(p: argparse.ArgumentParser, argv=None):
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----- timing ---------------------------------------------------------------------------------
_FLUSH: dict = {}


def _flush_l2(device) -> None:
    buf = _FLUSH.get(str(device))
    if buf is None:
        buf = _FLUSH[str(device)] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    buf.zero_()


def bench(fn, device, sets=None, *, warmup: int = 2, budget_s: float = 1.0, min_reps: int = 3,
          max_reps: int = 200, flush: bool = True) -> dict:
    """Median time of ``fn(*sets[i % len(sets)])`` (or ``fn()``) in ms, plus spread and rep count.

    Repeats are chosen so the timed part lasts about ``budget_s`` (at least ``min_reps``)."""
    sets = sets or [()]
    call = lambda i: fn(*sets[i % len(sets)])  # noqa: E731
    for i in range(warmup):
        call(i)
    sync(device)
    t0 = time.perf_counter()
    call(warmup)
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / est)))
    times = []
    if is_cuda(device):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            if flush:
                _flush_l2(device)
            start.record()
            call(i)
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "min_ms": times[0], "p10_ms": q(0.1),
            "p90_ms": q(0.9), "reps": reps}


def bench_interleaved(fns: dict, device, sets=None, *, warmup: int = 2, budget_s: float = 1.0, min_reps: int = 5,
                      max_reps: int = 400, flush: bool = True) -> dict:
    """``bench`` for several functions at once, interleaved: each repeat times every function in turn
    (L2 flushed before each), so a drift of the clocks over the run reaches all of them alike and a ratio
    of two medians compares the same stretch of time. Returns ``{name: bench's dict}``."""
    sets = sets or [()]
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](*sets[i % len(sets)])
    sync(device)
    t0 = time.perf_counter()
    for name in names:
        fns[name](*sets[warmup % len(sets)])
    sync(device)
    reps = int(min(max_reps, max(min_reps, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = {name: [] for name in names}
    if is_cuda(device):
        events = []
        for i in range(reps):
            for name in names:
                if flush:
                    _flush_l2(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name](*sets[i % len(sets)])
                end.record()
                events.append((name, start, end))
        torch.cuda.synchronize(device)
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    else:
        for i in range(reps):
            for name in names:
                t0 = time.perf_counter()
                fns[name](*sets[i % len(sets)])
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        out[name] = {"median_ms": statistics.median(ts), "min_ms": ts[0], "p10_ms": q(0.1), "p90_ms": q(0.9),
                     "reps": reps}
    return out


def do_bench_ms(fn, device):
    """Cross-check of ``bench``: ``triton.testing.do_bench`` median (CUDA with triton only, else None)."""
    if not is_cuda(device):
        return None
    try:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    except Exception:  # noqa: BLE001 - optional
        return None


def peak_memory(fn, device) -> dict:
    """Run ``fn`` once; peak allocated bytes above what was allocated before (CUDA only)."""
    if not is_cuda(device):
        fn()
        return {"peak_gb": None, "peak_total_gb": None}
    free(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_gb": (peak - before) / 1e9, "peak_total_gb": peak / 1e9}


# ----- ceilings and floors --------------------------------------------------------------------
def measure_ceilings(device, quick: bool = False) -> dict:
    """Dense matmul rate (bf16, and float32 with TF32 allowed) and device-to-device copy bandwidth."""
    n = 256 if quick else (8192 if is_cuda(device) else 1024)
    out = {"matmul_n": n}
    g = torch.Generator(device=device).manual_seed(123)
    old = torch.backends.cuda.matmul.allow_tf32
    for key, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, generator=g).to(dtype)  # random data, never zeros
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        t = bench(lambda: torch.mm(a, b.t()), device, budget_s=0.3 if quick else 1.0, flush=False)
        out[f"matmul_{key}_tflops"] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = old
    numel = (2**18 if quick else (2**28 if is_cuda(device) else 2**24))  # fp32: 1 GiB on CUDA
    src = torch.randn(numel, device=device, generator=g)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, budget_s=0.3 if quick else 1.0, flush=False)
    out["copy_bytes"] = 2 * src.numel() * 4
    out["copy_gbps"] = out["copy_bytes"] / (t["median_ms"] * 1e-3) / 1e9  # read + written
    if not is_cuda(device):
        out["note"] = "CPU: 'tf32' is plain float32 (TF32 is a CUDA mode)"
    del src, dst
    free(device)
    return out


def floor(flops: float, nbytes: float, ceilings: dict, unit: str) -> dict:
    """``max(flops / peak, bytes / bandwidth)`` in ms; ``unit`` is ``'bf16'`` or ``'tf32'``."""
    t_flop = flops / (ceilings[f"matmul_{unit}_tflops"] * 1e12) * 1e3
    t_byte = nbytes / (ceilings["copy_gbps"] * 1e9) * 1e3
    return {"floor_ms": max(t_flop, t_byte), "floor_bound": "flops" if t_flop >= t_byte else "bytes",
            "gflop": flops / 1e9, "gbytes": nbytes / 1e9}


# ----- correctness ----------------------------------------------------------------------------
def poison(device, nbytes: int = 64 * 2**20) -> None:
    """Fill then free a block, so the caching allocator hands out NaN memory to the next
    outputs: an element a kernel forgets to write stays NaN and fails the check. CUDA only (the
    CPU allocator gives no such guarantee); outputs written through ``out=`` are poisoned directly."""
    if is_cuda(device):
        torch.full((nbytes // 4,), float("nan"), device=device)
        # freed at once, back to the cache; later allocations of similar size reuse it


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def check(name: str, out, ref, tol: float, log: dict) -> float:
    """``||out - ref|| / ||ref|| < tol`` (NaN/inf fail); records the error in ``log[name]``."""
    err = rel_err(out, ref)
    log[name] = err
    if not err < tol:
        raise AssertionError(f"correctness check {name}: relative error {err:.3e} >= {tol:.0e}")
    return err


def guard(name: str, fn, failures: dict) -> bool:
    """Run a check; a failed check is recorded (and printed), not fatal, so the other variants
    still get timed in a one-shot GPU run. ``finish`` turns any failure into exit code 1."""
    try:
        fn()
        return True
    except Exception as err:  # noqa: BLE001 - a broken variant is reported, the rest still run
        failures[name] = f"{type(err).__name__}: {err}"
        print(f"# CHECK FAILED {name}: {err}", flush=True)
        return False


def finish(failures: dict) -> None:
    if failures:
        print(f"# {len(failures)} correctness check(s) failed: {sorted(failures)}", flush=True)
        sys.exit(1)


# ----- output ---------------------------------------------------------------------------------
def meta(args) -> dict:
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    info = {
        "card": card, "device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "quick": bool(args.quick),
        "cpu_threads": torch.get_num_threads(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    return info


def save(args, payload: dict) -> dict:
    """Add ``meta`` and write ``args.out`` (JSON) if given; returns the payload."""
    payload = {"meta": meta(args), **payload}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
    return payload


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or math.isinf(v) or math.isnan(v):
            return str(v)
        a = abs(v)
        return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.3e}"
    return str(v)


def table(rows: list[dict], cols: list[str], title: str = "") -> str:
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = ([title] if title else []) + [line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def header(args, ceilings: dict) -> None:
    m = meta(args)
    print(f"# {m['card']} | torch {m['torch']} | {m['date']} | {m['command']}")
    print(f"# ceilings: bf16 {fmt(ceilings['matmul_bf16_tflops'])} TFLOP/s, tf32 "
          f"{fmt(ceilings['matmul_tf32_tflops'])} TFLOP/s (n={ceilings['matmul_n']}), copy "
          f"{fmt(ceilings['copy_gbps'])} GB/s", flush=True)

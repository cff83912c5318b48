"""Which product multiplies each weight format, per number of rows: chosen by timing on the machine.

A product computes y = x @ W.T (+ b) for a Linear of one format (graph/weights.py). Several can do
it, and which is fastest depends on the machine and on M, the rows multiplied at once (1 for a
decode step, k for a k-token verify step). Measured on the 2-core development VMs, all 30 layers of
the default model, ms at 1 / 4 / 8 / 16 rows:
    AVX2 Zen 3:      numpy fp32 35/82/78/104, oneDNN bf16 (emulated) 24/102/180/342,
                     torch int8 kernel 18/38/68/129, torch int4 kernel 19/35/45/136,
                     numba int8 with fp32 activations (kernels/cpu_quant_linear.py) 9/20/39/76
    AVX-512 BF16:    torch/MKL fp32 45/67/97/63, oneDNN bf16 28/25/31/38, torch int8 12/12/25/37
So the first time a format is multiplied (the plan's first step), every candidate for that format
is timed at M = 1, 2, 4, 8, 16, 32 on a working set of the model's own matrices of that format
(a little more than the last-level cache, so that the weights stream from memory as they do in a
forward), and the fastest per bucket is kept; a step with M rows uses the smallest bucket >= M (32's
above 32). The choice is cached as JSON per machine (CPU model and vector features, thread count,
torch/numpy versions; or the GPU), so later processes read it instead of timing. Timing takes
about TIMING_BUDGET_S for all formats of a model. While other processes keep more than BUSY_CORES
cores busy (watched for BUSY_WINDOW_S first), nothing is timed (their threads would be measured,
and the choice would be cached): the backend's default product runs, and LLM.describe() says why.
TREADLE_PRODUCTS=fixed (or `mode="fixed"`) skips timing and uses each backend's default product
(graph/backend.py): tests use it for determinism.

Row invariance: speculative methods are lossless against AR only if a row's product is bit for bit
the same in a k-row verify step as in a 1-row decode step. Products whose output is rounded to 16
bits (bf16 weights, torch's int8/int4 kernels) turn any last-bit difference into ~2^-8 relative
noise in the logits, so for every format but float32 the chosen products must all come from one
row-invariant `numerics` family (the same bits whatever the rows: a kernel and its row-chunked
calls); the family is the one with the least summed time relative to the per-bucket best.
float32 products keep fp32 outputs: BLAS (numpy/OpenBLAS, torch/MKL) is not row-invariant there
(measured), and its differences are single fp32 roundings, as before this choice existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..kernels import cpu_quant_linear, quant_linear
from ..kernels.linear import (
    INT4_CPU_KERNEL,
    INT8_CPU_KERNEL,
    linear_cpu,
    linear_int4_cpu,
    linear_int8_cpu,
    linear_ref,
)
from .backend import Backend
from .weights import Linear, ModelWeights, WeightFormat

BUCKETS = (1, 2, 4, 8, 16, 32)
TIMING_BUDGET_S = 1.5  # for all of a model's formats: past it only the default is still timed
BUSY_CORES = 0.5  # other processes keeping more cores busy than this: nothing is timed
BUSY_WINDOW_S = 0.25  # how long _load() watches the CPUs
MODES = ("measure", "fixed")
ENV = "TREADLE_PRODUCTS"
CACHE_VERSION = 1
# Vector features that decide which products are fast (recorded with every cached choice).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Product:
    name: str
    fn: Callable[[torch.Tensor, Linear], torch.Tensor]  # (x [..., in], Linear) -> [..., out]
    numerics: str  # products with the same numerics compute the same bits for a row
    row_invariant: bool  # a row's bits do not depend on the other rows (tests/graph/test_products)
    rows_per_call: int = 0  # > 0: the same kernel called on chunks of this many rows


def _numpy(x, lin):
    return linear_cpu(x, lin.host, lin.bias)


def _torch(x, lin):
    return linear_ref(x, lin.weight, lin.bias)


def _int8_ref(x, lin):
    return quant_linear.int8_linear_ref(x, lin.weight, lin.scales, lin.bias)


def _int4_ref(x, lin):
    return quant_linear.int4_linear_ref(x, lin.weight, lin.scales, lin.mins, lin.bias)


def _int8_triton(x, lin):
    return quant_linear.int8_linear(x, lin.weight, lin.scales, lin.bias)


def _int4_triton(x, lin):
    return quant_linear.int4_linear(x, lin.weight, lin.scales, lin.mins, lin.bias)


def _int8_cpu(rows: int):
    def fn(x, lin):
        return linear_int8_cpu(x, lin.weight, lin.packed_scales, lin.bias, rows)

    return fn


def _int4_cpu(rows: int):
    def fn(x, lin):
        return linear_int4_cpu(x, lin.packed, lin.packed_scales, lin.out_features, lin.bias, rows)

    return fn


def _int8_numba(x, lin):
    codes, scales = lin.host_int8 if lin.host_int8 is not None else (lin.weight, lin.scales)
    return cpu_quant_linear.int8_linear_cpu(x, codes, scales, lin.bias)


def _packed(kind: str, make, available: bool, ref: Product) -> list[Product]:
    if not available:
        return [ref]
    # The same kernel on the whole of x, or on chunks of 4 / 8 rows: one numerics family.
    return [Product(f"torch-{kind}" + (f"-rows{r}" if r else ""), make(r), f"torch-{kind}", True, r)
            for r in (0, 4, 8)]


INT8_REF = Product("int8-dequantize-ref", _int8_ref, "fp32-dequantized", False)
INT4_REF = Product("int4-dequantize-ref", _int4_ref, "fp32-dequantized", False)
# fp32 activations and accumulation (kernels/cpu_quant_linear.py): one kernel for every row count.
INT8_NUMBA = ([Product("numba-int8", _int8_numba, "numba-fp32", True)]
              if cpu_quant_linear.AVAILABLE else [])


def candidates(backend: Backend, device_type: str, fmt: WeightFormat) -> list[Product]:
    """The products that can multiply `fmt` on this backend and device; the first is the default
    (graph/backend.py's op table runs it)."""
    cpu = device_type == "cpu"
    if fmt == WeightFormat.FLOAT32 and cpu:
        return [Product("numpy", _numpy, "openblas", False),
                Product("torch", _torch, "torch-fp32", False)]
    if not fmt.quantized:
        # bf16 on the CPU: oneDNN, row-invariant with kernels/linear.py's reduction chunks.
        invariant = cpu and fmt == WeightFormat.BFLOAT16
        return [Product("torch", _torch, f"torch-{fmt.value}", invariant)]
    ref = INT8_REF if fmt == WeightFormat.INT8 else INT4_REF
    if backend == Backend.TRITON:
        kernel = _int8_triton if fmt == WeightFormat.INT8 else _int4_triton
        return [Product(f"triton-{fmt.value}", kernel, f"triton-{fmt.value}", True), ref]
    if not cpu:
        return [ref]
    if fmt == WeightFormat.INT8:
        return _packed("int8", _int8_cpu, INT8_CPU_KERNEL, ref) + INT8_NUMBA
    return _packed("int4", _int4_cpu, INT4_CPU_KERNEL, ref)


# --- the choice ----------------------------------------------------------------------------------


@dataclass
class Choice:
    """One format's products: names[b] for bucket BUCKETS[b], and how they were chosen."""

    format: WeightFormat
    names: list[str]
    how: str  # "default", "only candidate", "measured", "cached"
    ms: dict[str, list[float | None]] | None = None  # per candidate, per bucket (when measured)


class Products:
    """The `linear` op of one model: the product per (format, bucket), chosen on first use."""

    def __init__(
        self,
        backend: Backend | str,
        weights: ModelWeights,
        mode: str | None = None,
        cache: Path | None = None,
    ):
        """`mode`: "measure" or "fixed" (default: $TREADLE_PRODUCTS, else "measure"); `cache`: a
        directory for the per-machine JSON (None: this process only)."""
        mode = mode or os.environ.get(ENV) or "measure"
        if mode not in MODES:
            raise ValueError(f"product mode {mode!r} (from the argument or ${ENV}): expected one "
                             f"of {', '.join(MODES)}")
        self.backend = Backend(backend)
        self.device = weights.embed.device
        self.dtype = weights.norm.dtype  # the activations'
        self.mode, self.cache = mode, cache
        self.by_format: dict[WeightFormat, list[Linear]] = {}
        seen = set()
        for lin in weights.linears():  # a tied LM head is the embedding's Linear: once
            if id(lin) not in seen:
                seen.add(id(lin))
                self.by_format.setdefault(lin.format, []).append(lin)
        self.choices: dict[WeightFormat, Choice] = {}
        self._tables: dict[WeightFormat, list[Callable]] = {}

    def candidates(self, fmt: WeightFormat) -> list[Product]:
        return candidates(self.backend, self.device.type, fmt)

    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        table = self._tables.get(lin.format)
        if table is None:
            table = self._table(lin.format)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return table[rows if rows < len(table) else -1](x, lin)

    def choose(self, fmt: WeightFormat) -> Choice:
        """The choice for `fmt` (timing it now unless fixed, cached or already made)."""
        if fmt not in self.choices:
            self._table(fmt)
        return self.choices[fmt]

    def _table(self, fmt: WeightFormat) -> list[Callable]:
        cands = self.candidates(fmt)
        usable = allowed(fmt, cands)
        if self.mode == "fixed":
            choice = Choice(fmt, [cands[0].name] * len(BUCKETS), "default")
        elif len(usable) == 1:
            choice = Choice(fmt, [usable[0].name] * len(BUCKETS), "only candidate")
        else:
            choice = self._measured(fmt, usable)
        by_name = {c.name: c.fn for c in cands}
        table = [by_name[choice.names[_bucket(m)]] for m in range(BUCKETS[-1] + 1)]
        self.choices[fmt], self._tables[fmt] = choice, table
        return table

    # --- timing ----------------------------------------------------------------------------------
    def _measured(self, fmt: WeightFormat, cands: list[Product]) -> Choice:
        lins = _working_set(self.by_format.get(fmt, []), _cache_bytes(self.device))
        if not lins:  # a format not in this model (asked through choose): time a stand-in
            lins = [_stand_in(fmt, self.device, self.dtype)]
        key = self._key(fmt, lins, cands)
        names = {c.name for c in cands}
        cached = _MEMO.get(key) or _read_cache(self.cache, key)
        if cached is not None and set(cached["names"]) <= names:
            _MEMO[key] = cached
            return Choice(fmt, list(cached["names"]), "cached", cached.get("ms"))
        busy, cores = _load()
        # Other processes' work would be timed with ours (thread pools spinning against each
        # other cost 10-100x), and a choice made under it would stay cached: a choice timed at
        # load ~3.6 on the 2-core VMs cached torch over numpy for fp32 with numpy timed 10-20x
        # slow, and AR fell from ~23 to ~16 tokens/s.
        if self.device.type == "cpu" and busy > BUSY_CORES:
            return Choice(fmt, [cands[0].name] * len(BUCKETS),
                          f"default, not timed: other processes keep {busy:.1f} of {cores} cores "
                          "busy")
        timed = sum(len(allowed(f, self.candidates(f))) > 1 for f in self.by_format) or 1
        ms = _time_candidates(cands, lins, self.dtype, self.device, TIMING_BUDGET_S / timed)
        chosen = pick(fmt, cands, ms)
        entry = {"names": chosen, "ms": ms, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "working_set": _signature(lins)}
        _MEMO[key] = entry
        if self.cache is not None:
            _write_cache(self.cache, key, entry)
        return Choice(fmt, chosen, "measured", ms)

    def _key(self, fmt: WeightFormat, lins: list[Linear], cands: list[Product]) -> str:
        # The candidates are part of the key: a new one (a kernel added, numba installed) is timed.
        return "/".join((self.backend.value, self.device.type, str(self.dtype).split(".")[-1],
                         fmt.value, _signature(lins), ",".join(sorted(c.name for c in cands))))

    # --- reporting -------------------------------------------------------------------------------
    def describe(self) -> list[str]:
        """One line per format in the model: its matrices and the product per row bucket."""
        lines = []
        for fmt, lins in self.by_format.items():
            choice = self.choices.get(fmt)
            if choice is None:
                what = (f"{self.candidates(fmt)[0].name} (default)" if self.mode == "fixed"
                        else "not chosen yet (timed on first use)")
            else:
                what = _ranges(choice.names) + f" ({choice.how})"
            lines.append(f"{fmt.value}: {len(lins)} matrices, {what}")
        return lines

    def fallbacks(self) -> list[str]:
        """Formats whose products run a dequantizing reference, and why."""
        out = []
        for fmt in self.by_format:
            if not fmt.quantized:
                continue
            choice = self.choices.get(fmt)
            names = choice.names if choice else [self.candidates(fmt)[0].name]
            if any(n.endswith("dequantize-ref") for n in names):
                why = ("this torch build has no CPU weight-only kernel for it"
                       if self.device.type == "cpu" else "the torch backend has no kernel for it "
                       "off the CPU (the Triton backend has)")
                out.append(f"{fmt.value} products dequantize the weights to fp32 on every call "
                           f"(the reference): {why}")
        return out


def allowed(fmt: WeightFormat, cands: list[Product]) -> list[Product]:
    """The candidates a choice may use: for every format but float32 the row-invariant ones, if
    any is (module docstring)."""
    if fmt != WeightFormat.FLOAT32 and any(c.row_invariant for c in cands):
        return [c for c in cands if c.row_invariant]
    return cands


def pick(fmt: WeightFormat, cands: list[Product], ms: dict[str, list[float | None]]) -> list[str]:
    """Per bucket, the fastest candidate; for every format but float32 all from one numerics
    family (row-invariant if any is): the family with the least time relative to the best."""
    usable = allowed(fmt, cands)
    if fmt != WeightFormat.FLOAT32:
        families: dict[str, list[Product]] = {}
        for c in usable:
            families.setdefault(c.numerics, []).append(c)
        best = [min(ms[c.name][b] for c in usable if ms[c.name][b] is not None)
                for b in range(len(BUCKETS))]

        def score(members: list[Product]) -> float:
            total = 0.0
            for b in range(len(BUCKETS)):
                times = [ms[c.name][b] for c in members if ms[c.name][b] is not None]
                total += min(times) / best[b] if times else float("inf")
            return total

        usable = min(families.values(), key=score)
    names = []
    for b in range(len(BUCKETS)):
        timed = [c for c in usable if ms[c.name][b] is not None]
        names.append(min(timed, key=lambda c: ms[c.name][b]).name)  # ties: the earlier one
    return names


def _bucket(rows: int) -> int:
    for b, size in enumerate(BUCKETS):
        if rows <= size:
            return b
    return len(BUCKETS) - 1


def _ranges(names: list[str]) -> str:
    """A per-bucket list of names as text: 'a at 1-8 rows, b at 9-32 rows'."""
    parts, start = [], 0
    for b in range(1, len(names) + 1):
        if b == len(names) or names[b] != names[start]:
            lo = 1 if start == 0 else BUCKETS[start - 1] + 1
            parts.append(f"{names[start]} at {lo}-{BUCKETS[b - 1]} rows")
            start = b
    return ", ".join(parts)


def _working_set(lins: list[Linear], nbytes: int) -> list[Linear]:
    """The first matrices of the list (the model's order) up to `nbytes`, at least one."""
    out, total = [], 0
    for lin in lins:
        if out and total >= nbytes:
            break
        out.append(lin)
        total += lin.nbytes
    return out


def _stand_in(fmt: WeightFormat, device: torch.device, dtype: torch.dtype) -> Linear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 1024, generator=g) / 32
    return Linear.of(w.to(dtype).to(device), dtype=fmt)


def _time_candidates(
    cands: list[Product],
    lins: list[Linear],
    dtype: torch.dtype,
    device: torch.device,
    budget_s: float,
) -> dict[str, list[float | None]]:
    """ms of one pass over `lins`, per candidate and bucket (None: not timed): the best of two
    passes while `budget_s` lasts, after it only the first (default) candidate's first pass, so
    every bucket has a choice. A candidate that splits x into chunks of r rows is the whole-x call
    at <= r rows."""
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    ks = {lin.in_features for lin in lins}
    xs = {(m, k): torch.randn(m, k, generator=g).to(dtype).to(device)
          for m in BUCKETS for k in ks}

    def one_pass(fn, m: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for lin in lins:
            fn(xs[m, lin.in_features], lin)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    ms: dict[str, list[float | None]] = {c.name: [None] * len(BUCKETS) for c in cands}
    for c in cands:  # warm up (first-call allocations, oneDNN/Triton compilation)
        c.fn(xs[1, lins[0].in_features], lins[0])
    start = time.perf_counter()
    for rep in range(2):
        for b, m in enumerate(BUCKETS):
            for c in cands:
                spent = time.perf_counter() - start > budget_s
                if spent and (rep or c is not cands[0]):
                    continue
                if m <= c.rows_per_call:  # the chunked call is the whole call here
                    continue
                t = one_pass(c.fn, m)
                ms[c.name][b] = t if ms[c.name][b] is None else min(ms[c.name][b], t)
    for c in cands:  # fill the chunked candidates' small buckets from the whole call
        if c.rows_per_call:
            whole = next(o for o in cands if o.numerics == c.numerics and not o.rows_per_call)
            for b, m in enumerate(BUCKETS):
                if m <= c.rows_per_call:
                    ms[c.name][b] = ms[whole.name][b]
    return ms


def _load() -> tuple[float, int]:
    """(cores kept busy by other processes, cores this process may use).

    Measured over BUSY_WINDOW_S from /proc/stat less this process's own CPU time, so that a
    process that has just been computing (a benchmark loading its next model) does not count
    itself: the 1-minute load average did, and left the next format untimed. Without /proc: the
    load average less all but one of the cores this process could be using itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        busy0, total0, own0 = _cpu_ticks()
        time.sleep(BUSY_WINDOW_S)
        busy1, total1, own1 = _cpu_ticks()
        n_cpus = os.cpu_count() or cores
        busy = (busy1 - busy0) / max(1, total1 - total0) * n_cpus
        own = (own1 - own0) / (os.sysconf("SC_CLK_TCK") * BUSY_WINDOW_S)
        return max(0.0, busy - own), cores
    except (OSError, ValueError, IndexError):
        pass
    try:
        return max(0.0, os.getloadavg()[0] - (cores - 1)), cores
    except OSError:
        return 0.0, cores


def _cpu_ticks() -> tuple[int, int, int]:
    """(busy, total) clock ticks of all CPUs (/proc/stat), and this process's user + system."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    with open("/proc/self/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    own = int(after_name[11]) + int(after_name[12])  # utime, stime (fields 14 and 15)
    return total - idle, total, own


def _cache_bytes(device: torch.device) -> int:
    """A working set a little larger than the last-level cache: passes over it cycle through more
    than the cache holds, so the weights stream from memory as they do in a forward."""
    if device.type == "cuda":
        return 128 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        size = int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        size = 32 << 20
    return size + size // 4


def _signature(lins: list[Linear]) -> str:
    shapes = sorted({(lin.out_features, lin.in_features) for lin in lins})
    total = sum(lin.nbytes for lin in lins)
    return f"{len(lins)}x[{' '.join(f'{o}x{i}' for o, i in shapes)}]:{total >> 20}MiB"


# --- the machine and the cache file -------------------------------------------------------------


def machine() -> dict:
    """What a cached choice is valid for: the CPU (model and vector features) or GPU, the thread
    count and the libraries."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or "unknown",
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "cores": _load()[1],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cache_version": CACHE_VERSION,
    }


def _machine_hash() -> str:
    return hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]


_MEMO: dict[str, dict] = {}  # key -> entry, for this process (a draft shares the target's)


def _read_cache(cache: Path | None, key: str) -> dict | None:
    if cache is None:
        return None
    try:
        entry = json.loads((cache / f"{_machine_hash()}.json").read_text())["choices"][key]
        if len(entry["names"]) == len(BUCKETS):
            return entry
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_cache(cache: Path, key: str, entry: dict) -> None:
    """Add `key` to the machine's JSON file, atomically (write a temp file, rename over)."""
    path = cache / f"{_machine_hash()}.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("choices"), dict):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        data = {"machine": machine(), "choices": {}}
    data["choices"][key] = entry
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)

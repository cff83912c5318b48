"""graph/products.py: the product per format and row bucket, timed and cached per machine.

Whether a candidate is fast is not tested here (perf/bench_linear.py measures it); what is: every
candidate computes the product, the ones that claim row invariance have it on this machine, the
choice follows the rules (one row-invariant family for 16-bit outputs), and the cache is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from tiny_models import load_tiny
from treadle.graph import products as P
from treadle.graph.backend import Backend
from treadle.graph.model import Transformer
from treadle.graph.weights import Linear, WeightFormat

FORMATS = list(WeightFormat)


def _cases():
    for fmt in FORMATS:
        for c in P.candidates(Backend.TORCH, "cpu", fmt):
            yield pytest.param(fmt, c, id=f"{fmt.value}-{c.name}")


@pytest.mark.parametrize("fmt, cand", list(_cases()))
def test_every_cpu_candidate_computes_the_product(fmt, cand):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(80, 96, generator=g) / 10, torch.randn(80, generator=g)
    lin = Linear.of(w, b, fmt)
    x = torch.randn(2, 5, 96, generator=g)
    y = cand.fn(x, lin)
    assert y.shape == (2, 5, 80) and y.dtype == torch.float32
    exact = x.double() @ lin.dequantized().double().T + b.double()
    rounding = 2**-7 if fmt != WeightFormat.FLOAT32 else 1e-5  # bf16 inputs/outputs
    assert (y.double() - exact).abs().max() <= rounding * (x.abs() @ w.abs().T).max() + 1e-6


@pytest.mark.parametrize("fmt, cand", list(_cases()))
def test_row_invariant_candidates_are(fmt, cand):
    """What pick() relies on: a candidate marked row-invariant computes a row the same bits
    whatever the rows beside it (at the default model's widest layer shape)."""
    if not cand.row_invariant:
        pytest.skip(f"{cand.name} does not claim row invariance")
    g = torch.Generator().manual_seed(2)
    lin = Linear.of(torch.randn(3072, 576, generator=g) / 24, dtype=fmt)
    x = torch.nn.functional.silu(3 * torch.randn(33, 576, generator=g))
    one = torch.cat([cand.fn(x[i : i + 1], lin) for i in range(33)])
    for rows in (2, 3, 4, 5, 8, 9, 16, 17, 32, 33):
        assert torch.equal(cand.fn(x[:rows], lin), one[:rows]), rows


def test_the_first_candidate_is_the_backends_default():
    assert P.candidates(Backend.TORCH, "cpu", WeightFormat.FLOAT32)[0].name == "numpy"
    assert P.candidates(Backend.TRITON, "cuda", WeightFormat.INT4)[0].name == "triton-int4"
    assert P.candidates(Backend.TORCH, "cuda", WeightFormat.INT8) == [P.INT8_REF]
    int4 = P.candidates(Backend.TORCH, "cpu", WeightFormat.INT4)
    assert [c.name for c in int4] == ["torch-int4", "torch-int4-rows4", "torch-int4-rows8"]
    assert {c.numerics for c in int4} == {"torch-int4"}


def _ms(**per_name):
    return {name: list(times) for name, times in per_name.items()}


def test_pick_keeps_one_row_invariant_family():
    a = P.Product("a", None, "fam", True)
    a4 = P.Product("a-rows4", None, "fam", True)
    ref = P.Product("ref", None, "other", False)
    ms = _ms(a=[1, 2, 4, 8, 16, 32], **{"a-rows4": [1, 2, 4, 7, 14, 28]},
             ref=[0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    # The reference is fastest everywhere, but not row-invariant: never mixed in, never chosen.
    assert P.pick(WeightFormat.INT4, [a, a4, ref], ms) == ["a", "a", "a", "a-rows4", "a-rows4",
                                                            "a-rows4"]
    b = P.Product("b", None, "fam2", True)
    ms["b"] = [2, 2, 2, 2, 2, 2]  # another family, faster overall: all of it, a's 1 row too
    assert P.pick(WeightFormat.INT4, [a, a4, b], ms) == ["b"] * 6


def test_pick_mixes_float32_products():
    n = P.Product("numpy", None, "openblas", False)
    t = P.Product("torch", None, "torch-fp32", False)
    ms = _ms(numpy=[1, 5, 5, 5, 5, 5], torch=[2, 3, 3, 3, 9, 9])
    assert P.pick(WeightFormat.FLOAT32, [n, t], ms) == ["numpy", "torch", "torch", "torch",
                                                        "numpy", "numpy"]


def test_fixed_mode_keeps_the_op_tables_products(tmp_path):
    model = load_tiny("llama_gqa_tied", tmp_path, weight_dtype=WeightFormat.INT4)
    assert model.products.mode == "fixed"  # tests/conftest.py
    assert model.ops.linear.__name__ == "_linear"
    assert model.products.describe() == ["int4: 8 matrices, torch-int4 (default)",
                                         "int8: 1 matrices, torch-int8 (default)"]
    with pytest.raises(ValueError, match="TREADLE_PRODUCTS"):
        P.Products(Backend.TORCH, model.weights, mode="fastest")


def test_measured_choice_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_MEMO", {})
    monkeypatch.setattr(P, "_load", lambda: (0.0, 2))  # time even on a busy test machine
    model = load_tiny("llama_gqa_tied", tmp_path / "m", weight_dtype=WeightFormat.INT4)
    cache = tmp_path / "cache"
    measured = Transformer(model.cfg, model.weights, products="measure", product_cache=cache)
    assert measured.ops.linear == measured.products.linear
    ids = torch.tensor([[1, 2, 3]])
    from treadle.runtime.kv_cache import KVCache

    kv = KVCache(model.cfg, rows=1, capacity=8)
    measured.forward(kv.make_step([0], [ids[0].tolist()], logits="all"), kv)  # first use: timed
    choice = measured.products.choices[WeightFormat.INT4]
    assert choice.how == "measured" and len(choice.names) == len(P.BUCKETS)
    assert None not in choice.ms["torch-int4"]  # the default is timed at every bucket
    assert {n for n in choice.names} <= {"torch-int4", "torch-int4-rows4", "torch-int4-rows8"}
    (file,) = cache.iterdir()
    data = json.loads(file.read_text())
    assert data["machine"]["cpu_features"] == P.machine()["cpu_features"]
    assert "avx2" in P.CPU_FEATURES and "amx_bf16" in P.CPU_FEATURES
    assert len(data["choices"]) == 2  # int4 layers, int8 head

    # Another process (an empty memo) reads the file instead of timing.
    monkeypatch.setattr(P, "_MEMO", {})
    monkeypatch.setattr(P, "_time_candidates", lambda *a: pytest.fail("timed again"))
    again = P.Products(Backend.TORCH, model.weights, mode="measure", cache=cache)
    assert again.choose(WeightFormat.INT4).how == "cached"
    assert again.choose(WeightFormat.INT4).names == choice.names
    assert "(cached)" in again.describe()[0]


def test_bucket_of_rows():
    assert [P.BUCKETS[P._bucket(m)] for m in (1, 2, 3, 5, 8, 9, 31, 32, 33, 500)] == [
        1, 2, 4, 8, 8, 16, 32, 32, 32, 32]
    assert P._ranges(["a", "a", "b", "b", "b", "a"]) == (
        "a at 1-2 rows, b at 3-16 rows, a at 17-32 rows")


def test_a_busy_machine_is_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_MEMO", {})
    monkeypatch.setattr(P, "_load", lambda: (5.8, 2))
    monkeypatch.setattr(P, "_time_candidates", lambda *a: pytest.fail("timed on a busy machine"))
    model = load_tiny("llama_gqa_tied", tmp_path / "m", weight_dtype=WeightFormat.INT4)
    products = P.Products(Backend.TORCH, model.weights, mode="measure", cache=tmp_path / "c")
    choice = products.choose(WeightFormat.INT4)
    assert choice.names == ["torch-int4"] * len(P.BUCKETS)
    assert choice.how == "default, not timed: other processes keep 5.8 of 2 cores busy"
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_busy_counts_other_processes_not_this_one():
    """The guard must not mistake this process's own recent work for another's (the load average
    did: a benchmark's second model went untimed), and must see a process that spins."""
    spinning = threading.Event()

    def spin():
        while not spinning.is_set():
            pass

    own = threading.Thread(target=spin)
    own.start()
    try:
        busy_self, _ = P._load()
    finally:
        spinning.set()
        own.join()
    other = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 2\n"
                              "while time.time() < t: pass"])
    try:
        time.sleep(0.3)
        busy_other, _ = P._load()
    finally:
        other.kill()
        other.wait()
    assert busy_other >= busy_self + 0.5


def test_a_missing_cpu_kernel_runs_the_reference_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "INT4_CPU_KERNEL", False)  # e.g. an older torch build
    model = load_tiny("llama_gqa_tied", tmp_path, weight_dtype=WeightFormat.INT4)
    products = P.Products(Backend.TORCH, model.weights, mode="measure")
    assert products.choose(WeightFormat.INT4).names == ["int4-dequantize-ref"] * len(P.BUCKETS)
    (line,) = products.fallbacks()
    assert line.startswith("int4 products dequantize the weights to fp32 on every call")
    assert "no CPU weight-only kernel" in line

"""kernels/kv_commit.py: the Triton kv_commit_ against kv_commit_ref on random tree paths.

Runs under TRITON_INTERPRET=1 on the CPU (set here unless the runner set it); with
TRITON_INTERPRET=0 on a CUDA machine the same tests check the compiled kernel.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import random

import pytest
import torch

tl = pytest.importorskip("triton.language")
from treadle.kernels import kv_commit as K  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if INTERPRET and not isinstance(tl.sigmoid, InterpretedFunction):  # triton's own @jit helpers
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (triton decides at import); "
                "set it at the top of tests/conftest.py or in the environment",
                allow_module_level=True)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
PAD = -1  # padding of src_slots past n_accept: never read


def random_commit(rng: random.Random, n_rows: int, capacity: int, batch: int, max_nodes: int):
    """A batch of random verify steps: per sequence a random tree of nodes stored in topological
    order at slots start + offset + i, and the root-to-node path of a random node accepted."""
    rows = rng.sample(range(n_rows), batch)
    starts, paths = [], []
    for _ in range(batch):
        n_nodes = rng.randint(1, max_nodes)
        parent = [-1] + [rng.randrange(i) for i in range(1, n_nodes)]  # parent[i] < i
        offset = rng.randint(0, 2)  # the tree may sit a few slots after the committed length
        start = rng.randint(0, capacity - n_nodes - offset)
        node = rng.randrange(n_nodes)
        path = []
        while node >= 0:
            path.append(start + offset + node)
            node = parent[node]
        path.reverse()
        path = path[: rng.randint(0, len(path))]  # also an empty or partial acceptance
        starts.append(start)
        paths.append(path)
    width = max(max(len(p) for p in paths), 1)
    src = [p + [PAD] * (width - len(p)) for p in paths]
    as_long = lambda a: torch.tensor(a, dtype=torch.long, device=DEVICE)  # noqa: E731
    return as_long(rows), as_long(starts), as_long(src), as_long([len(p) for p in paths])


def run_both(shape, dtype, rows, starts, src, n_accept):
    """Apply the kernel and the ref to copies of the same random cache; return all of them."""
    k = torch.randn(shape).to(dtype).to(DEVICE)
    v = torch.randn(shape).to(dtype).to(DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    k_out, v_out = k.clone(), v.clone()
    K.kv_commit_(k_out, v_out, rows, starts, src, n_accept)
    K.kv_commit_ref(k_ref, v_ref, rows, starts, src, n_accept)
    return (k, v), (k_out, v_out), (k_ref, v_ref)


SHAPES = [  # [L, R, Hkv, C, D]
    (2, 4, 3, 32, 16),
    (1, 3, 2, 24, 41),  # odd head dim: one masked block of 64
    (2, 2, 1, 16, 300),  # D > 256: two head-dim blocks
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_random_paths(shape, dtype, seed):
    rng = random.Random(seed)
    L, R, Hkv, C, D = shape
    args = random_commit(rng, R, C, batch=min(R, 3), max_nodes=10)
    (k, v), (k_out, v_out), (k_ref, v_ref) = run_both(shape, dtype, *args)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)  # a copy: bit-exact


def test_aliasing_path():
    """src = [s+1, s+3]: step 1 writes slot s+1, which step 0 read. Sequential order must win."""
    shape = (2, 2, 2, 8, 16)
    s = 2
    rows = torch.tensor([1], device=DEVICE)
    starts = torch.tensor([s], device=DEVICE)
    src = torch.tensor([[s + 1, s + 3]], device=DEVICE)
    n_accept = torch.tensor([2], device=DEVICE)
    (k, v), (k_out, v_out), (k_ref, v_ref) = run_both(shape, torch.float32, rows, starts, src,
                                                      n_accept)
    for before, out in ((k, k_out), (v, v_out)):
        assert torch.equal(out[:, 1, :, s], before[:, 1, :, s + 1])
        assert torch.equal(out[:, 1, :, s + 1], before[:, 1, :, s + 3])
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_long_chain_shifts_down():
    """A chain accepted in full one slot up: every slot is both a source and a destination."""
    shape = (1, 1, 1, 16, 8)
    starts = torch.tensor([3], device=DEVICE)
    src = torch.arange(4, 14, device=DEVICE)[None]  # slots 4..13 -> 3..12
    n_accept = torch.tensor([10], device=DEVICE)
    rows = torch.tensor([0], device=DEVICE)
    (k, _), (k_out, _), (k_ref, _) = run_both(shape, torch.float32, rows, starts, src, n_accept)
    assert torch.equal(k_out[0, 0, 0, 3:13], k[0, 0, 0, 4:14])
    assert torch.equal(k_out, k_ref)


def test_untouched_elsewhere():
    """Only slots [start, start + n) of the committed rows change, in every layer and head."""
    shape = (3, 4, 2, 16, 8)
    rows = torch.tensor([2, 0], device=DEVICE)
    starts = torch.tensor([5, 0], device=DEVICE)
    src = torch.tensor([[6, 8, 11], [0, 2, PAD]], device=DEVICE)
    n_accept = torch.tensor([3, 2], device=DEVICE)
    (k, v), (k_out, v_out), _ = run_both(shape, torch.float32, rows, starts, src, n_accept)
    changed = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    changed[:, 2, :, 5:8] = True
    changed[:, 0, :, 0:2] = True
    for before, out in ((k, k_out), (v, v_out)):
        assert torch.equal(out[~changed], before[~changed])
        assert torch.equal(out[:, 2, :, 5:8], before[:, 2, :, [6, 8, 11]])
        assert torch.equal(out[:, 0, :, 0:2], before[:, 0, :, [0, 2]])


def test_nothing_accepted():
    shape = (1, 2, 1, 8, 16)
    z = torch.zeros(2, dtype=torch.long, device=DEVICE)
    src = torch.full((2, 3), PAD, dtype=torch.long, device=DEVICE)
    (k, v), (k_out, v_out), _ = run_both(shape, torch.float32, torch.tensor([0, 1], device=DEVICE),
                                         z, src, z)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


def test_bad_inputs():
    k = torch.zeros(1, 2, 1, 8, 16, device=DEVICE)
    one = torch.zeros(1, dtype=torch.long, device=DEVICE)
    src = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="rows must be a contiguous int64"):
        K.kv_commit_(k, k.clone(), one.int(), one, src, one)
    with pytest.raises(ValueError, match="n_accept must be"):
        K.kv_commit_(k, k.clone(), one, one, src, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="src_slots must be"):
        K.kv_commit_(k, k.clone(), one, one, src[0], one)
    with pytest.raises(ValueError, match="v must match k"):
        K.kv_commit_(k, k.half(), one, one, src, one)
    with pytest.raises(ValueError, match=r"k must be \[L, R, Hkv, C, D\]"):
        K.kv_commit_(k[0], k[0].clone(), one, one, src, one)


def test_without_triton_or_device(monkeypatch):
    k = torch.zeros(1, 1, 1, 4, 8)
    one = torch.zeros(1, dtype=torch.long)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        K.kv_commit_(k, k.clone(), one, one, one[None], one)
    monkeypatch.setattr(K, "triton", None)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        K.kv_commit_(k, k.clone(), one, one, one[None], one)

"""Token-tree verification: which drafted nodes the target accepts, and the token that follows.

A tree per sequence b (N node slots, n_nodes[b] valid, topological order):
    node 0 is the root, the last committed token; parents[b, 0] = -1, parents[b, i] < i for i >= 1
    tokens[b, i] is the token at node i; the target's output at node i predicts the token after it
    children of a node are tried in index order
Both rules walk from the root and return, per sequence,
    n_accepted [B]     accepted draft nodes (the root is not counted)
    path [B, N]        the accepted node indices in order, then -1
    out_tokens [B, N]  the accepted nodes' tokens, one more token (n_accepted + 1 valid), then -1

Greedy (`verify_greedy`): at node cur step to the first child c with tokens[c] == argmax_T[cur];
when no child matches, emit argmax_T[cur] (the bonus token) and stop.

Sampled, lossless (`verify_sample`; chain speculative decoding is one child per node). With
p = p_target[cur] and q = p_draft[cur] (both already processed by temperature / top-k / top-p):
    for each child c of cur in order, x = tokens[c]:
        accept c with probability min(1, p(x) / q(x))       (u ~ U[0,1): accept iff u q(x) < p(x))
        on rejection p <- norm(max(0, p - q))                (the residual) and try the next child
    accepted: cur <- c, p <- p_target[c], q <- p_draft[c], repeat (a leaf has no children)
    no child accepted (or none to try): draw the final token from p and stop
This is lossless -- the emitted tokens are distributed exactly as sampling the target token by token
-- when the children of a node were drawn i.i.d. (with replacement) from p_draft[node]: each sibling
test is one step of chain speculative sampling against the residual left by the previous ones.
Callers that deduplicate siblings (sampling without replacement) must pass a different q.
u q(x) < p(x) with u in [0, 1) accepts with probability min(1, p(x)/q(x)) like u q <= p does, and
never accepts a token the target cannot emit (p(x) = 0) even if q(x) = 0.

The residual needs no V-sized buffer: after j rejections at a node it is max(0, p - c_j q) / S_j,
    c_0 = 0, S_0 = 1,   S_j = sum_v max(0, p(v) - c_j q(v)),   c_{j+1} = c_j + S_j
since r_j - q = (max(0, p - c_j q) - S_j q) / S_j, and p > c_{j+1} q implies p > c_j q, so
norm(max(0, r_j - q)) = norm(max(0, p - c_{j+1} q)). S_j is also the probability that the first j
children were all rejected.
Zero residual: S_j = 0 means p <= c_j q everywhere, i.e. p == q after one rejection -- a rejection
that has probability 0 in exact arithmetic and happens only through rounding (or when a drafted
token has q(x) = 0, which i.i.d. drafting cannot produce). Both implementations then, and whenever
S_j <= RESIDUAL_EPS, replace the residual by p_target[cur] itself (c <- 0, S <- 1): such states are
reached with probability S_j <= RESIDUAL_EPS, so the output distribution moves by at most that
much, and a degenerate residual never produces NaN.

Randomness of `verify_sample` (Triton): sequence b's draws are the uniforms of lanes e = 0..N-1 of
Philox(key = seed + b, counter = (e, offset mod 2^32, offset >> 32, 1)) (kernels/sampling.py's
`philox_uniforms(B, N, seed, offset, stream=1)` returns them): lane e < N - 1 for the e-th child
tested (at most N - 1 are), lane N - 1 for the final token by inverse CDF. Deterministic in
(seed, offset); advance `offset` by one per call. `verify_sample_ref` draws from a torch.Generator
(same distribution, other numbers) or, given `uniforms=`, follows the kernel draw for draw.

The walk is sequential in depth but each step is a vectorised search over the BLOCK_N >= N node
slots, so one program verifies one sequence, in one launch for the whole batch. The sampled rule
reads p_target/p_draft rows only when it must: one pass over V (in BLOCK_V chunks) per test against
a residual, and two passes (mass, then inverse-CDF scan) for the final draw; a fully accepted chain
costs 2 passes. The per-test pass is a loop whose trip count is a per-program scalar (n_chunks or
0), not a per-lane branch: it compiles to an ordinary scf.for with a runtime bound.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    def jit(**kwargs):
        return triton.jit(**kwargs)
except ImportError:  # CPU-only install: the refs below still work, the launchers raise
    triton = tl = None

    def jit(**kwargs):
        return lambda fn: fn

from .sampling import _uniforms

RESIDUAL_EPS = 1e-6  # a residual whose mass S_j is at most this is replaced by p_target[cur]
_VERIFY_STREAM = 1  # Philox counter word 3: keeps these draws apart from kernels/sampling.py's (0)
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # n_accepted [B], path [B, N], out [B, N]


# ----------------------------------------------------------------------------- references


def _children(parents: list[int], n: int, b: int) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        p = parents[i]
        if not 0 <= p < i:
            raise ValueError(f"kernels/verify.py: parents[{b}, {i}] = {p}; expected "
                             f"0 <= parent < {i} (nodes in topological order)")
        kids[p].append(i)
    return kids


def _check_n(ns: list[int], N: int) -> None:
    for b, n in enumerate(ns):
        if not 1 <= n <= N:
            raise ValueError(f"kernels/verify.py: n_nodes[{b}] = {n}; expected 1 <= n <= N = {N}")


def _pack(paths: list[list[int]], outs: list[list[int]], N: int, device) -> Triple:
    n_acc = torch.tensor([len(p) for p in paths], dtype=torch.int64)
    path = torch.tensor([p + [-1] * (N - len(p)) for p in paths], dtype=torch.int64).view(-1, N)
    out = torch.tensor([o + [-1] * (N - len(o)) for o in outs], dtype=torch.int64).view(-1, N)
    return n_acc.to(device), path.to(device), out.to(device)


def verify_greedy_ref(
    tokens: torch.Tensor,  # [B, N] int
    parents: torch.Tensor,  # [B, N] int, parents[:, 0] = -1
    n_nodes: torch.Tensor,  # [B] int, 1 <= n_nodes <= N
    target_argmax: torch.Tensor,  # [B, N] int: the target's argmax token at each node
) -> Triple:  # n_accepted [B], path [B, N], out_tokens [B, N]
    """Greedy acceptance in plain Python (the CPU path): one .tolist() per input, list walks."""
    B, N = tokens.shape
    toks, pars, ams = tokens.tolist(), parents.tolist(), target_argmax.tolist()
    ns = n_nodes.tolist()
    _check_n(ns, N)
    paths, outs = [], []
    for b in range(B):
        kids = _children(pars[b], ns[b], b)
        tok, am = toks[b], ams[b]
        cur, path = 0, []
        while True:
            nxt = next((c for c in kids[cur] if tok[c] == am[cur]), None)
            if nxt is None:
                break
            path.append(nxt)
            cur = nxt
        paths.append(path)
        outs.append([tok[c] for c in path] + [am[cur]])
    return _pack(paths, outs, N, tokens.device)


def verify_sample_ref(
    tokens: torch.Tensor,  # [B, N] int
    parents: torch.Tensor,  # [B, N] int, parents[:, 0] = -1
    n_nodes: torch.Tensor,  # [B] int, 1 <= n_nodes <= N
    p_target: torch.Tensor,  # [B, N, V] the target's processed distribution at each node
    p_draft: torch.Tensor,  # [B, N, V] the distribution node i's children were drawn from
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,  # [B, N] in [0, 1): replaces the generator's draws
) -> Triple:  # n_accepted [B], path [B, N], out_tokens [B, N]
    """The lossless multi-candidate rule, written out literally (see the module docstring).

    Draws come from `generator` (torch.rand for each test, torch.multinomial for the final token),
    or, given `uniforms`, sequence b's e-th test uses uniforms[b, e] and its final token is the
    inverse CDF of uniforms[b, N - 1] -- the kernel's convention, so that
    `uniforms = philox_uniforms(B, N, seed, offset, stream=1)` reproduces verify_sample exactly
    (up to float32-vs-float64 rounding at a decision boundary)."""
    B, N = tokens.shape
    V = p_target.shape[-1]
    if p_target.shape != (B, N, V) or p_draft.shape != (B, N, V):
        raise ValueError(f"kernels/verify.py: verify_sample_ref: p_target and p_draft must be "
                         f"[B={B}, N={N}, V]; got {tuple(p_target.shape)} and "
                         f"{tuple(p_draft.shape)}")
    toks, pars, ns = tokens.tolist(), parents.tolist(), n_nodes.tolist()
    _check_n(ns, N)
    us = uniforms.tolist() if uniforms is not None else None
    paths, outs = [], []
    for b in range(B):
        kids = _children(pars[b], ns[b], b)
        tok = toks[b]
        cur, path, event = 0, [], 0
        while True:
            # float64 rows, fetched only for the nodes the walk visits
            p, q = p_target[b, cur].double().cpu(), p_draft[b, cur].double().cpu()
            reach = 1.0  # probability of having rejected the children tried so far at cur
            accepted = None
            for c in kids[cur]:
                x = tok[c]
                if not 0 <= x < V:
                    raise ValueError(f"kernels/verify.py: tokens[{b}, {c}] = {x} is outside "
                                     f"[0, {V})")
                if us is None:
                    u = float(torch.rand((), generator=generator, dtype=torch.float64))
                else:
                    u = us[b][event]
                event += 1
                if u * float(q[x]) < float(p[x]):
                    accepted = c
                    break
                residual = (p - q).clamp_min(0)
                mass = float(residual.sum())
                reach *= mass
                if reach <= RESIDUAL_EPS:  # p == q up to rounding: fall back to p_target[cur]
                    p, reach = p_target[b, cur].double().cpu(), 1.0
                else:
                    p = residual / mass
            if accepted is None:
                if us is None:
                    final = int(torch.multinomial(p, 1, generator=generator))
                else:
                    cdf = p.cumsum(0)
                    hit = (cdf > us[b][N - 1] * float(cdf[-1])) & (p > 0)
                    final = int(hit.nonzero()[0]) if bool(hit.any()) else int((p > 0).nonzero()[-1])
                break
            path.append(accepted)
            cur = accepted
        paths.append(path)
        outs.append([tok[c] for c in path] + [final])
    return _pack(paths, outs, N, tokens.device)


# ----------------------------------------------------------------------------- kernels


@jit()
def _verify_greedy_kernel(
    tok_ptr,  # [B, N] int: token at each node
    par_ptr,  # [B, N] int: parent of each node (-1 at the root)
    n_ptr,  # [B] int: valid nodes per sequence
    am_ptr,  # [B, N] int: target argmax at each node
    n_acc_ptr,  # [B] int64 out: accepted draft nodes
    path_ptr,  # [B, N] int64 out: accepted node indices, then -1
    out_ptr,  # [B, N] int64 out: accepted tokens, the bonus token, then -1
    stride_tok,  # elements between rows of tokens
    stride_par,  # elements between rows of parents
    stride_am,  # elements between rows of target_argmax
    stride_out,  # elements between rows of path / out (both contiguous [B, N])
    N,  # node slots per sequence
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_N)
    n = tl.minimum(tl.maximum(tl.load(n_ptr + row).to(tl.int32), 1), N)
    valid = (idx >= 1) & (idx < n)
    tok = tl.load(tok_ptr + row * stride_tok + idx, mask=valid, other=-1).to(tl.int64)
    par = tl.load(par_ptr + row * stride_par + idx, mask=valid, other=-1).to(tl.int32)
    par_ok = valid & (par >= 0) & (par < idx)
    # good[i]: node i is the token the target picks after its parent (gathered argmax at parent).
    am_par = tl.load(am_ptr + row * stride_am + par, mask=par_ok, other=-1).to(tl.int64)
    good = par_ok & (tok == am_par)
    cur = tl.zeros([], tl.int32)
    n_acc = tl.zeros([], tl.int32)
    path = tl.full([BLOCK_N], -1, tl.int32)
    for _ in range(0, N - 1):  # at most N - 1 draft nodes on a path; once stuck, cur stays put
        c = tl.min(tl.where(good & (par == cur), idx, BLOCK_N), axis=0)  # first matching child
        found = c < BLOCK_N
        path = tl.where(found & (idx == n_acc), c, path)
        n_acc += found.to(tl.int32)
        cur = tl.where(found, c, cur)
    on_path = path >= 0
    out = tl.load(tok_ptr + row * stride_tok + path, mask=on_path, other=-1).to(tl.int64)
    bonus = tl.load(am_ptr + row * stride_am + cur).to(tl.int64)
    out = tl.where(idx == n_acc, bonus, out)
    keep = idx < N
    tl.store(path_ptr + row * stride_out + idx, path.to(tl.int64), mask=keep)
    tl.store(out_ptr + row * stride_out + idx, out, mask=keep)
    tl.store(n_acc_ptr + row, n_acc.to(tl.int64))


@jit(do_not_specialize=["seed", "offset"])
def _verify_sample_kernel(
    tok_ptr,  # [B, N] int: token at each node
    par_ptr,  # [B, N] int: parent of each node (-1 at the root)
    n_ptr,  # [B] int: valid nodes per sequence
    pt_ptr,  # [B, N, V] float: target distribution at each node (unit stride over V)
    pd_ptr,  # [B, N, V] float: draft distribution the node's children were drawn from
    n_acc_ptr,  # [B] int64 out: accepted draft nodes
    path_ptr,  # [B, N] int64 out: accepted node indices, then -1
    out_ptr,  # [B, N] int64 out: accepted tokens, the final token, then -1
    stride_tok,  # elements between rows of tokens
    stride_par,  # elements between rows of parents
    stride_pt_b,  # elements between sequences of p_target
    stride_pt_n,  # elements between nodes of p_target
    stride_pd_b,  # elements between sequences of p_draft
    stride_pd_n,  # elements between nodes of p_draft
    stride_out,  # elements between rows of path / out
    N,  # node slots per sequence
    V,  # vocabulary size
    seed,  # Philox key base (key = seed + sequence)
    offset,  # Philox counter base: advance by one per call
    EPS: tl.constexpr,  # RESIDUAL_EPS
    STREAM: tl.constexpr,  # Philox counter word 3
    BLOCK_N: tl.constexpr,  # next power of two >= N
    BLOCK_V: tl.constexpr,  # vocabulary chunk
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_N)
    vs = tl.arange(0, BLOCK_V)
    n_chunks = tl.cdiv(V, BLOCK_V)
    n = tl.minimum(tl.maximum(tl.load(n_ptr + row).to(tl.int32), 1), N)
    valid = (idx >= 1) & (idx < n)
    par = tl.load(par_ptr + row * stride_par + idx, mask=valid, other=-1).to(tl.int32)
    child_ok = valid & (par >= 0) & (par < idx)
    pt_row = pt_ptr + row * stride_pt_b
    pd_row = pd_ptr + row * stride_pd_b
    # All of this sequence's uniforms at once: lane e < N - 1 tests the e-th child tried, lane
    # N - 1 is the final draw (at most N - 1 tests happen).
    us = _uniforms(seed, row, offset, idx, STREAM)

    cur = tl.zeros([], tl.int32)  # node the walk stands on
    last = tl.zeros([], tl.int32)  # last child of cur tried (children have larger indices)
    c = tl.zeros([], tl.float32)  # residual at cur is max(0, p - c q) / S (c = 0: p itself)
    trying = tl.full([], 1, tl.int1)  # cur may still have untried children
    n_acc = tl.zeros([], tl.int32)
    path = tl.full([BLOCK_N], -1, tl.int32)
    out = tl.full([BLOCK_N], -1, tl.int64)
    for e in range(0, N - 1):  # each event tests one node as a child: at most N - 1 tests
        ch = tl.min(tl.where(child_ok & (par == cur) & (idx > last), idx, BLOCK_N), axis=0)
        has = trying & (ch < BLOCK_N)
        p_cur = pt_row + cur.to(tl.int64) * stride_pt_n
        q_cur = pd_row + cur.to(tl.int64) * stride_pd_n
        # S = mass of the residual; a V pass only when testing against a residual (c > 0). The
        # trip count is a per-program scalar (0 or n_chunks), not a per-lane branch.
        acc = tl.zeros([BLOCK_V], tl.float32)
        for k in range(0, tl.where(has & (c > 0), n_chunks, 0)):
            v = k * BLOCK_V + vs
            p = tl.load(p_cur + v, mask=v < V, other=0.0).to(tl.float32)
            q = tl.load(q_cur + v, mask=v < V, other=0.0).to(tl.float32)
            acc += tl.maximum(p - c * q, 0.0)
        S = tl.sum(acc, axis=0)
        ran = has & (c > 0)
        degenerate = ran & (S <= EPS)  # -> test against p_target[cur] itself (module docstring)
        c = tl.where(degenerate, 0.0, c)
        S = tl.where(ran & (degenerate == 0), S, 1.0)
        x = tl.load(tok_ptr + row * stride_tok + ch, mask=has, other=0).to(tl.int64)
        px = tl.load(p_cur + x, mask=has, other=0.0).to(tl.float32)
        qx = tl.load(q_cur + x, mask=has, other=0.0).to(tl.float32)
        u = tl.sum(tl.where(idx == e, us, 0.0), axis=0)
        accept = has & (u * qx * S < tl.maximum(px - c * qx, 0.0))
        reject = has & (accept == 0)
        path = tl.where(accept & (idx == n_acc), ch, path)
        out = tl.where(accept & (idx == n_acc), x, out)
        n_acc += accept.to(tl.int32)
        cur = tl.where(accept, ch, cur)
        c = tl.where(accept, 0.0, tl.where(reject, c + S, c))
        last = tl.where(has, ch, last)
        trying = has

    # Final token from the residual at cur: pass 1 its mass (and p's, for the fallback), pass 2
    # the inverse CDF: the first v whose running sum exceeds u * S.
    p_cur = pt_row + cur.to(tl.int64) * stride_pt_n
    q_cur = pd_row + cur.to(tl.int64) * stride_pd_n
    acc_r = tl.zeros([BLOCK_V], tl.float32)
    acc_p = tl.zeros([BLOCK_V], tl.float32)
    for k in range(0, n_chunks):
        v = k * BLOCK_V + vs
        p = tl.load(p_cur + v, mask=v < V, other=0.0).to(tl.float32)
        q = tl.load(q_cur + v, mask=v < V, other=0.0).to(tl.float32)
        acc_r += tl.maximum(p - c * q, 0.0)
        acc_p += p
    S = tl.sum(acc_r, axis=0)
    fallback = S <= EPS
    c = tl.where(fallback, 0.0, c)
    S = tl.where(fallback, tl.sum(acc_p, axis=0), S)
    target = tl.sum(tl.where(idx == N - 1, us, 0.0), axis=0) * S
    running = tl.zeros([], tl.float32)
    first = tl.full([], 2147483647, tl.int32)  # first v with running sum > target
    last_pos = tl.full([], -1, tl.int32)  # last v with mass: the answer if rounding left no hit
    for k in range(0, n_chunks):
        v = k * BLOCK_V + vs
        p = tl.load(p_cur + v, mask=v < V, other=0.0).to(tl.float32)
        q = tl.load(q_cur + v, mask=v < V, other=0.0).to(tl.float32)
        w = tl.maximum(p - c * q, 0.0)
        cum = running + tl.cumsum(w, axis=0)
        first = tl.minimum(first, tl.min(tl.where((cum > target) & (w > 0), v, 2147483647), axis=0))
        last_pos = tl.maximum(last_pos, tl.max(tl.where(w > 0, v, -1), axis=0))
        running += tl.sum(w, axis=0)
    final = tl.where(first < 2147483647, first, tl.maximum(last_pos, 0))
    out = tl.where(idx == n_acc, final.to(tl.int64), out)
    keep = idx < N
    tl.store(path_ptr + row * stride_out + idx, path.to(tl.int64), mask=keep)
    tl.store(out_ptr + row * stride_out + idx, out, mask=keep)
    tl.store(n_acc_ptr + row, n_acc.to(tl.int64))


# ----------------------------------------------------------------------------- launchers


def _check_triton(t: torch.Tensor, op: str) -> None:
    if triton is None:
        raise RuntimeError(f"kernels/verify.py: {op} needs the `triton` package (not installed); "
                           "use the pure-torch *_ref functions on this machine")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernels/verify.py: {op} runs on CUDA tensors (or on the CPU under "
                           f"TRITON_INTERPRET=1); got a tensor on {t.device}")


def _check_tree(op: str, tokens, parents, n_nodes, **per_node) -> tuple[int, int]:
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"kernels/verify.py: {op}: tokens must be [B, N] with N >= 1; "
                         f"got {tuple(tokens.shape)}")
    B, N = tokens.shape
    named = {"tokens": tokens, "parents": parents, "n_nodes": n_nodes, **per_node}
    for name, t in named.items():
        want = (B,) if name == "n_nodes" else (B, N)
        if tuple(t.shape) != want or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"kernels/verify.py: {op}: {name} must be an integer tensor of shape "
                             f"{want}; got {t.dtype} {tuple(t.shape)}")
        if t.device != tokens.device:
            raise ValueError(f"kernels/verify.py: {op}: {name} is on {t.device}, tokens on "
                             f"{tokens.device}; all inputs must share a device")
    return B, N


def _outputs(B: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_acc = torch.empty(B, dtype=torch.int64, device=device)
    path = torch.empty(B, N, dtype=torch.int64, device=device)
    out = torch.empty(B, N, dtype=torch.int64, device=device)
    return n_acc, path, out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def verify_greedy(
    tokens: torch.Tensor,  # [B, N] int
    parents: torch.Tensor,  # [B, N] int, parents[:, 0] = -1, parents[:, i] < i
    n_nodes: torch.Tensor,  # [B] int, 1 <= n_nodes <= N (clamped into range, not checked)
    target_argmax: torch.Tensor,  # [B, N] int
) -> Triple:  # n_accepted [B], path [B, N], out_tokens [B, N]
    """Greedy tree acceptance, one program per sequence, one launch. All outputs int64."""
    op = "verify_greedy"
    _check_triton(tokens, op)
    B, N = _check_tree(op, tokens, parents, n_nodes, target_argmax=target_argmax)
    n_acc, path, out = _outputs(B, N, tokens.device)
    if B == 0:
        return n_acc, path, out
    tokens, parents, target_argmax = _rows(tokens), _rows(parents), _rows(target_argmax)
    BLOCK_N = triton.next_power_of_2(N)
    _verify_greedy_kernel[(B,)](
        tokens, parents, n_nodes, target_argmax, n_acc, path, out,
        tokens.stride(0), parents.stride(0), target_argmax.stride(0), out.stride(0),
        N, BLOCK_N=BLOCK_N, num_warps=1,
    )
    return n_acc, path, out


def verify_sample(
    tokens: torch.Tensor,  # [B, N] int, each in [0, V)
    parents: torch.Tensor,  # [B, N] int, parents[:, 0] = -1, parents[:, i] < i
    n_nodes: torch.Tensor,  # [B] int, 1 <= n_nodes <= N (clamped into range, not checked)
    p_target: torch.Tensor,  # [B, N, V] float: the target's processed distribution at each node
    p_draft: torch.Tensor,  # [B, N, V] float: the distribution each node's children were drawn from
    seed: int,  # >= 0
    offset: int,  # >= 0; advance by one per call
    *,
    block_v: int = 1024,
) -> Triple:  # n_accepted [B], path [B, N], out_tokens [B, N]
    """Lossless sampled tree acceptance (module docstring), one program per sequence, one launch.
    Siblings must have been drawn i.i.d. from p_draft[parent]. All outputs int64."""
    op = "verify_sample"
    _check_triton(tokens, op)
    B, N = _check_tree(op, tokens, parents, n_nodes)
    for name, t in (("p_target", p_target), ("p_draft", p_draft)):
        if t.dim() != 3 or tuple(t.shape[:2]) != (B, N) or not t.dtype.is_floating_point:
            raise ValueError(f"kernels/verify.py: {op}: {name} must be a float [B={B}, N={N}, V] "
                             f"tensor; got {t.dtype} {tuple(t.shape)}")
        if t.device != tokens.device:
            raise ValueError(f"kernels/verify.py: {op}: {name} is on {t.device}, tokens on "
                             f"{tokens.device}")
    V = p_target.shape[2]
    if p_draft.shape[2] != V or V < 1:
        raise ValueError(f"kernels/verify.py: {op}: p_target and p_draft must share V >= 1; got "
                         f"{p_target.shape[2]} and {p_draft.shape[2]}")
    ints = isinstance(seed, int) and isinstance(offset, int)
    if not (ints and 0 <= seed < 2**62 and offset >= 0):
        raise ValueError(f"kernels/verify.py: {op}: seed and offset must be ints, 0 <= seed < 2^62 "
                         f"and offset >= 0; got seed={seed!r} offset={offset!r}")
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"kernels/verify.py: {op}: block_v must be a power of two >= 16; "
                         f"got {block_v}")
    n_acc, path, out = _outputs(B, N, tokens.device)
    if B == 0:
        return n_acc, path, out
    tokens, parents = _rows(tokens), _rows(parents)
    p_target, p_draft = _rows(p_target), _rows(p_draft)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_V = min(block_v, max(16, triton.next_power_of_2(V)))
    _verify_sample_kernel[(B,)](
        tokens, parents, n_nodes, p_target, p_draft, n_acc, path, out,
        tokens.stride(0), parents.stride(0),
        p_target.stride(0), p_target.stride(1), p_draft.stride(0), p_draft.stride(1),
        out.stride(0), N, V, seed, offset,
        EPS=RESIDUAL_EPS, STREAM=_VERIFY_STREAM, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
        num_warps=4 if BLOCK_V >= 512 else 1,
    )
    return n_acc, path, out

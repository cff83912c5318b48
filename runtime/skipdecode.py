"""SkipDecode's lossless self-speculative mode: the skip-layer forward drafts, the full forward
verifies, and the two share the K/V of the layers both ran.

One round, for every active sequence of the batch at once:
  1. Draft k tokens one at a time with the skip-layer forward (warm-up layers [0, w), then the top
     layers of the draft's layer set), keeping each token's residual stream after the warm-up
     layers. One more warm-up-only step gives the last draft token's stream.
  2. Verify root + k drafts in one step that runs layers [w, L) from those streams: the warm-up
     layers' K/V that the draft wrote is exactly what the full model computes (same layers, same
     inputs, same prefix), so it is reused, not recomputed; layers [w, L) are rewritten in full.
  3. Accept (greedy: the target's argmax; sampled: the lossless rejection rule, with the draft's
     and target's distributions processed by the same SamplingParams) and keep the accepted K/V.
The output is token-identical to greedy AR of the full model, and distributed as AR when sampling.

The draft's layers are one fixed set, or a SkipDecode schedule's: then the draft token at generated
position t runs schedule.layers_at(t), the layers a model fine-tuned for that schedule was trained
to predict with (train/skipdecode.py). The streams of a round share one layer list per draft step,
that of the earliest position among them: by monotonicity a superset of every other stream's.

A round of k drafts costs k skip-layer steps plus a (k + 1)-token verify step, and pays only when
enough drafts are accepted: on the untrained default model the skip-layer draft agrees with the
full model on few tokens, so a round emits ~1.5 tokens for the cost of ~3 full steps. With
`adaptive` on, the policy measures both (tokens per second of its draft rounds and of plain
full-model steps, as moving averages) and runs the faster. While plain steps win it re-measures
drafting after `probe_every` plain steps, and doubles that interval (up to `max_probe_every`)
each time the probe loses again: a losing probe round costs about four plain steps (k=4 on the
default model), so a fixed interval of 16 made the adaptive mode ~18% slower than AR (0.82x in
perf/results/bench_engine-vm.json before this), while the doubling bounds the loss to a few
probes per thousand steps. The stats count the plain steps it chose (`plain_steps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .ar import DecodePolicy
from .engine import Engine, Stream
from .executor import Executor
from .sampling import draw, probabilities
from .speculative import accept, commit

EMA = 0.3  # weight of the newest measurement in the moving averages


class SelfSpecPolicy:
    def __init__(
        self,
        executor: Executor,
        # the draft's layer set ([0, w) + some top layers, ascending), or the set of the draft
        # token at each generated position t (a schedule's layers_at: warm-up layers [0, warmup))
        draft_layers: Sequence[int] | Callable[[int], Sequence[int]],
        k: int,
        adaptive: bool = True,
        probe_every: int = 16,
        max_probe_every: int = 1024,
        warmup: int | None = None,  # w, required with per-position layer sets
    ):
        if k < 1:
            raise ValueError(f"self-speculative draft length k={k}: expected >= 1")
        self.executor, self.k, self.slack = executor, k, k + 1
        self.model = executor.model
        L = self.model.cfg.num_layers
        if callable(draft_layers):
            if warmup is None:
                raise ValueError("per-position draft layers need the warm-up layer count")
            self.layers_at = draft_layers
        else:
            fixed = list(draft_layers)
            if warmup is None:
                warmup = next((i for i, layer in enumerate(fixed) if layer != i), len(fixed))
            self.layers_at = lambda t: fixed
        self.warmup = list(range(warmup))
        self.rest = list(range(warmup, L))  # what verification runs on top of the shared warm-up
        self.plain = DecodePolicy(executor, L)
        self.adaptive, self.probe_every = adaptive, probe_every
        self.max_probe_every = max_probe_every
        self.probe_interval = probe_every  # plain steps before the next probe (doubles on loss)
        self.rate = {"draft": None, "plain": None}  # tokens per stream per second (EMA)
        self.plain_run = 0  # plain steps since the last draft round

    def _choose(self) -> str:
        if not self.adaptive:
            return "draft"
        for kind in ("draft", "plain"):  # measure each once first
            if self.rate[kind] is None:
                return kind
        if self.rate["draft"] >= self.rate["plain"] or self.plain_run >= self.probe_interval:
            return "draft"
        return "plain"

    def _measure(self, kind: str, tokens_per_stream: float, seconds: float) -> None:
        r = tokens_per_stream / max(seconds, 1e-9)
        old = self.rate[kind]
        self.rate[kind] = r if old is None else (1 - EMA) * old + EMA * r

    def round(self, engine: Engine, streams: list[Stream]) -> None:
        kind = self._choose()
        t0 = time.perf_counter()
        before = sum(len(s.request.tokens) for s in streams)
        if kind == "plain":
            self.plain.step(engine, streams, None)
            self.plain_run += 1
            for st in {id(s.stats): s.stats for s in streams}.values():
                st.plain_steps += 1
        else:
            probing = self.plain_run > 0  # a draft round that interrupts a run of plain steps
            self.draft_round(engine, streams)
            self.plain_run = 0
        emitted = sum(len(s.request.tokens) for s in streams) - before
        self._measure(kind, emitted / len(streams), time.perf_counter() - t0)
        if kind == "draft" and self.adaptive and self.rate["plain"] is not None:
            if self.rate["draft"] >= self.rate["plain"]:
                self.probe_interval = self.probe_every  # drafting pays again: watch it closely
            elif probing:
                self.probe_interval = min(2 * self.probe_interval, self.max_probe_every)

    def draft_round(self, engine: Engine, streams: list[Stream]) -> None:
        model, cache, k = self.model, self.executor.cache, self.k
        rows = [s.row for s in streams]
        starts = [cache.lengths[r] for r in rows]
        roots = [s.context[-1] for s in streams]
        t_root = min(len(s.request.tokens) for s in streams) - 1  # generated index of the root
        w = len(self.warmup)
        tops = []  # the top layers of each draft step
        for j in range(k):
            layers = list(self.layers_at(t_root + j))
            if layers[:w] != self.warmup:
                raise ValueError(f"draft layers {layers} at generated position {t_root + j} do not "
                                 f"start with the warm-up layers {self.warmup}")
            tops.append(layers[w:])
        t0 = time.perf_counter()
        # 1. Draft: k skip-layer steps, then the warm-up layers of the last draft token.
        cur = list(roots)
        drafts, streams_h, q = [], [], []
        contexts = [list(s.context) for s in streams]
        for j in range(k + 1):
            step = cache.make_step(rows, [[t] for t in cur])
            h_w = model.hidden(step, cache, self.warmup)  # [B, 1, d]
            streams_h.append(h_w)
            cache.extend(rows, [1] * len(rows))
            if j == k:
                break
            h = model.hidden(step, cache, tops[j], start=h_w)
            draft_logits = model.logits(h[:, 0])  # [B, V]
            cur, probs = [], []
            for b, s in enumerate(streams):
                logits_b = engine.process(s, contexts[b], draft_logits[b])
                if s.params.greedy:
                    cur.append(int(logits_b.argmax()))
                    probs.append(torch.zeros(0))
                else:
                    pb = probabilities(logits_b, s.params)
                    probs.append(pb)
                    cur.append(draw(pb, s.generator))
                contexts[b].append(cur[-1])
            q.append(probs)
            drafts.append(cur)
        for r, st in zip(rows, starts):
            cache.rollback(r, st)
        t1 = time.perf_counter()
        # 2. Verify root + drafts over layers [w, L), continuing from the draft's streams.
        chain = [[roots[b]] + [d[b] for d in drafts] for b in range(len(streams))]
        step = cache.make_step(rows, chain, logits="all")
        h = model.hidden(step, cache, self.rest, start=torch.cat(streams_h, dim=1))
        target_logits = model.logits(h)  # [B, k + 1, V]
        for b, s in enumerate(streams):
            if s.processor is not None:
                for i in range(k + 1):
                    ctx = s.context + chain[b][1 : i + 1]
                    target_logits[b, i] = engine.process(s, ctx, target_logits[b, i])
        tokens = torch.tensor(chain)
        parents = torch.arange(-1, k).expand(len(streams), k + 1)
        draft_probs = None
        if any(not s.params.greedy for s in streams):  # node j's child was drawn from q[j]
            V = target_logits.shape[-1]
            draft_probs = torch.zeros(len(streams), k + 1, V)
            for j in range(k):
                for b, s in enumerate(streams):
                    if not s.params.greedy:
                        draft_probs[b, j] = q[j][b]
        dev = target_logits.device
        accepted = accept(tokens.to(dev), parents.to(dev), [k + 1] * len(streams), target_logits,
                          [s.params for s in streams], draft_probs,
                          [s.generator for s in streams], [s.philox for s in streams])
        commit(cache, rows, accepted)
        t2 = time.perf_counter()
        for st in {id(s.stats): s.stats for s in streams}.values():
            st.draft_seconds += t1 - t0
            st.verify_seconds += t2 - t1
            st.steps += 1
        for s, acc in zip(streams, accepted):
            s.stats.accepted.append(len(acc.path))
            # The layers this round ran for the stream, shared out over the tokens it emits.
            s.stats.layers_computed += (sum(w + len(top) for top in tops) + w
                                        + (k + 1) * len(self.rest))
            engine.emit(s, acc.tokens)

    def join(self, engine: Engine, s: Stream) -> None:
        pass

    def leave(self, s: Stream) -> None:
        pass

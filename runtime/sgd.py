"""Skeleton Graph Decoding and Skeleton-of-Thought on the engine (METHODS.md section 3).

One question goes through up to four phases, each a stream (or streams) on a model's engine:
  router   (SoT-R, optional) one forward over a few-shot yes/no prompt: logit("Yes") - logit("No")
           >= router_margin sends the question to the skeleton, else to plain decoding (the
           margin is calibrated per model unless given: `calibrated_margin`);
  skeleton the model writes the numbered skeleton (assistant turn pre-filled with "1."); it is ended
           as soon as the list is over (skeleton.list_over) and parsed into a DAG;
  points   every point whose parents are done is launched at once, those on the same model as one
           group (a "wave"): their prompts share question + skeleton, and a group joins its engine
           in one step, so the engine prefills that prefix once and forks it for every point
           (engine.Worker.rows_for). A point's prompt carries its parents' finished text
           (forwarding); SGD routes points of difficulty <= threshold to the small model;
  ar       plain decoding of the question: when the router says no, or when the skeleton is
           unusable (a fallback, counted in the report), never an exception.
The answer is the points in order, "i. title: expansion" one per line, streamed point by point
as soon as every earlier point is done. Several questions run concurrently; the engines step
together.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .engine import Stream
from .llm import Completion, PromptError
from .methods import AR
from .sampling import SamplingParams
from .skeleton import (
    ROUTER_ANSWERS,
    ROUTER_CALIBRATION,
    SGD,
    SKELETON_PREFILL,
    Node,
    Skeleton,
    SkeletonMethod,
    list_over,
    parse_skeleton,
    point_prefill,
    point_prompt,
    router_messages,
    skeleton_prompt,
)
from .stats import DecodeStats

if TYPE_CHECKING:
    from .llm import LLM

POINT_STOP = "\n"  # a point is one line of the answer


@dataclass(eq=False)
class Job:
    """One stream to start on a model: queued, then launched at a step of the scheduler."""

    llm: LLM
    prompt: list[int]
    params: SamplingParams
    method: object
    processor: Callable | None = None
    on_text: Callable[[str], None] | None = None
    stream: Stream | None = None

    @property
    def done(self) -> bool:
        return self.stream is not None and self.stream.finished


@dataclass(eq=False)
class Point:
    node: Node
    model: str  # "large" | "small"
    job: Job | None = None
    wave: int = -1  # the launch it was part of (0 = first)
    forwarded: tuple[int, ...] = ()  # parents whose text is in its prompt

    @property
    def text(self) -> str:
        """The expansion the model wrote after the pre-filled "i. title:" (once done)."""
        return self.job.stream.request.text if self.job is not None and self.job.done else ""

    def line(self) -> str:
        return (point_prefill(self.node) + self.text).rstrip()


@dataclass
class SkeletonReport:
    """What a skeleton method did with one question (printed by the CLI, read by bench_sgd)."""

    method: str
    mode: str = "skeleton"  # "skeleton" | "ar" (the router said no) | "fallback" (unusable)
    reason: str = ""  # why the question went to plain decoding
    router_score: float | None = None  # logit("Yes") - logit("No")
    router_margin: float | None = None  # the score at or above which the skeleton is used
    skeleton_text: str = ""  # as generated, "1." pre-fill included
    skeleton: Skeleton | None = None
    points: list[Point] = field(default_factory=list)
    waves: list[list[int]] = field(default_factory=list)  # point indices launched together
    forward_dropped: int = 0  # points whose parents' text did not fit in the context
    seconds: dict[str, float] = field(default_factory=dict)  # per phase

    @property
    def fallback(self) -> bool:
        return self.mode == "fallback"

    def routed_small(self) -> int:
        return sum(p.model == "small" for p in self.points)

    def describe(self) -> str:
        head = f"{self.method}: "
        if self.router_score is not None:
            head += (f"router {'yes' if self.mode != 'ar' else 'no'} ({self.router_score:+.2f}, "
                     f"margin {self.router_margin:+.2f}); ")
        if self.mode != "skeleton":
            what = "plain decoding" if self.mode == "ar" else "FALLBACK to plain decoding"
            return head + f"{what}: {self.reason}"
        lines = [head + f"{len(self.points)} points in {len(self.waves)} waves, "
                 f"{self.routed_small()} on the small model"]
        for p in self.points:
            n, st = p.node, p.job.stream.stats
            deps = ",".join(map(str, n.depends)) or "-"
            lines.append(f"  {n.index}. {n.title} [depends: {deps}] [difficulty: {n.difficulty}]"
                         f" -> {p.model}, wave {p.wave + 1}, {len(p.job.stream.request.tokens)} "
                         f"tokens, prompt {len(p.job.prompt)} tokens ({st.reused_tokens} reused)")
        lines.append("  waves: " + " | ".join(" ".join(map(str, w)) for w in self.waves))
        notes = self.skeleton.notes + ([f"{self.forward_dropped} points without their parents' "
                                        "text (past the context)"] if self.forward_dropped else [])
        lines += [f"  parse: {note}" for note in notes]
        return "\n".join(lines)


@dataclass
class SkeletonCompletion(Completion):
    report: SkeletonReport


# --- prompts -> ids ---------------------------------------------------------------------------
def render(llm: LLM, messages: list[dict[str, str]], prefill: str, chat: bool,
           system: str | None) -> list[int]:
    """Token ids of a conversation whose assistant turn begins with `prefill`: through the chat
    template, or as plain "User: ... Assistant: ..." text for a model without one."""
    if system:
        messages = [{"role": "system", "content": system}] + messages
    if chat:
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True) + prefill
        return llm.tokenizer.encode(text, add_special_tokens=False)
    text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return llm.tokenizer.encode(f"{text}\n\nAssistant: {prefill}")


def answer_ids(llm: LLM) -> tuple[int, int]:
    """The first token of "Yes" and of "No" as an assistant turn begins them."""
    ids = [llm.tokenizer.encode(a, add_special_tokens=False)[0] for a in ROUTER_ANSWERS]
    if ids[0] == ids[1]:
        raise ValueError(f"{llm.model_dir}: 'Yes' and 'No' start with the same token")
    return ids[0], ids[1]


# --- one question -----------------------------------------------------------------------------
class Run:
    def __init__(self, sched: Scheduler, question: str, params: SamplingParams, chat: bool,
                 system: str | None, on_text: Callable[[str], None] | None = None,
                 skeleton: str | None = None, stop_after: str | None = None):
        self.sched, self.question, self.params = sched, question, params
        self.chat, self.system, self.on_text = chat, system, on_text
        self.scripted = skeleton  # a skeleton text to use instead of generating one (tests)
        self.stop_after = stop_after  # "router" / "skeleton": stop once that phase is done
        self.report = SkeletonReport(sched.method.name)
        self.stats = DecodeStats(sched.method.name)
        self.phase, self.job = "", None  # the router / skeleton / ar job
        self.score: list[float] = []  # the router's logit("Yes") - logit("No")
        self.released = 0  # points streamed so far (in order)
        self.t0 = self.t_phase = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.phase == "done"

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self.phase:
            self.report.seconds[self.phase] = now - self.t_phase
        self.phase, self.t_phase = phase, now
        if phase == "done":
            self.report.seconds["total"] = now - self.t0

    # --- phases -------------------------------------------------------------------------------
    def begin(self) -> None:
        m = self.sched.method
        if self.scripted is not None:
            self._enter("skeleton")
            self._plan(self.scripted)
        elif m.router:
            self._enter("router")
            yes, no = answer_ids(self.sched.large)

            def record(context, logits):  # [V]: the first answer token's logits
                self.score.append(float(logits[yes] - logits[no]))
                return logits

            ids = render(self.sched.large, router_messages(self.question), "", self.chat,
                         self.system)
            self.job = self.sched.enqueue("router", Job(
                self.sched.large, ids, SamplingParams(max_new_tokens=1), AR(), record))
        else:
            self._skeleton()

    def _skeleton(self) -> None:
        self._enter("skeleton")
        m, llm = self.sched.method, self.sched.large
        ids = render(llm, [{"role": "user", "content": skeleton_prompt(self.question,
                                                                     m.annotated)}],
                     SKELETON_PREFILL, self.chat, self.system)
        n = len(ids)
        eos = min(llm.eos_ids)

        def end_of_list(context, logits):  # [V]: EOS as soon as the list is over
            if list_over(SKELETON_PREFILL + llm.tokenizer.decode(context[n:]), m.max_points):
                logits = torch.full_like(logits, -float("inf"))
                logits[eos] = 0.0
            return logits

        params = replace(self.params, max_new_tokens=m.skeleton_tokens, stop=(),
                         ignore_eos=False)
        self.job = self.sched.enqueue("skeleton", Job(llm, ids, params, AR(), end_of_list))

    def _ar(self, mode: str, reason: str) -> None:
        self._enter("ar")
        self.report.mode, self.report.reason = mode, reason
        llm = self.sched.large
        ids = llm.encode(self.question, self.chat, self.system)
        self.job = self.sched.enqueue("ar", Job(llm, ids, self.params, self.sched.large_method,
                                                on_text=self.on_text))

    def _plan(self, text: str) -> None:
        m, r = self.sched.method, self.report
        r.skeleton_text = text
        r.skeleton = sk = parse_skeleton(text, m.max_points, annotated=m.annotated)
        if not sk.ok:
            return self._ar("fallback", sk.error)
        small = self.sched.small is not None and isinstance(m, SGD)
        r.points = [Point(n, "small" if small and n.difficulty <= m.threshold else "large")
                    for n in sk.nodes]
        limit = self.sched.large.max_seq_len
        longest = max(len(self._point_ids(p, [])) for p in r.points)
        if longest >= limit:
            return self._ar("fallback", f"a point's prompt has {longest} tokens, past the "
                            f"context ({limit})")
        self._enter("points")
        self._launch()

    def _point_ids(self, p: Point, parents: list[Point]) -> list[int]:
        user, prefill = point_prompt(self.question, self.report.skeleton, p.node,
                                     [(q.node, q.text) for q in parents])
        return render(self.sched.model(p.model), [{"role": "user", "content": user}], prefill,
                      self.chat, self.system)

    def _launch(self) -> None:
        """Queue every point whose parents are done, one group per model (a wave)."""
        r = self.report
        ready = [p for p in r.points if p.job is None
                 and all(r.points[d - 1].job is not None and r.points[d - 1].job.done
                         for d in p.node.depends)]
        if not ready:
            return
        wave = len(r.waves)
        r.waves.append([p.node.index for p in ready])
        for model in ("large", "small"):
            for p in (p for p in ready if p.model == model):
                parents = [r.points[d - 1] for d in p.node.depends]
                ids = self._point_ids(p, parents)
                if len(ids) >= self.sched.model(model).max_seq_len:
                    ids, parents = self._point_ids(p, []), []
                    r.forward_dropped += 1
                p.wave, p.forwarded = wave, tuple(q.node.index for q in parents)
                params = replace(self.params, max_new_tokens=self.sched.method.point_tokens
                                 or self.params.max_new_tokens,
                                 stop=self.params.stop + (POINT_STOP,),
                                 seed=None if self.params.seed is None
                                 else self.params.seed + p.node.index)
                p.job = self.sched.enqueue(("points", id(self), wave, model), Job(
                    self.sched.model(model), ids, params, self.sched.method_on(model)))

    def advance(self) -> None:
        """Move on from whatever finished in the last step."""
        if self.phase == "router" and self.job.done:
            self._add(self.job)
            self.report.router_score, self.report.router_margin = self.score[0], self.sched.margin
            if self.stop_after == "router":
                self._enter("done")
            elif self.score[0] >= self.sched.margin:
                self._skeleton()
            else:
                self._ar("ar", f"the router answered No ({self.score[0]:+.2f} < "
                         f"{self.sched.margin:+.2f})")
        elif self.phase == "skeleton" and self.job.done:
            self._add(self.job)
            text = SKELETON_PREFILL + self.job.stream.request.text
            if self.stop_after == "skeleton":
                m = self.sched.method
                self.report.skeleton_text = text
                self.report.skeleton = parse_skeleton(text, m.max_points, annotated=m.annotated)
                self._enter("done")
            else:
                self._plan(text)
        elif self.phase == "points":
            self._release()
            if all(p.job is not None and p.job.done for p in self.report.points):
                for p in self.report.points:
                    self._add(p.job)
                self._enter("done")
            else:
                self._launch()
        elif self.phase == "ar" and self.job.done:
            self._add(self.job)
            self._enter("done")

    def _release(self) -> None:
        """Stream the points that are done and follow only done points."""
        points = self.report.points
        while self.released < len(points) and points[self.released].job is not None \
                and points[self.released].job.done:
            piece = ("\n" if self.released else "") + points[self.released].line()
            self.released += 1
            if self.on_text is not None:
                self.on_text(piece)

    def _add(self, job: Job) -> None:
        s, t = job.stream.stats, self.stats
        t.generated_tokens += s.generated_tokens
        t.steps += s.steps
        t.prefill_tokens += s.prefill_tokens
        t.reused_tokens += s.reused_tokens
        t.layers_computed += s.layers_computed
        t.accepted += s.accepted

    def completion(self) -> SkeletonCompletion:
        llm, r = self.sched.large, self.report
        self.stats.seconds = r.seconds.get("total", 0.0)
        prompt = len(llm.encode(self.question, self.chat, self.system))
        if r.mode != "skeleton":
            req = self.job.stream.request
            return SkeletonCompletion(req.text, req.tokens, prompt, req.finish_reason,
                                      self.stats.seconds, self.stats, r)
        text = "\n".join(p.line() for p in r.points)
        reasons = {p.job.stream.request.finish_reason for p in r.points}
        # The answer's tokens: its text encoded (titles were pre-filled, not generated).
        return SkeletonCompletion(text, llm.tokenizer.encode(text, add_special_tokens=False),
                                  prompt, "length" if "length" in reasons else "eos",
                                  self.stats.seconds, self.stats, r)


# --- the scheduler ------------------------------------------------------------------------------
class Scheduler:
    """Starts queued jobs and steps the engines of the large and (SGD) small model until every
    run is done. Per step and model one group of jobs joins: all queued router prompts, all
    skeleton prompts (they share the few-shot prefix), all AR prompts, or ONE wave of one
    question, since the engine shares only the prefix common to everything joining in a step."""

    def __init__(self, llm: LLM, method: SkeletonMethod):
        self.large, self.method = llm, method
        self.small = llm.draft_model(method.small) if isinstance(method, SGD) and method.small \
            else None
        self.large_method = method.node_method or AR()
        self.queues: dict[str, dict[object, list[Job]]] = {"large": {}, "small": {}}
        self.jobs: list[Job] = []  # every job queued, to cancel what an abandoned run leaves
        self.margin = method.router_margin  # set by `run` when the router needs calibrating

    def model(self, name: str) -> LLM:
        return self.small if name == "small" else self.large

    def method_on(self, name: str):
        if name == "small":
            return self.method.small_method or AR()
        return self.large_method

    def enqueue(self, key: object, job: Job) -> Job:
        self.queues["small" if job.llm is self.small else "large"].setdefault(key, []).append(job)
        self.jobs.append(job)
        return job

    def tick(self) -> bool:
        """Start one queued group per model, then step each engine that has live streams;
        False when there was nothing to do."""
        busy = False
        for name, queue in self.queues.items():
            if queue:
                llm = self.model(name)
                for job in queue.pop(next(iter(queue))):
                    job.stream = llm.submit(job.prompt, job.params, method=job.method,
                                            on_text=job.on_text, processor=job.processor)
        for llm in (self.large, self.small):
            if llm is not None and llm.engine.live:
                llm.step()
                busy = True
        return busy

    def run(self, runs: list[Run]) -> Iterator[None]:
        """Drive the runs to the end, yielding after every step."""
        if self.method.router and self.margin is None:
            self.margin = calibrated_margin(self.large, runs[0].chat, runs[0].system)
        try:
            for r in runs:
                r.begin()
            while not all(r.finished for r in runs):
                if not self.tick():
                    raise RuntimeError("skeleton scheduler: runs are waiting but nothing runs")
                for r in runs:
                    r.advance()
                yield
        finally:  # an abandoned run must not leave its streams running: they leave next step
            for j in self.jobs:
                if j.stream is not None and not j.stream.finished:
                    j.stream.request.finish_reason = "cancelled"


# --- entry points (LLM.generate / LLM.stream) ---------------------------------------------------
def generate_skeleton(llm: LLM, prompts: list[str], params: SamplingParams, chat: bool,
                      system: str | None, method: SkeletonMethod,
                      skeletons: list[str] | None = None) -> list[SkeletonCompletion]:
    """Answer every prompt with a skeleton method, all concurrently. `skeletons`: skeleton texts
    to use instead of generating them ("1." included; tests and replays)."""
    sched = Scheduler(llm, method)
    runs = [Run(sched, _question(p), params, chat, system,
                skeleton=None if skeletons is None else skeletons[i])
            for i, p in enumerate(prompts)]
    for _ in sched.run(runs):
        pass
    return [r.completion() for r in runs]


def write_skeletons(llm: LLM, prompts: list[str], params: SamplingParams, chat: bool,
                    system: str | None, method: SkeletonMethod) -> list[SkeletonReport]:
    """Only the skeleton step for every prompt (all concurrently, no router), parsed: what the
    parse rate is measured on, and what format tuning would start from."""
    no_small = {"small": None} if isinstance(method, SGD) else {}
    sched = Scheduler(llm, replace(method, router=False, **no_small))
    runs = [Run(sched, _question(p), params, chat, system, stop_after="skeleton")
            for p in prompts]
    for _ in sched.run(runs):
        pass
    return [r.report for r in runs]


def router_scores(llm: LLM, prompts: list[str], chat: bool, system: str | None = None
                  ) -> list[float]:
    """The router's logit("Yes") - logit("No") for every prompt (all concurrently): a prompt
    goes to the skeleton when its score is at least `router_margin`."""
    sched = Scheduler(llm, SGD(router=True, router_margin=0.0))  # the margin goes unused
    runs = [Run(sched, _question(p), SamplingParams(), chat, system, stop_after="router")
            for p in prompts]
    for _ in sched.run(runs):
        pass
    return [r.report.router_score for r in runs]


_MARGINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LLM -> {(chat, system): m}


def calibrated_margin(llm: LLM, chat: bool, system: str | None = None) -> float:
    """The router's margin for this model: halfway between its mean score on questions that
    split into points and its mean score on questions that do not (ROUTER_CALIBRATION: our own,
    in no evaluation set). Computed once per model and prompt format."""
    margins = _MARGINS.setdefault(llm, {})
    if (chat, system) not in margins:
        yes, no = ROUTER_CALIBRATION
        scores = router_scores(llm, list(yes + no), chat, system)
        mean_yes, mean_no = sum(scores[:len(yes)]) / len(yes), sum(scores[len(yes):]) / len(no)
        margins[chat, system] = (mean_yes + mean_no) / 2
    return margins[chat, system]


def stream_skeleton(llm: LLM, prompt: str, params: SamplingParams, chat: bool,
                    system: str | None, method: SkeletonMethod,
                    skeleton: str | None = None) -> Iterator[str]:
    """The answer's text as it becomes final: each point once it and every earlier point are
    done (plain decoding streams token by token). Returns the SkeletonCompletion."""
    pieces: list[str] = []
    sched = Scheduler(llm, method)
    run = Run(sched, _question(prompt), params, chat, system, pieces.append, skeleton)
    for _ in sched.run([run]):
        yield from pieces
        pieces.clear()
    return run.completion()


def _question(prompt) -> str:
    if not isinstance(prompt, str):
        raise PromptError("skeleton methods (SGD, SoT) take the question as text, not token ids")
    if not prompt.strip():
        raise PromptError("the prompt is empty (no text)")
    return prompt

"""SkipDecode fine-tuning: the target trained to decode under its exit schedule (METHODS.md 2).

    treadle train skipdecode --speedup 2 [--tune-layers all|upper] [--max-steps N]

writes `<cache>/models/SmolLM2-135M-Instruct-skipdecode-2x` (`-upper` appended when only the upper
layers train): an HF-layout Llama directory (config.json, model.safetensors, the target's tokenizer
files) and `skipdecode.json` (the schedule, the recipe, losses, held-out figures, timings), written
last, into a temp directory renamed into place. `treadle.load(dir)` runs it, and SkipDecode on it
runs the stored schedule unless told otherwise (another schedule warns: runtime/methods.py).

The training forward runs, inside one causal sequence, exactly what decoding runs: the prompt
(every position up to the last prompt token) runs all layers, and the token generated at index t
(sequence position P + t) runs schedule.layers_at(t). `skip_hidden` does it layer by layer with the
one graph forward (`Transformer.hidden` over that layer): the positions that run layer l are a
prefix of each sequence (n(t) never increases, so once a token skips l every later token does),
so the layer runs over the first W_l positions of the batch, W_l = the longest such prefix, and a
position past its own prefix keeps its residual stream unchanged (`torch.where`). Attention needs
nothing else: a position that runs l attends to earlier positions, which all ran l (their K/V are
the ones the KV cache holds at inference); a position that skips l attends to garbage K/V of
positions that also skipped it, but its output is discarded. Layers that no generated token runs
cost only the prompt's positions, so a step costs about what the schedule saves.

Loss over the answer positions (teacher forcing on the target's own answers, train/data.py):
    loss = CE(tokens) + kl_weight * KL(p_teacher^topk || p_skip)
           [+ full_kl_weight * KL(p_teacher^topk || p_full)]
p_teacher^topk = the ORIGINAL full model's next-token distribution at that position, truncated to
its top-`kl_topk` tokens and renormalised (computed once, train/distill.py); p_skip the skip pass
above; p_full the tuned model's own full pass (optional: it keeps AR and self-speculation on the
tuned model close to the original, for one more forward and backward). AdamW, warm-up and cosine
decay. `tune_layers`: ALL trains every layer and the final norm; UPPER trains the top layers
the schedule ever runs above its warm-up ([L - (n(0) - w), L)) and the final norm, leaving the
warm-up and skipped layers (and so the prompt's lower-layer K/V) as they were. The embedding and
the tied LM head stay frozen in both.

Resumable: the teacher's soft targets and, every `checkpoint_every` steps, the trainable tensors,
the optimizer state and the step are saved (atomically) in `.<out>.ckpt/` beside the output, under
a hash of the recipe; an interrupted build given the same recipe continues from its last checkpoint
(and regenerates nothing: the answers are cached by train/data.py). The checkpoint goes when the
output is published.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F

from ..graph.config import ModelConfig
from ..graph.model import Transformer
from ..graph.skip import SCHEDULE_FILE, SkipSchedule
from ..graph.step import Step
from ..graph.training import (
    StepKV,
    make_trainable,
    sequence_step,
    state_dict_of,
    trainable_parameters,
    training_model,
)
from ..graph.weights import ModelWeights
from ..loaders.default_model import DEFAULT_MODEL_NAME, cache_dir
from ..loaders.gguf_import import OutputExistsError, _atomic_dir, _fsync, _write_json
from ..loaders.safetensors_weights import read_state_dict
from .data import GenerateFn, Generation, GenerationRecipe, batches, pack, target_answers
from .distill import (
    TOKENIZER_FILES,
    Checkpoint,
    SoftTargets,
    heldout_split,
    hidden,
    load_target,
    teacher_pass,
    warmup_cosine,
)

FORMAT = 1  # of skipdecode.json


class TuneLayers(str, Enum):
    ALL = "all"  # every layer and the final norm
    UPPER = "upper"  # the top layers the schedule runs above its warm-up, and the final norm


@dataclass(frozen=True)
class TuneRecipe:
    """How the tuning trains (everything here is recorded, and keys the checkpoint)."""

    speedup: float = 2.0  # the schedule's L / mean layers over `schedule_tokens` tokens
    tune_layers: TuneLayers = TuneLayers.ALL
    warmup_layers: int = 2
    schedule_tokens: int = 128  # decay length: n(t) reaches its minimum at this generated index
    heldout_fraction: float = 0.1
    epochs: int = 2
    max_steps: int | None = None  # cap on optimizer steps (None: `epochs` full passes)
    lr: float = 1e-4
    batch_tokens: int = 512
    kl_weight: float = 1.0
    kl_topk: int = 32
    full_kl_weight: float = 0.0  # also keep the full pass near the teacher (see batch_loss)
    seed: int = 0

    def __post_init__(self):
        bad = {
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "lr": self.lr > 0,
            "batch_tokens": self.batch_tokens >= 1,
            "kl_weight": self.kl_weight >= 0,
            "kl_topk": self.kl_topk >= 1,  # the held-out KL needs the teacher's top-k
            "full_kl_weight": self.full_kl_weight >= 0,
            "heldout_fraction": 0 <= self.heldout_fraction < 1,
        }
        for name, ok in bad.items():
            if not ok:
                raise ValueError(f"TuneRecipe.{name}={getattr(self, name)!r} is out of range")

    def schedule(self, num_layers: int) -> SkipSchedule:
        return SkipSchedule.for_speedup(
            num_layers, self.speedup, self.schedule_tokens, self.warmup_layers
        )

    def describe(self) -> dict:
        return asdict(self) | {"tune_layers": self.tune_layers.value}


def tuned_dir(speedup: float, tune_layers: TuneLayers = TuneLayers.ALL,
              base: str = DEFAULT_MODEL_NAME) -> Path:
    """`<cache>/models/<base>-skipdecode-<S>x[-upper]` (made by `build_skipdecode`)."""
    suffix = "" if tune_layers == TuneLayers.ALL else f"-{tune_layers.value}"
    return cache_dir() / "models" / f"{base}-skipdecode-{speedup:g}x{suffix}"


def read_info(path: str | Path) -> dict | None:
    """The recorded skipdecode.json of a finished tuning (None if there is none)."""
    try:
        info = json.loads((Path(path) / SCHEDULE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


# --- the training forward -----------------------------------------------------------------------
def participation(
    schedule: SkipSchedule, prompt_lens: Sequence[int], width: int
) -> torch.Tensor:  # [L, B, T] bool
    """Which positions run which layer: position p of sequence b runs every layer while it is in
    the prompt (p < P_b), and schedule.layers_at(p - P_b) after it."""
    L = schedule.num_layers
    table = torch.zeros(width, L, dtype=torch.bool)  # [t, layer] for generated index t
    for t in range(width):
        table[t, schedule.layers_at(t)] = True
    runs = torch.ones(L, len(prompt_lens), width, dtype=torch.bool)
    for b, p in enumerate(prompt_lens):
        runs[:, b, p:] = table[: width - p].T
    return runs


def skip_hidden(
    model: Transformer, tokens: torch.Tensor, prompt_lens: Sequence[int], schedule: SkipSchedule
) -> torch.Tensor:  # [B, T] right-padded -> [B, T, d] residual stream after the last layer
    """The forward of whole sequences in which every position runs the layers SkipDecode gives it
    (see the module docstring); differentiable when `model` runs the training op table."""
    if schedule.num_layers != model.cfg.num_layers:
        raise ValueError(f"the schedule is for {schedule.num_layers} layers, the model has "
                         f"{model.cfg.num_layers}")
    width = tokens.shape[1]
    runs = participation(schedule, prompt_lens, width).to(tokens.device)
    kv = StepKV()
    steps: dict[int, Step] = {}  # one Step (and attention mask) per prefix width

    def step_of(w: int) -> Step:
        if w not in steps:
            steps[w] = sequence_step(tokens[:, :w])
        return steps[w]

    h = model.hidden(step_of(width), kv, layers=[])  # the embeddings
    for layer in range(schedule.num_layers):
        r = runs[layer]  # [B, T], a prefix of each row
        w = int(r.sum(1).max())
        if w == 0:
            continue
        out = model.hidden(step_of(w), kv, [layer], start=h[:, :w])  # [B, w, d]
        if not bool(r[:, :w].all()):
            out = torch.where(r[:, :w, None], out, h[:, :w])  # skipping positions pass through
        h = out if w == width else torch.cat([out, h[:, w:]], dim=1)
    return h


def student_of(
    target_dir: str | Path, layers: Sequence[int] | None, device: str = "cpu"
) -> Transformer:
    """The target with `layers` (None: all) and its final norm trainable, running the training op
    table; the embedding and the tied LM head stay frozen."""
    cfg = ModelConfig.from_json(target_dir)
    state = {k: v.float().to(device) for k, v in read_state_dict(target_dir, cfg).items()}
    weights = ModelWeights.from_state_dict(state, cfg)
    make_trainable(weights, layers=layers, norm=True, embed=False)
    return training_model(cfg, weights)


def tuned_layers(schedule: SkipSchedule, choice: TuneLayers) -> list[int] | None:
    """The layers `choice` trains (None: all)."""
    if choice == TuneLayers.ALL:
        return None
    return sorted(set(schedule.layers_at(0)) - set(range(schedule.warmup_layers)))


# --- loss, training, evaluation -----------------------------------------------------------------
def _soft(soft: Sequence[SoftTargets], idx: list[int], dev) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([soft[i][1] for i in idx]).to(dev).long()  # [N, k]
    probs = torch.cat([soft[i][2] for i in idx]).to(dev).float()  # [N, k]
    return ids, probs


def _kl(ids: torch.Tensor, probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) over positions, p = probs [N, k] on token ids [N, k] (the teacher's top-k,
    renormalised), log q = logp [N, V]."""
    return (torch.xlogy(probs, probs) - probs * logp.gather(1, ids)).sum(-1).mean()


def batch_loss(
    model: Transformer,
    schedule: SkipSchedule,
    data: Sequence[Generation],
    idx: list[int],
    soft: Sequence[SoftTargets] | None,
    kl_weight: float,
    full_kl_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(loss, CE, KL or None, argmax [N]) over the answer positions of examples `idx`, through the
    SkipDecode training forward. `full_kl_weight` > 0 adds the KL of the model's own full pass
    (every layer at every position) to the teacher: the full pass is what self-speculation
    verifies with and what AR on the tuned model runs, and training the skip pass alone lets it
    drift (one more forward and backward per step)."""
    tokens, where, labels = pack(data, idx, model.device)
    h = skip_hidden(model, tokens, [len(data[i][0]) for i in idx], schedule)
    logp = F.log_softmax(model.logits(h.flatten(0, 1)[where]), dim=-1)  # [N, V]
    ce = F.nll_loss(logp, labels)
    kl = None
    if soft is not None:
        ids, probs = _soft(soft, idx, model.device)
        kl = _kl(ids, probs, logp)
    loss = ce if kl is None or kl_weight == 0 else ce + kl_weight * kl
    if full_kl_weight > 0:
        if soft is None:
            raise ValueError("full_kl_weight > 0 needs the teacher's soft targets")
        h_full = hidden(model, tokens).flatten(0, 1)[where]
        loss = loss + full_kl_weight * _kl(ids, probs, F.log_softmax(model.logits(h_full), -1))
    return loss, ce, kl, logp.argmax(-1)


def plan_steps(data: Sequence[Generation], recipe: TuneRecipe) -> list[list[int]]:
    """The batches of every optimizer step, in order: `epochs` seeded shuffles of the data, capped
    at `max_steps` (fixed by the recipe, so a resumed run takes up exactly where it stopped)."""
    gen = random.Random(recipe.seed)
    plan: list[list[int]] = []
    for _ in range(recipe.epochs):
        order = list(range(len(data)))
        gen.shuffle(order)
        epoch = batches(data, recipe.batch_tokens, order)
        gen.shuffle(epoch)
        plan += epoch
    return plan[: recipe.max_steps] if recipe.max_steps is not None else plan


def train_skip(
    model: Transformer,
    schedule: SkipSchedule,
    data: Sequence[Generation],
    soft: Sequence[SoftTargets] | None,
    recipe: TuneRecipe,
    *,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> dict:
    """Train `model`'s trainable tensors (`make_trainable`) under the schedule; resumes from
    `checkpoint` when it holds a state of this recipe. Returns the steps run and, per step,
    [loss, CE, KL, answer positions]."""
    from tqdm import tqdm

    params = trainable_parameters(model.weights)
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    plan = plan_steps(data, recipe)
    start, history, train_s = 0, [], 0.0
    state = checkpoint.load_state() if checkpoint is not None else None
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        start, history, train_s = state["step"], state["history"], state["train_s"]
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan), initial=start, desc="skipdecode tuning", unit="step",
               disable=not progress)
    with bar:
        for step in range(start, len(plan)):
            loss, ce, kl, arg = batch_loss(model, schedule, data, plan[step], soft,
                                           recipe.kl_weight, recipe.full_kl_weight)
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(recipe.lr, step, len(plan))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append([float(loss.detach()), float(ce.detach()),
                            None if kl is None else float(kl.detach()), len(arg)])
            recent = history[-20:]
            bar.update()
            bar.set_postfix(loss=f"{sum(h[0] for h in recent) / len(recent):.3f}")
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0
                                           or step + 1 == len(plan)):
                checkpoint.save_state({
                    "step": step + 1,
                    "params": [p.detach() for p in params],
                    "opt": opt.state_dict(),
                    "history": history,
                    "train_s": train_s + time.perf_counter() - t0,
                })
    return {"steps": len(plan), "resumed_from_step": start, "history": history,
            "train_s": train_s + time.perf_counter() - t0}


@torch.no_grad()
def heldout_figures(
    model: Transformer,
    schedule: SkipSchedule,
    data: Sequence[Generation],
    soft: Sequence[SoftTargets],
    batch_tokens: int = 1024,
) -> dict:
    """On held-out answers: the skip pass's CE and KL to the original full model, and argmax
    agreement of (skip pass, original full model), (the model's own full pass, original) and
    (skip pass, own full pass: what greedy self-speculation accepts per drafted token)."""
    sums = {"ce": 0.0, "kl": 0.0, "skip_vs_original": 0, "full_vs_original": 0, "skip_vs_full": 0}
    n = 0
    for idx in batches(data, batch_tokens, list(range(len(data)))):
        _, ce, kl, skip_arg = batch_loss(model, schedule, data, idx, soft, 1.0)
        tokens, where, _ = pack(data, idx, model.device)
        h = hidden(model, tokens).flatten(0, 1)[where]
        full_arg = torch.cat([model.logits(h[c : c + 512]).argmax(-1)
                              for c in range(0, len(h), 512)])
        teacher_arg = torch.cat([soft[i][0] for i in idx]).to(model.device)
        m = len(skip_arg)
        sums["ce"] += float(ce) * m
        sums["kl"] += float(kl) * m
        sums["skip_vs_original"] += int((skip_arg == teacher_arg).sum())
        sums["full_vs_original"] += int((full_arg == teacher_arg).sum())
        sums["skip_vs_full"] += int((skip_arg == full_arg).sum())
        n += m
    out = {k: round(v / max(n, 1), 5) for k, v in sums.items()}
    return {**out, "loss": round(out["ce"] + out["kl"], 5), "positions": n}


# --- the build -----------------------------------------------------------------------------------
def build_skipdecode(
    out_dir: str | Path | None = None,
    *,
    target_dir: str | Path | None = None,
    recipe: TuneRecipe = TuneRecipe(),
    data_recipe: GenerationRecipe = GenerationRecipe(),
    generations: Sequence[Generation] | None = None,
    generate_fn: GenerateFn | None = None,
    data_cache: bool | str | Path = True,
    gen_batch: int = 32,
    device: str = "cpu",
    threads: int | None = None,
    checkpoint_every: int = 50,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Fine-tune `target_dir` (default: the embedded default model) for the SkipDecode schedule
    of `recipe` into `out_dir` (default `tuned_dir(...)`) and return it (see the module docstring).

    A finished output with the same recipe is returned as is; one made differently raises
    OutputExistsError unless `overwrite`. `generations` replaces the target's answers (every one
    then counts as greedy; the prompts are recorded as "given"); `generate_fn` replaces their
    generator (its answers are then cached only in an explicitly given `data_cache` folder)."""
    t_start = time.perf_counter()
    if target_dir is None:
        from ..loaders.default_model import default_model_dir

        target_dir = default_model_dir(progress=progress)
    target_dir = Path(target_dir).resolve()
    cfg = ModelConfig.from_json(target_dir)
    schedule = recipe.schedule(cfg.num_layers)
    out = Path(out_dir) if out_dir is not None else tuned_dir(
        recipe.speedup, recipe.tune_layers, target_dir.name)
    record = {
        "target": str(target_dir),
        "train": recipe.describe(),
        "prompts": "given" if generations is not None else data_recipe.describe(),
    }
    existing = read_info(out)
    if existing is not None and not overwrite:
        if existing.get("recipe") == record:
            return out
        raise OutputExistsError(
            f"{out}: holds a SkipDecode tuning with a different recipe (pass overwrite=True / "
            "--force)"
        )
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = Checkpoint(out.with_name(f".{out.name}.ckpt"), key)

    old_threads = torch.get_num_threads()
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        if generations is None:
            answers = target_answers(
                target_dir, data_recipe, generate_fn=generate_fn, batch=gen_batch, device=device,
                cache=False if generate_fn is not None and data_cache is True else data_cache,
                progress=progress,
            )
            data = answers.data
            if answers.chunks_cached:
                timings["generate_s_cached_run"] = answers.generate_s
        else:
            data = [(list(p), list(g)) for p, g in generations]
        data = [(p, g) for p, g in data if p and g]  # an empty answer teaches nothing
        for p, g in data:
            if max(p + g) >= cfg.vocab_size or min(p + g) < 0:
                raise ValueError(f"token id out of range for vocab_size={cfg.vocab_size}")
        timings["generate_s"] = time.perf_counter() - t0
        torch.set_num_threads(threads or old_threads)

        held, train = heldout_split(len(data), recipe.heldout_fraction, recipe.seed)
        train_data, held_data = [data[i] for i in train], [data[i] for i in held]
        student = student_of(target_dir, tuned_layers(schedule, recipe.tune_layers), device)

        # The teacher's soft targets and the untuned figures, once (a resumed build reads them).
        t0 = time.perf_counter()
        cached = checkpoint.load_teacher()
        if cached is None:
            teacher = load_target(target_dir, device)
            infer = max(recipe.batch_tokens, 2048)
            soft = teacher_pass(teacher, train_data, infer, recipe.kl_topk, progress)
            held_soft = teacher_pass(teacher, held_data, infer, recipe.kl_topk, progress,
                                     "teacher (held-out)")
            del teacher
            before = heldout_figures(student, schedule, held_data, held_soft) if held else {}
            checkpoint.save_teacher({"soft": soft, "held_soft": held_soft, "before": before,
                                     "seconds": time.perf_counter() - t0})
        else:
            soft, held_soft, before = cached["soft"], cached["held_soft"], cached["before"]
        timings["teacher_s"] = time.perf_counter() - t0

        run = train_skip(student, schedule, train_data, soft, recipe, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, progress=progress)
        timings["train_s"] = run["train_s"]
        t0 = time.perf_counter()
        after = heldout_figures(student, schedule, held_data, held_soft) if held else {}
        timings["eval_s"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)

    history = run["history"]
    window = max(1, min(20, len(history) // 5))
    mean = lambda rows, j: round(sum(r[j] for r in rows) / len(rows), 4)  # noqa: E731
    trained = tuned_layers(schedule, recipe.tune_layers)
    info = {
        "format": FORMAT,
        "schedule": schedule.to_dict(),
        "speedup": recipe.speedup,
        "mean_layers": round(schedule.mean_layers(recipe.schedule_tokens), 3),
        "recipe": record,
        "trained": (["all layers"] if trained is None else [f"layers {trained}"]) + ["model.norm"],
        "frozen": ["model.embed_tokens (tied LM head)" if cfg.tie_word_embeddings
                   else "model.embed_tokens, lm_head"],
        "data": {
            "examples_train": len(train_data),
            "examples_heldout": len(held_data),
            "answer_tokens_train": sum(len(g) for _, g in train_data),
            "prompt_tokens_train": sum(len(p) for p, _ in train_data),
        },
        "steps": run["steps"],
        "resumed_from_step": run["resumed_from_step"],
        "train_loss_first_steps": mean(history[:window], 0) if history else None,
        "train_loss_last_steps": mean(history[-window:], 0) if history else None,
        "train_ce_last_steps": mean(history[-window:], 1) if history else None,
        "heldout_before": before,
        "heldout_after": after,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "seconds_per_step": round(run["train_s"] / max(1, run["steps"] - run["resumed_from_step"]),
                                  3),
        "wall_time_s": None,
        "torch_version": torch.__version__,
        "device": device,
        "threads": threads or old_threads,
    }
    from safetensors.torch import save_file

    state = {k: v.cpu() for k, v in state_dict_of(student.weights, cfg).items()}
    with _atomic_dir(out, overwrite=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _fsync(tmp / "model.safetensors")
        for name in ("config.json", *TOKENIZER_FILES):
            if (target_dir / name).is_file():
                shutil.copyfile(target_dir / name, tmp / name)
                _fsync(tmp / name)
        info["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        _write_json(tmp / SCHEDULE_FILE, info)  # last: the schedule, and the build's marker
    checkpoint.remove()
    return out


# --- CLI -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = "treadle train skipdecode") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune the default model (or --target) for a SkipDecode schedule: the "
        "output directory runs with `treadle generate --model DIR --method skipdecode`.",
    )
    d = TuneRecipe()
    g = GenerationRecipe()
    ap.add_argument("--speedup", type=float, default=d.speedup,
                    help="the schedule's total layers / mean layers per token "
                    "(default %(default)s)")
    ap.add_argument("--tune-layers", choices=[c.value for c in TuneLayers],
                    default=d.tune_layers.value,
                    help="train every layer, or only the top layers the schedule runs above its "
                    "warm-up (default %(default)s)")
    ap.add_argument("--warmup-layers", type=int, default=d.warmup_layers)
    ap.add_argument("--schedule-tokens", type=int, default=d.schedule_tokens,
                    help="generated tokens over which the layer count decays (default "
                    "%(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output dir (default <cache>/models/<model>-skipdecode-<S>x[-upper])")
    ap.add_argument("--target", type=Path, default=None, help="model dir (default: embedded)")
    ap.add_argument("--n-prompts", type=int, default=g.n_prompts)
    ap.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    ap.add_argument("--sampled-fraction", type=float, default=g.sampled_fraction)
    ap.add_argument("--temperature", type=float, default=g.temperature)
    ap.add_argument("--extra-prompts-csv", type=Path, default=None,
                    help="optional CSV of extra training questions (column 'request'); never an "
                    "evaluation set (MT-Bench, Vicuna-80, WizardLM, LIMA)")
    ap.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    ap.add_argument("--kl-weight", type=float, default=d.kl_weight)
    ap.add_argument("--kl-topk", type=int, default=d.kl_topk)
    ap.add_argument("--full-kl-weight", type=float, default=d.full_kl_weight,
                    help="weight of the full pass's KL to the original model (keeps the tuned "
                    "model's full depth, which self-speculation verifies with, near the original; "
                    "one more forward/backward per step)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="retrain even if the output is there")
    ap.add_argument("--no-data-cache", action="store_true",
                    help="do not keep/reuse the generated answers under <cache>/train-data")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    recipe = TuneRecipe(
        speedup=args.speedup, tune_layers=TuneLayers(args.tune_layers),
        warmup_layers=args.warmup_layers, schedule_tokens=args.schedule_tokens,
        heldout_fraction=args.heldout_fraction, epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr, batch_tokens=args.batch_tokens, kl_weight=args.kl_weight,
        kl_topk=args.kl_topk, full_kl_weight=args.full_kl_weight, seed=args.seed,
    )
    data_recipe = GenerationRecipe(
        n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
        sampled_fraction=args.sampled_fraction, temperature=args.temperature, seed=args.seed,
        extra_prompts_csv=str(args.extra_prompts_csv) if args.extra_prompts_csv else None,
    )
    path = build_skipdecode(
        args.out, target_dir=args.target, recipe=recipe, data_recipe=data_recipe,
        data_cache=not args.no_data_cache, gen_batch=args.gen_batch, device=args.device,
        threads=args.threads, checkpoint_every=args.checkpoint_every, overwrite=args.force,
        progress=not args.quiet,
    )
    info = read_info(path) or {}
    print(f"tuned model: {path}\nschedule: {info.get('schedule')}\n"
          f"held-out before: {info.get('heldout_before')}\n"
          f"held-out after:  {info.get('heldout_after')}\n"
          f"steps: {info.get('steps')} ({info.get('seconds_per_step')} s/step), wall time: "
          f"{info.get('wall_time_s')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m treadle.train.skipdecode"))

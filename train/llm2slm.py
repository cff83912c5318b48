"""LLM-to-SLM's projector (METHODS.md section 5), trained through the graph forward.

    treadle train llm2slm                        # the projector; the small model: the derived draft
    treadle train llm2slm --tune-small           # the small model (layers + final norm) with it
    treadle train llm2slm --study 6,12,18,24,29  # held-out loss per candidate layer (short runs)

builds `<cache>/models/SmolLM2-135M-Instruct-llm2slm` (`-tuned` with --tune-small; the format is in
loaders/projector.py), which `llm.generate(..., method=LLM2SLM())` runs. Nothing is downloaded.

Pipeline (`build_projector`):
1. Data: the large model's OWN answers to built-in instructions (train/data.py: cached per chunk,
   resumable) that the small model never saw: when it is a derived draft, the prompts after the
   ones its build trained on (`unseen_after`; --after overrides). Trained on the draft's own
   examples, projectors made held-out loss worse at every layer studied (3.07 -> 3.26-3.28 after
   120 steps at layers 10/16/22/29): they learn to correct the draft's fit to those examples.
   A held-out split of these examples scores every projector.
2. Large pass: the frozen large model prefills every prompt once and keeps the states of the
   chosen layer (runtime/llm2slm.py `layer_states`, the very function generation calls), in memory:
   prompt tokens x d_large floats.
3. Training: the small model runs teacher-forced over prompt + answer with projector(states) added
   to the prompt tokens' embeddings (one to one: one tokenizer); next-token cross-entropy on the
   answer tokens only. The projector (and with --tune-small the small model's layers and final norm,
   at `small_lr`; its embedding / tied LM head stay frozen) trains with AdamW, warm-up then cosine
   decay. Every `checkpoint_every` steps the run's state is saved beside the output (atomically):
   a killed run resumes from its last checkpoint and ends with the same weights.
4. Evaluation: held-out cross-entropy per answer token with a zero projector (= the small model
   alone, before tuning) and with the trained one.
5. Output, written into a temp dir renamed into place: projector.safetensors, the tuned small model
   (small/), and treadle-llm2slm.json (models, fingerprints, layer, widths, recipe, losses,
   timings), written last.

The layer: the paper found an intermediate layer of a decoder-only large model can beat its last.
`study_layers` trains a projector per candidate layer for a few hundred steps and reports each
one's held-out loss beside the small model alone's; the large pass runs once for all of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..graph.config import ModelConfig
from ..graph.model import Transformer
from ..graph.training import (
    StepKV,
    make_trainable,
    sequence_step,
    state_dict_of,
    trainable_parameters,
    training_model,
)
from ..graph.weights import ModelWeights
from ..loaders.draft_model import find_draft, read_marker
from ..loaders.gguf_import import OutputExistsError, _atomic_dir, _fsync, _write_json
from ..loaders.projector import (
    MARKER,
    TUNED_SMALL,
    WEIGHTS,
    ProjectorInfo,
    find_projector,
    model_fingerprint,
    projector_dir,
    read_info,
    vocab_fingerprint,
)
from ..loaders.safetensors_weights import read_state_dict
from ..loaders.tokenizer import Tokenizer
from ..runtime.llm2slm import Projector, check_same_vocab, layer_states, vocabulary
from .data import GenerateFn, Generation, GenerationRecipe, batches, pack, target_answers
from .distill import Checkpoint
from .draft import TOKENIZER_FILES, _split, load_target


# --- the models -----------------------------------------------------------------------------------
def load_small(small_dir: str | Path, device: str = "cpu", tune: bool = False) -> Transformer:
    """The small model in fp32 on the training op table; with `tune` its layers and final norm
    are parameters (its embedding and tied LM head stay frozen), else everything is frozen and
    only the gradient to its input embeddings flows."""
    cfg = ModelConfig.from_json(small_dir)
    state = {k: v.float().to(device) for k, v in read_state_dict(small_dir, cfg).items()}
    weights = ModelWeights.from_state_dict(state, cfg)
    if tune:
        make_trainable(weights, norm=True, embed=False)
    return training_model(cfg, weights)


@torch.no_grad()
def large_states(
    large: Transformer,
    data: Sequence[Generation],
    layers: Sequence[int],
    batch_tokens: int = 4096,
    progress: bool = True,
) -> dict[int, list[torch.Tensor]]:
    """layer -> per example [prompt tokens, d_large]: the states the projector reads (the same
    `layer_states` as generation), prompts batched by length."""
    from tqdm import tqdm

    out: dict[int, list[torch.Tensor]] = {i: [None] * len(data) for i in layers}  # type: ignore
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    groups, cur = [], []
    for i in order:
        if cur and len(data[i][0]) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups += [cur] if cur else []
    for idx in tqdm(groups, desc="large model pass", unit="batch", disable=not progress):
        states = layer_states(large, [data[i][0] for i in idx], layers)
        for i, s in zip(idx, states):
            for n, layer in enumerate(layers):
                out[layer][i] = s[n].cpu()
    return out


def batch_loss(
    small: Transformer,
    projector: Projector | None,
    data: Sequence[Generation],
    states: Sequence[torch.Tensor],
    idx: list[int],
) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy over the answer tokens, their count) of the examples `idx`,
    teacher-forced, projector(states) added at the prompt positions (None: nothing added)."""
    dev = small.device
    tokens, where, labels = pack(data, idx, dev)
    batch, width = tokens.shape
    embeds = None
    if projector is not None:
        # Prompt token j of example b sits at flat position b * T + j (prompts start at 0).
        pos = torch.cat([torch.arange(len(data[i][0])) + b * width for b, i in enumerate(idx)])
        projected = projector(torch.cat([states[i] for i in idx]).to(dev))  # [sum Tp, d_small]
        embeds = torch.zeros(batch * width, small.cfg.hidden_size, device=dev)
        embeds = embeds.index_copy(0, pos.to(dev), projected).view(batch, width, -1)
    h = small.hidden(sequence_step(tokens), StepKV(), input_embeds=embeds).flatten(0, 1)[where]
    return F.cross_entropy(small.logits(h), labels), len(labels)


@torch.no_grad()
def heldout_loss(small, projector, data, states, batch_tokens: int = 1024) -> float:
    """Cross-entropy per answer token over `data` (token-weighted); projector None = nothing
    added (the small model alone)."""
    total, n = 0.0, 0
    for idx in batches(data, batch_tokens, list(range(len(data)))):
        loss, count = batch_loss(small, projector, data, states, idx)
        total += float(loss) * count
        n += count
    return total / max(1, n)


# --- training -------------------------------------------------------------------------------------
def train_projector(
    small: Transformer,
    projector: Projector,
    data: Sequence[Generation],
    states: Sequence[torch.Tensor],
    *,
    epochs: int,
    lr: float,
    small_lr: float = 1e-4,
    batch_tokens: int = 512,
    max_steps: int | None = None,
    seed: int = 0,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> dict:
    """Train the projector (and the small model's parameters, if `load_small(tune=True)` made
    any) on the answer tokens. Returns {"loss_per_epoch", "steps", "resumed_at_step"}."""
    from tqdm import tqdm

    small_params = trainable_parameters(small.weights)
    groups = [{"params": list(projector.parameters()), "lr": lr, "peak": lr}]
    if small_params:
        groups.append({"params": small_params, "lr": small_lr, "peak": small_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    gen = random.Random(seed)
    plan: list[tuple[int, list[int]]] = []  # (epoch, example indices) per step
    for e in range(epochs):
        order = list(range(len(data)))
        gen.shuffle(order)
        epoch = batches(data, batch_tokens, order)
        gen.shuffle(epoch)
        plan += [(e, idx) for idx in epoch]
    plan = plan[:max_steps] if max_steps is not None else plan
    total = len(plan)
    warmup = max(1, min(30, total // 10))

    def scale(step: int) -> float:  # linear warm-up, then cosine decay to 0.1 of the peak
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sums = [0.0] * epochs  # loss x tokens, tokens: per epoch, for the epoch means
    counts = [0] * epochs
    start = 0
    saved = checkpoint.load_state() if checkpoint is not None else None
    if saved is not None:
        projector.load_state_dict(saved["projector"])
        with torch.no_grad():
            for p, t in zip(small_params, saved["small"]):
                p.copy_(t)
        opt.load_state_dict(saved["optimizer"])
        start, sums, counts = saved["step"], saved["sums"], saved["counts"]
    bar = tqdm(total=total, initial=start, desc="training projector", unit="step",
               disable=not progress)
    with bar:
        for step in range(start, total):
            e, idx = plan[step]
            loss, n = batch_loss(small, projector, data, states, idx)
            for g in opt.param_groups:
                g["lr"] = g["peak"] * scale(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sums[e] += float(loss.detach()) * n
            counts[e] += n
            bar.update()
            bar.set_postfix(epoch=e + 1, loss=f"{sums[e] / counts[e]:.3f}")
            done = step + 1
            if checkpoint is not None and done < total and done % checkpoint_every == 0:
                checkpoint.save_state({
                    "step": done, "sums": sums, "counts": counts,
                    "projector": projector.state_dict(),
                    "small": [p.detach().clone() for p in small_params],
                    "optimizer": opt.state_dict(),
                })
    return {
        "loss_per_epoch": [round(s / c, 4) for s, c in zip(sums, counts) if c],
        "steps": total,
        "resumed_at_step": start,
    }


# --- data and checks ------------------------------------------------------------------------------
def _resolve(large_dir, small_dir, progress: bool) -> tuple[Path, Path]:
    if large_dir is None:
        from ..loaders.default_model import default_model_dir

        large_dir = default_model_dir(progress=progress)
    if small_dir is None:
        small_dir = find_draft()
        if small_dir is None:
            raise FileNotFoundError(
                "no small model given and the default model's derived draft is not built: run "
                "`treadle draft build`, or pass --small DIR"
            )
    return Path(large_dir).resolve(), Path(small_dir).resolve()


def unseen_after(small_dir: str | Path, seed: int, extra_prompts_csv: str | None) -> int:
    """How many prompts of the built-in order (this seed and CSV) the small model was trained on,
    from its draft record (0 when it has none): the projector's data start after them. Trained on
    examples the small model has fitted (its training loss there ~1.1 against ~3.1 held out), a
    projector learns to correct that fit and made held-out loss worse at every layer studied."""
    info = read_marker(small_dir)
    prompts = ((info or {}).get("recipe") or {}).get("prompts") or {}
    if prompts.get("seed") != seed or prompts.get("extra_prompts_csv") != extra_prompts_csv:
        return 0
    return int(prompts.get("n_prompts") or 0)


def _check_pair_dirs(large_dir: Path, small_dir: Path) -> list[str | None]:
    """The shared vocabulary (checked) of a large / small pair of model directories."""
    vocab = vocabulary(Tokenizer.from_dir(large_dir))
    check_same_vocab(vocab, vocabulary(Tokenizer.from_dir(small_dir)), small_dir, large_dir)
    return vocab


def _answers(large_dir, recipe, generations, generate_fn, gen_batch, device, data_cache,
             progress, vocab_size) -> tuple[list[Generation], float]:
    t0 = time.perf_counter()
    if generations is None:
        answers = target_answers(
            large_dir, recipe, generate_fn=generate_fn, batch=gen_batch, device=device,
            cache=False if generate_fn is not None and data_cache is True else data_cache,
            progress=progress,
        )
        data = answers.data
    else:
        data = [(list(p), list(g)) for p, g in generations]
    data = [(p, g) for p, g in data if p and g]  # an empty answer teaches nothing
    for p, g in data:
        if max(p + g) >= vocab_size or min(p + g) < 0:
            raise ValueError(f"token id out of range for vocab_size={vocab_size}")
    return data, time.perf_counter() - t0


def _check_layer(layer: int, n: int) -> int:
    if not 0 <= layer < n:
        raise ValueError(f"layer={layer}: the large model has layers 0..{n - 1}")
    return layer


# --- the study ------------------------------------------------------------------------------------
def study_layers(
    layers: Sequence[int],
    *,
    large_dir: str | Path | None = None,
    small_dir: str | Path | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    batch_tokens: int = 512,
    recipe: GenerationRecipe | None = None,
    heldout_fraction: float = 0.1,
    generations: Sequence[Generation] | None = None,
    generate_fn: GenerateFn | None = None,
    data_cache: bool | str | Path = True,
    gen_batch: int = 32,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Held-out loss of a projector per candidate layer, each trained `steps` steps from the same
    seed on the same batches, beside the small model alone's: which layer to train for real."""
    t_start = time.perf_counter()
    large_dir, small_dir = _resolve(large_dir, small_dir, progress)
    cfg = ModelConfig.from_json(large_dir)
    layers = [_check_layer(int(i), cfg.num_layers) for i in layers]
    _check_pair_dirs(large_dir, small_dir)
    recipe = recipe or GenerationRecipe(seed=seed)
    data, _ = _answers(large_dir, recipe, generations, generate_fn, gen_batch, device, data_cache,
                       progress, cfg.vocab_size)
    held, train = _split(len(data), heldout_fraction, seed)
    large = load_target(large_dir, device)
    states = large_states(large, data, layers, progress=progress)
    del large
    small = load_small(small_dir, device)
    held_data = [data[i] for i in held]
    train_data = [data[i] for i in train]
    out = {"large": str(large_dir), "small": str(small_dir), "steps": steps, "lr": lr,
           "batch_tokens": batch_tokens, "examples_train": len(train),
           "examples_heldout": len(held)}
    out["heldout_loss_small_alone"] = round(
        heldout_loss(small, None, held_data, [states[layers[0]][i] for i in held]), 4)
    per_epoch = len(batches(train_data, batch_tokens, list(range(len(train_data)))))
    epochs = -(-steps // max(1, per_epoch))  # enough epochs for `steps` steps
    losses = {}
    for layer in layers:
        torch.manual_seed(seed)
        projector = Projector(cfg.hidden_size, small.cfg.hidden_size).to(device)
        train_projector(small, projector, train_data, [states[layer][i] for i in train],
                        epochs=epochs, lr=lr, batch_tokens=batch_tokens, max_steps=steps,
                        seed=seed, progress=progress)
        losses[layer] = round(
            heldout_loss(small, projector, held_data, [states[layer][i] for i in held]), 4)
        if progress:
            print(f"layer {layer}: held-out loss {losses[layer]}", file=sys.stderr)
    out["heldout_loss_per_layer"] = {str(k): v for k, v in losses.items()}
    out["best_layer"] = min(losses, key=losses.get)
    out["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    return out


# --- the build ------------------------------------------------------------------------------------
def build_projector(
    out_dir: str | Path | None = None,
    *,
    large_dir: str | Path | None = None,
    small_dir: str | Path | None = None,
    layer: int | None = None,
    tune_small: bool = False,
    n_prompts: int = 512,
    max_new_tokens: int = 160,
    sampled_fraction: float = 0.25,
    temperature: float = 0.7,
    heldout_fraction: float = 0.1,
    epochs: int = 4,
    lr: float = 1e-3,
    small_lr: float = 1e-4,
    batch_tokens: int = 512,
    checkpoint_every: int = 50,
    gen_batch: int = 32,
    extra_prompts_csv: str | Path | None = None,
    after: int | None = None,
    generations: Sequence[Generation] | None = None,
    generate_fn: GenerateFn | None = None,
    data_cache: bool | str | Path = True,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train a projector from `large_dir`'s layer `layer` (default: its last) to `small_dir`
    (default: the derived draft) into `out_dir` (default `projector_dir(tune_small)`) and return
    it; see the module docstring. A finished build with the same recipe is returned as is; one
    built differently raises OutputExistsError unless `overwrite`. `generations` replaces the
    large model's answers (tests); `generate_fn` its generator."""
    t_start = time.perf_counter()
    large_dir, small_dir = _resolve(large_dir, small_dir, progress)
    out = Path(out_dir) if out_dir is not None else projector_dir(tune_small)
    cfg, small_cfg = ModelConfig.from_json(large_dir), ModelConfig.from_json(small_dir)
    layer = _check_layer(cfg.num_layers - 1 if layer is None else int(layer), cfg.num_layers)
    vocab = _check_pair_dirs(large_dir, small_dir)
    csv_path = str(extra_prompts_csv) if extra_prompts_csv else None
    gen_recipe = GenerationRecipe(
        n_prompts=n_prompts, max_new_tokens=max_new_tokens, sampled_fraction=sampled_fraction,
        temperature=temperature, seed=seed, extra_prompts_csv=csv_path,
        after=unseen_after(small_dir, seed, csv_path) if after is None else after,
    )
    large_fp, small_fp = model_fingerprint(large_dir), model_fingerprint(small_dir)
    recipe = {
        "large": str(large_dir), "large_fingerprint": large_fp,
        "small": str(small_dir), "small_fingerprint": small_fp,
        "layer": layer, "tune_small": tune_small,
        "prompts": "given" if generations is not None else gen_recipe.describe(),
        "heldout_fraction": heldout_fraction, "epochs": epochs, "lr": lr,
        "small_lr": small_lr if tune_small else None, "batch_tokens": batch_tokens, "seed": seed,
    }
    if find_projector(out) is not None and not overwrite:
        if read_info(out).record.get("recipe") == recipe:
            return out
        raise OutputExistsError(
            f"{out}: holds a projector built with a different recipe (pass overwrite=True / "
            "--force)"
        )
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = Checkpoint(out.with_name(f".{out.name}.checkpoint"), key)

    old_threads = torch.get_num_threads()
    timings: dict[str, float] = {}
    try:
        data, timings["data_s"] = _answers(large_dir, gen_recipe, generations, generate_fn,
                                           gen_batch, device, data_cache, progress,
                                           cfg.vocab_size)
        torch.set_num_threads(threads or old_threads)
        held, train = _split(len(data), heldout_fraction, seed)

        t0 = time.perf_counter()
        large = load_target(large_dir, device)
        states = large_states(large, data, [layer], progress=progress)[layer]
        del large
        timings["large_pass_s"] = time.perf_counter() - t0

        small = load_small(small_dir, device, tune=tune_small)
        torch.manual_seed(seed)
        projector = Projector(cfg.hidden_size, small_cfg.hidden_size).to(device)
        held_data, held_states = [data[i] for i in held], [states[i] for i in held]
        t0 = time.perf_counter()
        before = heldout_loss(small, None, held_data, held_states) if held else None
        timings["eval_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        trained = train_projector(
            small, projector, [data[i] for i in train], [states[i] for i in train],
            epochs=epochs, lr=lr, small_lr=small_lr, batch_tokens=batch_tokens, seed=seed,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
        )
        timings["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        after = heldout_loss(small, projector, held_data, held_states) if held else None
        timings["eval_s"] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)

    record = {
        "recipe": recipe,
        "states": f"final_norm(residual stream after layer {layer}) of the large model",
        "trained": ["projector"] + (["small model layers", "small model.norm"] if tune_small
                                    else []),
        "data": {
            "examples_train": len(train), "examples_heldout": len(held),
            "answer_tokens_train": sum(len(data[i][1]) for i in train),
            "prompt_tokens_train": sum(len(data[i][0]) for i in train),
        },
        "heldout_loss_small_alone": None if before is None else round(before, 4),
        "heldout_loss": None if after is None else round(after, 4),
        "train_loss_per_epoch": trained["loss_per_epoch"],
        "steps": trained["steps"],
        "resumed_at_step": trained["resumed_at_step"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_time_s": None,
        "torch_version": torch.__version__,
        "device": device,
        "threads": threads or old_threads,
    }
    from safetensors.torch import save_file

    with _atomic_dir(out, overwrite=True) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _fsync(tmp / WEIGHTS)
        small_rec, small_fp_rec = str(small_dir), small_fp
        if tune_small:
            _write_small(small, small_dir, tmp / TUNED_SMALL)
            small_rec, small_fp_rec = TUNED_SMALL, model_fingerprint(tmp / TUNED_SMALL)
        record["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        info = ProjectorInfo(
            large_dir=str(large_dir), large_fingerprint=large_fp, layer=layer,
            small_dir=small_rec, small_fingerprint=small_fp_rec, d_large=cfg.hidden_size,
            d_small=small_cfg.hidden_size, vocab_fingerprint=vocab_fingerprint(vocab),
            record=record,
        )
        _write_json(tmp / MARKER, info.to_json())  # last: its presence means the build finished
    checkpoint.remove()
    return out


def _write_small(small: Transformer, src: Path, dst: Path) -> None:
    """The tuned small model as an HF-layout directory: src's config and tokenizer files."""
    from safetensors.torch import save_file

    dst.mkdir()
    state = {k: v.cpu() for k, v in state_dict_of(small.weights, small.cfg).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _fsync(dst / "model.safetensors")
    for name in ("config.json", *TOKENIZER_FILES, "chat_template.jinja", "chat_template.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            _fsync(dst / name)


# --- CLI ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = "treadle train llm2slm") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Train LLM-to-SLM's projector (large model states -> small model embeddings); "
        "--study compares candidate layers instead.",
    )
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output dir (default {projector_dir()}, or {projector_dir(True)} with "
                    "--tune-small)")
    ap.add_argument("--large", type=Path, default=None, help="large model dir (default: embedded)")
    ap.add_argument("--small", type=Path, default=None,
                    help="small model dir (default: the derived draft, `treadle draft build`)")
    ap.add_argument("--layer", type=int, default=None,
                    help="the large model's layer whose states are projected (default: its last)")
    ap.add_argument("--tune-small", action="store_true",
                    help="also train the small model's layers and final norm (at --small-lr)")
    ap.add_argument("--study", default=None, metavar="LAYERS",
                    help="comma-separated candidate layers: print each one's held-out loss after "
                    "--study-steps steps (no artifact is written)")
    ap.add_argument("--study-steps", type=int, default=200)
    ap.add_argument("--study-out", type=Path, default=None, help="also write the study's JSON here")
    ap.add_argument("--n-prompts", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--sampled-fraction", type=float, default=0.25)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="the projector's peak learning rate")
    ap.add_argument("--small-lr", type=float, default=1e-4,
                    help="the small model's peak learning rate (--tune-small)")
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--extra-prompts-csv", type=Path, default=None,
                    help="optional CSV of extra training questions (column 'request'); never an "
                    "evaluation set")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--after", type=int, default=None,
                    help="skip the first N built-in prompts (default: those the small model, a "
                         "derived draft, was trained on; 0 to use them too)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a projector is there")
    ap.add_argument("--no-data-cache", action="store_true",
                    help="do not keep/reuse the generated answers under <cache>/train-data")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    csv_path = str(args.extra_prompts_csv) if args.extra_prompts_csv else None
    if args.after is None:
        args.after = unseen_after(_resolve(args.large, args.small, not args.quiet)[1], args.seed,
                                  csv_path)
    recipe = GenerationRecipe(
        n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
        sampled_fraction=args.sampled_fraction, temperature=args.temperature, seed=args.seed,
        extra_prompts_csv=csv_path, after=args.after,
    )
    if args.study is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        res = study_layers(
            [int(x) for x in args.study.split(",") if x.strip()], large_dir=args.large,
            small_dir=args.small, steps=args.study_steps, lr=args.lr,
            batch_tokens=args.batch_tokens, recipe=recipe, heldout_fraction=args.heldout_fraction,
            data_cache=not args.no_data_cache, gen_batch=args.gen_batch, device=args.device,
            seed=args.seed, progress=not args.quiet,
        )
        text = json.dumps(res, indent=2)
        if args.study_out is not None:
            args.study_out.write_text(text + "\n")
        print(text)
        return 0
    path = build_projector(
        args.out, large_dir=args.large, small_dir=args.small, layer=args.layer,
        tune_small=args.tune_small, n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
        sampled_fraction=args.sampled_fraction, temperature=args.temperature,
        heldout_fraction=args.heldout_fraction, epochs=args.epochs, lr=args.lr,
        small_lr=args.small_lr, batch_tokens=args.batch_tokens,
        checkpoint_every=args.checkpoint_every, gen_batch=args.gen_batch,
        extra_prompts_csv=args.extra_prompts_csv, after=args.after,
        data_cache=not args.no_data_cache,
        device=args.device, threads=args.threads, seed=args.seed, overwrite=args.force,
        progress=not args.quiet,
    )
    rec = read_info(path).record
    print(f"projector: {path}\nheld-out loss per answer token: small alone "
          f"{rec['heldout_loss_small_alone']}, with the projector {rec['heldout_loss']}\n"
          f"wall time: {rec['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m treadle.train.llm2slm"))

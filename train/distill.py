"""What every distillation from the target shares: the frozen teacher, its soft targets over the
answer positions, the held-out split, the learning-rate schedule, and the resumable checkpoint
of a training run (train/draft.py, skipdecode.py, apar.py and llm2slm.py use them).

    teacher = load_target(target_dir)
    soft = teacher_pass(teacher, data, 2048, topk=32)   # per example: argmax, top-k ids, probs
    held, train = heldout_split(len(data), 0.1, seed)
    lr = warmup_cosine(peak, step, total)
"""

from __future__ import annotations

import math
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from ..graph.backend import Backend
from ..graph.config import ModelConfig
from ..graph.model import Transformer
from ..graph.training import StepKV, sequence_step
from ..graph.weights import ModelWeights
from ..loaders.safetensors_weights import read_state_dict
from .data import Generation, batches, pack

# copied from the target into a derived model directory, when present
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

# (target argmax ids [n], top-k ids [n, k] int32 | None, top-k probabilities [n, k] fp16 | None)
# over the n answer positions of one example
SoftTargets = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def load_target(target_dir: str | Path, device: str = "cpu") -> Transformer:
    """The frozen target in fp32 with the torch backend (its reference attention reads a `StepKV`;
    on the CPU its products are the fast inference ones)."""
    cfg = ModelConfig.from_json(target_dir)
    state = {k: v.float().to(device) for k, v in read_state_dict(target_dir, cfg).items()}
    return Transformer(cfg, ModelWeights.from_state_dict(state, cfg), backend=Backend.TORCH)


def hidden(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, d]
    """The residual stream after the last layer over right-padded sequences (padding only follows
    real tokens, so causal attention keeps it out of every real position)."""
    return model.hidden(sequence_step(tokens), StepKV())


@torch.no_grad()
def teacher_pass(
    teacher: Transformer,
    data: Sequence[Generation],
    batch_tokens: int,
    topk: int,
    progress: bool = True,
    what: str = "teacher pass",
) -> list[SoftTargets]:
    """Per example: (target argmax ids, top-k ids, top-k probabilities renormalised) at its answer
    positions; topk=0 keeps only the argmax."""
    from tqdm import tqdm

    out: list[SoftTargets] = [None] * len(data)  # type: ignore[list-item]
    plan = batches(data, batch_tokens, list(range(len(data))))
    for idx in tqdm(plan, desc=what, unit="batch", disable=not progress):
        tokens, where, _ = pack(data, idx, teacher.device)
        h = hidden(teacher, tokens).flatten(0, 1)[where]
        arg, ids, probs = [], [], []
        for c in range(0, len(h), 512):
            lg = teacher.logits(h[c : c + 512])
            arg.append(lg.argmax(-1))
            if topk:
                v, ix = lg.topk(topk, dim=-1)
                ids.append(ix)
                probs.append(v.softmax(-1))  # renormalised over the kept top-k
        arg = torch.cat(arg).cpu()
        ids_t = torch.cat(ids).cpu().int() if topk else None
        probs_t = torch.cat(probs).cpu().half() if topk else None
        n0 = 0
        for i in idx:
            n = len(data[i][1])
            out[i] = (
                arg[n0 : n0 + n],
                ids_t[n0 : n0 + n] if topk else None,
                probs_t[n0 : n0 + n] if topk else None,
            )
            n0 += n
    return out


def heldout_split(n: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out, training) example indices: a seeded shuffle, the first fraction held out."""
    order = list(range(n))
    random.Random(seed + 2).shuffle(order)
    n_held = max(1, round(n * heldout_fraction)) if n > 1 else 0
    return sorted(order[:n_held]), sorted(order[n_held:])


def warmup_cosine(lr: float, step: int, total: int) -> float:
    """The learning rate at `step` of `total`: linear warm-up over min(30, total / 10) steps, then
    cosine decay to a tenth of `lr`."""
    warmup = max(1, min(30, total // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Checkpoint:
    """The resumable state of one build, in a folder beside its output: `teacher.pt` (the soft
    targets and the untuned figures, computed once) and `state.pt` (the step, the trainable
    tensors and the optimizer), each written atomically and valid only under the recipe's key."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key

    def _load(self, name: str) -> dict | None:
        try:
            obj = torch.load(self.folder / name, weights_only=True)
        except FileNotFoundError:
            return None
        return obj if isinstance(obj, dict) and obj.get("key") == self.key else None

    def _save(self, name: str, obj: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        tmp = path.with_name(f".{name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            torch.save({"key": self.key, **obj}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_teacher(self) -> dict | None:
        return self._load("teacher.pt")

    def save_teacher(self, obj: dict) -> None:
        self._save("teacher.pt", obj)

    def load_state(self) -> dict | None:
        return self._load("state.pt")

    def save_state(self, obj: dict) -> None:
        self._save("state.pt", obj)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

"""SkipDecode's layer schedule: which layers a generated token runs, as plan data.

Token t of the generation (t = 0 for the first generated token; the prompt runs all layers) runs
    n(t) = round(max_layers - (max_layers - min_layers) * min(t / decay_length, 1))
layers: the warm-up layers [0, w), then the top n(t) - w layers [L - (n(t) - w), L); the layers
in between are bypassed (the residual stream skips them) and cost nothing. Three properties make
this batch- and KV-cache-compatible:
  - the exit point depends only on t, which every sequence of a batch shares, so a batch runs one
    layer list per step and never waits for a slowest member;
  - n(t) never increases, so a later token's layers are a subset of an earlier token's: every key
    and value a token attends to was computed when that earlier token ran (none is recomputed);
  - the prompt and warm-up layers run everywhere, so the lower layers' KV is complete.
The speedup it targets is L / mean n(t) (the LM head and embeddings are never skipped).

A model fine-tuned for a schedule (`treadle train skipdecode`, train/skipdecode.py) keeps it beside
its weights in `skipdecode.json` (key "schedule"); `read_tuned_schedule` finds it, the way
`ModelConfig.from_json` finds config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCHEDULE_FILE = "skipdecode.json"  # beside config.json in a tuned model's directory


class ScheduleError(ValueError):
    """Schedule parameters that cannot describe a SkipDecode schedule."""


@dataclass(frozen=True)
class SkipSchedule:
    num_layers: int  # L
    max_layers: int  # n(0)
    min_layers: int  # n(t) for t >= decay_length
    warmup_layers: int  # w: [0, w) always run
    decay_length: int  # T_max: tokens over which n(t) falls from max_layers to min_layers

    def __post_init__(self):
        L, w = self.num_layers, self.warmup_layers
        if not 0 <= w < self.min_layers <= self.max_layers <= L:
            raise ScheduleError(
                f"SkipSchedule needs 0 <= warmup_layers < min_layers <= max_layers <= num_layers; "
                f"got warmup_layers={w}, min_layers={self.min_layers}, "
                f"max_layers={self.max_layers}, num_layers={L}"
            )
        if self.decay_length < 1:
            raise ScheduleError(f"SkipSchedule.decay_length={self.decay_length}: expected >= 1")

    def layer_count(self, t: int) -> int:
        """n(t): layers run by generated token t."""
        frac = min(t / self.decay_length, 1.0)
        return round(self.max_layers - (self.max_layers - self.min_layers) * frac)

    def layers_at(self, t: int) -> list[int]:
        n, w, L = self.layer_count(t), self.warmup_layers, self.num_layers
        return list(range(w)) + list(range(L - (n - w), L))

    def mean_layers(self, tokens: int) -> float:
        """Mean layers per token over a generation of `tokens` tokens."""
        return sum(self.layer_count(t) for t in range(tokens)) / tokens

    @classmethod
    def for_speedup(
        cls,
        num_layers: int,
        speedup: float,
        tokens: int,
        warmup_layers: int = 2,
        spread: float = 0.25,
    ) -> SkipSchedule:
        """A linear-decay schedule whose mean layers over `tokens` generated tokens is
        num_layers / speedup: n falls from mean * (1 + spread) to mean * (1 - spread)."""
        if speedup < 1:
            raise ScheduleError(f"skip speedup {speedup}: expected >= 1")
        mean = num_layers / speedup
        hi = min(num_layers, round(mean * (1 + spread)))
        lo = max(warmup_layers + 1, round(2 * mean - hi))  # linear decay: mean ~ (hi + lo) / 2
        sched = cls(num_layers, hi, lo, warmup_layers, decay_length=max(tokens, 1))
        # Rounding can leave the mean a little off: nudge min_layers towards the target.
        for _ in range(num_layers):
            err = sched.mean_layers(tokens) - mean
            step = -1 if err > 0.5 else (1 if err < -0.5 else 0)
            lo2 = sched.min_layers + step
            if step == 0 or not warmup_layers < lo2 <= sched.max_layers:
                break
            sched = cls(num_layers, hi, lo2, warmup_layers, sched.decay_length)
        return sched

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: object, where: str = "schedule") -> SkipSchedule:
        names = [f.name for f in fields(cls)]
        if not isinstance(obj, dict) or set(obj) != set(names):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ScheduleError(f"{where}: expected an object with keys {names}; got {got}")
        bad = [n for n in names if type(obj[n]) is not int]
        if bad:
            raise ScheduleError(f"{where}: {bad[0]}={obj[bad[0]]!r}: expected an integer")
        return cls(**obj)


def read_tuned_schedule(model_dir: str | Path) -> SkipSchedule | None:
    """The schedule a model directory was fine-tuned for (its `skipdecode.json`), or None when it
    has none. A file that is there but unreadable is an error, not a silent untuned model."""
    path = Path(model_dir) / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise ScheduleError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict) or "schedule" not in obj:
        raise ScheduleError(f"{path}: no \"schedule\" entry (written by treadle train skipdecode)")
    return SkipSchedule.from_dict(obj["schedule"], f"{path}: schedule")

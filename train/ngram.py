"""The n-gram table of a draft: the target's habitual phrases, a model-free draft source.

Counted over the target's own answers (train/data.py), written beside the distilled draft as
`ngram-table.json`; read by loaders/draft_model.py's `read_ngram_table`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..loaders.draft_model import NGRAM_ORDER
from ..loaders.gguf_import import _fsync
from .data import Generation


def count_next_tokens(
    sequences: Sequence[Sequence[int]], order: int = NGRAM_ORDER, min_count: int = 2, top: int = 2
) -> dict[tuple[int, ...], list[int]]:
    """context (1..order tokens) -> its `top` most frequent next tokens, for contexts seen at least
    `min_count` times."""
    counts: dict[tuple[int, ...], dict[int, int]] = {}
    for seq in sequences:
        seq = list(seq)
        for i in range(len(seq) - 1):
            for n in range(1, min(order, i + 1) + 1):
                after = counts.setdefault(tuple(seq[i - n + 1 : i + 1]), {})
                after[seq[i + 1]] = after.get(seq[i + 1], 0) + 1
    return {
        ctx: [t for t, _ in sorted(after.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
        for ctx, after in counts.items()
        if sum(after.values()) >= min_count
    }


def ngram_table_of(train_data: Sequence[Generation]) -> dict[tuple[int, ...], list[int]]:
    """Counted over prompt + answer of the training examples only (the held-out ones stay
    unseen, as for the distilled model)."""
    return count_next_tokens([list(p) + list(g) for p, g in train_data])


def write_ngram_table(
    table: dict[tuple[int, ...], list[int]], path: Path, vocab_size: int, order: int = NGRAM_ORDER
) -> None:
    """Atomically (temp file + rename) write `table` (contexts of up to `order` tokens) as JSON."""
    obj = {
        "format": 1,
        "order": order,
        "vocab_size": vocab_size,
        "next_tokens": [[list(ctx), nxt] for ctx, nxt in table.items()],
    }
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_text(json.dumps(obj, separators=(",", ":")))
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""Finding and reading a draft for speculative decoding: the distilled draft of the default model
and its n-gram table. They are made by `treadle draft build` (treadle/train/draft.py); this module
only locates and reads them.

A draft is a normal HF-layout Llama directory (`treadle.load(draft_dir())` runs it) holding
`treadle-draft.json` (the recipe, written last: its presence means the build finished) and
`ngram-table.json` (the target's habitual next tokens after 1-3 token contexts).
"""

from __future__ import annotations

import json
from pathlib import Path

from .default_model import DEFAULT_MODEL_NAME, cache_dir

DRAFT_NAME = f"{DEFAULT_MODEL_NAME}-draft"
MARKER = "treadle-draft.json"
DRAFT_FORMAT = 1
NGRAM_FILE = "ngram-table.json"
NGRAM_ORDER = 3


# --- where the draft lives ------------------------------------------------------------------------
def draft_dir() -> Path:
    """`<cache>/models/SmolLM2-135M-Instruct-draft` (made by `build_draft`; may not exist yet)."""
    return cache_dir() / "models" / DRAFT_NAME


def read_marker(path: str | Path) -> dict | None:
    """The recorded `treadle-draft.json` of a draft dir; None unless it is a finished draft."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != DRAFT_FORMAT:
        return None
    return info


def find_draft(path: str | Path | None = None) -> Path | None:
    """The draft directory (default `draft_dir()`) if a finished build is there, else None."""
    path = Path(path) if path is not None else draft_dir()
    if read_marker(path) is None or not (path / "config.json").is_file():
        return None
    return path


# --- the n-gram table ----------------------------------------------------------------------------
def read_ngram_table(
    draft: str | Path, vocab_size: int
) -> tuple[dict[tuple[int, ...], list[int]], int]:
    """(table, order) of a draft directory, checked against the target's vocabulary."""
    path = Path(draft) / NGRAM_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no n-gram table (made by `treadle draft build`; a draft built before it "
            "existed needs `treadle draft build --force`)"
        )
    try:
        obj = json.loads(path.read_text())
        order, entries = int(obj["order"]), obj["next_tokens"]
        table = {tuple(int(t) for t in ctx): [int(t) for t in nxt] for ctx, nxt in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a treadle n-gram table ({e})") from None
    if obj.get("vocab_size") != vocab_size:
        raise ValueError(
            f"{path}: made for a vocabulary of {obj.get('vocab_size')} tokens, but the target "
            f"has {vocab_size}"
        )
    bad = [t for ctx, nxt in table.items() for t in (*ctx, *nxt) if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{path}: token id {bad[0]} out of range for vocab_size={vocab_size}")
    return table, order

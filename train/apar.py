"""APAR tuning (METHODS.md section 4): the default model, taught to fork its own answers.

    treadle train apar [--n-prompts 128] [--plain-prompts 128] [--steps 150] [--out DIR]
    treadle train apar --info                      # the recorded recipe and figures

builds `<cache>/models/SmolLM2-135M-Instruct-apar` (cache root: `$TREADLE_CACHE`, else
~/.cache/treadle), an HF-layout Llama directory whose tokenizer has the two control tokens [Fork]
and [Child]: `treadle generate --model DIR --method apar` runs it (`LLM.apar_ids` finds the tokens
by name). Nothing is downloaded: it is made from the embedded model and its own answers.

Pipeline (`build_apar`):
1. Answers (train/data.py, cached per chunk, resumable): the target's own answers to
   `STRUCTURED_TEMPLATES` x data.TOPICS x counts (instructions that ask for numbered tips, steps,
   facts, or a few paragraphs), to `PLAIN_TEMPLATES` x data.TOPICS (short prose: the unstructured
   half), and optionally to data.py's built-in mixed set (the draft build's, reused from its
   cache). None of them comes from an evaluation set.
2. Recipe (`split_answer`, `fork_examples`), the public APAR recipe:
   - "N. Title: details" items, >= 3 of them, each detail >= 10 characters: each detail becomes a
     child stream and the main text keeps `N. Title:[Fork]`;
   - otherwise prose paragraphs, >= 3 of them forked: a paragraph's first sentence + [Fork] stays
     in the main text, the rest of the paragraph (>= 10 characters) is the child stream;
   - answers with code, math or markup are dropped, and so are answers shaped like a list or
     several paragraphs that fit neither form (they would teach not to fork where a fork fits);
   - one main example per answer (loss on the main text: its [Fork]s and EOS included), plus one
     child example per stream: prompt + the main tokens up to its [Fork] + [Child] -> detail +
     EOS, loss on the detail and EOS only. That is the context the runtime gives a child
     (runtime/apar.py: the parent's sequence up to and including [Fork], then [Child] forced),
     and the main text after a [Fork] starts right at the next item (reassembly adds the breaks);
   - mixed 50/50 (by answers) with unstructured answers, trained as they were generated (the
     scarcer kind sets the count; structured answers that ended by themselves go first).
   An answer cut by the token limit loses its unfinished last item, paragraph or closing text; its
   main example then ends at its last [Fork], without EOS.
3. Model: the two tokens appended to the vocabulary (tokenizer.json and tokenizer_config.json),
   the embedding widened by 2 rows (SmolLM2 ties it with the LM head: one matrix; an untied head
   is widened alike), each new row drawn like an ordinary row: seeded noise with the old rows'
   per-dimension mean and std. (Rows at the mean alone are near zero: control tokens that the
   input barely sees and whose logits grow slowly; on a tiny model such rows had not learned to
   fork after 60 steps where ordinary-scale rows had.)
4. Training: full fine-tuning (every layer, the norms, the embedding and tied head) through the
   graph's training path, AdamW, warm-up + cosine, `steps` optimizer steps over seeded shuffles of
   the examples. Every `checkpoint_every` steps the trainable tensors, the optimizer and the step
   are saved beside the output (`.<out>.ckpt/`, keyed by the recipe and the examples): a killed
   run resumes there; the checkpoint goes when the output is published.
5. Held-out figures before and after (10% of the answers): loss per example kind, and on the
   answers' positions the teacher-forced fork recall (argmax = [Fork] where the main text forks)
   and false forks (argmax = [Fork] anywhere else, unstructured answers included).
6. Output, atomically: config.json (vocab_size widened), model.safetensors (HF names), the
   tokenizer files with the added tokens (chat template kept), and `treadle-apar.json` (recipe,
   counts, timings, figures), written last.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..graph.config import ModelConfig
from ..graph.model import Transformer
from ..graph.training import make_trainable, state_dict_of, trainable_parameters, training_model
from ..graph.weights import ModelWeights
from ..loaders.default_model import DEFAULT_MODEL_NAME, cache_dir
from ..loaders.gguf_import import OutputExistsError, _atomic_dir, _fsync, _write_json
from ..loaders.safetensors_weights import read_state_dict
from ..loaders.tokenizer import Tokenizer
from ..runtime.llm import APAR_TOKENS
from .data import TOPICS, GenerateFn, Generation, GenerationRecipe, batches, pack, target_answers
from .distill import TOKENIZER_FILES, Checkpoint, heldout_split, hidden, warmup_cosine

MARKER = "treadle-apar.json"
APAR_FORMAT = 1
MIN_PARTS = 3  # items or forked paragraphs of a structured answer
MIN_DETAIL_CHARS = 10  # of each child stream's text


# --- prompts: ones that ask for structured answers, and ones that ask for plain prose ----------
STRUCTURED_TEMPLATES = (
    "List {n} practical tips for {t}, each with a short explanation.",
    "What are {n} key facts about {t}? Number them and explain each briefly.",
    "Give {n} steps to get started with {t}, with a sentence or two on each.",
    "Name {n} common mistakes people make with {t} and how to avoid them.",
    "What are {n} benefits of {t}? Explain each one.",
    "Describe {n} important ideas behind {t} in a numbered list.",
    "Write {n} short paragraphs about {t}: where it comes from, how it works, and why it matters.",
    "Explain {t} in {n} paragraphs.",
)
PLAIN_TEMPLATES = (
    "Explain {t} in one short paragraph.",
    "Summarize what {t} is in two or three sentences.",
    "Write a short poem about {t}.",
    "Tell a very short story about {t}.",
    "Why does {t} matter? Answer in a few sentences.",
    "How would you describe {t} to a friend, in a few sentences?",
)
COUNTS = ("three", "four", "five")  # the {n} of a template


def template_prompts(
    templates: Sequence[str], n: int, seed: int = 0, extra_prompts_csv: str | Path | None = None
) -> list[str]:
    """`n` distinct instructions: every extra CSV question first (column `request`), then
    templates x data.TOPICS (x COUNTS where a template has {n}) in a seeded order."""
    prompts: list[str] = []
    if extra_prompts_csv is not None:
        with open(extra_prompts_csv, newline="", encoding="utf-8") as f:
            prompts += [r["request"].strip() for r in csv.DictReader(f) if r.get("request")]
    combos = [tpl.format(n=c, t=t) for tpl in templates for t in TOPICS
              for c in (COUNTS if "{n}" in tpl else ("",))]
    random.Random(seed).shuffle(combos)
    prompts = list(dict.fromkeys(prompts + combos))
    if n > len(prompts):
        raise ValueError(f"n_prompts={n}: only {len(prompts)} distinct prompts are available")
    prompts = prompts[:n]
    random.Random(seed + 1).shuffle(prompts)
    return prompts


@dataclass(frozen=True)
class TemplateRecipe(GenerationRecipe):
    """A GenerationRecipe over `template_prompts(templates)`. train/data.py keys its cache by the
    recipe's fields (the templates among them) and by the prompts themselves, so these answers
    never mix with another set's."""

    templates: tuple[str, ...] = STRUCTURED_TEMPLATES
    max_new_tokens: int = 320  # lists run longer than the built-in set's answers

    def prompts(self) -> list[str]:
        return template_prompts(self.templates, self.n_prompts, self.seed, self.extra_prompts_csv)

    def describe(self) -> dict:
        extra = self.extra_prompts_csv
        return {
            **super().describe(),
            "source": "train/apar.py templates x data.TOPICS (x COUNTS)"
            + (f" + {Path(extra).name} (column request)" if extra else ""),
        }


# --- the recipe: a structured answer -> main text and child streams ------------------------------
@dataclass(frozen=True)
class Split:
    """An answer cut for APAR: a [Fork] goes after each main piece but the last, and details[i] is
    the text of the i-th fork's child stream. `complete`: the answer ended by itself (EOS)."""

    main: tuple[str, ...]
    details: tuple[str, ...]
    complete: bool
    form: str  # "numbered" | "paragraphs"


UNSTRUCTURED = "unstructured"  # the one rejection whose answers train as they are
ITEM = re.compile(r"^[ \t]*(\d+)\.[ \t]+", re.M)  # "N. " at a line start
LIST_LINE = re.compile(r"^[ \t]*(?:\d+[.)]|[-*+\u2022])[ \t]+", re.M)
# "Title:" / "**Title**:" / "**Title:**" right after "N. ", within its line
TITLE = re.compile(r"[^\n:]{1,80}?:(?:\*\*)?")
BLANK = re.compile(r"\n[ \t]*\n\s*")
FIRST_SENTENCE = re.compile(r".{10,}?[.!?](?=\s+\S)")
# code (fences, backticks, braces, tags), math (TeX commands, $...$ but not prices like $5,
# operators), markup (tables, headings)
MARKUP = re.compile(
    r"```|`|</?[A-Za-z][^>\n]*>|\\[A-Za-z(\[]|\$\$|\$[^\s$][^$\n]*?[^\s$]\$|[{}<>|^=]"
    r"|^[ \t]*#",
    re.M,
)


def split_answer(text: str, complete: bool = True) -> Split | str:
    """The APAR cut of one answer, or why there is none (a reason string; only UNSTRUCTURED
    answers are kept, as plain examples). `complete`: the answer ended with EOS; otherwise its
    unfinished last part is dropped."""
    if MARKUP.search(text):
        return "code, math or markup"
    if len(ITEM.findall(text)) >= 2:
        return _numbered(text, complete)
    paragraphs = _paragraphs(text)
    if LIST_LINE.search(text) or len(paragraphs) >= MIN_PARTS:
        return _paragraph_split(paragraphs, complete)
    return UNSTRUCTURED


def _numbered(text: str, complete: bool) -> Split | str:
    starts = list(ITEM.finditer(text))
    if [int(m.group(1)) for m in starts] != list(range(1, len(starts) + 1)):
        return "numbered list not numbered 1, 2, 3, ..."
    blank = BLANK.search(text, starts[-1].end())  # the last item ends at a blank line
    end = blank.start() if blank else len(text)
    closing = text[blank.end():] if blank else ""
    heads, details = [], []
    for i, m in enumerate(starts):
        title = TITLE.match(text, m.end())
        stop = starts[i + 1].start() if i + 1 < len(starts) else end
        if title is None or title.end() > stop or ". " in title.group():
            return "list not in 'N. Title: details' form"
        heads.append(text[m.start() : title.end()])
        details.append(text[title.end() : stop].rstrip())
    if not complete:  # what was cut is the closing text, else the last item
        if closing:
            closing = ""
        else:
            heads, details = heads[:-1], details[:-1]
    if len(heads) < MIN_PARTS:
        return "fewer than 3 items"
    if any(len(d.strip()) < MIN_DETAIL_CHARS for d in details):
        return "an item's details are shorter than 10 characters"
    intro = text[: starts[0].start()]
    return Split((intro + heads[0], *heads[1:], closing), tuple(details), complete, "numbered")


def _paragraphs(text: str) -> list[tuple[str, str]]:
    """(paragraph, the blank-line separator after it) pairs."""
    out, at = [], 0
    for m in BLANK.finditer(text):
        out.append((text[at : m.start()], m.group()))
        at = m.end()
    return out + [(text[at:], "")] if text[at:].strip() else out


def _paragraph_split(paragraphs: list[tuple[str, str]], complete: bool) -> Split | str:
    if not complete:
        paragraphs = paragraphs[:-1]
    if any("\n" in p or LIST_LINE.match(p) for p, _ in paragraphs):
        return "list or lines that are not prose paragraphs"
    main, details, pending = [], [], ""
    for p, sep in paragraphs:
        first = FIRST_SENTENCE.match(p)
        if first is not None and len(p[first.end() :].strip()) >= MIN_DETAIL_CHARS:
            main.append(pending + first.group())
            details.append(p[first.end() :].rstrip())
            pending = ""  # the continuation starts at the next paragraph: reassembly adds "\n\n"
        else:
            pending += p + sep
    if len(details) < MIN_PARTS:
        return "fewer than 3 paragraphs that split into a first sentence and the rest"
    return Split((*main, pending if complete else ""), tuple(details), complete, "paragraphs")


def fork_examples(
    prompt: Sequence[int],
    split: Split,
    encode: Callable[[str], list[int]],
    fork_id: int,
    child_id: int,
    eos_id: int,
) -> list[Generation]:
    """The main example, then one child example per fork, as (context, target) pairs whose loss
    covers the target. Pieces are tokenized apart, as the model will produce them on either side
    of a control token."""
    main: list[int] = []
    forks: list[int] = []  # the length of the main tokens up to and including each [Fork]
    for i, piece in enumerate(split.main):
        main += encode(piece)
        if i < len(split.details):
            main.append(fork_id)
            forks.append(len(main))
    if split.complete:
        main.append(eos_id)
    prompt = list(prompt)
    out = [(prompt, main)]
    for at, detail in zip(forks, split.details, strict=True):
        out.append((prompt + main[:at] + [child_id], encode(detail) + [eos_id]))
    return out


@dataclass
class ForkData:
    """Training examples built from answers: per example its kind ("main", "child", "plain")
    and the answer it came from; `outcomes` counts the answers per form or rejection reason."""

    examples: list[Generation] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def subset(self, answers: set[int]) -> ForkData:
        keep = [i for i, a in enumerate(self.answer) if a in answers]
        return ForkData([self.examples[i] for i in keep], [self.kinds[i] for i in keep],
                        [self.answer[i] for i in keep], {})


def make_fork_data(
    answers: Sequence[Generation],
    tokenizer: Tokenizer,
    fork_id: int,
    child_id: int,
    eos_ids: Sequence[int],
    seed: int = 0,
) -> ForkData:
    """Structured answers as fork examples and as many unstructured answers as plain examples
    (50/50: the scarcer kind decides how many of each), drawn in a seeded order, structured
    answers that ended by themselves first (their main texts end as the model's would)."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = set(eos_ids)
    splits: dict[int, Split] = {}
    plain: list[int] = []
    outcomes: dict[str, int] = {}
    for i, (_, answer) in enumerate(answers):
        complete = bool(answer) and answer[-1] in eos
        got = split_answer(tokenizer.decode(answer), complete) if answer else "empty"
        kind = got.form if isinstance(got, Split) else got
        outcomes[kind] = outcomes.get(kind, 0) + 1
        if isinstance(got, Split):
            splits[i] = got
        elif got == UNSTRUCTURED:
            plain.append(i)
    rng = random.Random(seed)
    structured = sorted(splits)
    rng.shuffle(structured)
    rng.shuffle(plain)
    structured.sort(key=lambda i: not splits[i].complete)  # stable: complete ones first
    n = min(len(structured), len(plain))
    outcomes["structured_used"] = outcomes["unstructured_used"] = n
    data = ForkData(outcomes=outcomes)
    for i in sorted(structured[:n] + plain[:n]):
        prompt, answer = answers[i]
        if i in splits:
            made = fork_examples(prompt, splits[i], encode, fork_id, child_id, eos_ids[0])
            kinds = ["main"] + ["child"] * (len(made) - 1)
        else:
            made, kinds = [(list(prompt), list(answer))], ["plain"]
        data.examples += made
        data.kinds += kinds
        data.answer += [i] * len(made)
    return data


# --- the model with two more tokens --------------------------------------------------------------
def control_token_ids(target_dir: Path) -> tuple[list[int], int]:
    """The ids [Fork] and [Child] get (the next two of the tokenizer) and the vocabulary size that
    holds them (the model's, if it has padding rows past the tokenizer, else 2 more)."""
    tok = Tokenizer.from_dir(target_dir)
    have = [t for t in APAR_TOKENS if tok.token_to_id(t) is not None]
    if have:
        raise ValueError(f"{target_dir}: the tokenizer already has {have}: it is tuned for APAR")
    ids = [tok.vocab_size, tok.vocab_size + 1]
    return ids, max(ModelConfig.from_json(target_dir).vocab_size, ids[-1] + 1)


def widen(state: dict[str, torch.Tensor], vocab: int, new_ids: Sequence[int], seed: int) -> dict:
    """The state dict with the embedding (and an untied LM head) grown to `vocab` rows; rows
    `new_ids` ~ N(mean, std^2) per dimension, the old rows' mean and std (an ordinary row)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in state:
            continue
        old = state[name].float()
        rows = torch.zeros(vocab, old.shape[1])
        rows[: len(old)] = old
        mean, std = old.mean(0), old.std(0)
        for i in new_ids:
            rows[i] = mean + std * torch.randn(old.shape[1], generator=gen)
        out[name] = rows
    return out


def apar_student(target_dir: Path, new_ids: Sequence[int], vocab: int, seed: int = 0,
                 device: str = "cpu") -> Transformer:
    """The target with the widened vocabulary, every tensor trainable, on the training ops."""
    cfg = ModelConfig.from_json(target_dir)
    state = widen(read_state_dict(target_dir, cfg), vocab, new_ids, seed)
    cfg = replace(cfg, vocab_size=vocab)
    weights = ModelWeights.from_state_dict({k: v.float().to(device) for k, v in state.items()},
                                           cfg)
    make_trainable(weights, norm=True, embed=True)
    return training_model(cfg, weights)


def write_tokenizer(target_dir: Path, out: Path, new_ids: Sequence[int]) -> None:
    """The target's tokenizer files into `out`, with [Fork] and [Child] added as special tokens at
    `new_ids` (tokenizer.json, and tokenizer_config.json's added_tokens_decoder, which is where
    a sentencepiece model's added tokens live)."""
    import tokenizers

    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copyfile(target_dir / name, out / name)
    if (target_dir / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(target_dir / "tokenizer.json"))
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in APAR_TOKENS])
        got = [tok.token_to_id(t) for t in APAR_TOKENS]
        if got != list(new_ids):
            raise ValueError(f"{target_dir}/tokenizer.json gave {APAR_TOKENS} the ids {got}, "
                             f"expected {list(new_ids)}")
        tok.save(str(out / "tokenizer.json"))
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    added = config.setdefault("added_tokens_decoder", {})
    for t, i in zip(APAR_TOKENS, new_ids, strict=True):
        added[str(i)] = {"content": t, "special": True, "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False}
    extra = config.get("additional_special_tokens") or []
    config["additional_special_tokens"] = [*extra, *(t for t in APAR_TOKENS if t not in extra)]
    _write_json(path, config)
    for name in TOKENIZER_FILES:
        if (out / name).is_file():
            _fsync(out / name)


# --- training and figures -------------------------------------------------------------------------
def plan_steps(data: Sequence[Generation], steps: int, batch_tokens: int, seed: int):
    """The batches of `steps` optimizer steps, in order: seeded shuffles of the data, one epoch
    after another (the same every run, so a resumed run takes up where it stopped)."""
    if not data:
        raise ValueError("no training examples: no answer fit the APAR recipe")
    gen = random.Random(seed)
    plan: list[list[int]] = []
    while len(plan) < steps:
        order = list(range(len(data)))
        gen.shuffle(order)
        epoch = batches(data, batch_tokens, order)
        gen.shuffle(epoch)
        plan += epoch
    return plan[:steps]


def train_apar(
    model: Transformer,
    data: Sequence[Generation],
    plan: list[list[int]],
    lr: float,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> dict:
    """Teacher-forced training of every trainable tensor on the examples' targets; resumes from
    `checkpoint` when it holds a state of this run. Returns the per-step losses."""
    from tqdm import tqdm

    params = trainable_parameters(model.weights)
    # fused: one kernel over all 135M parameters (the foreach path took seconds a step on a CPU)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    start, losses, train_s = 0, [], 0.0
    state = checkpoint.load_state() if checkpoint is not None else None
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        start, losses, train_s = state["step"], state["losses"], state["train_s"]
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan), initial=start, desc="APAR tuning", unit="step",
               disable=not progress)
    with bar:
        for step in range(start, len(plan)):
            tokens, where, labels = pack(data, plan[step], model.device)
            h = hidden(model, tokens).flatten(0, 1)[where]
            loss = F.cross_entropy(model.logits(h), labels)
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(lr, step, len(plan))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            recent = losses[-20:]
            bar.update()
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < len(
                plan
            ):
                checkpoint.save_state({
                    "step": step + 1,
                    "params": [p.detach() for p in params],
                    "opt": opt.state_dict(),
                    "losses": losses,
                    "train_s": train_s + time.perf_counter() - t0,
                })
    return {"losses": losses, "resumed_from_step": start,
            "train_s": train_s + time.perf_counter() - t0}


@torch.no_grad()
def heldout_figures(model: Transformer, data: ForkData, fork_id: int,
                    batch_tokens: int = 2048) -> dict:
    """Mean loss per example kind, and over the targets' positions the fork recall (argmax =
    [Fork] where the target is [Fork]) and the false-fork rate (argmax = [Fork] where it is not)."""
    sums: dict[str, list[float]] = {}
    forks = hits = others = false = 0
    for idx in batches(data.examples, batch_tokens, list(range(len(data.examples)))):
        tokens, where, labels = pack(data.examples, idx, model.device)
        h = hidden(model, tokens).flatten(0, 1)[where]
        logits = model.logits(h)
        nll = F.cross_entropy(logits, labels, reduction="none").cpu()
        arg, labels = logits.argmax(-1).cpu(), labels.cpu()
        n0 = 0
        for i in idx:
            n = len(data.examples[i][1])
            s = sums.setdefault(data.kinds[i], [0.0, 0])
            s[0] += float(nll[n0 : n0 + n].sum())
            s[1] += n
            n0 += n
        is_fork = labels == fork_id
        forks += int(is_fork.sum())
        hits += int((arg[is_fork] == fork_id).sum())
        others += int((~is_fork).sum())
        false += int((arg[~is_fork] == fork_id).sum())
    return {
        "loss": {k: round(s / n, 4) for k, (s, n) in sorted(sums.items())},
        "fork_recall": round(hits / forks, 4) if forks else None,
        "false_fork_rate": round(false / others, 5) if others else None,
        "fork_positions": forks,
    }


# --- where the tuned model lives ------------------------------------------------------------------
def apar_dir() -> Path:
    """`<cache>/models/SmolLM2-135M-Instruct-apar` (made by `build_apar`; may not exist yet)."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-apar"


def read_info(path: str | Path) -> dict | None:
    """The recorded `treadle-apar.json`; None unless `path` holds a finished build."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == APAR_FORMAT else None


def find_apar(path: str | Path | None = None) -> Path | None:
    """The tuned model directory (default `apar_dir()`) if a finished build is there, else None."""
    path = Path(path) if path is not None else apar_dir()
    return path if read_info(path) is not None and (path / "config.json").is_file() else None


# --- the build -----------------------------------------------------------------------------------
def build_apar(
    out_dir: str | Path | None = None,
    *,
    target_dir: str | Path | None = None,
    n_prompts: int = 128,
    plain_prompts: int = 128,
    general_prompts: int = 0,
    max_new_tokens: int = 320,
    plain_max_new_tokens: int = 160,
    steps: int = 150,
    lr: float = 1e-4,
    batch_tokens: int = 512,
    heldout_fraction: float = 0.1,
    gen_batch: int = 32,
    extra_prompts_csv: str | Path | None = None,
    generate_fn: GenerateFn | None = None,
    data_cache: bool | str | Path = True,
    device: str = "cpu",
    threads: int | None = None,
    checkpoint_every: int = 50,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tune `target_dir` (default: the embedded default model) for APAR into `out_dir` (default
    `apar_dir()`) and return it; see the module docstring for the pipeline.

    The target answers `n_prompts` STRUCTURED_TEMPLATES instructions (up to `max_new_tokens`
    each; `extra_prompts_csv` questions join them), `plain_prompts` PLAIN_TEMPLATES ones (the
    unstructured half; `plain_max_new_tokens`) and `general_prompts` of data.py's built-in set
    (`plain_max_new_tokens`; 512 x 160 is the draft build's set: its cached answers are reused).
    A finished output with the
    same recipe is returned as is; one made differently raises OutputExistsError unless
    `overwrite`. `generate_fn` replaces the answers' generator (they are then cached only in an
    explicitly given `data_cache` folder)."""
    t_start = time.perf_counter()
    if target_dir is None:
        from ..loaders.default_model import default_model_dir

        target_dir = default_model_dir(progress=progress)
    target_dir = Path(target_dir).resolve()
    out = Path(out_dir) if out_dir is not None else apar_dir()
    extra = str(extra_prompts_csv) if extra_prompts_csv else None
    recipes = [
        TemplateRecipe(n_prompts=n_prompts, max_new_tokens=max_new_tokens, seed=seed,
                       extra_prompts_csv=extra),
        TemplateRecipe(n_prompts=plain_prompts, max_new_tokens=plain_max_new_tokens, seed=seed,
                       templates=PLAIN_TEMPLATES),
        GenerationRecipe(n_prompts=general_prompts, max_new_tokens=plain_max_new_tokens,
                         seed=seed),
    ]
    recipes = [r for r in recipes if r.n_prompts]
    record = {
        "target": str(target_dir),
        "prompts": [r.describe() for r in recipes],
        "forms": f"'N. Title: details' items or prose paragraphs, >= {MIN_PARTS} forks, details "
                 f">= {MIN_DETAIL_CHARS} characters; code/math/markup dropped; 50/50 with "
                 "unstructured answers",
        "init": "new rows ~ N(mean, std^2) of the embedding rows per dimension, seeded",
        "trained": "all tensors (layers, norms, embedding / tied LM head)",
        "steps": steps,
        "lr": lr,
        "batch_tokens": batch_tokens,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
    }
    record = json.loads(json.dumps(record))  # as the marker holds it (tuples are lists there)
    existing = read_info(out)
    if existing is not None and not overwrite:
        if existing.get("recipe") == record:
            return out
        raise OutputExistsError(
            f"{out}: holds an APAR tuning with a different recipe (pass overwrite=True / --force)"
        )

    old_threads = torch.get_num_threads()
    timings: dict[str, float] = {}
    try:
        # 1. answers (train/data.py: cached per chunk, so a killed build resumes)
        t0 = time.perf_counter()
        answers: list[Generation] = []
        for r in recipes:
            got = target_answers(
                target_dir, r, generate_fn=generate_fn, batch=gen_batch, device=device,
                cache=False if generate_fn is not None and data_cache is True else data_cache,
                progress=progress,
            )
            answers += got.data
            if got.chunks_cached:  # what the generation took when it ran
                timings[f"generate_s_cached_run_{len(timings)}"] = got.generate_s
        timings["generate_s"] = time.perf_counter() - t0
        torch.set_num_threads(threads or old_threads)

        # 2. the recipe; held-out answers
        t0 = time.perf_counter()
        new_ids, vocab = control_token_ids(target_dir)
        tokenizer = Tokenizer.from_dir(target_dir)
        cfg = ModelConfig.from_json(target_dir)
        eos_ids = list(dict.fromkeys([*tokenizer.eos_ids, *cfg.eos_token_ids]))
        data = make_fork_data(answers, tokenizer, *new_ids, eos_ids, seed)
        used = sorted(set(data.answer))
        held, train = heldout_split(len(used), heldout_fraction, seed)
        train_data = data.subset({used[i] for i in train})
        held_data = data.subset({used[i] for i in held})
        timings["recipe_s"] = time.perf_counter() - t0

        # 3-5. model, training (resumable), held-out figures
        examples_hash = hashlib.sha256(json.dumps(train_data.examples).encode()).hexdigest()
        key = hashlib.sha256(json.dumps([record, examples_hash]).encode()).hexdigest()[:16]
        checkpoint = Checkpoint(out.with_name(f".{out.name}.ckpt"), key)
        student = apar_student(target_dir, new_ids, vocab, seed, device)
        t0 = time.perf_counter()
        before = heldout_figures(student, held_data, new_ids[0]) if held_data.examples else {}
        timings["eval_s"] = time.perf_counter() - t0
        plan = plan_steps(train_data.examples, steps, batch_tokens, seed)
        run = train_apar(student, train_data.examples, plan, lr, checkpoint, checkpoint_every,
                         progress)
        timings["train_s"] = run["train_s"]
        t0 = time.perf_counter()
        after = heldout_figures(student, held_data, new_ids[0]) if held_data.examples else {}
        timings["eval_s"] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)

    losses = run["losses"]
    window = max(1, min(20, len(losses) // 5))
    count = lambda d, k: sum(x == k for x in d.kinds)  # noqa: E731
    info = {
        "format": APAR_FORMAT,
        "recipe": record,
        "control_tokens": dict(zip(APAR_TOKENS, new_ids, strict=True)),
        "vocab_size": vocab,
        "data": {
            "answers": len(answers),
            "answer_outcomes": data.outcomes,
            "answers_used": len(used),
            "answers_heldout": len(held),
            "examples_train": {k: count(train_data, k) for k in ("main", "child", "plain")},
            "examples_heldout": {k: count(held_data, k) for k in ("main", "child", "plain")},
            "target_tokens_train": sum(len(g) for _, g in train_data.examples),
            "sequence_tokens_train": sum(len(p) + len(g) for p, g in train_data.examples),
        },
        "steps": len(plan),
        "epochs": round(sum(map(len, plan)) / max(1, len(train_data.examples)), 2),
        "resumed_from_step": run["resumed_from_step"],
        "train_loss_first_steps": round(sum(losses[:window]) / window, 4) if losses else None,
        "train_loss_last_steps": round(sum(losses[-window:]) / window, 4) if losses else None,
        "heldout_before": before,
        "heldout_after": after,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "seconds_per_step": round(run["train_s"] / max(1, len(plan) - run["resumed_from_step"]),
                                  3),
        "wall_time_s": None,
        "torch_version": torch.__version__,
        "device": device,
        "threads": threads or old_threads,
    }
    from safetensors.torch import save_file

    config = json.loads((target_dir / "config.json").read_text())
    config["vocab_size"] = vocab
    state = {k: v.cpu() for k, v in state_dict_of(student.weights, student.cfg).items()}
    with _atomic_dir(out, overwrite=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _fsync(tmp / "model.safetensors")
        write_tokenizer(target_dir, tmp, new_ids)
        _write_json(tmp / "config.json", config)
        info["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        _write_json(tmp / MARKER, info)  # last: its presence means the build finished
    checkpoint.remove()
    return out


# --- CLI -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = "treadle train apar") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Fine-tune the default model into an APAR model (forks its answers)."
    )
    ap.add_argument("--out", type=Path, default=None, help=f"output dir (default {apar_dir()})")
    ap.add_argument("--target", type=Path, default=None, help="model dir (default: embedded)")
    ap.add_argument("--n-prompts", type=int, default=128,
                    help="instructions that ask for lists or paragraphs (default %(default)s)")
    ap.add_argument("--plain-prompts", type=int, default=128,
                    help="instructions that ask for plain prose: the unstructured half "
                    "(default %(default)s)")
    ap.add_argument("--general-prompts", type=int, default=0,
                    help="data.py's built-in instructions too (512: the draft build's set, "
                    "reused from its cache when built)")
    ap.add_argument("--max-new-tokens", type=int, default=320,
                    help="of the structured answers (default %(default)s)")
    ap.add_argument("--plain-max-new-tokens", type=int, default=160,
                    help="of the plain and built-in answers (default %(default)s)")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--extra-prompts-csv", type=Path, default=None,
                    help="CSV of more structured-answer questions (column 'request'), read at "
                    "build time; never an evaluation set (MT-Bench, Vicuna-80, WizardLM, LIMA)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a tuning is there")
    ap.add_argument("--no-data-cache", action="store_true",
                    help="do not keep/reuse the generated answers under <cache>/train-data")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--info", action="store_true", help="print the recorded treadle-apar.json")
    args = ap.parse_args(argv)

    if args.info:
        path = args.out or apar_dir()
        info = read_info(path)
        if info is None:
            print(f"no finished APAR tuning at {path} (build it: {prog})", file=sys.stderr)
            return 1
        print(json.dumps({"path": str(path), **info}, indent=2))
        return 0

    path = build_apar(
        args.out, target_dir=args.target, n_prompts=args.n_prompts,
        plain_prompts=args.plain_prompts, general_prompts=args.general_prompts,
        max_new_tokens=args.max_new_tokens, plain_max_new_tokens=args.plain_max_new_tokens,
        steps=args.steps, lr=args.lr,
        batch_tokens=args.batch_tokens, heldout_fraction=args.heldout_fraction,
        gen_batch=args.gen_batch, extra_prompts_csv=args.extra_prompts_csv, device=args.device,
        threads=args.threads, data_cache=not args.no_data_cache,
        checkpoint_every=args.checkpoint_every, seed=args.seed, overwrite=args.force,
        progress=not args.quiet,
    )
    info = read_info(path) or {}
    after = info.get("heldout_after", {})
    print(f"APAR model: {path}\nheld-out fork recall {after.get('fork_recall')}, false forks "
          f"{after.get('false_fork_rate')}\nwall time: {info.get('wall_time_s')} s\n"
          f"run it: treadle generate --model {path} --method apar \"...\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m treadle.train.apar"))

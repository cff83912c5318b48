"""The text side of the skeleton methods (METHODS.md section 3): what SGD and SoT are as data, their
prompts, and the parser that turns a generated skeleton into a DAG of points.

A skeleton is a numbered list, one point per line. SGD asks for two annotations per point:
    3. Compare the costs [depends: 1,2] [difficulty: 2]
`depends` names earlier points whose finished text this one needs (they decode first and their
text is forwarded into its prompt); `difficulty` runs from 1 (easy) to 5 (hard) and picks the
model. SoT asks for the bare list. The parser is lenient on what the model writes and strict on
what it returns (`parse_skeleton`); a skeleton it cannot use sends the question to plain decoding.
The scheduler that decodes the points on the engine is runtime/sgd.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
DEFAULT_DIFFICULTY = 3  # a point without a difficulty goes to the large model (threshold 2)


@dataclass(frozen=True)
class SkeletonMethod:
    """What SoT and SGD share: a skeleton step, then every point decoded as a stream of its own
    (all ready points of a question in one batch per model, sharing the prompt prefix's KV)."""

    node_method: object = None  # how each point decodes on the large model (a Method; None = AR)
    max_points: int = 10  # points past this are dropped (and the list is cut off there)
    skeleton_tokens: int = 160  # the skeleton step's token cap
    point_tokens: int | None = None  # each point's token cap (None: the request's max_new_tokens)
    router: bool = False  # SoT-R: ask the model first whether the question suits a skeleton
    # Skeleton when logit("Yes") - logit("No") >= this; None: calibrated per model on
    # ROUTER_CALIBRATION (a small model leans to one answer whatever the question).
    router_margin: float | None = None

    annotated = False  # whether the skeleton carries [depends] / [difficulty]
    name = "skeleton"


@dataclass(frozen=True)
class SoT(SkeletonMethod):
    """Skeleton-of-Thought: a bare skeleton, every point independent, all on the large model."""

    name = "sot"


@dataclass(frozen=True)
class SGD(SkeletonMethod):
    """Skeleton Graph Decoding: points with dependencies (decoded in waves along the DAG, parents'
    text forwarded into children's prompts) and difficulties (points at or under `threshold` go
    to the small model). `small`: "default" (the derived draft), a model directory or GGUF file
    with the large model's vocabulary, or None (every point on the large model)."""

    small: str | None = None
    small_method: object = None  # how points on the small model decode (None = AR)
    threshold: int = 2

    annotated = True
    name = "sgd"


# --- parsing ----------------------------------------------------------------------------------
POINT = re.compile(r"^\s*(?:[-*]\s*)?(\d{1,3})\s*[.)]\s*(.*)$")
DEPENDS = re.compile(r"\[\s*depend(?:s|encies)?(?:\s+on)?\s*:?\s*([^\]]*)\]", re.IGNORECASE)
DIFFICULTY = re.compile(r"\[\s*difficulty\s*:?\s*([^\]]*)\]", re.IGNORECASE)
BEGUN = re.compile(r"^\s*(?:[-*]\s*)?\d{1,3}$")  # a point's number, before its "."
UNCLOSED = re.compile(r"\s*\[[^\]]*$")  # an annotation cut off by the token cap


@dataclass(frozen=True)
class Node:
    index: int  # 1-based and consecutive after parsing (the answer's numbering)
    title: str
    depends: tuple[int, ...] = ()  # indices of earlier points, ascending
    difficulty: int = DEFAULT_DIFFICULTY
    annotated: bool = False  # the model wrote both annotations for this point


@dataclass
class Skeleton:
    nodes: list[Node]
    notes: list[str] = field(default_factory=list)  # what the parser dropped or defaulted, and why
    error: str | None = None  # why the skeleton is unusable; the question then goes to AR

    @property
    def ok(self) -> bool:
        return self.error is None

    def waves(self) -> list[list[int]]:
        """Point indices by DAG level: level 0 has no parents, level k's deepest parent is at
        k - 1. The scheduler starts a point as soon as its parents are done, so these are the
        waves when points take equal time."""
        level: dict[int, int] = {}
        for n in self.nodes:  # parents come first: dependencies only point backwards
            level[n.index] = 1 + max((level[d] for d in n.depends), default=-1)
        out: list[list[int]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for n in self.nodes:
            out[level[n.index]].append(n.index)
        return out

    def outline(self) -> str:
        """The points' titles as a numbered list (what every point's prompt shows)."""
        return "\n".join(f"{n.index}. {n.title}" for n in self.nodes)


def parse_skeleton(text: str, max_points: int = 10, min_points: int = 2,
                   annotated: bool = True) -> Skeleton:
    """The DAG of a generated skeleton (the "1." pre-fill included in `text`). Never raises: what
    cannot be used is dropped with a note, and a skeleton of fewer than `min_points` points gets
    an `error`.

    - Points are the lines that start with a number; other lines are ignored.
    - A repeated index or title keeps its first occurrence; empty titles are dropped.
    - Points are put in index order and renumbered 1..n (a list that skips a number closes up),
      and only the first `max_points` are kept (a list that never ends is cut).
    - Dependencies on unknown, later or the same point are dropped: what is left points strictly
      backwards, so the graph has no cycle.
    - A missing or unreadable difficulty becomes DEFAULT_DIFFICULTY; others are clamped to 1..5.
    - With annotated=False (SoT) annotations are removed from titles and ignored.
    """
    notes: list[str] = []
    # the model's index -> (title, dependencies, difficulty, whether both annotations were there)
    raw: dict[int, tuple[str, list[int], int | None, bool]] = {}
    titles: set[str] = set()
    for line in text.splitlines():
        m = POINT.match(line)
        if m is None:
            continue
        index, body = int(m.group(1)), m.group(2)
        deps_m, diff_m = DEPENDS.search(body), DIFFICULTY.search(body)
        title = UNCLOSED.sub("", DIFFICULTY.sub("", DEPENDS.sub("", body))).strip(" \t-:;,")
        if not title:
            notes.append(f"point {index}: empty title, dropped")
            continue
        if index in raw or title.lower() in titles:
            notes.append(f"point {index}: repeats an earlier point, dropped")
            continue
        deps = [int(d) for d in re.findall(r"\d+", deps_m.group(1))] if deps_m else []
        number = re.match(r"\s*(\d+)", diff_m.group(1)) if diff_m else None
        diff = int(number.group(1)) if number else None
        both = deps_m is not None and diff is not None
        raw[index] = (title, deps, diff, both) if annotated else (title, [], None, False)
        titles.add(title.lower())
    order = sorted(raw)
    if len(order) > max_points:
        notes.append(f"{len(order) - max_points} points past the cap of {max_points}, dropped")
        order = order[:max_points]
    new = {old: i + 1 for i, old in enumerate(order)}
    if order != list(range(1, len(order) + 1)):
        notes.append(f"points {order} renumbered 1..{len(order)}")
    nodes = []
    for old in order:
        title, deps, diff, both = raw[old]
        keep = sorted({new[d] for d in deps if d in new and new[d] < new[old]})
        for d in sorted(set(deps)):
            if d not in new:
                notes.append(f"point {new[old]}: dependency on unknown point {d}, dropped")
            elif new[d] >= new[old]:
                what = "itself" if d == old else f"later point {new[d]}"
                notes.append(f"point {new[old]}: dependency on {what}, dropped")
        if annotated and diff is None:
            notes.append(f"point {new[old]}: no difficulty, {DEFAULT_DIFFICULTY} assumed")
        difficulty = min(max(DEFAULT_DIFFICULTY if diff is None else diff, MIN_DIFFICULTY),
                         MAX_DIFFICULTY)
        nodes.append(Node(new[old], title, tuple(keep), difficulty, both))
    error = None
    if len(nodes) < min_points:
        error = (f"{'no numbered points' if not nodes else f'only {len(nodes)} point'} in the "
                 f"skeleton (at least {min_points} needed)")
    return Skeleton(nodes, notes, error)


def list_over(text: str, max_points: int) -> bool:
    """Whether a skeleton being generated is complete: a line that is not a point has begun after
    the points (the model moved on to prose or to a new "Question:"), or more than `max_points`
    points have begun. The scheduler ends the skeleton step there instead of at the token cap."""
    lines = text.split("\n")
    points = 0
    for i, line in enumerate(lines):
        head = line.lstrip()
        if not head:
            continue
        begun = i == len(lines) - 1 and BEGUN.match(line) is not None  # a number being written
        if POINT.match(line) is None and not begun:
            return points > 0
        points += 1
    return points > max_points


# --- prompts (our wording; SoT's public prompts are the model) -------------------------------
# The examples are our own and stay clear of every evaluation set (Vicuna-80, MT-Bench).
SKELETON_EXAMPLES = (  # sparse dependencies: a small model copies what the examples show
    ("How do I start running?",
     [("Choose comfortable running shoes", [], 1), ("Start with walk-run intervals", [], 2),
      ("Increase the distance slowly", [2], 3), ("Rest between running days", [], 1)]),
    ("Why do leaves change color in autumn?",
     [("Chlorophyll breaks down", [], 3), ("Yellow pigments become visible", [1], 2),
      ("Red pigments form in some trees", [], 4), ("Weather changes the colors", [], 2)]),
)
SKELETON_PREFILL = "1."


def _example_line(i: int, title: str, deps: list[int], difficulty: int, annotated: bool) -> str:
    if not annotated:
        return f"{i}. {title}"
    dep = ",".join(map(str, deps)) if deps else "none"
    return f"{i}. {title} [depends: {dep}] [difficulty: {difficulty}]"


def skeleton_prompt(question: str, annotated: bool) -> str:
    """The skeleton step's user message; the assistant turn is pre-filled with "1."."""
    rules = ("Do not answer the question. Write only the skeleton of a good answer: a numbered "
             "list of 3 to 8 points, each point 3 to 6 words, one point per line.")
    if annotated:
        rules += (" After each point write [depends: ...] with the numbers of the earlier points "
                  "it builds on (or none), then [difficulty: n] from 1 (easy, common knowledge) "
                  "to 5 (hard, needs careful reasoning).")
    shots = "\n\n".join(
        f"Question: {q}\nSkeleton:\n" + "\n".join(
            _example_line(i + 1, *point, annotated) for i, point in enumerate(points))
        for q, points in SKELETON_EXAMPLES)
    return f"{rules}\n\n{shots}\n\nQuestion: {question}\nSkeleton:"


def point_prompt(question: str, skeleton: Skeleton, node: Node,
                 parents: list[tuple[Node, str]]) -> tuple[str, str]:
    """(user message, assistant pre-fill) that expand one point. Everything up to the skeleton is
    the same for every point of the question, so their prompts share that prefix's KV; what
    differs (the parents' text, the point's number) comes last."""
    text = ("You write one point of an answer. Here are the question and the skeleton of the "
            f"whole answer.\n\nQuestion: {question}\n\nSkeleton:\n{skeleton.outline()}\n\n")
    if parents:
        text += "Points already written that this one builds on:\n" + "\n".join(
            point_prefill(p) + body for p, body in parents) + "\n\n"
    text += (f"Continue point {node.index} only, in one or two short sentences. Do not write any "
             "other point.")
    return text, point_prefill(node)


def point_prefill(node: Node) -> str:
    """How a point's line begins, pre-filled in its assistant turn. The colon matters: after a
    bare title the default model ends the line (it reads as the skeleton again); after "title:"
    it writes the sentence."""
    return f"{node.index}. {node.title}:"


ROUTER_EXAMPLES = (  # (question, whether its answer splits into independent points)
    ("What are some good habits for staying healthy?", "Yes"),
    ("Solve for y: 4y - 7 = 13.", "No"),
    ("What should I pack for a week of camping?", "Yes"),
    ("Write a short poem about the sea as an old sailor.", "No"),
)
ROUTER_ANSWERS = ("Yes", "No")
ROUTER_CALIBRATION = (  # (questions whose answer is a list of points, questions whose is not)
    ("What are some ways to stay focused while studying?",
     "What are the pros and cons of living in a big city?",
     "How can I get my car ready for winter?",
     "What are the main causes of air pollution?"),
    ("What is 15 multiplied by 12?",
     "Write a Python function that reverses a string.",
     "Pretend you are a ship's robot and greet the passengers.",
     "Translate 'good morning' into Spanish."),
)


def router_messages(question: str) -> list[dict[str, str]]:
    """A chat (few-shot as earlier turns) whose next token is Yes or No: can the answer be written
    as independent points?"""
    ask = ("Can a good answer to this request be written as a list of separate points, each one "
           "explained on its own? Answer Yes or No.\n\nRequest: ")
    messages = []
    for q, a in ROUTER_EXAMPLES:
        messages += [{"role": "user", "content": ask + q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": ask + question}]

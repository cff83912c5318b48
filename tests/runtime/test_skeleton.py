"""The skeleton parser on hand-written skeletons, well-formed and malformed: it never raises, drops
what it cannot use with a note, and returns a DAG whose dependencies point strictly backwards."""

from __future__ import annotations

import os

import pytest
from treadle.runtime.skeleton import (
    DEFAULT_DIFFICULTY,
    SKELETON_EXAMPLES,
    list_over,
    parse_skeleton,
    point_prompt,
    skeleton_prompt,
)


def shape(text: str, **kw):
    sk = parse_skeleton(text, **kw)
    return [(n.index, n.title, n.depends, n.difficulty) for n in sk.nodes], sk


def test_well_formed_skeleton():
    nodes, sk = shape("1. Get shoes [depends: none] [difficulty: 1]\n"
                      "2. Short runs [depends: ] [difficulty: 2]\n"
                      "3. Build distance [depends: 1, 2] [difficulty: 4]\n")
    assert nodes == [(1, "Get shoes", (), 1), (2, "Short runs", (), 2),
                     (3, "Build distance", (1, 2), 4)]
    assert sk.ok and sk.notes == [] and all(n.annotated for n in sk.nodes)
    assert sk.waves() == [[1, 2], [3]]
    assert sk.outline() == "1. Get shoes\n2. Short runs\n3. Build distance"


def test_duplicates_keep_the_first_occurrence():
    nodes, sk = shape("1. Alpha\n2. Beta\n2. Beta again\n3. Alpha\n1. Gamma\n4. Delta")
    # index 2 repeated, title "Alpha" repeated (at index 3), index 1 repeated: each dropped
    assert [(i, t) for i, t, _, _ in nodes] == [(1, "Alpha"), (2, "Beta"), (3, "Delta")]
    assert sum("repeats" in n for n in sk.notes) == 3
    assert any("renumbered" in n for n in sk.notes)


def test_a_list_that_never_ends_is_capped():
    text = "1." + "".join(f" point number {i}\n{i + 1}." for i in range(1, 60))
    nodes, sk = shape(text, max_points=6)
    assert [i for i, *_ in nodes] == list(range(1, 7)) and sk.ok
    assert any("past the cap of 6" in n for n in sk.notes)


def test_missing_and_bad_annotations_get_defaults():
    nodes, sk = shape("1. No annotations at all\n"
                      "2. Only depends [depends: 1]\n"
                      "3. Odd difficulty [difficulty: hard]\n"
                      "4. Too hard [difficulty: 9] [depends: 3]\n"
                      "5. Too easy [Difficulty:0]\n"
                      "6. Cut off by the cap [depends: 1,")
    assert nodes == [(1, "No annotations at all", (), DEFAULT_DIFFICULTY),
                     (2, "Only depends", (1,), DEFAULT_DIFFICULTY),
                     (3, "Odd difficulty", (), DEFAULT_DIFFICULTY),
                     (4, "Too hard", (3,), 5),
                     (5, "Too easy", (), 1),
                     (6, "Cut off by the cap", (), DEFAULT_DIFFICULTY)]
    assert [n.annotated for n in sk.nodes] == [False, False, False, True, False, False]
    assert sum("no difficulty" in n for n in sk.notes) == 4


def test_forward_self_cyclic_and_unknown_dependencies_are_dropped():
    nodes, sk = shape("1. A [depends: 2] [difficulty: 1]\n"  # forward (and a cycle 1 <-> 2)
                      "2. B [depends: 1] [difficulty: 1]\n"
                      "3. C [depends: 3, 7, 0] [difficulty: 1]\n"  # self, unknown, unknown
                      "4. D [depends: 2,3,4,5] [difficulty: 1]\n")  # 5 is unknown
    assert [d for _, _, d, _ in nodes] == [(), (1,), (), (2, 3)]
    assert sk.waves() == [[1, 3], [2], [4]]
    notes = "\n".join(sk.notes)
    assert "point 1: dependency on later point 2" in notes
    assert "point 3: dependency on itself" in notes
    assert "unknown point 7" in notes and "unknown point 0" in notes and "unknown point 5" in notes


def test_dependencies_follow_renumbering_and_the_cap():
    # The model skips 2 and 4: 3 -> 2, 5 -> 3; a dependency on a point past the cap is unknown.
    nodes, sk = shape("1. A\n3. B [depends: 1]\n5. C [depends: 3, 6]\n6. D", max_points=3)
    assert nodes[1][2] == (1,) and nodes[2][2] == (2,)
    assert any("unknown point 6" in n for n in sk.notes)


def test_sot_ignores_annotations():
    nodes, sk = shape("1. A [depends: none] [difficulty: 1]\n2. B [depends: 1] [difficulty: 1]",
                      annotated=False)
    assert nodes == [(1, "A", (), DEFAULT_DIFFICULTY), (2, "B", (), DEFAULT_DIFFICULTY)]
    assert sk.waves() == [[1, 2]] and sk.notes == []


@pytest.mark.parametrize("text,error", [
    ("", "no numbered points"),
    ("1.", "no numbered points"),  # the pre-fill alone: the model stopped at once
    ("I cannot make a list for this.", "no numbered points"),
    ("1. The only point\nand then some prose", "only 1 point"),
    ("1. [depends: none] [difficulty: 2]\n2. Real", "only 1 point"),  # empty title dropped
    ("1. Same\n1. Same\n1. Same", "only 1 point"),
])
def test_malformed_skeletons_are_errors_not_exceptions(text, error):
    sk = parse_skeleton(text)
    assert not sk.ok and error in sk.error


def test_bullets_parentheses_and_prose_around_the_list():
    nodes, sk = shape("Here is the skeleton:\n- 1) First thing\n  2. Second thing:\n"
                      "Some prose.\n3.Third")
    assert [t for _, t, _, _ in nodes] == ["First thing", "Second thing", "Third"]


@pytest.mark.parametrize("text,over", [
    ("1.", False),
    ("1. A\n2", False),  # a number being written
    ("1. A\n2. B\n", False),
    ("1. A\n\n", False),  # a blank line alone does not end it
    ("1. A\n2. B\n\nQ", True),  # prose begins
    ("1. A\nHere", True),
    ("1. A\n2023 was a year", True),  # a line that begins with a number but is not a point
    ("1. A\n2. B\n3. C\n4", True),  # past max_points=3
])
def test_list_over(text, over):
    assert list_over(text, max_points=3) == over


def test_prompts_share_everything_before_the_point():
    sk = parse_skeleton("1. A [depends: none] [difficulty: 1]\n2. B [depends: 1] [difficulty: 3]")
    (p1, f1), (p2, f2) = (point_prompt("Q?", sk, n, []) for n in sk.nodes)
    common = os.path.commonprefix([p1, p2])
    assert "Q?" in common and common.endswith(sk.outline() + "\n\nContinue point ")
    assert (f1, f2) == ("1. A:", "2. B:")
    with_parent, _ = point_prompt("Q?", sk, sk.nodes[1], [(sk.nodes[0], " alpha text")])
    assert "1. A: alpha text" in with_parent and with_parent.startswith(
        common.removesuffix("Continue point "))
    annotated, bare = skeleton_prompt("Q?", True), skeleton_prompt("Q?", False)
    assert "[depends:" in annotated and "[depends:" not in bare
    for question, _ in SKELETON_EXAMPLES:
        assert question in bare and bare.endswith("Question: Q?\nSkeleton:")

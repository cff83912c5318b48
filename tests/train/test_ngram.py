"""The n-gram table writer (train/ngram.py) against its reader (loaders/draft_model.py)."""

from __future__ import annotations

import pytest
from treadle.loaders.draft_model import NGRAM_FILE, read_ngram_table
from treadle.train.ngram import count_next_tokens, ngram_table_of, write_ngram_table


def test_ngram_table_counts_and_round_trips(tmp_path):
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 2, 3, 4], [7, 7]]
    table = count_next_tokens(seqs, order=2, min_count=2)
    assert table[(2, 3)] == [4, 5]  # 4 seen twice, 5 once; most frequent first
    assert table[(3,)] == [4, 5] and table[(2,)] == [3]
    assert (7,) not in table and (1, 2) in table and (9, 2) not in table  # seen once
    path = tmp_path / NGRAM_FILE
    write_ngram_table(table, path, vocab_size=10, order=2)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    assert read_ngram_table(tmp_path, 10) == (table, 2)


def test_ngram_table_of_counts_prompt_and_answer():
    table = ngram_table_of([([1, 2], [3]), ([1, 2], [3, 4])])
    assert table[(1, 2)] == [3] and table[(2,)] == [3] and (3,) not in table


def test_ngram_table_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no n-gram table"):
        read_ngram_table(tmp_path, 10)
    write_ngram_table({(1, 2): [3]}, tmp_path / NGRAM_FILE, 10)
    with pytest.raises(ValueError, match="vocabulary of 10 tokens, but the target has 12"):
        read_ngram_table(tmp_path, 12)
    (tmp_path / NGRAM_FILE).write_text('{"order": 3, "next_tok')  # truncated
    with pytest.raises(ValueError, match="not a treadle n-gram table"):
        read_ngram_table(tmp_path, 10)
    write_ngram_table({(1, 2): [30]}, tmp_path / NGRAM_FILE, 10)
    with pytest.raises(ValueError, match="token id 30 out of range"):
        read_ngram_table(tmp_path, 10)

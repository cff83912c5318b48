"""Drafts for the real default model: a vocabulary match is checked, padding rows are handled, and
speculative decoding with any draft is token-identical to AR."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import treadle
from tiny_models import make_hf_model, save_hf_model
from treadle.runtime.llm import DraftMismatchError
from treadle.runtime.methods import AR, Speculative

pytestmark = pytest.mark.default_model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def llm():
    from treadle.loaders.default_model import DefaultModelMissing

    try:
        return treadle.load(max_seq_len=512)
    except DefaultModelMissing as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def tiny_draft(llm, path, vocab_size):
    """A 1-layer random model that uses the default model's tokenizer."""
    save_hf_model(make_hf_model("llama_gqa_tied", vocab_size=vocab_size, num_layers=1), path)
    for name in TOKENIZER_FILES:
        if (llm.model_dir / name).exists():
            shutil.copy(llm.model_dir / name, path / name)
    return path


@pytest.mark.parametrize("padding", [0, 64])
def test_speculative_with_a_tiny_draft_is_token_identical(llm, tmp_path, padding):
    draft = tiny_draft(llm, tmp_path / "draft", llm.config.vocab_size + padding)
    params = treadle.SamplingParams(max_new_tokens=24, ignore_eos=True)
    question = "Name the planets of the solar system."
    ref = llm.generate(question, params, chat=True, method=AR()).tokens
    for method in (Speculative.chain(depth=3, draft=str(draft)),
                   Speculative.gsd(k=2, tau=0, depth=3, budget=8, draft=str(draft))):
        assert llm.generate(question, params, chat=True, method=method).tokens == ref


def test_a_draft_with_another_vocabulary_is_refused_before_decoding(llm, tmp_path):
    draft = tiny_draft(llm, tmp_path / "bad", llm.config.vocab_size)
    tok = json.loads((draft / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "Ġthe", "Ġand"  # swap two ids: same size, different vocabulary
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DraftMismatchError, match=r"token id \d+ is .* in the draft but"):
        llm.generate("Hi", treadle.SamplingParams(max_new_tokens=4),
                     method=Speculative.chain(draft=str(draft)))

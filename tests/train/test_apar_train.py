"""APAR tuning (train/apar.py) on a tiny random model with a tiny byte-level BPE tokenizer: the
recipe on hand-written answers (exact token sequences and loss masks), the added tokens and the
widened tied embedding, a few steps that teach the forks, the output directory that treadle loads
and runs with APAR, resuming, and a golden test on the tuned default model when it is built.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from treadle.loaders.gguf_import import OutputExistsError
from treadle.loaders.tokenizer import Tokenizer
from treadle.runtime.apar import APAR, Family, reassemble
from treadle.runtime.engine import Stream
from treadle.runtime.methods import AR
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams
from treadle.runtime.stats import DecodeStats
from treadle.train import apar
from treadle.train.apar import (
    PLAIN_TEMPLATES,
    STRUCTURED_TEMPLATES,
    UNSTRUCTURED,
    Split,
    TemplateRecipe,
    apar_student,
    build_apar,
    control_token_ids,
    fork_examples,
    heldout_figures,
    make_fork_data,
    plan_steps,
    split_answer,
    template_prompts,
    train_apar,
    write_tokenizer,
)
from treadle.train.data import pack

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EOS = 2

LIST = (
    "Here are three tips:\n\n"
    "1. **Plan ahead**: Make a list of what you need before you start.\n"
    "2. **Water often**: Most plants like water every morning.\n"
    "3. Compost: It feeds the soil for years to come.\n\n"
    "Good luck with your garden!"
)
PARAGRAPHS = (
    "Volcanoes are openings in the crust. They let magma out when the pressure builds.\n\n"
    "There are many kinds of volcanoes. Some are steep cones and others are wide shields.\n\n"
    "Eruptions can be dangerous. Ash clouds travel far and can stop planes."
)
PLAIN = [
    "The sky looks blue because air scatters blue light more than red light.",
    "A story: the cat sat by the window and watched the rain all day long.",
    "Bread rises because yeast makes gas inside the dough as it warms up.",
]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny tied-embedding Llama with a ChatML byte-level BPE tokenizer of the same size."""
    path = tmp_path_factory.mktemp("target")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator([LIST, PARAGRAPHS, *PLAIN] * 20, trainer)
    vocab = raw.get_vocab_size()
    save_hf_model(make_hf_model("llama_gqa_tied", vocab, num_layers=2), path)
    raw.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML}))
    return path


@pytest.fixture(scope="module")
def tok(target):
    return Tokenizer.from_dir(target)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


# --- the prompts and the recipe -------------------------------------------------------------------
def test_template_prompts(tmp_path):
    a = template_prompts(STRUCTURED_TEMPLATES, 300, seed=0)
    assert len(set(a)) == 300 and a == template_prompts(STRUCTURED_TEMPLATES, 300, seed=0)
    assert a != template_prompts(STRUCTURED_TEMPLATES, 300, seed=1)
    assert any(p.startswith("List four practical tips for ") for p in a)
    assert not any("{" in p for p in a + template_prompts(PLAIN_TEMPLATES, 300))
    csv = tmp_path / "q.csv"
    csv.write_text("request\nName three kinds of clouds and describe each.\n")
    assert "Name three kinds of clouds and describe each." in template_prompts(
        STRUCTURED_TEMPLATES, 20, extra_prompts_csv=csv)
    with pytest.raises(ValueError, match="distinct prompts"):
        template_prompts(PLAIN_TEMPLATES, 10**5)
    # the recipe's prompts (and so train/data.py's cache key) follow its templates
    assert TemplateRecipe(n_prompts=5).prompts() != TemplateRecipe(
        n_prompts=5, templates=PLAIN_TEMPLATES).prompts()


def test_numbered_list_to_main_and_children(tok):
    split = split_answer(LIST)
    assert split == Split(
        ("Here are three tips:\n\n1. **Plan ahead**:", "2. **Water often**:", "3. Compost:",
         "Good luck with your garden!"),
        (" Make a list of what you need before you start.",
         " Most plants like water every morning.",
         " It feeds the soil for years to come."),
        True, "numbered")
    F, C = 900, 901
    prompt = [1, 7, 8, 9]
    made = fork_examples(prompt, split, lambda t: enc(tok, t), F, C, EOS)
    main = (enc(tok, split.main[0]) + [F] + enc(tok, split.main[1]) + [F]
            + enc(tok, split.main[2]) + [F] + enc(tok, split.main[3]) + [EOS])
    assert made[0] == (prompt, main)
    forks = [i + 1 for i, t in enumerate(main) if t == F]
    assert len(made) == 4
    for (context, target), at, detail in zip(made[1:], forks, split.details, strict=True):
        # the runtime's child context: the parent's sequence through its [Fork], then [Child]
        assert context == prompt + main[:at] + [C]
        assert target == enc(tok, detail) + [EOS]
    # the loss masks: pack's labels are exactly each example's target, nothing of its context
    tokens, where, labels = pack(made, [0, 1, 2, 3], "cpu")
    assert labels.tolist() == [t for _, g in made for t in g]
    width = tokens.shape[1]
    for b, (context, target) in enumerate(made):
        pos = where[(where >= b * width) & (where < (b + 1) * width)] - b * width
        assert pos.tolist() == list(range(len(context) - 1, len(context) + len(target) - 1))


def test_the_fork_tree_reassembles_the_answer(tok):
    """The streams the model learns, put in a fork tree as the runtime builds it, reassemble into
    the items with their details (runtime/apar.py's reassembly)."""
    split = split_answer(LIST)
    F, C = 900, 901
    made = fork_examples([1], split, lambda t: enc(tok, t), F, C, EOS)

    def stream(tokens, parent=None):
        s = Stream(Request([0], SamplingParams(max_new_tokens=99), frozenset()), AR(), [0], None,
                   DecodeStats("t"), parent=parent)
        s.request.tokens = list(tokens)
        return s

    main = made[0][1]
    root = stream(main)
    kids = [stream([C] + g, root) for _, g in made[1:]]
    forks = [i for i, t in enumerate(main) if t == F]
    family = Family(root, 999, [root, *kids], {id(root): 1} | {id(k): 2 for k in kids},
                    {id(k): at for k, at in zip(kids, forks, strict=True)})
    text = reassemble(family, lambda ids: tok.decode([i for i in ids if i < F]))
    assert text == (
        "Here are three tips:\n\n1. **Plan ahead**:\nMake a list of what you need before you "
        "start.\n\n2. **Water often**:\nMost plants like water every morning.\n\n3. Compost:\n"
        "It feeds the soil for years to come.\n\nGood luck with your garden!")


def test_paragraphs_fork_after_their_first_sentence():
    split = split_answer(PARAGRAPHS)
    assert split == Split(
        ("Volcanoes are openings in the crust.", "There are many kinds of volcanoes.",
         "Eruptions can be dangerous.", ""),
        (" They let magma out when the pressure builds.",
         " Some are steep cones and others are wide shields.",
         " Ash clouds travel far and can stop planes."),
        True, "paragraphs")
    # a one-sentence paragraph stays whole in the main text, with its blank line
    two = "Intro line here!\n\n" + PARAGRAPHS
    assert split_answer(two).main[0] == "Intro line here!\n\nVolcanoes are openings in the crust."


def test_rejections():
    assert split_answer(PLAIN[0]) == UNSTRUCTURED
    assert split_answer("Run `pip install x`, then:\n\n" + LIST) == "code, math or markup"
    assert split_answer(LIST.replace("years", "x^2 years")) == "code, math or markup"
    assert split_answer(LIST.replace("plants", "<b>plants</b>")) == "code, math or markup"
    assert split_answer(LIST.replace("years", "$n + 1$ years")) == "code, math or markup"
    assert split_answer(LIST.replace("### ", "").replace("Here", "## Here")) == (
        "code, math or markup")
    assert isinstance(split_answer(LIST.replace("years", "years ($5 or $10 a bag)")), Split)
    assert split_answer("1. Plan: Make a list of things.\n2. Water: Every morning, a lot."
                        ) == "fewer than 3 items"
    short = LIST.replace(" Most plants like water every morning.", " Daily.")
    assert split_answer(short) == "an item's details are shorter than 10 characters"
    assert split_answer("1. Plan ahead\n2. Water\n3. Compost").startswith("list not in")
    assert split_answer("1. A: long enough text.\n3. B: long enough text.").startswith("numbered")
    assert split_answer("- one thing\n- two things\n- three things").startswith("list or lines")
    assert split_answer("One.\n\nTwo.\n\nThree.").startswith("fewer than 3 paragraphs")


def test_a_cut_answer_loses_its_unfinished_part(tok):
    # cut in the closing text: the items stay, the closing goes
    assert split_answer(LIST, complete=False).main[-1] == ""
    # cut in the last item: it goes, and two items are too few
    bare = LIST.replace("\n\nGood luck with your garden!", "")
    assert split_answer(bare, complete=False) == "fewer than 3 items"
    longer = LIST.replace("\n\nGood", "\n4. Mulch: Keeps the weeds down all summer.\n\nGood")
    cut = split_answer(longer.split("\n\nGood")[0], complete=False)
    assert len(cut.details) == 3 and cut.main[-1] == "" and not cut.complete
    main = fork_examples([1], cut, lambda t: enc(tok, t), 900, 901, EOS)[0][1]
    assert main[-1] == 900  # ends at its last [Fork], without EOS


def test_fork_data_mixes_half_unstructured(tok):
    answers = [([1, 5], enc(tok, LIST) + [EOS]), ([1, 6], enc(tok, PARAGRAPHS) + [EOS])]
    answers += [([1, 7 + i], enc(tok, p) + [EOS]) for i, p in enumerate(PLAIN * 2)]
    answers.append(([1, 20], enc(tok, "Use `code` here.") + [EOS]))
    data = make_fork_data(answers, tok, 900, 901, [EOS], seed=0)
    assert data.outcomes == {"numbered": 1, "paragraphs": 1, UNSTRUCTURED: 6,
                             "code, math or markup": 1, "structured_used": 2,
                             "unstructured_used": 2}
    assert data.kinds.count("main") == 2 and data.kinds.count("child") == 3 + 3
    assert data.kinds.count("plain") == 2  # as many unstructured answers as structured ones
    plain = [e for e, k in zip(data.examples, data.kinds, strict=True) if k == "plain"]
    assert all(e in answers for e in plain)
    # more structured answers than unstructured: those that ended by themselves go first
    cut = ([1, 30], enc(tok, LIST.split("\n\nGood")[0] + "\n4. Mulch: Keeps"))  # no EOS
    for seed in range(4):
        data = make_fork_data([cut, answers[0], answers[2]], tok, 900, 901, [EOS], seed=seed)
        assert sorted(set(data.answer)) == [1, 2]


# --- the model with two more tokens -------------------------------------------------------------
def test_added_tokens_and_the_widened_tied_embedding(target, tok, tmp_path):
    new_ids, vocab = control_token_ids(target)
    assert new_ids == [tok.vocab_size, tok.vocab_size + 1] and vocab == tok.vocab_size + 2
    write_tokenizer(target, tmp_path, new_ids)
    out = Tokenizer.from_dir(tmp_path)
    assert [out.token_to_id(t) for t in ("[Fork]", "[Child]")] == new_ids
    assert out.encode("1. Plan:[Fork]", add_special_tokens=False) == enc(tok, "1. Plan:") + [
        new_ids[0]]
    assert out.decode(enc(tok, "a b") + new_ids) == "a b"  # special: skipped in the text
    assert out.chat_template == tok.chat_template

    model = apar_student(target, new_ids, vocab, seed=0)
    w = model.weights
    assert w.embed.shape[0] == vocab and w.lm_head.weight is w.embed  # one tied matrix
    assert isinstance(w.embed, torch.nn.Parameter) and w.embed.requires_grad
    old = make_hf_model("llama_gqa_tied", tok.vocab_size, num_layers=2).model.embed_tokens.weight
    torch.testing.assert_close(w.embed[: tok.vocab_size].detach(), old.detach())
    new = w.embed[new_ids].detach()
    mean = old.detach().mean(0)
    assert not torch.equal(new[0], new[1])
    # ordinary rows: the old rows' scale around their mean
    spread = (old.detach() - mean).norm(dim=1).mean()
    assert ((new - mean).norm(dim=1) / spread - 1).abs().max() < 0.5


def test_a_few_steps_teach_the_forks(target, tok):
    new_ids, vocab = control_token_ids(target)
    answers = [([1, 5], enc(tok, LIST) + [EOS]), ([1, 6], enc(tok, PARAGRAPHS) + [EOS]),
               ([1, 7], enc(tok, PLAIN[0]) + [EOS]), ([1, 8], enc(tok, PLAIN[1]) + [EOS])]
    data = make_fork_data(answers, tok, *new_ids, [EOS])
    model = apar_student(target, new_ids, vocab, seed=0)
    before = heldout_figures(model, data, new_ids[0])
    plan = plan_steps(data.examples, 60, 512, seed=0)
    run = train_apar(model, data.examples, plan, lr=3e-3, progress=False)
    after = heldout_figures(model, data, new_ids[0])
    assert len(run["losses"]) == 60 and run["losses"][-1] < run["losses"][0]
    for kind in ("main", "child", "plain"):
        assert after["loss"][kind] < 0.5 * before["loss"][kind]
    assert before["fork_recall"] == 0.0 and after["fork_recall"] == 1.0
    assert after["false_fork_rate"] < 0.02


# --- the build ------------------------------------------------------------------------------------
class FakeTarget:
    """Answers every prompt with one of the hand-written answers, in turn (as the chat-templated
    prompt's ids and the answer's ids + EOS)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.calls = tok, 0

    def __call__(self, prompts, *, max_new_tokens, temperature, seed):
        texts = [LIST, PARAGRAPHS, *PLAIN]
        out = []
        for p in prompts:
            chat = self.tok.apply_chat_template([{"role": "user", "content": p}])
            out.append((enc(self.tok, chat), enc(self.tok, texts[self.calls % 5]) + [EOS]))
            self.calls += 1
        return out


def small_build(target, tok, out, **kw):
    return build_apar(out, target_dir=target, n_prompts=10, plain_prompts=6, general_prompts=4,
                      steps=6, lr=3e-3, batch_tokens=256, generate_fn=FakeTarget(tok),
                      progress=False, checkpoint_every=2, **kw)


def test_the_output_loads_and_runs_apar(target, tok, tmp_path):
    import treadle

    out = small_build(target, tok, tmp_path / "apar")
    info = apar.read_info(out)
    assert apar.find_apar(out) == out and info["steps"] == 6 and info["resumed_from_step"] == 0
    assert info["data"]["answer_outcomes"] == {"numbered": 4, "paragraphs": 4, UNSTRUCTURED: 12,
                                               "structured_used": 8, "unstructured_used": 8}
    assert info["data"]["answers_used"] == 16  # 8 structured + 8 of the 12 unstructured
    assert info["control_tokens"] == {"[Fork]": tok.vocab_size, "[Child]": tok.vocab_size + 1}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == tok.vocab_size + 2
    assert not out.with_name(f".{out.name}.ckpt").exists()  # the checkpoint went

    llm = treadle.load(out)
    m = llm.apar_ids(APAR())
    assert (m.fork_id, m.child_id) == (tok.vocab_size, tok.vocab_size + 1)
    assert llm.config.vocab_size == tok.vocab_size + 2
    done = llm.generate("Give three tips.", SamplingParams(max_new_tokens=24), chat=True,
                        method=APAR(max_streams=4))
    assert 1 <= done.stats.streams <= 4 and sum(done.stats.tokens_per_stream) <= 24
    assert "[Fork]" not in done.text and "[Child]" not in done.text

    # a finished identical build is kept; a different recipe is refused without --force
    assert small_build(target, tok, out) == out
    with pytest.raises(OutputExistsError, match="different recipe"):
        build_apar(out, target_dir=target, n_prompts=10, plain_prompts=6, general_prompts=4,
                   steps=7, generate_fn=FakeTarget(tok), progress=False)


def test_a_killed_run_resumes_from_its_checkpoint(target, tok, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    whole = small_build(target, tok, tmp_path / "whole")
    real = apar.warmup_cosine

    def dies_at_step_5(lr, step, total):
        if step == 5:
            raise KeyboardInterrupt
        return real(lr, step, total)

    out = tmp_path / "resumed"
    monkeypatch.setattr(apar, "warmup_cosine", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        small_build(target, tok, out)
    assert not out.exists() and (tmp_path / ".resumed.ckpt" / "state.pt").is_file()
    monkeypatch.setattr(apar, "warmup_cosine", real)
    small_build(target, tok, out)
    assert apar.read_info(out)["resumed_from_step"] == 4  # the last checkpoint (every 2 steps)
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_cli_info(target, tok, tmp_path, capsys):
    from treadle.__main__ import main

    assert main(["train", "apar", "--info", "--out", str(tmp_path / "none")]) == 1
    out = small_build(target, tok, tmp_path / "apar")
    capsys.readouterr()
    assert main(["train", "apar", "--info", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == apar.APAR_FORMAT


# --- the tuned default model, when it is built ----------------------------------------------------
@pytest.mark.default_model
def test_golden_tuned_default_model_forks_and_reassembles():
    import treadle

    path = apar.find_apar()
    if path is None:
        if os.environ.get("TREADLE_REQUIRE_APAR"):
            raise AssertionError(f"no tuned APAR model at {apar.apar_dir()}")
        pytest.skip(f"no tuned APAR model at {apar.apar_dir()} (build it: treadle train apar)")
    llm = treadle.load(path)
    # not an evaluation-set question (MT-Bench, Vicuna-80, WizardLM, LIMA)
    done = llm.generate("List four practical tips for keeping houseplants alive.",
                        SamplingParams(max_new_tokens=320), chat=True, method=APAR())
    assert done.stats.streams >= 3 and done.stats.fork_depth == 2
    text = done.text
    items = [line for line in text.splitlines() if line[:1].isdigit() and ". " in line[:4]]
    assert len(items) >= 3, text
    assert "[Fork]" not in text and "[Child]" not in text
    words = text.lower().split()
    assert len(words) >= 40 and len(set(words)) / len(words) > 0.4, text  # not a loop
    assert any(w.strip(".,:*") in ("water", "light", "plant", "plants", "soil") for w in words)

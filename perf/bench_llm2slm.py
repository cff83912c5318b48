"""LLM-to-SLM against the large model's AR and the small model alone, speed and quality in one run.

    python perf/bench_llm2slm.py --mt-bench ../shared/data/mt_bench/question.jsonl \
        --vicuna ../shared/data/vicuna80/questions.csv [--n-prompts 16] [--max-new-tokens 128]
    # smoke: --n-prompts 1 --max-new-tokens 8 --speed-prompts 1 --speed-tokens 8

Systems (one run, the same prompts, greedy, chat template, batch --batch-size):
    large_ar            the large model (default: the default model) decoding alone
    small_alone         the projector's small model decoding alone (no projection)
    llm2slm             large prefill -> projector -> small decodes (runtime/llm2slm.py)
    small_tuned_alone   with a --tune-small projector (--tuned-projector, default the default
    llm2slm_tuned       model's `-tuned` one, when built): its tuned small model, alone and with it
Prompt sets: MT-Bench first turns (round-robin over categories), Vicuna-80, and `summ`: passages
written for this script (below; nothing downloaded), each to be summarised, so the answer depends
on a long prompt.

Quality (natural EOS stopping, --max-new-tokens cap), per set and system (perf/eval_quality.py):
    rouge_l     mean over prompts of ROUGE-L F1 against the large model's AR answer
    large_nll   token-weighted NLL of the system's output under the large model, teacher-forced
    clean_stop  fraction of answers ended by EOS
Speed: the first --speed-prompts prompts of each set, exactly --speed-tokens tokens each (EOS
ignored, so every system writes the same tokens), batch 1, after a warm-up, prefix cache off:
    speedup     = large_ar wall seconds / system wall seconds (LLM-to-SLM's: its large prefill too)
    ideal       = large weight bytes per token / small weight bytes per token (decode reads every
                  weight once per token; the large prefill per prompt is ignored): the bound
Writes perf/results/bench_llm2slm-<tag>.json with the machine, the command and the formulas.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treadle  # noqa: E402
from bench_decode import machine, mt_bench_prompts  # noqa: E402
from eval_quality import rouge_l, teacher_forced  # noqa: E402
from treadle.loaders.projector import find_projector  # noqa: E402
from treadle.runtime.llm2slm import LLM2SLM  # noqa: E402
from treadle.runtime.methods import AR  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SUMMARISE = "Summarize the following text in two or three sentences.\n\n"
# Passages written for this benchmark (not taken from any dataset): the answer to each prompt is
# a summary, so the prompt carries what the answer must say.
PASSAGES = [
    "The town of Millbrook built its first public library in 1902, a single room above the post "
    "office with three hundred donated books. By the 1950s the collection had outgrown the room, "
    "and a local carpenter offered to build a new hall on land left to the town by a farmer's "
    "widow. Volunteers raised the walls over two summers. The new library opened with a reading "
    "room, a children's corner and, for the first time, electric lamps at every table. In the "
    "1990s the library added computers and a weekly class for older residents who wanted to learn "
    "to send email. Today it lends tools, seeds and musical instruments as well as books, and "
    "its busiest hour is Saturday morning, when parents bring small children to a story reading "
    "led by a retired teacher who has not missed a week in eleven years.",
    "Honeybees keep their hive at about thirty-five degrees Celsius in the brood area, whatever "
    "the weather outside. On hot days, worker bees collect water and spread it in thin films over "
    "the comb, then fan their wings so that evaporation cools the air. Some bees stand at the "
    "entrance and fan in a coordinated direction, pulling warm air out of one side and drawing "
    "cooler air in at the other. In cold weather the bees do the opposite: they cluster tightly "
    "around the queen and the brood and shiver their flight muscles without moving their wings, "
    "producing heat. The bees on the outside of the cluster form an insulating shell and slowly "
    "trade places with those inside, so that no single bee stays in the cold for too long. A "
    "colony can lose much of its stored honey in a long winter because this heating burns sugar.",
    "A small bakery in a coastal city faced rising flour prices and a long queue that drove "
    "customers away each morning. The owner tried three changes over one year. First, she moved "
    "the baking of the most popular loaves to the late evening, so that shelves were full when the "
    "shop opened. Second, she introduced a pre-order system by text message, which let regular "
    "customers collect their bread without waiting in line. Third, she bought flour directly from "
    "a mill two hours away in larger quantities, which lowered the price per sack but required "
    "renting a dry storage room. After the year, daily sales had risen by a fifth, waste had "
    "fallen because she baked closer to real demand, and the morning queue was gone. The storage "
    "rent, however, ate most of the savings on flour, and she plans to share the room with a cafe.",
    "Glaciers move because ice, under its own great weight, slowly deforms like a very thick "
    "liquid. In addition, many glaciers slide over their beds on a thin layer of meltwater, which "
    "can make them move much faster in summer than in winter. As a glacier flows over uneven "
    "ground, the brittle upper ice cracks and forms crevasses, some of them dozens of meters deep. "
    "Glaciers also carry rocks torn from the valley walls and floor; these rocks scrape the "
    "bedrock and leave long parallel grooves that geologists use to reconstruct the direction of "
    "past ice flow. When a glacier retreats, it leaves behind ridges of mixed rock and soil called "
    "moraines, and the valley it carved often has a broad U shape instead of the narrow V shape of "
    "a valley cut by a river. Many lakes in northern countries fill basins dug by ancient ice.",
    "At a regional hospital, nurses noticed that patients often woke up confused after surgery and "
    "that the confusion lasted longer for older patients. A team of nurses and doctors set up a "
    "simple program: patients were given their glasses and hearing aids as soon as they woke, the "
    "lights were kept on a day and night pattern, family members were invited to visit in the "
    "first evening, and staff avoided waking patients at night for routine checks unless needed. "
    "Over eighteen months the share of older patients who became confused fell by about a third, "
    "and those who did become confused recovered sooner. The program cost little, since it mostly "
    "changed habits rather than adding equipment. The team's main difficulty was night shifts, "
    "where old routines were hardest to change, and they now train new staff in the program first.",
    "The first long-distance telegraph lines in the nineteenth century changed how newspapers "
    "worked. Before them, news from a distant city arrived by train or ship and could be days or "
    "weeks old. With the telegraph, a report could cross a continent in minutes, but each word "
    "cost money, so reporters learned to write short, plain sentences and to put the most "
    "important facts first, in case the end of a message was cut. Several newspapers shared the "
    "cost of sending reports by forming news agencies, which sold the same stories to many papers. "
    "Because those stories had to suit readers of every political opinion, the agencies favored a "
    "neutral, factual tone. Historians argue that this style, born of cost and shared use, shaped "
    "the standard form of news writing that many papers still follow today.",
]


def weight_bytes(llm) -> int:
    """Bytes a decode step reads: every matrix in its stored format (scales included; the LM
    head, which a tied model shares with the embedding, once) and the norms."""
    w = llm.model.weights
    norms = [w.norm] + [t for lw in w.layers for t in (lw.attn_norm, lw.mlp_norm)]
    return (sum(lin.nbytes for lin in w.linears())
            + sum(t.numel() * t.element_size() for t in norms))


def prompt_sets(args) -> dict[str, list[str]]:
    sets = {}
    if "mtbench" in args.sets:
        sets["mtbench"] = mt_bench_prompts(args.mt_bench, args.n_prompts)
    if "vicuna" in args.sets:
        with open(args.vicuna, newline="", encoding="utf-8") as f:
            sets["vicuna"] = [r["request"] for r in csv.DictReader(f)][: args.n_prompts]
    if "summ" in args.sets:
        sets["summ"] = [SUMMARISE + p for p in PASSAGES][: args.n_prompts]
    return sets


def generate(run, prompts: list[str], params, batch: int) -> tuple[list, float]:
    """(completions, wall seconds) of `run(batch_of_prompts, params)` over all prompts."""
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += run(prompts[i : i + batch], params)
    return outs, time.perf_counter() - t0


def quality(large, prompts, outs, refs) -> dict:
    nll = n = 0
    for p, c in zip(prompts, outs):
        if c.tokens:
            nll += teacher_forced(large, large.encode(p, chat=True), c.tokens)[0] * len(c.tokens)
            n += len(c.tokens)
    return {
        "rouge_l": sum(rouge_l(c.text, r.text) for c, r in zip(outs, refs)) / len(outs),
        "large_nll": nll / max(1, n),
        "clean_stop": sum(c.finish_reason == "eos" for c in outs) / len(outs),
        "mean_tokens": sum(len(c.tokens) for c in outs) / len(outs),
        "samples": [c.text[:200] for c in outs[:2]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mt-bench", type=Path, default=Path("../shared/data/mt_bench/question.jsonl"))
    ap.add_argument("--vicuna", type=Path, default=Path("../shared/data/vicuna80/questions.csv"))
    ap.add_argument("--sets", default="mtbench,vicuna,summ")
    ap.add_argument("--n-prompts", type=int, default=16, help="per set (summ has 6 at most)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--speed-prompts", type=int, default=4, help="per set, for the timing")
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--large", default=None, help="large model dir (default: the default model)")
    ap.add_argument("--weights", default=None,
                    help="the large model's weight format (LLM's `weights`; default: load's); "
                    "the small model is stored the same way (runtime/llm2slm.py matching_weights)")
    ap.add_argument("--projector", default="default", help="'default' or a projector dir")
    ap.add_argument("--tuned-projector", default="tuned",
                    help="'tuned' (the default model's, if built), a dir, or 'none'")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the machine's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    # No prefix cache: a prompt timed twice (quality run, then speed run) must prefill twice.
    large = treadle.load(args.large, prefix_cache=False, weights=args.weights)
    systems = {"large_ar": lambda ps, p: large.generate(ps, p, chat=True, method=AR())}
    methods = {"": LLM2SLM(projector=args.projector)}
    tuned = args.tuned_projector
    if tuned != "none" and (tuned != "tuned" or find_projector(tuned=True) is not None):
        methods["_tuned"] = LLM2SLM(projector=tuned)
    pairs = {suffix: large.llm2slm(m) for suffix, m in methods.items()}  # loaded and checked once
    for suffix, pair in pairs.items():
        systems[f"small{suffix}_alone"] = (
            lambda ps, p, s=pair.small: s.generate(ps, p, chat=True, method=AR()))
        systems[f"llm2slm{suffix}"] = (
            lambda ps, p, m=methods[suffix]: large.generate(ps, p, chat=True, method=m))

    result = {
        "machine": machine(),
        "command": " ".join(["python"] + sys.argv),
        "large": str(large.model_dir),
        "large_weights": large.weights,
        "pairs": {f"llm2slm{k}": {"projector": str(p.path), "small": str(p.small.model_dir),
                                  "small_weights": p.small.weights, "layer": p.info.layer,
                                  "record": p.info.record}
                  for k, p in pairs.items()},
        "formulas": {
            "speedup": "large_ar wall seconds / system wall seconds, same prompts, exactly "
                       "speed_tokens tokens each (EOS ignored), batch 1, prefill included",
            "ideal_speedup": "large weight bytes read per decoded token / small's (every matrix, "
                             "norm and the LM head; the large prefill per prompt not counted)",
            "rouge_l": "mean over prompts of ROUGE-L F1 vs the large model's AR answer "
                       "(perf/eval_quality.py)",
            "large_nll": "token-weighted NLL of the output under the large model, teacher-forced",
            "clean_stop": "fraction of answers ended by EOS (natural stopping, max_new_tokens cap)",
        },
        "ideal_speedup": {f"llm2slm{k}": weight_bytes(large) / weight_bytes(p.small)
                          for k, p in pairs.items()},
        "weight_bytes_per_token": {"large": weight_bytes(large),
                                   **{f"small{k}": weight_bytes(p.small)
                                      for k, p in pairs.items()}},
        "sets": {},
    }
    natural = treadle.SamplingParams(max_new_tokens=args.max_new_tokens)
    fixed = treadle.SamplingParams(max_new_tokens=args.speed_tokens, ignore_eos=True)
    warm = treadle.SamplingParams(max_new_tokens=4)
    for run in systems.values():  # warm-up: code paths, plans, the pairs' checks
        run(["Hello"], warm)
    for name, prompts in prompt_sets(args).items():
        print(f"== {name}: {len(prompts)} prompts", file=sys.stderr)
        rows, refs = {}, None
        for sys_name, run in systems.items():
            outs, seconds = generate(run, prompts, natural, args.batch_size)
            refs = refs or outs  # large_ar runs first: its answers are the reference
            speed_prompts = prompts[: args.speed_prompts]
            _, speed_s = generate(run, speed_prompts, fixed, 1)
            rows[sys_name] = {"quality_run_s": seconds, "speed_run_s": speed_s,
                              "speed_tokens": args.speed_tokens * len(speed_prompts),
                              **quality(large, prompts, outs, refs)}
            shown = {k: v for k, v in rows[sys_name].items() if k != "samples"}
            print(f"  {sys_name}: {json.dumps(shown)}", file=sys.stderr)
        for row in rows.values():
            row["speedup"] = rows["large_ar"]["speed_run_s"] / row["speed_run_s"]
        result["sets"][name] = rows
    tag = args.tag or ("vm-amx" if "amx_bf16" in result["machine"]["cpu_features"] else "vm")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_llm2slm-{tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

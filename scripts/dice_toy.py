"""The README's DICE table and plot: DICE, DICE without the length term (alpha = 0) and DICE without replay
(gamma = 0) on the built-in toy task, rounds 0-3, several seeds.

    python scripts/dice_toy.py                 # seeds 0 1 2, two runs at a time (each on one CPU thread)
    python scripts/dice_toy.py --seeds 0 --jobs 1 --dir runs/dice_toy     # a --dir of unfinished runs resumes them

For each seed, round 0 is `python dpo.py --seed S` (the DPO toy default, which is also what dice.py's own round 0
does); each variant then runs `python dice.py --model <that run> --seed S --rounds 3` with its flags, the toy's
defaults otherwise (K = 16), on 64 sampled prompts per round (128 without replay, so that every variant trains
on as many pairs), to fit the time of a CPU. Every round's gold reward, length and KL(policy || SFT) come from
the round's summary.json (one sample per test prompt, sampled with seed S); the table gives mean and standard
deviation over the seeds, and the plot is written to scripts/dice_toy.svg.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"DICE": ["--max_prompts", "64"], "alpha = 0 (no length term)": ["--alpha", "0", "--max_prompts", "64"],
            "gamma = 0 (no replay)": ["--replay_ratio", "0", "--max_prompts", "128"]}


def run(command, out):
    """python <command> --output_dir out, resumed if out holds an unfinished run, skipped if it holds a finished one."""
    if os.path.exists(os.path.join(out, "config.json")):
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(out + ".log", "a") as f:
        subprocess.run([sys.executable, *command, "--output_dir", out, *(["--resume"] if os.path.exists(out) else [])],
                       cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def summaries(out):
    rounds = sorted((d for d in os.listdir(out) if d.startswith("round_")), key=lambda d: int(d[6:]))
    return [json.load(open(os.path.join(out, d, "summary.json"))) for d in rounds]


def svg(results, rounds, path):
    """Gold reward (left) and length (right) by round, one line per variant (the mean over seeds)."""
    colours, width, height, pad = ["#1b9e77", "#d95f02", "#7570b3"], 300, 200, 40
    parts = []
    for panel, (key, title) in enumerate((("toy/gold_reward", "gold reward"), ("toy/length", "length, words"))):
        values = [statistics.mean(s[r][key] for s in runs) for runs in results.values() for r in rounds]
        low, high = min(values), max(values)
        x = lambda r: panel * (width + pad) + pad + r * (width - pad) / max(rounds)
        y = lambda v: height - pad / 2 - (v - low) / (high - low or 1) * (height - pad)
        parts.append(f'<text x="{x(0)}" y="12" font-size="12">{title} by round ({low:.2f} to {high:.2f})</text>')
        for colour, (name, runs) in zip(colours, results.items()):
            points = " ".join(f"{x(r):.1f},{y(statistics.mean(s[r][key] for s in runs)):.1f}" for r in rounds)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
            if panel == 0:
                parts.append(f'<text x="{x(0)}" y="{height + 12 + 14 * list(results).index(name)}" font-size="11" '
                             f'fill="{colour}">{name}</text>')
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 2 * pad}" height="{height + 60}">'
                + "".join(parts) + "</svg>\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--dir", default=None, help="where the runs go (default: a new temporary directory)")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="dice_toy-")
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda s: run(["dpo.py", "--seed", str(s)], f"{work}/dpo-{s}"), args.seeds))
        jobs = [(name, s) for s in args.seeds for name in VARIANTS]
        list(pool.map(lambda job: run(["dice.py", "--model", f"{work}/dpo-{job[1]}", "--seed", str(job[1]), "--rounds",
                                       str(args.rounds), *VARIANTS[job[0]]], f"{work}/{job[0][:5]}-{job[1]}"), jobs))
    results = {name: [summaries(f"{work}/{name[:5]}-{s}") for s in args.seeds] for name in VARIANTS}
    rounds = list(range(args.rounds + 1))
    ms = lambda xs, f: f"{statistics.mean(xs):{f}} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:{f}}"
    print(f"toy task, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± sd; {time.time() - start:.0f} s "
          f"with {args.jobs} runs at a time; runs in {work}\n")
    print("| variant | round | alpha* | chosen / rejected length, chars (at alpha = 0) | implicit reward agrees with gold "
          "| gold reward | length, words | KL(policy ‖ SFT), nats |")
    print("|---|---|---|---|---|---|---|---|")
    sft = results["DICE"][0][0]
    print(f"| SFT | - | - | - | - | {sft['toy/sft_gold_reward']:+.2f} | {sft['toy/sft_length']:.1f} | 0 |")
    for name, runs in results.items():
        for r in rounds:
            s = [run_[r] for run_ in runs]
            lengths = (f"{ms([x['chosen_length'] for x in s], '.0f')} / {ms([x['rejected_length'] for x in s], '.0f')} "
                       f"({ms([x['chosen_length_alpha0'] for x in s], '.0f')} / {ms([x['rejected_length_alpha0'] for x in s], '.0f')})"
                       if r else "-")
            print(f"| {name if r == 0 else ''} | {r} | {ms([x['alpha'] for x in s], '.3f') if r else '-'} | {lengths} | "
                  f"{ms([x['gold_agreement'] for x in s], '.2f') if r else '-'} | {ms([x['toy/gold_reward'] for x in s], '+.2f')} | "
                  f"{ms([x['toy/length'] for x in s], '.1f')} | {ms([x['toy/kl'] for x in s], '.1f')} |")
    stages = [dict(s["seconds"]) for runs in results.values() for run_ in runs for s in run_[1:] if "sampling" in s["seconds"]]
    print(f"\nwall time of a DICE round (mean over {len(stages)} rounds, {args.jobs} runs at a time on a shared machine): "
          + ", ".join(f"{k} {statistics.mean(x.get(k, 0) for x in stages):.0f} s" for k in
                      ("sampling", "scoring", "alpha_and_pairs", "training", "toy_evaluation")))
    svg(results, rounds, os.path.join(ROOT, "scripts", "dice_toy.svg"))


if __name__ == "__main__":
    main()

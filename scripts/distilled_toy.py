"""The README's distilled-DPO table and plot: DPO, distillation from one reward model, the ensemble (min over 3)
and pessimistic DPO on the built-in toy task, with the training pairs relabelled by annotators of growing length
bias; several seeds.

    python scripts/distilled_toy.py                       # biases 0 1 2, seeds 0 1 2, two runs at a time
    python scripts/distilled_toy.py --biases 0 2 --seeds 0 --jobs 1 --dir runs/distilled_toy   # resumes unfinished runs

Each cell is `python distilled_dpo.py --objective O --length_bias B --seed S` with the toy's defaults otherwise
(beta 0.1, 2 epochs over the 1,920 relabelled pairs; held-out pairs and test prompts unbiased). The gold reward,
length and KL(policy || SFT) of one sample per test prompt come from the run's metrics.jsonl, as do the size of
the implicit margins |beta h| on the held-out pairs over training; the teachers' agreement with the gold order
and how often they prefer the longer answer come from teachers.json. The table gives the mean and standard
deviation over the seeds; the plot (scripts/distilled_toy.svg) shows the held-out |beta h| by step.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = ["dpo", "distill", "ensemble", "pessimistic_dpo"]


def run(command, out):
    """python <command> --output_dir out, resumed if out holds an unfinished run, skipped if it holds a finished one."""
    if not os.path.exists(os.path.join(out, "config.json")):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        started = time.time()
        with open(out + ".log", "a") as f:
            subprocess.run([sys.executable, *command, "--output_dir", out, *(["--resume"] if os.path.exists(out) else [])],
                           cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
        with open(out + ".seconds", "w") as f:
            f.write(f"{time.time() - started:.1f}\n")


def read(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    toy = next(r for r in rows if "toy/gold_reward_after" in r)
    evals = [r for r in rows if "eval_loss" in r]
    result = {"gold": toy["toy/gold_reward_after"], "gold_sft": toy["toy/gold_reward_before"], "length": toy["toy/length_after"],
              "length_sft": toy["toy/length_before"], "kl": toy["toy/kl_after"], "accuracy": evals[-1]["eval_rewards/accuracies"],
              "abs_margin": evals[-1]["eval_rewards/abs_margins"],
              "margins": [(r["step"], r["eval_rewards/abs_margins"]) for r in evals]}
    teachers = os.path.join(out, "teachers.json")
    if os.path.exists(teachers):
        t = json.load(open(teachers))
        result["teacher_gold"] = statistics.mean(x["gold_agreement"] for x in t)
        result["teacher_longer"] = statistics.mean(x["prefers_longer"] for x in t)
    return result


def cell(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt.lstrip('+'))}"


def svg(results, biases, path):
    """Held-out |beta h| by step, one panel per bias, one line per objective (the mean over seeds)."""
    colours, width, height, pad = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"], 260, 200, 40
    high = max(m for runs in results.values() for r in runs for _, m in r["margins"]) or 1
    parts = []
    for panel, bias in enumerate(biases):
        for colour, objective in zip(colours, OBJECTIVES):
            runs = results.get((bias, objective), [])
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["margins"]]
            x = lambda s: panel * (width + pad) + pad + s * (width - pad) / max(steps)
            y = lambda v: height - pad / 2 - v / high * (height - pad)
            points = " ".join(f"{x(s):.1f},{y(statistics.mean(r['margins'][i][1] for r in runs)):.1f}"
                              for i, s in enumerate(steps))
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
            if panel == 0:
                parts.append(f'<text x="{pad}" y="{height + 12 + 14 * OBJECTIVES.index(objective)}" font-size="11" '
                             f'fill="{colour}">{objective}</text>')
        parts.append(f'<text x="{panel * (width + pad) + pad}" y="12" font-size="12">length bias {bias}: held-out '
                     f'|beta h| by step (0 to {high:.2f})</text>')
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(biases) * (width + pad) + pad}" height="{height + 70}">'
                + "".join(parts) + "</svg>\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--biases", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one CPU thread)")
    parser.add_argument("--dir", default=os.path.join(ROOT, "runs", "distilled_toy"))
    parser.add_argument("--report_only", action="store_true", help="only the table and plot of the finished runs")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    cells = [(b, s, o) for s in args.seeds for b in args.biases for o in args.objectives]  # a seed at a time
    out = lambda b, s, o: os.path.join(args.dir, f"bias{b:g}-seed{s}-{o}")
    command = lambda b, s, o: ["distilled_dpo.py", "--objective", o, "--length_bias", str(b), "--seed", str(s)]
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: run(command(*c), out(*c)), cells))
    results = {}
    for b, s, o in sorted(cells, key=lambda c: (c[0], args.objectives.index(c[2]), c[1])):
        if os.path.exists(os.path.join(out(b, s, o), "config.json")):  # finished runs only
            seconds = float(open(out(b, s, o) + ".seconds").read()) if os.path.exists(out(b, s, o) + ".seconds") else math.nan
            results.setdefault((b, o), []).append({**read(out(b, s, o)), "seconds": seconds, "seed": s})
    print(f"| length bias | objective | teachers agree with gold | teachers prefer the longer | gold reward (SFT {cell([r['gold_sft'] for runs in results.values() for r in runs], '+.2f')}) "
          f"| length, words (SFT {cell([r['length_sft'] for runs in results.values() for r in runs], '.1f')}) | KL(policy ‖ SFT), nats "
          f"| held-out accuracy | held-out abs(beta h) at the end | wall time per run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (b, o), runs in results.items():
        print(f"| {b:g} | {o} (seeds {' '.join(str(r['seed']) for r in runs)}) | {cell([r.get('teacher_gold') for r in runs], '.3f')} | {cell([r.get('teacher_longer') for r in runs], '.3f')} "
              f"| {cell([r['gold'] for r in runs], '+.2f')} | {cell([r['length'] for r in runs], '.1f')} | {cell([r['kl'] for r in runs], '.2f')} "
              f"| {cell([r['accuracy'] for r in runs], '.3f')} | {cell([r['abs_margin'] for r in runs], '.3f')} "
              f"| {statistics.median(r['seconds'] for r in runs):.0f} s |")
    svg(results, args.biases, os.path.join(ROOT, "scripts", "distilled_toy.svg"))


if __name__ == "__main__":
    main()

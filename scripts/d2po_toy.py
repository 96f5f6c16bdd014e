"""The README's D2PO table and plot: at the same gold budget, D2PO against online DPO on gold labels only, a static
discriminator and offline DPO, on the built-in toy task, several seeds and budgets.

    python scripts/d2po_toy.py                            # seeds 0 1 2, budgets 64 and 256, two runs at a time (one thread each)
    python scripts/d2po_toy.py --budgets 256 --dir runs/d2po_toy      # a --dir of unfinished runs resumes them

Each run's gold labels come from the toy's annotator (toy.annotate on toy.gold_reward, 76% agreement with the
gold order on the toy's pairs), and each spends at most the budget B:
- D2PO: `python d2po.py --seed S --gold_budget B` (the toy default, the paper's set-up: the discriminator first
  learns the toy's 1,920 annotated pairs, not charged to the budget, then windows of 16 gold labels in 128 pairs,
  126 steps of 16 prompts);
- D2PO, fresh head: the ablation, `--disc_pretrain none --initial_gold min(32, B / 2)` (the discriminator starts
  from the SFT model with a fresh scalar head and learns from gold alone; the initial gold is charged);
- online DPO, gold only: `python d2po.py --labels gold --gold_budget B` (every pair labelled, 16 a step, until the
  budget is spent: B / 16 steps), and the same with `--updates_per_step 8` (8 updates on each step's pairs, as
  the authors' strongest gold-only baselines);
- static discriminator: `python d2po.py --labels static --initial_gold B --gold_budget B` (the starting
  discriminator, then all the gold up front, never updated, 126 steps on its silver labels), and the same with
  `--disc_pretrain none` (from a fresh head, on the B labels alone);
- offline DPO: `python dpo.py` on B of the toy's annotated pairs of SFT samples (a seeded draw), with dpo.py's toy
  settings (2 epochs, lr 1e-4, beta 0.1, 16 pairs a step).
Every final model is then scored here the same way: gold reward, length and KL(policy || SFT) of one sample per
test prompt (512 prompts, sampled with seed S). The table gives mean and standard deviation over the seeds; the
plot (gold reward against gold labels used, the mean over seeds) goes to scripts/d2po_toy.svg.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SLUGS = {"D2PO": "d2po", "D2PO, fresh head": "d2po_fresh", "online DPO, gold only": "online",
         "online DPO, gold only, 8 updates a step": "online8", "static discriminator": "static",
         "static, fresh head": "static_fresh", "offline DPO": "offline"}  # method -> the name of its runs' directories
METHODS = tuple(SLUGS)  # the default set, in the plot


def run(command, out):
    """python <command> --output_dir out, resumed if out holds an unfinished run, skipped if it holds a finished one.
    Returns the seconds it took (as recorded when it ran, if it was done already; None if unknown)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return float(open(out + ".seconds").read()) if os.path.exists(out + ".seconds") else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    with open(out + ".log", "a") as f:
        subprocess.run([sys.executable, *command, "--output_dir", out, *(["--resume"] if os.path.exists(out) else [])],
                       cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    with open(out + ".seconds", "w") as f:
        f.write(str(time.time() - start))
    return time.time() - start


def command(method, seed, budget, work, toy_dir):
    d2po = ["d2po.py", "--seed", str(seed), "--gold_budget", str(budget)]
    if method == "D2PO":
        return d2po
    if method == "D2PO, fresh head":
        return d2po + ["--disc_pretrain", "none", "--initial_gold", str(min(32, budget // 2))]
    if method.startswith("online DPO, gold only"):
        return d2po + ["--labels", "gold", "--updates_per_step", "8" if "8 updates" in method else "1"]
    if method.startswith("static"):
        return d2po + ["--labels", "static", "--initial_gold", str(budget)] + (
            ["--disc_pretrain", "none"] if "fresh" in method else [])
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:  # offline DPO: B annotated pairs, a seeded draw
        lines = random.Random(f"{seed}/offline/{budget}").sample(f.readlines(), budget)
    path = os.path.join(work, f"offline_pairs-{budget}-{seed}.jsonl")
    with open(path, "w") as f:
        f.writelines(lines)
    return ["dpo.py", "--model", os.path.join(toy_dir, "sft"), "--dataset", path, "--eval_dataset",
            os.path.join(toy_dir, "test_pairs.jsonl"), "--seed", str(seed), "--learning_rate", "1e-4", "--batch_size", "16",
            "--grad_accum", "1", "--warmup_steps", "10", "--epochs", "2", "--eval_every", "40", "--max_length", "128"]


def score(out, seed, toy_dir):
    """Gold reward, length and KL(policy || SFT) of the run's final model, and what its metrics say of gold."""
    import toy
    from common import load_model, load_tokenizer
    sft, tokenizer = load_model(os.path.join(toy_dir, "sft"), "float32", "cpu").eval(), load_tokenizer(os.path.join(toy_dir, "sft"))
    result = toy.evaluate(load_model(out, "float32", "cpu").eval(), sft, tokenizer, toy.test_prompts(toy_dir), seed=seed)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "grad_norm" in r]
    result["steps"] = len(steps)
    result["gold_used"] = steps[-1].get("gold/used") if steps and "gold/used" in steps[-1] else None
    agreement = [r["silver/agreement"] for r in steps if r.get("silver/agreement") is not None]
    result["silver_agreement"] = sum(agreement) / len(agreement) if agreement else None  # the silver order vs gold's
    if os.path.exists(os.path.join(out, "gold.jsonl")):
        result["gold_used"] = sum(json.loads(line)["label"] != "skip" for line in open(os.path.join(out, "gold.jsonl")))
    return result


def svg(table, budgets, path):
    """Gold reward against gold labels used (budget), one line per method, the mean over seeds."""
    budgets = sorted(budgets)
    colours = ["#1b9e77", "#66c2a5", "#d95f02", "#e6ab02", "#7570b3", "#bcbddc", "#e7298a"]
    width, height, pad = 420, 240, 50
    values = [statistics.mean(r["gold_reward"] for r in table[m, b]) for m in METHODS for b in budgets]
    low, high = min(values + [0.0]), max(values)
    x = lambda b: pad + (budgets.index(b) if len(budgets) > 1 else 0.5) * (width - 2 * pad) / max(1, len(budgets) - 1)
    y = lambda v: height - pad - (v - low) / (high - low or 1) * (height - 2 * pad)
    parts = [f'<text x="{pad}" y="16" font-size="12">toy gold reward of the final policy ({low:+.2f} to {high:+.2f}) '
             f'against gold labels used</text>']
    parts += [f'<text x="{x(b) - 10:.1f}" y="{height - pad + 16}" font-size="11">{b}</text>' for b in budgets]
    for colour, method in zip(colours, METHODS):
        points = [(x(b), y(statistics.mean(r["gold_reward"] for r in table[method, b]))) for b in budgets]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                     + " ".join(f"{px:.1f},{py:.1f}" for px, py in points) + '"/>')
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points]
        parts.append(f'<text x="{pad}" y="{height + 4 + 14 * METHODS.index(method)}" font-size="11" fill="{colour}">{method}</text>')
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 110}">' + "".join(parts) + "</svg>\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256], help="gold labels per run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(SLUGS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--dir", default=None, help="where the runs go (default: a new temporary directory)")
    args = parser.parse_args()
    import toy
    toy_dir = toy.ensure_built()
    work = args.dir or tempfile.mkdtemp(prefix="d2po_toy-")
    os.makedirs(work, exist_ok=True)
    start = time.time()
    jobs = [(m, s, b) for b in args.budgets for s in args.seeds for m in args.methods]
    name = lambda m, s, b: os.path.join(work, f"{SLUGS[m]}-{b}-{s}")
    with ThreadPoolExecutor(args.jobs) as pool:
        seconds = dict(zip(jobs, pool.map(lambda j: run(command(*j, work, toy_dir), name(*j)), jobs)))
    table = {}
    for m, s, b in jobs:
        table.setdefault((m, b), []).append({**score(name(m, s, b), s, toy_dir), "seconds": seconds[m, s, b]})
    import torch
    with torch.no_grad():
        sft = score_sft(toy_dir, args.seeds)
    ms = lambda xs, f: "-" if any(v is None for v in xs) else (f"{statistics.mean(xs):{f}} ± {statistics.stdev(xs):.2f}"
                                                                 if len(xs) > 1 else f"{xs[0]:{f}}")
    print(f"toy task, seeds {', '.join(map(str, args.seeds))}, mean ± sd; {time.time() - start:.0f} s with {args.jobs} runs "
          f"at a time; runs in {work}\n")
    print("| method | gold budget | gold labels used | policy steps | gold reward | length, words | KL(policy ‖ SFT), nats "
          "| silver order = gold order (mean over steps) | wall time per run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| SFT | - | 0 | 0 | {ms(sft, '+.2f')} | - | 0 | - | - |")
    for b in args.budgets:
        for m in args.methods:
            r = table[m, b]
            print(f"| {m} | {b} | {ms([x['gold_used'] or b for x in r], '.0f')} | {ms([x['steps'] for x in r], '.0f')} | "
                  f"{ms([x['gold_reward'] for x in r], '+.2f')} | {ms([x['length'] for x in r], '.1f')} | "
                  f"{ms([x['kl'] for x in r], '.2f')} | {ms([x['silver_agreement'] for x in r], '.2f')} | "
                  f"{ms([x['seconds'] for x in r], '.0f')} s |")
    if set(args.methods) == set(METHODS):
        svg(table, args.budgets, os.path.join(ROOT, "scripts", "d2po_toy.svg"))


def score_sft(toy_dir, seeds):
    import toy
    from common import load_model, load_tokenizer
    sft, tokenizer = load_model(os.path.join(toy_dir, "sft"), "float32", "cpu").eval(), load_tokenizer(os.path.join(toy_dir, "sft"))
    return [toy.evaluate(sft, sft, tokenizer, toy.test_prompts(toy_dir), seed=s)["gold_reward"] for s in seeds]


if __name__ == "__main__":
    main()

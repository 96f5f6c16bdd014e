"""The family on the toy task: every algorithm at its defaults over seeds, a beta sweep of each, and two figures.

    python scripts/compare.py                       # all of it: 30 runs, about 20 minutes on 2 CPU cores
    python scripts/compare.py --only dpo            # one algorithm's row (and its sweep): a few minutes
    python scripts/compare.py --only dice --no-sweep --seeds 0
    python scripts/compare.py --dir runs/compare    # runs already finished there are read, not rerun

Each run is the script's own command, `python <algorithm>.py --seed S [--beta B] --output_dir DIR`, with the toy
defaults otherwise; the table and the figures read what the runs wrote (metrics.jsonl; DICE's round summaries).
Rows: the SFT model (the toy's starting point; no training) and the five algorithms at their default settings:

    dpo            DPO on the annotator's pairs
    d2po           D2PO: online pairs, a 256-label gold budget, the discriminator's silver labels for the rest
    dice           DICE: round 0 is DPO, then 2 rounds on its own samples, labelled by its implicit reward
    pointwise_dpo  point-wise DPO with binary labels, on both completions of every pair, labelled gold reward > 0
    distilled_dpo  e-DPO: 3 reward models trained on the pairs, DPO towards their pessimistic (min) margin; with
                   --length_bias 0, so that it learns from the same labels as DPO (its toy default adds a bias)

Columns: gold reward, length and KL(policy || SFT) of one sample per test prompt, the held-out accuracy each
script reports (of its own kind: pairs ordered by the implicit reward; for point-wise DPO, the sign of the
implicit reward as a classifier of the label), gold labels asked (D2PO), and wall time. Mean ± sd over seeds;
a difference to DPO is marked when it is larger than twice the standard error of the difference.

The sweep runs seed 0 of each algorithm at beta = its default times 0.3, 3 and 10 (the default is in the table
already) for the reward-vs-KL frontier. The frontier's e-DPO runs reuse the seed-0 run's reward models
(--reward_models), so its teachers are the same at every beta. Figures (matplotlib, a development dependency):
docs/frontier.png (gold reward against KL, one line per algorithm through its betas) and docs/curves.png (gold
reward and KL against training steps, seed 0 at the default beta, sampled every --toy_eval_every steps).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = dict(dpo=0.1, d2po=0.05, dice=0.1, pointwise_dpo=0.1, distilled_dpo=0.1)  # name: default beta
SWEEP = (0.3, 3.0, 10.0)  # times the default beta
CURVE_EVERY = dict(dpo=40, d2po=20, pointwise_dpo=40, distilled_dpo=40)  # DICE: one point per round
SAME_LABELS = dict(distilled_dpo=["--length_bias", "0"])  # its toy default relabels the pairs with a length bias


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS),
                        help="the algorithms to run (default: all five)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the default runs (default: 0 1 2)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the beta sweep (and the frontier)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one CPU thread each (default: 2)")
    parser.add_argument("--dir", default=os.path.join(ROOT, "runs", "compare"),
                        help="where the runs go; a finished run found there is read, not rerun (default: runs/compare)")
    parser.add_argument("--figures", default=os.path.join(ROOT, "docs"), help="where the two PNGs go (default: docs/)")
    return parser.parse_args(argv)


def beta_text(beta):
    return f"{beta:.4g}"


def jobs(args):
    """(name, algorithm, beta, seed, extra flags, name of a run it needs first), longest algorithms first."""
    out = []
    for algorithm in sorted(args.only, key=["dice", "distilled_dpo", "d2po", "pointwise_dpo", "dpo"].index):
        default = ALGORITHMS[algorithm]
        first = f"{algorithm}-beta{beta_text(default)}-seed{args.seeds[0]}"
        for seed in args.seeds:
            curve = ["--toy_eval_every", str(CURVE_EVERY[algorithm])] if seed == args.seeds[0] and algorithm in CURVE_EVERY else []
            out.append((f"{algorithm}-beta{beta_text(default)}-seed{seed}", algorithm, default, seed,
                        SAME_LABELS.get(algorithm, []) + curve, None))
        for factor in SWEEP if args.sweep else ():
            beta = round(default * factor, 6)
            teachers = ["--reward_models", ",".join(os.path.join(args.dir, first, f"reward_model_{k}") for k in range(3))]
            out.append((f"{algorithm}-beta{beta_text(beta)}-seed{args.seeds[0]}", algorithm, beta, args.seeds[0],
                        SAME_LABELS.get(algorithm, []) + (teachers if algorithm == "distilled_dpo" else []),
                        first if algorithm == "distilled_dpo" else None))
    return out


def finished(directory):
    return os.path.exists(os.path.join(directory, "wall.json"))


def start(job, args):
    name, algorithm, beta, seed, extra, _ = job
    directory = os.path.join(args.dir, name)
    command = [sys.executable, os.path.join(ROOT, f"{algorithm}.py"), "--seed", str(seed), "--beta", str(beta),
               "--output_dir", directory, *extra]
    if os.path.exists(os.path.join(directory, "args.json")):
        command.append("--resume")  # a comparison that was stopped: every script continues where it was
    log = open(os.path.join(args.dir, name + ".log"), "a")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), directory


def run_all(args):
    """Every job not finished yet, --workers at a time; each one's wall time goes to wall.json beside its run."""
    os.makedirs(args.dir, exist_ok=True)
    todo = [j for j in jobs(args) if not finished(os.path.join(args.dir, j[0]))]
    running = {}
    while todo or running:
        for job in [j for j in todo if len(running) < args.workers and (j[5] is None or finished(os.path.join(args.dir, j[5])))]:
            if len(running) < args.workers:
                todo.remove(job)
                running[job[0]] = start(job, args)
                print(f"started {job[0]}", file=sys.stderr)
        time.sleep(1)
        for name, (process, started, directory) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode:
                    sys.exit(f"error: {name} failed (exit {process.returncode}); see {os.path.join(args.dir, name)}.log")
                with open(os.path.join(directory, "wall.json"), "w") as f:
                    json.dump({"seconds": time.time() - started}, f)
                print(f"finished {name} in {time.time() - started:.0f} s", file=sys.stderr)
        if todo and not running and not any(j[5] is None or finished(os.path.join(args.dir, j[5])) for j in todo):
            sys.exit("error: a run waits for one that was not scheduled")


# ---------------------------------------------------------------- reading the runs
def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def figures_of(directory, algorithm):
    """A run's final figures, and its curve: [(step, gold reward, KL)] from the SFT model to the end."""
    with open(os.path.join(directory, "wall.json")) as f:
        wall = json.load(f)["seconds"]
    if algorithm == "dice":
        rounds = sorted(int(d[6:]) for d in os.listdir(directory) if d.startswith("round_"))
        summaries = []
        for t in rounds:
            with open(os.path.join(directory, f"round_{t}", "summary.json")) as f:
                summaries.append(json.load(f))
        last, sft = summaries[-1], summaries[0]
        metrics = read_jsonl(os.path.join(directory, f"round_{rounds[-1]}", "metrics.jsonl"))
        curve, steps = [(0, sft["toy/sft_gold_reward"], sft["toy/sft_kl"])], 0
        for s in summaries:
            steps += s["steps"]
            curve.append((steps, s["toy/gold_reward"], s["toy/kl"]))
        out = dict(gold=last["toy/gold_reward"], length=last["toy/length"], kl=last["toy/kl"],
                   sft_gold=sft["toy/sft_gold_reward"], sft_length=sft["toy/sft_length"])
    else:
        metrics = read_jsonl(os.path.join(directory, "metrics.jsonl"))
        final = [m for m in metrics if "toy/gold_reward_after" in m][-1]
        curve = [(0, final["toy/gold_reward_before"], final["toy/kl_before"])]
        curve += [(m["step"], m["toy/gold_reward"], m["toy/kl"]) for m in metrics if "toy/gold_reward" in m]
        curve.append((final["step"], final["toy/gold_reward_after"], final["toy/kl_after"]))
        out = dict(gold=final["toy/gold_reward_after"], length=final["toy/length_after"], kl=final["toy/kl_after"],
                   sft_gold=final["toy/gold_reward_before"], sft_length=final["toy/length_before"])
    accuracies = [m["eval_rewards/accuracies"] for m in metrics if "eval_rewards/accuracies" in m]
    gold_used = [m["gold/used"] for m in metrics if "gold/used" in m]
    return dict(out, accuracy=accuracies[-1] if accuracies else None, gold_used=gold_used[-1] if gold_used else None,
                wall=wall, curve=curve)


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values, fmt):
    mean, sd = mean_sd(values)
    if mean is None:
        return "-"
    return format(mean, fmt) + (f" ± {format(sd, fmt.lstrip('+'))}" if len(values) > 1 else "")


def differs(a, b):
    """Whether mean(a) - mean(b) is larger than twice its standard error (two-sample, unequal variances)."""
    if len(a) < 2 or len(b) < 2:
        return False
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.mean(a) - statistics.mean(b)) > 2 * se


def table(runs, seeds):
    """The README's table: one row per algorithm at its defaults, the SFT model first."""
    sft = next(iter(runs.values()))  # every script scores the SFT model with the run's seed: the same samples
    lines = [f"mean ± sd over seeds {', '.join(map(str, seeds))}; * : differs from DPO by more than twice the standard "
             "error of the difference", "",
             "| algorithm | beta | gold reward | length, words | KL(policy ‖ SFT), nats | held-out accuracy | gold labels "
             "| wall time per run |", "|---|---|---|---|---|---|---|---|",
             f"| SFT model (no training) | - | {cell([r['sft_gold'] for r in sft], '+.2f')} "
             f"| {cell([r['sft_length'] for r in sft], '.1f')} | 0 | - | - | - |"]
    reference = runs.get("dpo")
    for algorithm, rs in runs.items():
        marks = {}
        for key in ("gold", "length", "kl"):
            if reference and algorithm != "dpo":
                marks[key] = " *" if differs([r[key] for r in rs], [r[key] for r in reference]) else ""
            else:
                marks[key] = ""
        walls = [r["wall"] for r in rs[1:]] or [rs[0]["wall"]]  # seed 0 also samples its training curve
        lines.append(f"| {algorithm} | {ALGORITHMS[algorithm]} | {cell([r['gold'] for r in rs], '+.2f')}{marks['gold']} "
                     f"| {cell([r['length'] for r in rs], '.1f')}{marks['length']} "
                     f"| {cell([r['kl'] for r in rs], '.1f')}{marks['kl']} | {cell([r['accuracy'] for r in rs], '.3f')} "
                     f"| {cell([r['gold_used'] for r in rs], '.0f')} | {statistics.median(walls) / 60:.1f} min |")
    return "\n".join(lines)


def draw(runs, sweeps, figures):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(figures, exist_ok=True)
    colours = dict(zip(ALGORITHMS, ["C0", "C1", "C2", "C3", "C4"]))
    if sweeps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for algorithm, points in sweeps.items():
            points = sorted(points)  # (beta, kl, gold)
            ax.plot([p[1] for p in points], [p[2] for p in points], "-o", color=colours[algorithm], label=algorithm, ms=4)
            for beta, kl, gold in points:
                ax.annotate(f"{beta:g}", (kl, gold), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=colours[algorithm])
        ax.plot([0], [statistics.mean(r["sft_gold"] for r in next(iter(runs.values())))], "k*", ms=10, label="SFT model")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("KL(policy ‖ SFT), nats (symmetric log scale)")
        ax.set_ylabel("gold reward")
        ax.set_title("Reward against KL on the toy task, seed 0; labels: beta")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(figures, "frontier.png"), dpi=120)
        plt.close(fig)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for algorithm, rs in runs.items():
        curve = rs[0]["curve"]
        top.plot([c[0] for c in curve], [c[1] for c in curve], "-o", ms=3, color=colours[algorithm], label=algorithm)
        bottom.plot([c[0] for c in curve], [c[2] for c in curve], "-o", ms=3, color=colours[algorithm], label=algorithm)
    top.set_ylabel("gold reward")
    bottom.set_ylabel("KL(policy ‖ SFT), nats")
    bottom.set_xlabel("optimizer steps (DICE: round 0, then each round's steps)")
    top.set_title("Training curves on the toy task, seed 0, default beta")
    top.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(figures, "curves.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    import toy
    toy.ensure_built()  # before the first run, so that no run's wall time includes the build
    started = time.time()
    run_all(args)
    runs, sweeps = {}, {}
    for name, algorithm, beta, seed, _, _ in jobs(args):
        found = figures_of(os.path.join(args.dir, name), algorithm)
        if beta == ALGORITHMS[algorithm]:
            runs.setdefault(algorithm, []).append(found)
        if seed == args.seeds[0]:
            sweeps.setdefault(algorithm, []).append((beta, found["kl"], found["gold"]))
    runs = {a: runs[a] for a in ALGORITHMS if a in runs}  # DPO first, in the docstring's order
    sweeps = {a: sweeps[a] for a in ALGORITHMS if a in sweeps}
    print(table(runs, args.seeds))
    if args.sweep:
        print("\nsweep (seed 0): algorithm, beta: gold reward, KL")
        for algorithm, points in sweeps.items():
            print(f"{algorithm}: " + "; ".join(f"beta {b:g}: {g:+.2f}, {k:.1f}" for b, k, g in sorted(points)))
    try:
        draw(runs, sweeps if args.sweep else {}, args.figures)
    except ImportError:
        print("(matplotlib is not installed: no figures; pip install -r requirements-dev.txt)", file=sys.stderr)
    print(f"\n{time.time() - started:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()

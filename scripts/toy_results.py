"""The README's toy table: DPO on the built-in toy task at several beta, one fresh run per beta and seed.

    python scripts/toy_results.py                       # the README's table: 4 betas, seed 0, 1-2 min a run
    python scripts/toy_results.py 0.1 --seeds 0 1 2     # the default run's spread over seeds

Each run is `python dpo.py --beta B --seed S --output_dir <tmp>` (the toy defaults otherwise); the table reads
the run's metrics.jsonl: held-out preference accuracy, and gold reward / length / KL of samples on the test
prompts before and after training. With several seeds a cell is the mean over seeds, and the spread
(smallest to largest) follows in brackets. A larger beta keeps the policy closer to the reference (lower KL)
and buys less gold reward: the reward-vs-KL trade-off of the DPO paper's IMDb experiment, in miniature.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("betas", nargs="*", type=float, default=[0.03, 0.1, 0.3, 1.0],
                        help="the betas to run (default: 0.03 0.1 0.3 1.0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="dpo.py --seed of each run; every beta runs once per seed (default: 0)")
    parser.add_argument("--out", default=None,
                        help="keep the runs in OUT/beta<B>-seed<S> (default: a temporary directory, deleted)")
    return parser.parse_args(argv)


def run(beta, seed, out):
    """One fresh dpo.py run into out; its figures and wall time."""
    start = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), "--beta", str(beta), "--seed", str(seed),
                    "--output_dir", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    toy = metrics[-1]
    return dict(acc=[m for m in metrics if "eval_rewards/accuracies" in m][-1]["eval_rewards/accuracies"],
                g0=toy["toy/gold_reward_before"], g1=toy["toy/gold_reward_after"], l0=toy["toy/length_before"],
                l1=toy["toy/length_after"], kl=toy["toy/kl_after"], wall=time.time() - start)


def cell(runs, key, fmt):
    """The mean over runs, and (smallest-largest) when there are several."""
    values = [r[key] for r in runs]
    text = format(statistics.mean(values), fmt)
    return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    import toy
    toy.ensure_built()  # before the first run, so that no run's wall time includes the build
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for beta in args.betas:
            runs = []
            for seed in args.seeds:
                runs.append(run(beta, seed, os.path.join(args.out or tmp, f"beta{beta}-seed{seed}")))
                print(f"beta {beta} seed {seed}: {runs[-1]}", file=sys.stderr)
            rows.append((beta, runs))

    seeds = f"seeds {', '.join(map(str, args.seeds))}: mean (smallest–largest)" if len(args.seeds) > 1 else \
        f"seed {args.seeds[0]}"
    print(f"{seeds}\n")
    print("| beta | held-out pref. accuracy | gold reward (SFT -> DPO) | length, words (SFT -> DPO) "
          "| KL(policy ‖ SFT), nats | wall time |")
    print("|---|---|---|---|---|---|")
    for beta, runs in rows:
        print(f"| {beta} | {cell(runs, 'acc', '.3f')} | {cell(runs, 'g0', '+.2f')} -> {cell(runs, 'g1', '+.2f')} "
              f"| {cell(runs, 'l0', '.1f')} -> {cell(runs, 'l1', '.1f')} | {cell(runs, 'kl', '.2f')} "
              f"| {statistics.median(r['wall'] for r in runs):.0f} s |")


if __name__ == "__main__":
    main()

"""The README's toy table: DPO on the built-in toy task at several beta, one fresh run each.

    python scripts/toy_results.py            # about a minute per run on 2 CPU cores

Each run is `python dpo.py --beta B --output_dir <tmp>` (the toy defaults otherwise); the table reads the
run's metrics.jsonl: held-out preference accuracy, and gold reward / length / KL of samples on the test
prompts before and after training. A larger beta keeps the policy closer to the reference (lower KL) and
buys less gold reward: the reward-vs-KL trade-off of the DPO paper's IMDb experiment, in miniature.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETAS = [float(b) for b in sys.argv[1:]] or [0.03, 0.1, 0.3, 1.0]

rows = []
for beta in BETAS:
    out = os.path.join(tempfile.mkdtemp(), "run")
    start = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), "--beta", str(beta), "--output_dir", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    evals = [m for m in metrics if "eval_rewards/accuracies" in m]
    toy = metrics[-1]
    rows.append((beta, evals[-1]["eval_rewards/accuracies"], toy["toy/gold_reward_before"], toy["toy/gold_reward_after"],
                 toy["toy/length_before"], toy["toy/length_after"], toy["toy/kl_after"], time.time() - start))
    print(f"beta {beta}: done in {rows[-1][-1]:.0f} s", file=sys.stderr)

print("| beta | held-out pref. accuracy | gold reward (SFT -> DPO) | length, words (SFT -> DPO) | KL(policy ‖ SFT), nats | wall time |")
print("|---|---|---|---|---|---|")
for beta, acc, g0, g1, l0, l1, kl, wall in rows:
    print(f"| {beta} | {acc:.3f} | {g0:+.2f} -> {g1:+.2f} | {l0:.1f} -> {l1:.1f} | {kl:.2f} | {wall:.0f} s |")

"""distilled_dpo.py's two costs against their baselines: reward-model training against TRL's RewardTrainer, and
a distillation step against a dpo.py step. Same weights, same token ids, same batch size, one table.

    python bench/vs_reward.py --rounds 2                     # the measurement: 6 minutes on 2 quiet CPU cores
    DPO_BENCH_MAX_WAIT=0 python bench/vs_reward.py --rounds 1 --warmup 1 --steps 2    # a check that it runs

Part 1, the teachers (distilled_dpo.py's stage 1): a Bradley-Terry reward model, AutoModelForSequenceClassification
with one output on the 20M Llama, trained on preference pairs.
    trl-reward          RewardTrainer: chosen and rejected (each prompt + response) as 2B right-padded rows, one
                        forward, -log sigmoid(r_c - r_r), and its metrics (min/mean/max reward, accuracy, margin)
    ours-reward         distilled_dpo.py's train_reward_model step, made of its own functions (pair_scores, which
                        is common.grouped_scores: each pair's prompt computed once, prompt, chosen and rejected in one
                        sequence with a 4D mask, the score head read at each response's last token;
                        bradley_terry_loss) and its optimizer, AdamW(fused=True); LambdaLR, clip, one host sync
    ours-reward-separate  the same step as distilled_dpo.py did it before: chosen and rejected as 2B separate rows
                        (each prompt computed twice, as TRL does) and the for-each AdamW: what the layout is worth
Part 2, the policy (stage 3): the teachers' margins are precomputed (stage 2), so a distillation step should cost
what a DPO step costs.
    dpo                 dpo.py's step (synthetic.dpo_step), reference log-probs precomputed with dpo.py's function
    distill             distilled_dpo.py --objective distill: its training loop's step (pair_logps,
                        objective_loss/distill_loss, the step's one host sync, fused AdamW, LambdaLR), reference
                        log-probs precomputed with its own function, one teacher's margins precomputed
    ensemble            the same with --objective ensemble, K = 3 teachers (the min over the family per batch)
The teachers' margins are random (a normal with std 1, seeded): the step does not depend on their values.

Made equal on purpose: the model (synthetic.py's 20M Llama: one saved causal-LM directory for part 2, and one saved
sequence-classifier directory, synthetic.build_reward_model, for part 1, so the new score head is the same in every
process), fp32, 8 pairs a step, no gradient accumulation, constant learning rate 1e-4, weight decay 0, max_grad_norm
10, no gradient checkpointing, the same token ids (TRL's tokenisation is skipped: its rows already hold chosen_ids =
prompt + chosen and rejected_ids = prompt + rejected, each response ending with EOS), the same order (a
sequential sampler). Each contender runs in its own process (its peak RSS is its own), in turn, `--rounds`
times with the order rotated; a process waits for a quiet machine and is run again (at most 3 times) if other
processes took more than 15% of the CPUs meanwhile (bench/synthetic.py; --tries sets how often). The first
`--warmup` steps are not timed; step time = time between the ends of consecutive optimizer steps; beside it the
process's CPU time per step (all its threads: with OMP_NUM_THREADS=1 it hardly depends on other processes).
Whole process = start-up, imports, loading, reference log-probs (part 2) and every step.

Parity: part 1, the losses of ours-reward*, and TRL's agree over the first 3 steps (within 1e-4; the same function
of the same scores); part 2, every contender's step-1 policy log-probs agree (pi = pi_ref, loss ln 2 for DPO,
mean(Delta^2) for distillation: checked against the closed form).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from synthetic import (CPU, PAD, VOCAB, build_model, build_reward_model, dpo_optimizer, dpo_step, load_model,
                       make_pairs, median, n_params, peak_rss_mib, quietly, rss_mib, tick)

REWARD = ["trl-reward", "ours-reward", "ours-reward-separate"]
POLICY = ["dpo", "distill", "ensemble"]
CONTENDERS = REWARD + POLICY
TEMP_PREFIX = "reward-bench-"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20M", choices=list(VOCAB), help="which synthetic model")
    parser.add_argument("--pairs", type=int, default=1000, help="synthetic preference pairs in the data set")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per contender, order rotated each round")
    parser.add_argument("--max-length", type=int, default=256, help="max prompt + response tokens (none are longer)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="large enough that the loss moves")
    parser.add_argument("--beta", type=float, default=0.1, help="beta of the policy objectives")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--tries", type=int, default=3, help="runs of a process at most while others load the machine")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------- part 1: reward models
def reward_step(model, optimizer, scheduler, chunk, scores, max_grad_norm=10.0):
    """One step of distilled_dpo.py's train_reward_model in one process with --grad_accum 1 (its loop body, its
    functions): `scores(model, chunk)` gives the chosen and rejected scores (B,), (B,)."""
    import torch
    from distilled_dpo import bradley_terry_loss
    weight = 1 / len(chunk)  # the step's mean
    losses, correct = bradley_terry_loss(*scores(model, chunk))
    (losses.sum() * weight).backward()
    loss, accuracy = losses.sum().detach() * weight, correct.sum() * weight
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    loss, accuracy = torch.stack([loss, accuracy]).tolist()  # the step's one host sync
    if not math.isfinite(loss):
        raise SystemExit("non-finite reward-model loss")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def separate_scores(model, chunk):
    """Chosen and rejected scores (B,), (B,) from 2B right-padded rows, each prompt computed twice, the score read
    where the class reads it: distilled_dpo.py's pair_scores before it computed each prompt once."""
    from common import collate
    batch = collate([(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk], PAD)
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, 0].float()
    return scores[:len(chunk)], scores[len(chunk):]


def run_ours_reward(args, path, pairs, separate):
    import torch
    from types import SimpleNamespace
    from distilled_dpo import load_reward_model, pair_scores
    model, tokenizer = load_reward_model(path, SimpleNamespace(dtype="float32", trust_remote_code=False), "cpu")
    # train_reward_model's optimizer: AdamW(lr, weight_decay, fused=True) (before: the for-each one); warm-up 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0,
                                  **({} if separate else {"fused": True}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0 + 1)))
    scores = separate_scores if separate else (lambda m, chunk: pair_scores(m, chunk, tokenizer.pad_token_id, "cpu"))
    model.train()
    losses, ends = [], tick([])
    for step in range(args.warmup + args.steps):
        losses.append(reward_step(model, optimizer, scheduler, pairs[step * args.batch_size:(step + 1) * args.batch_size], scores))
        tick(ends)
    return losses, ends, None


def run_trl_reward(args, path, pairs):
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class Trainer(RewardTrainer):
        """RewardTrainer with our token ids as they are, in order, and the exact loss of each step kept."""
        losses = []

        def _prepare_dataset(self, dataset, *unused, **kwargs):
            return dataset  # already chosen_ids / rejected_ids

        def _get_train_sampler(self, *unused, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((out[0] if return_outputs else out).detach())
            return out

    class Clock(TrainerCallback):
        ends = []

        def on_train_begin(self, *unused, **kwargs):
            tick(self.ends)

        def on_step_end(self, *unused, **kwargs):
            tick(self.ends)

    data = Dataset.from_dict({"chosen_ids": [p + c for p, c, _ in pairs], "rejected_ids": [p + r for p, _, r in pairs]})
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    config = RewardConfig(output_dir=tempfile.mkdtemp(prefix=TEMP_PREFIX), per_device_train_batch_size=args.batch_size,
                          gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
                          lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=10.0,
                          bf16=False, fp16=False, gradient_checkpointing=False, max_length=args.max_length,
                          logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                          dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path),
                      callbacks=[Clock()])
    trainer.train()
    return torch.stack(Trainer.losses).tolist(), Clock.ends, None


# ---------------------------------------------------------------- part 2: a distillation step against a DPO step
def precomputed(script, policy, pairs, batch_size):
    """(N, 2) reference log-probs of every pair under the initial policy, by the script's own function
    (all_pair_logps since the scripts run under torchrun, reference_logps before)."""
    from types import SimpleNamespace
    module = __import__(script)
    compute = getattr(module, "all_pair_logps", None) or module.reference_logps
    return compute(policy, pairs, SimpleNamespace(batch_size=batch_size), PAD, "cpu")


def distill_step(policy, optimizer, scheduler, chunk, idx, ref, margins, args, max_grad_norm=10.0):
    """One optimizer step of distilled_dpo.py's training loop with --grad_accum 1 and gamma 0, made of its own
    functions. `ref(chunk, idx)` gives the precomputed reference log-probs, `margins(idx)` the teachers' (B, K)."""
    import torch
    from distilled_dpo import objective_loss, pair_logps
    policy_logps = pair_logps(policy, chunk, PAD, "cpu")
    losses, metrics = objective_loss(args, policy_logps, ref(chunk, idx), margins(idx))
    losses.mean().backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    values = torch.stack([*metrics.values(), grad_norm.float()]).tolist()  # the step's one host sync
    row = dict(zip([*metrics, "grad_norm"], values))
    if not all(map(math.isfinite, values)):
        raise SystemExit(f"non-finite loss or gradient ({row})")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return row


def run_distill(args, path, pairs, objective, K):
    import torch
    from types import SimpleNamespace
    policy = load_model(path)
    cache = precomputed("distilled_dpo", policy, pairs, args.batch_size)  # (N, 2)
    teacher = torch.randn(args.pairs, K, generator=torch.Generator().manual_seed(1))[:len(pairs)]  # (N, K): calibrated margins
    ref = lambda chunk, idx: cache[list(idx)].unbind(-1)
    margins = lambda idx: teacher[list(idx)]
    objective_args = SimpleNamespace(objective=objective, beta=args.beta, label_smoothing=0.0, ensemble_min="batch")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0 + 1)))
    policy.train()
    losses, ends, first = [], tick([]), None
    B = args.batch_size
    for step in range(args.warmup + args.steps):
        idx = range(step * B, (step + 1) * B)
        row = distill_step(policy, optimizer, scheduler, [pairs[i] for i in idx], idx, ref, margins, objective_args)
        losses.append(row["loss"])
        if first is None:  # at step 1 m = 0: the loss is the mean squared target margin (of the chosen teacher)
            first = dict(logps=row["logps/chosen"], closed_form=min((teacher[list(idx)] ** 2).mean(0).tolist()))
        tick(ends)
    return losses, ends, first


def run_dpo(args, path, pairs):
    policy = load_model(path)
    cache = precomputed("dpo", policy, pairs, args.batch_size)  # (N, 2), as synthetic.precomputed_reference
    index = {id(pair): i for i, pair in enumerate(pairs)}
    ref = lambda chunk: cache[[index[id(pair)] for pair in chunk]].unbind(-1)
    optimizer = dpo_optimizer(policy, args.learning_rate)
    policy.train()
    losses, ends, first = [], tick([]), None
    for step in range(args.warmup + args.steps):
        row = dpo_step(policy, optimizer, pairs[step * args.batch_size:(step + 1) * args.batch_size], ref, args.beta)
        losses.append(row["loss"])
        first = first or dict(logps=row["logps/chosen"], closed_form=math.log(2))
        tick(ends)
    return losses, ends, first


def child(args):
    """One contender in this process: print one JSON line with its step times, losses and peak RSS."""
    import torch
    if args.child.startswith("trl"):
        import trl  # noqa: F401  (what each contender imports counts towards its memory)
    elif args.child == "dpo":
        import dpo  # noqa: F401
    else:
        import distilled_dpo  # noqa: F401
    rss_imports = rss_mib()
    n_pairs = (args.warmup + args.steps) * args.batch_size
    pairs = make_pairs(VOCAB[args.model], args.pairs, 0)[:n_pairs]  # only those trained on
    rm, lm = build_reward_model(args.model), build_model(args.model)
    run = {"trl-reward": lambda: run_trl_reward(args, rm, pairs),
           "ours-reward": lambda: run_ours_reward(args, rm, pairs, separate=False),
           "ours-reward-separate": lambda: run_ours_reward(args, rm, pairs, separate=True),
           "dpo": lambda: run_dpo(args, lm, pairs),
           "distill": lambda: run_distill(args, lm, pairs, "distill", 1),
           "ensemble": lambda: run_distill(args, lm, pairs, "ensemble", 3)}[args.child]
    losses, ends, first = run()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    cpu_times = [b - a for a, b in zip(CPU, CPU[1:])][args.warmup:]
    print(json.dumps(dict(contender=args.child, losses=losses, times=times, cpu_times=cpu_times, first=first, peak_rss_mib=peak_rss_mib(),
                          rss_after_imports_mib=rss_imports, threads=torch.get_num_threads())))


def table(contenders, results, base, B, n_pairs):
    print(f"\n| contender | median step (s) | pairs/s | peak RSS (MiB) | pairs/s vs {base} | peak RSS vs {base} | "
          f"whole process (s) | whole-process pairs/s vs {base} | others' CPU | CPU s a step | CPU pairs/s vs {base} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for c in contenders:
        step = median([t for run in results[c] for t in run["times"]])
        rss = max(run["peak_rss_mib"] for run in results[c])
        wall = median([run["wall"] for run in results[c]])
        cpu = median([t for run in results[c] for t in run["cpu_times"]])
        summary[c] = (step, B / step, rss, wall, max(run["others"] for run in results[c]), cpu)
    ref = summary.get(base)
    for c, (step, rate, rss, wall, others, cpu) in summary.items():
        print(f"| {c} | {step:.3f} | {rate:.2f} | {rss:.0f} | " + (
            f"{rate / ref[1]:.2f}x | {rss / ref[2]:.2f}x | {wall:.1f} | {ref[3] / wall:.2f}x" if ref else f"- | - | {wall:.1f} | -")
            + f" | {others:.0%} | {cpu:.3f} | " + (f"{ref[5] / cpu:.2f}x |" if ref else "- |"))
    return summary


def main():
    args = parse_args()
    if args.child:
        return child(args)
    import torch
    path = build_model(args.model)
    build_reward_model(args.model)
    pairs = make_pairs(VOCAB[args.model], args.pairs, 0)
    tokens = [len(p) + len(r) for p, c, rj in pairs for r in (c, rj)]
    B, n_pairs = args.batch_size, (args.warmup + args.steps) * args.batch_size
    print(f"model {args.model}: {n_params(load_model(path)) / 1e6:.1f}M parameters, vocab {VOCAB[args.model]}; "
          f"{len(pairs)} pairs, {sum(tokens) / len(tokens):.0f} tokens per sequence on average; batch {B} pairs, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    contenders = args.contenders.split(",")
    results = {c: [] for c in contenders}
    try:
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for name in order:
                command = [sys.executable, os.path.abspath(__file__), "--child", name,
                           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "contenders", "tries")]]
                def process():  # the whole process: start-up, loading, reference log-probs and the steps
                    start = time.perf_counter()
                    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                    return done, time.perf_counter() - start
                (out, wall), others = quietly(process, tries=args.tries)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                results[name].append({**json.loads(out.stdout.strip().splitlines()[-1]), "others": others, "wall": wall})
                print(f"round {r + 1} {name:18s} median step {median(results[name][-1]['times']):.3f} s, whole process "
                      f"{wall:.1f} s, other processes used {others:.0%} of the CPUs meanwhile", flush=True)
    finally:  # RewardTrainer's output directories (empty: save_strategy "no")
        for d in os.listdir(tempfile.gettempdir()):
            if d.startswith(TEMP_PREFIX):
                shutil.rmtree(os.path.join(tempfile.gettempdir(), d), ignore_errors=True)

    ok = True
    reward = [c for c in contenders if c in REWARD]
    if reward:
        base = reward[0]
        print(f"\nPart 1, reward models. Parity with {base} (round 1): the Bradley-Terry loss at steps 1-3 and the "
              f"largest difference over all {n_pairs // B} steps")
        print("| contender | loss step 1 | loss step 2 | loss step 3 | max abs diff |")
        print("|---|---|---|---|---|")
        for c in reward:
            a, b = results[c][0]["losses"], results[base][0]["losses"]
            ok &= max(abs(x - y) for x, y in zip(a[:3], b[:3])) < 1e-4
            print(f"| {c} | " + " | ".join(f"{x:.6f}" for x in a[:3]) + f" | {max(abs(x - y) for x, y in zip(a, b)):.1e} |")
        summary = table(reward, results, base, B, n_pairs)
        for a in [c for c in reward if c != base]:
            print(f"{a} vs {base}: {summary[a][1] / summary[base][1]:.2f}x pairs/s steady ({summary[base][5] / summary[a][5]:.2f}x in CPU time), "
                  f"{summary[base][3] / summary[a][3]:.2f}x whole process ({n_pairs} pairs), "
                  f"{summary[a][2] / summary[base][2]:.2f}x peak RSS")
    policy = [c for c in contenders if c in POLICY]
    if policy:
        base = policy[0]
        print("\nPart 2, the policy step. Parity (round 1): mean policy log-probs of the first batch's chosen "
              "responses (pi = pi_ref), the step-1 loss against its closed form (DPO: ln 2; distillation: the mean "
              "squared teacher margin of the batch, min over teachers)")
        print("| contender | logps/chosen step 1 | loss step 1 | closed form | loss step 2 |")
        print("|---|---|---|---|---|")
        for c in policy:
            first, losses = results[c][0]["first"], results[c][0]["losses"]
            ok &= abs(losses[0] - first["closed_form"]) < 1e-4 and abs(first["logps"] - results[base][0]["first"]["logps"]) < 1e-2
            print(f"| {c} | {first['logps']:.4f} | {losses[0]:.6f} | {first['closed_form']:.6f} | "
                  + (f"{losses[1]:.6f}" if len(losses) > 1 else "-") + " |")
        summary = table(policy, results, base, B, n_pairs)
        for a in [c for c in policy if c != base]:
            print(f"{a} step vs {base} step: {summary[a][0] / summary[base][0]:.3f}x the time "
                  f"({(summary[a][0] / summary[base][0] - 1) * 100:+.1f}%; CPU time {summary[a][5] / summary[base][5]:.3f}x, "
                  f"{(summary[a][5] / summary[base][5] - 1) * 100:+.1f}%), whole process {summary[a][3] / summary[base][3]:.3f}x, "
                  f"peak RSS {summary[a][2] / summary[base][2]:.2f}x")
    print("RSS right after imports (MiB): " + ", ".join(f"{c} {results[c][0]['rss_after_imports_mib']:.0f}" for c in contenders))
    print("parity: " + ("OK" if ok else "FAILED"))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()

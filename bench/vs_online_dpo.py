"""d2po.py's online step against TRL's OnlineDPOTrainer, and a D2PO step broken into its parts: same weights, same
prompts, same number of new tokens, same batch.

    python bench/vs_online_dpo.py --rounds 2                 # the measurement: 6 minutes on 2 quiet CPU cores
    DPO_BENCH_MAX_WAIT=0 python bench/vs_online_dpo.py --rounds 1 --warmup 1 --steps 1   # a check that it runs

Every contender, each step: P prompts (--prompts, 8), two samples of each from the current policy (one batched
`generate` of 2P rows, KV cache, temperature 1, no top-k/top-p), the reference's log-probs of the 2P samples (a
frozen copy of the initial policy), a reward model's score of both samples of each pair (the judge), and one DPO
update (beta 0.05) on the P pairs ordered by the judge:
    trl               OnlineDPOTrainer (trl.experimental.online_dpo) with the reward model as reward_funcs and a
                      frozen reference model; it decodes the samples and re-tokenises prompt + completion text for
                      the reward model, as it does for any reward model
    ours              d2po.py --labels gold --gold rm:<the reward model>: online DPO where every pair is gold-labelled
                      by the reward model, made of d2po.py's own functions (sample_pairs, response_logps,
                      reward_model_gold, collect_gold with its GoldLog, gold_candidates, pair_order, pair_logps,
                      dpo_loss, dpo_metrics) in its loop's order: the judge scores the step's P pairs in one batch,
                      each pair's prompt once (score_pairs), and each label is appended to gold.jsonl and
                      fsync'ed, as for any gold source
    ours-separate     the same step with the judge as d2po.py asked it before: pair by pair, each pair's two rows
                      with a prompt each (two rows a forward pass): what the shared prompt and the batch are worth
    d2po              d2po.py --labels d2po, a window step: the discriminator (a sequence classifier on the
                      policy's weights with a fresh head, as by default) scores the 2P samples, the judge labels
                      the P least-confident pairs (all of them: a window's 16 gold labels outnumber P), the
                      discriminator trains on them (close_window: 4 epochs, batches of 16), the DPO update.
                      Its parts are timed, and the step's time is printed for a silver step too (without the
                      judge and the discriminator's training), and averaged over a default window (16 gold
                      pairs, then 256 silver pairs)
Both sides generate exactly --max-new-tokens new tokens per sample: min_new_tokens = max_new_tokens (EOS is
suppressed until then, so no sample ends early: on random weights about 3% of 64-token samples would draw EOS,
vocabulary 2,048), on TRL through OnlineDPOConfig.generation_kwargs, on ours through the policy's
generation_config (sample_responses passes no min_new_tokens of its own).

Made equal on purpose: the weights (synthetic.py's 20M Llama for the policy and its frozen reference, and
synthetic.build_reward_model's sequence classifier on the same backbone as the judge: saved directories, loaded
by every process), fp32, the same prompts in the same order (synthetic.make_pairs's prompts, 30-80 tokens; TRL
gets them as text of the word-level tokenizer, which encodes back to the same ids), P = 8 prompts a step, 64 new
tokens, temperature 1, top_k 0, top_p 1, beta 0.05, constant learning rate 1e-4, no weight decay, max_grad_norm 10,
the fused AdamW (TRL's default and d2po.py's), no gradient checkpointing. The samples themselves differ (each
side draws from its own random stream), so only step 1 can be compared exactly: the policy is the reference, so
every DPO loss is ln 2, and the mean summed log-prob of the step's samples is of the same size on both sides.
Each contender runs in its own process (its peak RSS is its own), in turn, `--rounds` times with the order
rotated; a process waits for a quiet machine and is run again (at most 3 times) if other processes took more than
15% of the CPUs meanwhile (bench/synthetic.py; --tries sets how often). The first `--warmup` steps are not timed;
step time = time between the ends of consecutive optimizer steps. Beside it, the process's CPU time per step (all
its threads): with OMP_NUM_THREADS=1 it hardly depends on other processes, on a machine that is not quiet.
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

from synthetic import (CPU, PAD, VOCAB, build_model, build_reward_model, load_model, make_pairs, median, n_params,
                       peak_rss_mib, quietly, rss_mib, tick)

CONTENDERS = ["trl", "ours", "ours-separate", "d2po"]
PHASES = ["sample", "reference", "disc_score", "judge", "disc_train", "update"]
TEMP_PREFIX = "online-bench-"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20M", choices=list(VOCAB), help="which synthetic model")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (2 samples each: one pair)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens of every sample (min = max)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per contender, order rotated each round")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="large enough that the policy moves")
    parser.add_argument("--beta", type=float, default=0.05, help="DPO beta (D2PO paper: 0.05)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--tries", type=int, default=3, help="runs of a process at most while others load the machine")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def prompt_text(ids):
    """The word-level tokenizer's text of a prompt; the trailing space keeps TRL's prompt + completion text from
    gluing the prompt's last word to the completion's first (its tokenizer splits on whitespace only)."""
    return " ".join(f"t{i}" for i in ids) + " "


# ---------------------------------------------------------------- ours: d2po.py's step
def run_ours(args, lm, rm, prompts, mode):
    """mode: "gold" (--labels gold --gold rm:rm), "separate" (the same, the judge asked pair by pair, a row for each
    response), "d2po" (--labels d2po, a window step). Returns losses, step ends, phase times per step, step-1 details."""
    import torch
    from types import SimpleNamespace
    import d2po
    from d2po import (GoldLog, close_window, collect_gold, dpo_loss, dpo_metrics, gold_candidates, load_discriminator,
                      new_window_state, pair_logps, pair_order, response_logps, reward_model_gold, sample_pairs,
                      score_pairs)
    from common import clip_grad_norm_, load_tokenizer, my_share
    P = args.prompts
    d2 = SimpleNamespace(model=lm, disc_model=None, dtype="float32", trust_remote_code=False, max_new_tokens=args.max_new_tokens,
                         temperature=1.0, sample_batch_size=64, seed=0, disc_epochs=4, disc_batch_size=16,
                         disc_replay=False, gold_per_window=16, gold_budget=10**9, max_length=512)
    tokenizer = load_tokenizer(lm)
    policy = load_model(lm)
    policy.generation_config.min_new_tokens = args.max_new_tokens  # every sample exactly max_new_tokens long
    reference = load_model(lm).eval().requires_grad_(False)  # d2po.py's pi_0: a frozen copy
    ask = reward_model_gold(rm, d2, "cpu")  # the judge, --gold rm:<rm>
    if mode == "separate":  # the judge as before: no batch (ask without .prepare), no common prompts (a row each)
        d2po.prefix_groups = lambda row_pairs: None
        ask = lambda pair, ask=ask: ask(pair)
    discriminator = disc_optimizer = None
    if mode == "d2po":
        discriminator, _ = load_discriminator(d2, "cpu")
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=1e-5)
    out_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    gold_log = GoldLog(os.path.join(out_dir, "gold.jsonl"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0 + 1)))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    policy.train()
    losses, ends, phases, first = [], tick([]), [], None
    for step in range(args.warmup + args.steps):
        t, clock = {}, [(time.perf_counter(), time.process_time())]

        def lap(name):  # a part's wall-clock and CPU seconds
            clock.append((time.perf_counter(), time.process_time()))
            wall, cpu = t.get(name, (0.0, 0.0))
            t[name] = (wall + clock[-1][0] - clock[-2][0], cpu + clock[-1][1] - clock[-2][1])
        batch = prompts[step * P:(step + 1) * P]  # [(raw prompt, ids)]
        responses_a, responses_b = sample_pairs(policy, tokenizer, [ids for _, ids in batch], d2, step + 1)
        lap("sample")
        groups = [(ids, [a, b]) for (_, ids), a, b in zip(batch, responses_a, responses_b)]
        reference_logps = response_logps(reference, groups, PAD, "cpu", d2.sample_batch_size).view(-1, 2)  # (P, 2)
        items = [dict(key=GoldLog.key(ids, a, b), prompt=decode(ids), a=decode(a), b=decode(b), raw_prompt=raw)
                 for (raw, ids), a, b in zip(batch, responses_a, responses_b)]
        eligible = torch.tensor([a != b for a, b in zip(responses_a, responses_b)])  # (P,)
        lap("reference")
        if discriminator is not None:
            rows = [((ids + a)[-d2.max_length:], (ids + b)[-d2.max_length:]) for ids, (a, b) in groups]
            scores = score_pairs(discriminator, rows, PAD, "cpu", d2.sample_batch_size)  # (P, 2)
        else:
            scores = torch.zeros(P, 2)
        margins = scores[:, 0] - scores[:, 1]
        lap("disc_score")
        chosen = gold_candidates(margins, eligible, P if mode != "d2po" else d2.gold_per_window, "conf",
                                 torch.Generator().manual_seed(step + 1))
        labels, _ = collect_gold(ask, gold_log, [items[i] for i in chosen], d2.gold_budget,
                                 {"step": step + 1, "window": 1 if mode == "d2po" else None})
        gold = dict(zip(chosen, labels))
        lap("judge")
        if mode == "d2po":  # the window's gold is spent: accuracy on it, then the discriminator trains on it
            w = new_window_state(d2)
            for i, label in gold.items():
                if label in ("a", "b"):
                    win = int(label == "b")
                    w["pairs"].append({"chosen": groups[i][0] + groups[i][1][win], "rejected": groups[i][0] + groups[i][1][1 - win],
                                       "score_chosen": scores[i, win].item(), "score_rejected": scores[i, 1 - win].item()})
            close_window(w, d2, discriminator, disc_optimizer, PAD, "cpu")
        lap("disc_train")
        winners = pair_order(margins, gold)
        keep = [i for i in range(P) if eligible[i] and (mode == "d2po" or gold.get(i) in ("a", "b"))]
        step_pairs = [(groups[i][0], groups[i][1][winners[i]], groups[i][1][1 - winners[i]]) for i in keep]
        kept, firsts = torch.tensor(keep, dtype=torch.long), torch.tensor(winners, dtype=torch.long)[keep]
        step_reference = torch.stack([reference_logps[kept, firsts], reference_logps[kept, 1 - firsts]], -1)  # (n, 2)
        # the DPO update: d2po.py's loop in one process (--updates_per_step 1, one micro-batch of the step's pairs)
        share, weights = my_share(len(step_pairs), weights=True)
        chunk, weight = [step_pairs[i] for i in share], weights
        policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, PAD, "cpu")
        reference_chosen_logps, reference_rejected_logps = step_reference[share].unbind(-1)
        dpo_losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                                reference_chosen_logps, reference_rejected_logps, args.beta)
        ((dpo_losses * weight).sum() / len(step_pairs)).backward()
        real = weight.nonzero().squeeze(-1)  # in one process every pair is the rank's own
        pick = lambda t: t if len(real) in (0, len(chunk)) else t.index_select(0, real)
        metrics = dpo_metrics(*map(pick, (dpo_losses.detach(), chosen_rewards, rejected_rewards,
                                          policy_chosen_logps, policy_rejected_logps)))
        sums = {k: v * len(real) / len(step_pairs) for k, v in metrics.items()}
        grad_norm = clip_grad_norm_(policy, 10.0)
        values = torch.cat([torch.stack([*sums.values()]).float(), grad_norm.float()[None]]).tolist()  # one host sync
        row = dict(zip([*sums, "grad_norm"], values))
        if not all(map(math.isfinite, values)):
            raise SystemExit(f"non-finite loss or gradient ({row})")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lap("update")
        losses.append(row["loss"])
        phases.append(t)
        lengths = [len(r) for r in responses_a + responses_b]
        if first is None:
            first = dict(logps=(row["logps/chosen"] + row["logps/rejected"]) / 2, pairs=len(step_pairs))
        first.setdefault("lengths", []).extend(lengths)
        tick(ends)
    shutil.rmtree(out_dir, ignore_errors=True)
    first["new_tokens"] = sum(first.pop("lengths")) / ((args.warmup + args.steps) * 2 * P)
    first["min_new_tokens"] = min(lengths)
    return losses, ends, phases, first


# ---------------------------------------------------------------- TRL's OnlineDPOTrainer
def run_trl(args, lm, rm, prompts):
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    phase = {}

    def timed(name, f):
        def wrapped(*a, **k):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = f(*a, **k)
            wall, cpu = phase.get(name, (0.0, 0.0))
            phase[name] = (wall + time.perf_counter() - start, cpu + time.process_time() - start_cpu)
            return out
        return wrapped

    class Trainer(OnlineDPOTrainer):
        """OnlineDPOTrainer with the prompts in order, the loss of each step kept, its parts timed."""
        losses, lengths, logs = [], [], []

        def _get_train_sampler(self, *unused, **kwargs):
            return SequentialSampler(self.train_dataset)

        def _generate(self, *a, **k):
            out = timed("sample", super()._generate)(*a, **k)
            self.lengths += out[3].sum(1).tolist()  # completion_mask: the new tokens of each sample
            return out

        def _forward(self, model, *a, **k):
            return timed("update" if model is self.model else "reference", super()._forward)(model, *a, **k)

        def _calculate_rewards_from_functions(self, *a, **k):
            return timed("judge", super()._calculate_rewards_from_functions)(*a, **k)

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            self.losses.append(loss.item())
            return loss

    class Clock(TrainerCallback):
        ends, phases = [], []

        def on_train_begin(self, *unused, **kwargs):
            tick(self.ends)

        def on_step_end(self, *unused, **kwargs):
            tick(self.ends)
            step, step_cpu = self.ends[-1] - self.ends[-2], CPU[-1] - CPU[-2]
            self.phases.append({**phase, "update": (step - sum(v[0] for k, v in phase.items() if k != "update"),
                                                    step_cpu - sum(v[1] for k, v in phase.items() if k != "update"))})
            phase.clear()

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            Trainer.logs.append(dict(logs or {}))

    policy = load_model(lm)
    reference = load_model(lm)
    judge = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32)
    n = (args.warmup + args.steps) * args.prompts
    data = Dataset.from_dict({"prompt": [raw for raw, _ in prompts[:n]]})
    config = OnlineDPOConfig(output_dir=tempfile.mkdtemp(prefix=TEMP_PREFIX), per_device_train_batch_size=args.prompts,
                             gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
                             learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=10.0, beta=[args.beta], max_new_tokens=args.max_new_tokens,
                             generation_kwargs={"min_new_tokens": args.max_new_tokens}, temperature=1.0, top_k=0,
                             top_p=1.0, max_length=512, missing_eos_penalty=None, bf16=False, fp16=False,
                             gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=policy, ref_model=reference, reward_funcs=judge, args=config, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(lm),
                      reward_processing_classes=AutoTokenizer.from_pretrained(rm), callbacks=[Clock()])
    trainer.train()
    log = next(log for log in Trainer.logs if "logps/chosen" in log)
    lengths = Trainer.lengths
    first = dict(logps=(log["logps/chosen"] + log["logps/rejected"]) / 2, pairs=args.prompts,
                 new_tokens=sum(lengths) / len(lengths), min_new_tokens=min(lengths))
    return Trainer.losses, Clock.ends, Clock.phases, first


def child(args):
    """One contender in this process: print one JSON line with its step times, phases, losses and peak RSS."""
    import torch
    if args.child.startswith("trl"):
        import trl.experimental.online_dpo  # noqa: F401  (what each contender imports counts towards its memory)
    else:
        import d2po  # noqa: F401
    rss_imports = rss_mib()
    lm, rm = build_model(args.model), build_reward_model(args.model)
    n = (args.warmup + args.steps) * args.prompts
    prompts = [(prompt_text(p), p) for p, _, _ in make_pairs(VOCAB[args.model], n, 0)]
    run = {"trl": lambda: run_trl(args, lm, rm, prompts),
           "ours": lambda: run_ours(args, lm, rm, prompts, "gold"),
           "ours-separate": lambda: run_ours(args, lm, rm, prompts, "separate"),
           "d2po": lambda: run_ours(args, lm, rm, prompts, "d2po")}[args.child]
    losses, ends, phases, first = run()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    cpu_times = [b - a for a, b in zip(CPU, CPU[1:])][args.warmup:]
    print(json.dumps(dict(contender=args.child, losses=losses, times=times, cpu_times=cpu_times, phases=phases[args.warmup:], first=first,
                          peak_rss_mib=peak_rss_mib(), rss_after_imports_mib=rss_imports, threads=torch.get_num_threads())))


def main():
    args = parse_args()
    if args.child:
        return child(args)
    import torch
    lm = build_model(args.model)
    build_reward_model(args.model)  # built once here, before the processes that load it
    prompts = [p for p, _, _ in make_pairs(VOCAB[args.model], 1000, 0)]
    P = args.prompts
    print(f"model {args.model}: {n_params(load_model(lm)) / 1e6:.1f}M parameters, vocab {VOCAB[args.model]}, policy, "
          f"reference and reward model (judge) on the same backbone; prompts of {sum(map(len, prompts)) / len(prompts):.0f} "
          f"tokens on average, {P} prompts a step (2 samples each), {args.max_new_tokens} new tokens a sample; "
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
                def process():  # the whole process: start-up, loading and the steps
                    start = time.perf_counter()
                    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                    return done, time.perf_counter() - start
                (out, wall), others = quietly(process, tries=args.tries)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                results[name].append({**json.loads(out.stdout.strip().splitlines()[-1]), "others": others, "wall": wall})
                print(f"round {r + 1} {name:13s} median step {median(results[name][-1]['times']):.3f} s, whole process "
                      f"{wall:.1f} s, other processes used {others:.0%} of the CPUs meanwhile", flush=True)
    finally:  # the trainers' output directories and our gold logs
        for d in os.listdir(tempfile.gettempdir()):
            if d.startswith(TEMP_PREFIX):
                shutil.rmtree(os.path.join(tempfile.gettempdir(), d), ignore_errors=True)

    ok = True
    print(f"\nParity (round 1): step-1 DPO loss (the policy is the reference: ln 2 = {math.log(2):.6f}), pairs in the "
          f"step-1 update, mean summed log-prob of the step-1 samples (different samples: same size expected), new "
          f"tokens per sample over all steps (mean and smallest)")
    print("| contender | loss step 1 | pairs step 1 | mean logps of the samples step 1 | new tokens per sample | fewest |")
    print("|---|---|---|---|---|---|")
    for c in contenders:
        first, losses = results[c][0]["first"], results[c][0]["losses"]
        ok &= abs(losses[0] - math.log(2)) < 1e-4 and first["min_new_tokens"] == args.max_new_tokens
        print(f"| {c} | {losses[0]:.6f} | {first['pairs']} | {first['logps']:.2f} | {first['new_tokens']:.1f} | "
              f"{first['min_new_tokens']} |")

    base = contenders[0]
    print(f"\n| contender | median step (s) | pairs/s | peak RSS (MiB) | pairs/s vs {base} | peak RSS vs {base} | "
          f"whole process (s) | whole-process pairs/s vs {base} | others' CPU | CPU s a step | CPU pairs/s vs {base} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for c in contenders:
        step = median([t for run in results[c] for t in run["times"]])
        rss = max(run["peak_rss_mib"] for run in results[c])
        wall = median([run["wall"] for run in results[c]])
        cpu = median([t for run in results[c] for t in run["cpu_times"]])
        summary[c] = (step, P / step, rss, wall, max(run["others"] for run in results[c]), cpu)
    ref = summary[base]
    for c, (step, rate, rss, wall, others, cpu) in summary.items():
        print(f"| {c} | {step:.3f} | {rate:.2f} | {rss:.0f} | {rate / ref[1]:.2f}x | {rss / ref[2]:.2f}x | {wall:.1f} | "
              f"{ref[3] / wall:.2f}x | {others:.0%} | {cpu:.3f} | {ref[5] / cpu:.2f}x |")
    for a in [c for c in ("ours", "ours-separate") if c in summary and c != base]:
        print(f"{a} vs {base}: {summary[a][1] / summary[base][1]:.2f}x pairs/s steady ({summary[base][5] / summary[a][5]:.2f}x in CPU time), {summary[base][3] / summary[a][3]:.2f}x "
              f"whole process ({(args.warmup + args.steps) * P} pairs), {summary[a][2] / summary[base][2]:.2f}x peak RSS")

    for unit, which in (("CPU", 1), ("wall-clock", 0)):
        print(f"\nWhere a step's time goes: median {unit} seconds of each part over the timed steps (TRL: its _generate, "
              f"the reference's _forward, the reward functions; 'update' is the rest of its step)")
        print("| contender | " + " | ".join(PHASES) + " | step | sampling share |")
        print("|---|" + "---|" * (len(PHASES) + 2))
        medians = {}
        for c in contenders:
            steps = [{k: v[which] for k, v in p.items()} for run in results[c] for p in run["phases"]]
            medians[c] = {k: median([p.get(k, 0.0) for p in steps]) for k in PHASES}
            total = median([sum(p.values()) for p in steps])
            print(f"| {c} | " + " | ".join(f"{medians[c][k]:.3f}" if any(k in p for p in steps) else "-" for k in PHASES)
                  + f" | {total:.3f} | {medians[c]['sample'] / total:.0%} |")
        if "d2po" in medians:
            m = medians["d2po"]
            window = sum(m.values())
            silver = window - m["judge"] - m["disc_train"]
            share = 16 / 128  # a default window: 16 gold pairs in 128 (--window_pairs, gold steps included)
            average = silver + share * (m["judge"] + m["disc_train"])
            print(f"d2po ({unit}): a window step (judge + discriminator training) {window:.3f} s, a silver step "
                  f"{silver:.3f} s; with the default window (--gold_per_window 16, --window_pairs 128) the average "
                  f"step is {average:.3f} s, of which sampling {m['sample'] / average:.0%}, the reference "
                  f"{m['reference'] / average:.0%}, discriminator scoring {m['disc_score'] / average:.0%}, judge "
                  f"{share * m['judge'] / average:.0%}, discriminator training {share * m['disc_train'] / average:.0%}, "
                  f"DPO update {m['update'] / average:.0%}")
    print("RSS right after imports (MiB): " + ", ".join(f"{c} {results[c][0]['rss_after_imports_mib']:.0f}" for c in contenders))
    print("parity: " + ("OK: every step-1 loss is ln 2 within 1e-4 and every sample has exactly "
                        f"{args.max_new_tokens} new tokens" if ok else "FAILED"))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()

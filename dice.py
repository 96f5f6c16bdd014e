"""DICE: Bootstrapping Language Models with DPO Implicit Rewards.
Chen, Liu, Du, Pang, Liu, Sinha, Varakantham, Lin. ICLR 2025. https://arxiv.org/abs/2406.09760  Its page: docs/dice.md

A DPO model pi^(0), trained against pi^(-1), carries a reward. Each round t = 1..T labels its own samples with it:

    y_1 .. y_K ~ pi^(t-1)(. | x)                        K = 16 samples for each prompt of the offline data
    s(x, y)    = log pi^(t-1)(y|x) - log pi^(t-2)(y|x)    the implicit reward of pi^(t-1), summed over tokens, no beta
    r_LR(x, y) = s(x, y) - alpha |y|                      length-regularised reward (Eq. 5); |y| in characters
    alpha*     = argmin_alpha | E[ |y_w| - |y_l| ] |      signed mean length gap of the pairs at alpha (Eq. 6)
    y_w, y_l   = argmax_k r_LR(x, y_k), argmin_k r_LR     one pair per prompt
    D_t        = generated pairs + offline pairs on the other prompts, a fraction gamma offline (replay)
    pi^(t)     = DPO from pi^(t-1), reference pi^(t-1):  L = - E_{D_t}[ log sigmoid(beta h) ]   (DPO, Eq. 7)

Scoring and training use different references: pi^(t-1) is scored against pi^(t-2) (round 1: the SFT model),
and trained against itself.

Run:
    python dice.py                                    # toy task: round 0 (DPO from the SFT model), 2 DICE rounds
    python dice.py --model runs/dpo-<time>            # toy task, from a dpo.py run instead of round 0
    python dice.py --model princeton-nlp/Llama-3-Base-8B-SFT-DPO --ref_model princeton-nlp/Llama-3-Base-8B-SFT \\
        --dataset uf_10k.jsonl --learning_rate 5e-7 --warmup_steps 50 --batch_size 2 --grad_accum 16 --output_dir out
    python dice.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 dice.py <the same flags>    # several GPUs: as dpo.py; each rank samples and scores its
                                                            # share of the prompts, the alpha search sees them all

Every round writes <output_dir>/round_<t>/: samples.jsonl, scores.jsonl, alpha.json, pairs.jsonl (the generated
pairs), train_pairs.jsonl (what the round trains on), the DPO round's checkpoints and metrics.jsonl, its model,
and summary.json. --resume skips every stage already written; the last round's model is also saved in
<output_dir> itself. args.json, --resume, Ctrl-C and SIGTERM behave as in dpo.py.

Deviations from the paper and the authors' code (sail-sg/dice):
1. On the toy task with no --model, round 0 makes pi^(0) itself: DPO from the SFT model on the offline pairs,
   with the settings of dpo.py's toy default (--round0_learning_rate 1e-4). The DICE rounds use a 10x smaller
   learning rate there (the paper uses one learning rate throughout).
2. Each round samples floor(N (1 - gamma)) random prompts of the N distinct ones, the most that the replay can
   use (the authors sample all N and discard the surplus), by pure sampling at --temperature (no top-p), batched
   with the KV cache. A response is dropped when it has no EOS within --max_new_tokens or when prompt + response
   exceed --max_length (the authors drop finish_reason == "length" and responses over 6,700 characters).
3. The training reference pi^(t-1) is the round's initial policy, so its log-probs are computed once before
   training (dpo.py, deviation 1); scoring takes pi^(t-1)'s log-probs, then loads pi^(t-2) alone.
4. Replay counts the offline data's distinct prompts, not its rows, and replays one pair per prompt (the
   paper's data has one pair per prompt; the toy's 1,920 pairs share 346 prompts). It keeps the fixed total size
   also at gamma = 0 (the authors' code then uses every generated pair) and is seeded (theirs is not).
5. AdamW with linear warm-up, then constant, as dpo.py (the authors: LLaMA-Factory, lr 5e-7, 50 warm-up steps,
   300 steps at batch 32 per round).
6. Shorter lengths: --max_new_tokens 512 and --max_length 512 by default, against the authors' 2,048 new tokens
   (generate_responses.py, max_token) and 4,096-token cutoff in scoring and training (generate_dpo_scores.py,
   pipeline.sh, --cutoff_len). The responses that do not fit are dropped before alpha is searched, and they are the
   long end of the length distribution that the length term r_LR = s - alpha |y| is there to correct: each round
   prints and logs how many (samples/dropped_for_length in its metrics.jsonl, and in summary.json), and warns
   when they are more than a tenth of its samples. Raise the two flags for a real model's long answers.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (AT_LEAST_1, OPTIONAL_AT_LEAST_1, POSITIVE, RunArgs, check_resume, claim_output_dir, collate,
                    crash_point, dpo_metrics, end_of_step, evaluate_pairs, finished, flag, from_pretrained, frozen,
                    gather_shares, is_main, list_checkpoints, load_model, load_pair_data, load_policy, load_tokenizer,
                    make_optimizer, my_share, on_rank_0, open_metrics, pair_logps, parse_flags, read_json_rows,
                    reference_cache, restore, run_record, sample_responses, save_checkpoint, save_final,
                    sequence_logps, start_run, steps_of, sync_gradients, this_rank, torch_threads, training_bar,
                    update, world_size, write_json, write_jsonl)


@dataclasses.dataclass
class Args(RunArgs):  # the flags every script has (common.RunArgs), some with DICE's defaults or help; then DICE's own
    model: str = flag(None, "the DPO model pi^(0): hub id or local directory (default: round 0 on the toy task)")
    ref_model: str = flag(None, "the reference model --model was DPO-trained against, pi^(-1); round 1 scores with "
                                "both (toy: the SFT model)")
    dataset: str = flag(None, "offline preference data (prompt/chosen/rejected), for prompts and replay: hub name, "
                              ".jsonl/.json/.parquet, or a save_to_disk folder (default: toy)")
    max_steps: int = flag(None, "optimizer steps per round (default: --epochs over the round's pairs)")
    grad_accum: int = flag(4, "micro-batches per optimizer step (authors: batch 32)")
    learning_rate: float = flag(5e-7, "peak learning rate (paper: 5e-7)")
    warmup_steps: int = flag(50, "linear warm-up steps, then constant (paper: 50)")
    beta: float = flag(0.1, "KL strength beta of each DPO round (paper: 0.1)")
    max_eval_pairs: int = flag(512, "at most this many held-out pairs are evaluated")
    label_smoothing: float = flag(0.0, "cDPO label smoothing eps in [0, 0.5) (0 = plain DPO, as the paper)")
    rounds: int = flag(2, "DICE rounds T (paper: 2)")
    round0_learning_rate: float = flag(1e-4, "learning rate of round 0, the DPO model made on the toy task when "
                                             "--model is not given (dpo.py's toy default)")
    num_samples: int = flag(16, "responses K sampled per prompt (paper: 16)")
    min_valid: int = flag(8, "prompts with fewer usable responses are dropped (authors: 8)")
    max_prompts: int = flag(None, "sample for at most this many prompts (default: all that the replay can use)")
    temperature: float = flag(0.9, "sampling temperature (paper: 0.7 Zephyr, 0.9 Llama-3)")
    max_new_tokens: int = flag(512, "a response without EOS within this many tokens is dropped")
    sample_batch_size: int = flag(64, "sequences per batch when sampling and scoring")
    length_unit: str = flag("chars", "|y| in the length term: characters (authors' code) or tokens",
                            ["chars", "tokens"])
    alpha: float = flag(None, "fix alpha instead of searching it (0: no length term, the paper's ablation)")
    alpha_step: float = flag(0.001, "grid step of the alpha search (authors: 0.001)")
    alpha_max: float = flag(1.0, "the alpha search stops below this (authors: 1)")
    replay_ratio: float = flag(0.5, "gamma in [0, 1), the fraction of offline pairs in a round's data (paper: 0.5; 0: "
                                    "no replay)")


# The toy task: dpo.py's toy settings (round 0 is dpo.py's toy default), a 10x smaller learning rate in the DICE
# rounds (in trial runs, 1e-4 and 3e-5 took the KL to the SFT model from 5.4 to 29 and 11 nats in round 1, and
# the gold reward down), sampling at the temperature of the toy's evaluation; used when --dataset is not given.
TOY_DEFAULTS = dict(learning_rate=1e-5, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128, max_new_tokens=64, temperature=1.0, sample_batch_size=256)
AT_LEAST_2 = (lambda v: v >= 2, "at least 2")
ARG_CHECKS = dict(max_eval_pairs=AT_LEAST_1, label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"), rounds=AT_LEAST_1,
                  round0_learning_rate=POSITIVE, num_samples=AT_LEAST_2, min_valid=AT_LEAST_2, temperature=POSITIVE,
                  max_prompts=OPTIONAL_AT_LEAST_1, max_new_tokens=AT_LEAST_1, sample_batch_size=AT_LEAST_1,
                  alpha=(lambda v: v is None or 0 <= v < math.inf, "0 or more"), alpha_step=POSITIVE,
                  alpha_max=POSITIVE, replay_ratio=(lambda v: 0 <= v < 1, "in [0, 1)"))


def parse_args(argv=None):
    """The flags, each one checked (common.parse_flags), over the toy's defaults when --model is not given or when it
    comes without --dataset (a DPO model of the toy task: a dpo.py run's directory); real data needs --ref_model."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_flags(Args, TOY_DEFAULTS, ARG_CHECKS, argv, __doc__.split("\n")[0])
    if args.model and not args.dataset:
        given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
        args = dataclasses.replace(args, **{k: v for k, v in TOY_DEFAULTS.items() if k not in given})
    if args.dataset and not args.ref_model:
        sys.exit("error: --model needs --ref_model, the model it was DPO-trained against (round 1 scores with the two)")
    if args.min_valid > args.num_samples:
        sys.exit(f"error: --min_valid {args.min_valid} is more than --num_samples {args.num_samples}")
    return args


# ---------------------------------------------------------------- ALGO LOGIC: the loss, the pairs, the replay
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-pair DPO loss (Eq. 7 of arXiv 2305.18290; cDPO if label_smoothing > 0) and implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def select_pairs(scores, lengths, valid, alpha):
    """The best and the worst usable response of each prompt under r_LR = s - alpha |y| (Eq. 5 of arXiv
    2406.09760): scores, lengths (P, K) float, valid (P, K) bool -> indices of y_w, y_l (P,). On ties y_w is the
    first best and y_l the last worst, so a prompt whose scores all tie still gives two different responses."""
    r = scores - alpha * lengths  # (P, K)
    chosen = r.masked_fill(~valid, -math.inf).argmax(-1)  # (P,)
    rejected = r.shape[-1] - 1 - r.masked_fill(~valid, math.inf).flip(-1).argmin(-1)  # (P,)
    return chosen, rejected


def length_gap(scores, lengths, valid, alpha):
    """The signed mean length gap E[|y_w| - |y_l|] of the pairs that alpha selects."""
    chosen, rejected = select_pairs(scores, lengths, valid, alpha)  # (P,), (P,)
    return (lengths.gather(-1, chosen[:, None]) - lengths.gather(-1, rejected[:, None])).mean().item()


def search_alpha(scores, lengths, valid, step=0.001, max_alpha=1.0):
    """alpha* = argmin_alpha |E[|y_w| - |y_l|]| (Eq. 6 of arXiv 2406.09760) on the grid 0, step, 2 step, ... below
    max_alpha, stopping at the first alpha whose |gap| exceeds the smallest so far (as the authors' optimize_alpha;
    a gap that falls again later is not seen). Returns alpha* and the [(alpha, gap)] it tried."""
    trace = []
    for k in range(math.ceil(max_alpha / step - 1e-9)):
        trace.append((k * step, length_gap(scores, lengths, valid, k * step)))
        if abs(trace[-1][1]) > min(abs(gap) for _, gap in trace):
            break
    return min(trace, key=lambda alpha_gap: abs(alpha_gap[1]))[0], trace


def replay_mix(generated, offline, gamma, rng):
    """Experience replay at a fixed total size (the authors' create_mix_paired_set) over N, the offline data's
    distinct prompts (its size in the paper, one pair per prompt): n_gen = min(floor(N (1 - gamma)), |generated|)
    generated pairs and floor(gamma n_gen / (1 - gamma)) offline pairs, one per prompt, on prompts that no chosen
    generated pair has; every prompt appears once. Pairs are (prompt, chosen, rejected) id lists; gamma < 1."""
    by_prompt = {}
    for pair in rng.sample(offline, len(offline)):  # one offline pair per prompt, drawn at random
        by_prompt.setdefault(tuple(pair[0]), pair)
    n_generated = min(math.floor(len(by_prompt) * (1 - gamma) + 1e-9), len(generated))
    n_offline = math.floor(gamma * n_generated / (1 - gamma) + 1e-9)
    generated = rng.sample(generated, n_generated)
    taken = {tuple(prompt) for prompt, _, _ in generated}
    pool = [pair for prompt, pair in by_prompt.items() if prompt not in taken]
    return generated, rng.sample(pool, min(n_offline, len(pool)))


# ---------------------------------------------------------------- a round's data: samples, scores, pairs
def usable(prompt, response, eos_token_id, max_length):
    """A sampled response is kept if it ended (EOS) and fits in --max_length with its prompt (deviation 2)."""
    return response[-1:] == [eos_token_id] and len(prompt) + len(response) <= max_length


def length_drops(t, samples, eos_token_id, max_new_tokens, max_length, warn_above=0.1):
    """Round t's samples that `usable` drops for length (deviation 6): cut off with no EOS within --max_new_tokens,
    or ended but longer than --max_length with their prompt. Returns their counts and fraction as metrics, and the
    lines to print: the counts, and a warning when more than warn_above of the samples were dropped."""
    responses = [(len(row["prompt_ids"]), r) for row in samples for r in row["response_ids"]]
    cut = sum(r[-1:] != [eos_token_id] for _, r in responses)
    over = sum(r[-1:] == [eos_token_id] and n + len(r) > max_length for n, r in responses)
    dropped, total, fraction = cut + over, len(responses), (cut + over) / max(len(responses), 1)
    metrics = {"samples/total": total, "samples/dropped_for_length": dropped, "samples/dropped_for_length_fraction":
               fraction, "samples/cut_at_max_new_tokens": cut, "samples/over_max_length": over}
    lines = [f"round {t}: {dropped} of {total} samples ({fraction:.1%}) dropped for length: {cut} with no EOS within "
             f"--max_new_tokens {max_new_tokens}, {over} longer than --max_length {max_length} with the prompt"]
    if fraction > warn_above:
        flags = " and ".join(flag for flag, n in (("--max_new_tokens", cut), ("--max_length", over)) if n)
        lines.append(f"warning: round {t}: {fraction:.0%} of the samples were dropped for length, more than "
                     f"{warn_above:.0%}: the alpha search sees the lengths without their long end; raise {flags} "
                     f"(the authors: 2048 new tokens, 4096 in all)")
    return metrics, lines


@torch.no_grad()
def response_logps(model, samples, args, pad_token_id, device):
    """(P, K) float64: summed log pi(y|x) of every usable response under `model`, in eval mode; NaN elsewhere.
    Under torchrun each rank scores its share of the responses and every rank gets all scores."""
    rows = [(i, k) for i, row in enumerate(samples) for k, ok in enumerate(row["usable"]) if ok]
    share, mine = my_share(len(rows)), [torch.zeros(0, dtype=torch.float64)]
    model.eval()
    for s in tqdm(range(0, len(share), args.sample_batch_size), desc="scoring"):
        chunk = [rows[j] for j in share[s:s + args.sample_batch_size]]
        batch = collate([(samples[i]["prompt_ids"], samples[i]["response_ids"][k]) for i, k in chunk], pad_token_id)
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})  # (n,)
        mine.append(logps.double().cpu())
        crash_point("score")
    out = torch.full((len(samples), args.num_samples), math.nan, dtype=torch.float64)  # (P, K)
    out[[i for i, _ in rows], [k for _, k in rows]] = gather_shares(torch.cat(mine), len(rows))
    return out


@torch.no_grad()
def sample(t, directory, policy, prompts, args, tokenizer, seconds):
    """y_1 .. y_K ~ pi^(t-1) for floor(N (1 - gamma)) random prompts of the N distinct ones (deviation 2), batched, each
    rank its share (its own seed): a row per prompt with ids, texts and which are usable, in samples.jsonl (a resumed
    run reads it). Returns the rows, and those dropped for length (deviation 6) as metrics."""
    path, K = os.path.join(directory, "samples.jsonl"), args.num_samples
    if not os.path.exists(path):
        started = time.time()
        n = min(max(1, math.floor(len(prompts) * (1 - args.replay_ratio) + 1e-9)), args.max_prompts or len(prompts))
        prompts = random.Random(f"{args.seed}/prompts/{t}").sample(prompts, n)  # as many as the replay can use
        mine = [prompts[i] for i in my_share(len(prompts))]
        flat, responses = [p for p in mine for _ in range(K)], []
        with torch.random.fork_rng():
            torch.manual_seed((args.seed * 1000 + t) * world_size() + this_rank())
            for s in tqdm(range(0, len(flat), args.sample_batch_size), desc=f"sampling {K} per prompt"):
                responses += sample_responses(policy, tokenizer, flat[s:s + args.sample_batch_size],
                                              args.max_new_tokens, args.temperature, args.sample_batch_size)
                crash_point("sample")
        rows = [{"prompt": tokenizer.decode(p), "prompt_ids": p, "response_ids": rs,
                 "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in rs],
                 "usable": [usable(p, r, tokenizer.eos_token_id, args.max_length) for r in rs]}
                for p, rs in zip(mine, (responses[i:i + K] for i in range(0, len(responses), K)))]
        on_rank_0(write_jsonl, path, gather_shares(rows, len(prompts)))
        seconds["sampling"] = time.time() - started
    samples = read_json_rows(path)
    drops, lines = length_drops(t, samples, tokenizer.eos_token_id, args.max_new_tokens, args.max_length)
    print("\n".join(lines))
    return samples, drops


def implicit_rewards(t, directory, policy, samples, models, args, tokenizer, device, seconds):
    """s(x, y) = log pi^(t-1)(y|x) - log pi^(t-2)(y|x), no beta: (P, K) float64, NaN for an unusable response; pi^(t-2)
    loaded after pi^(t-1)'s log-probs (deviation 3). In scores.jsonl with both log-probs (a resumed run reads it)."""
    path = os.path.join(directory, "scores.jsonl")
    if not os.path.exists(path):
        started = time.time()
        policy_logps = response_logps(policy, samples, args, tokenizer.pad_token_id, device)  # (P, K) pi^(t-1)
        reference = frozen(load_model(models[t - 2], args.dtype, device, args.trust_remote_code), args)  # pi^(t-2)
        reference_logps = response_logps(reference, samples, args, tokenizer.pad_token_id, device)  # (P, K)
        listed = lambda row: [None if math.isnan(v) else v for v in row.tolist()]
        on_rank_0(write_jsonl, path, [{"prompt": row["prompt"], "logps_policy": listed(p), "logps_reference": listed(r),
                                       "scores": listed(p - r)}  # no beta
                                      for row, p, r in zip(samples, policy_logps, reference_logps)])
        seconds["scoring"] = time.time() - started
    return torch.tensor([[math.nan if s is None else s for s in row["scores"]] for row in read_json_rows(path)],
                        dtype=torch.float64)  # (P, K)


def pairs_and_replay(t, directory, samples, scores, offline, models, args, tokenizer, toy, drops, seconds):
    """alpha* (Eq. 6; or --alpha); y_w and y_l, the best and the worst under r_LR = s - alpha* |y| (Eq. 5), of each
    prompt with --min_valid usable responses; the replay. Returns D_t and what to log; written in alpha.json,
    pairs.jsonl and train_pairs.jsonl (again on a resume only if train_pairs.jsonl, the last, is missing)."""
    started = time.time()
    lengths = torch.tensor([[len(r) for r in row["responses" if args.length_unit == "chars" else "response_ids"]]
                            for row in samples], dtype=torch.float64)  # (P, K)
    valid = torch.tensor([row["usable"] for row in samples]) & scores.isfinite()  # (P, K)
    keep = (valid.sum(-1) >= args.min_valid).nonzero().squeeze(-1).tolist()  # prompts with enough usable responses
    if not keep:
        sys.exit(f"error: round {t}: no prompt has --min_valid {args.min_valid} usable responses of {args.num_samples} "
                 f"(see {os.path.join(directory, 'samples.jsonl')}); raise --max_new_tokens or --max_length, or lower "
                 f"--min_valid")
    scores, lengths, valid = scores[keep].nan_to_num(0.0), lengths[keep], valid[keep]  # (P', K)
    alpha, trace = (search_alpha(scores, lengths, valid, args.alpha_step, args.alpha_max) if args.alpha is None
                    else (args.alpha, [(args.alpha, length_gap(scores, lengths, valid, args.alpha))]))
    chosen, rejected = select_pairs(scores, lengths, valid, alpha)  # (P',), (P',)
    chosen_0, rejected_0 = select_pairs(scores, lengths, valid, 0.0)  # without the length term, for the log
    rows = [{"prompt": samples[i]["prompt"], "chosen": samples[i]["responses"][w],
             "rejected": samples[i]["responses"][l], "score_chosen": scores[j, w].item(),
             "score_rejected": scores[j, l].item(), "prompt_ids": samples[i]["prompt_ids"],
             "chosen_ids": samples[i]["response_ids"][w], "rejected_ids": samples[i]["response_ids"][l]}
            for j, (i, w, l) in enumerate(zip(keep, chosen.tolist(), rejected.tolist()))]
    generated, replayed = replay_mix([(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows], offline,
                                     args.replay_ratio, random.Random(f"{args.seed}/replay/{t}"))
    mean_length = lambda index: lengths.gather(-1, index[:, None]).mean().item()
    stats = {"alpha": alpha, "scored_with": [models[t - 1], models[t - 2]], "prompts": len(samples),
             "usable_responses": int(valid.sum()), "prompts_kept": len(keep), "generated_pairs": len(rows),
             "generated_used": len(generated), "offline_used": len(replayed), "length_unit": args.length_unit,
             "chosen_length_alpha0": mean_length(chosen_0), "rejected_length_alpha0": mean_length(rejected_0),
             "chosen_length": mean_length(chosen), "rejected_length": mean_length(rejected), **drops}
    if toy:  # how often the implicit reward's order agrees with the gold program's, ties count half
        gold = [(toy.gold_reward(r["chosen"]), toy.gold_reward(r["rejected"])) for r in rows]
        stats["gold_agreement"] = sum((w > l) + 0.5 * (w == l) for w, l in gold) / len(gold)
    if is_main() and not os.path.exists(os.path.join(directory, "train_pairs.jsonl")):  # train_pairs.jsonl last
        write_json(os.path.join(directory, "alpha.json"), {"alpha": alpha, "searched": args.alpha is None,
                   "length_unit": args.length_unit, "trace": [{"alpha": a, "length_gap": g} for a, g in trace]})
        write_jsonl(os.path.join(directory, "pairs.jsonl"), rows)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        write_jsonl(os.path.join(directory, "train_pairs.jsonl"),
                    [{"source": source, "prompt": decode(p), "chosen": decode(c), "rejected": decode(r),
                      "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                     for source, part in (("generated", generated), ("offline", replayed)) for p, c, r in part])
    seconds["alpha_and_pairs"] = time.time() - started
    return generated + replayed, stats


# ---------------------------------------------------------------- a DPO round
def train_round(t, run, policy, train, held_out, record, tokenizer, toy_curve=None, summary=None):
    """pi^(t): DPO in round_<t> from `policy`, pi^(t-1), also its reference (its log-probs cached): dpo.py's training
    loop, round 0 at --round0_learning_rate; the step-0 row also logs the samples dropped for length of `summary`.
    Returns pi^(t) and its steps; a round that ran steps removes the later ones (built on an older pi^(t): a resume)."""
    args = dataclasses.replace(run.args, learning_rate=run.args.round0_learning_rate) if t == 0 else run.args
    directory = os.path.join(args.output_dir, f"round_{t}")
    pad, device, pairs_per_step = tokenizer.pad_token_id, run.device, args.batch_size * args.grad_accum * run.world
    steps_per_epoch = len(train) // pairs_per_step  # each rank batch_size x grad_accum pairs of a step
    if steps_per_epoch == 0:
        sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {run.world} processes = "
                 f"{pairs_per_step} pairs per step, but {directory} has only {len(train)} training pairs")
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    checkpoint = (list_checkpoints(directory) or [None])[-1]
    if checkpoint and not os.path.exists(os.path.join(directory, "reference_logps.pt")):
        sys.exit(f"error: {directory} has checkpoints but no reference_logps.pt; it cannot be resumed")
    cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, pad, device, directory=directory)
    policy = load_policy(run, checkpoint)[0] if checkpoint else policy  # a resumed round's weights
    optimizer, scheduler = make_optimizer(policy, args)
    start_step = restore(checkpoint, policy, optimizer, scheduler)[0] if checkpoint else 0
    if finished(directory, start_step, max_steps):
        return policy, max_steps
    evaluate = lambda: evaluate_pairs(policy, held_out, cache["eval"], args, pad, device, dpo_loss)
    run.log = open_metrics(directory, start_step)  # forgets what a killed run logged after its checkpoint
    if start_step == 0:
        run.log({"step": 0, **{k: v for k, v in (summary or {}).items() if k.startswith("samples/")}, **evaluate()})
    policy.train()
    bar = training_bar(run, policy, start_step, max_steps, os.path.basename(directory))
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
        indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()[run.rank::run.world]
        sums = {}
        for micro in range(args.grad_accum):  # the backward passes of --grad_accum micro-batches, the loss averaged
            idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
            sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
            policy_chosen_logps, policy_rejected_logps = pair_logps(policy, [train[i] for i in idx], pad, device)
            reference_chosen_logps, reference_rejected_logps = cache["train"][idx].to(device).unbind(-1)
            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                                reference_chosen_logps, reference_rejected_logps,
                                                                args.beta, args.label_smoothing)
            (losses.mean() / args.grad_accum).backward()
            metrics = dpo_metrics(losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps,
                                  policy_rejected_logps)
            sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
        row = update(run, policy, optimizer, scheduler, sums, step, directory)  # clip, stop on NaN, step
        row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3),
                   learning_rate=scheduler.get_last_lr()[0])
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        end_of_step(run, row, step, max_steps, bar, evaluate,
                    save=lambda: save_checkpoint(directory, policy, tokenizer, optimizer, scheduler, step + 1),
                    toy_curve=toy_curve and (lambda: toy_curve(policy)), directory=directory)
    run.signals["stop_after_step"] = False
    save_final(directory, policy, tokenizer)  # last: its presence marks the round's training complete
    for later in os.listdir(run.args.output_dir) if max_steps != start_step and is_main() else []:
        if later.startswith("round_") and int(later[6:]) > t:
            shutil.rmtree(os.path.join(run.args.output_dir, later))
    return policy, max_steps


# ---------------------------------------------------------------- main
def finished_round(directory, args):
    """A round's summary.json, if the round is done (with as many steps as asked for now); else None."""
    path = os.path.join(directory, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if not summary["trained"] or summary["steps"] >= (args.max_steps or summary["steps"]) else None


def table(summaries):
    """The run by round: alpha*, mean |y| of chosen / rejected with and without the length term, how often the
    implicit reward's order agrees with gold, and the toy's gold reward, length, KL."""
    cell = lambda s, k, f: format(s[k], f) if k in s else "-"
    lines = ["round     alpha*   chosen/rejected length   (alpha = 0)   implicit = gold   gold reward   words    KL"]
    if summaries and "toy/sft_gold_reward" in summaries[0]:
        s = {k.replace("sft_", ""): v for k, v in summaries[0].items()}
        lines.append(f"SFT            -                        -             -                 -   "
                     f"{s['toy/gold_reward']:+11.3f} {s['toy/length']:8.1f} {s['toy/kl']:5.2f}")
    for s in summaries:
        lengths = (f"{s['chosen_length']:7.1f} / {s['rejected_length']:<7.1f}  ({s['chosen_length_alpha0']:.1f} / "
                   f"{s['rejected_length_alpha0']:.1f})") if "alpha" in s else "-"
        lines.append(f"{s['round']:<5} {cell(s, 'alpha', '10.4f'):>10}   {lengths:>36}   "
                     f"{cell(s, 'gold_agreement', '15.3f'):>15}   {cell(s, 'toy/gold_reward', '+11.3f'):>11} "
                     f"{cell(s, 'toy/length', '8.1f'):>8} {cell(s, 'toy/kl', '5.2f'):>5}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    with start_run(args, argv, __file__) as run:  # torchrun, the output directory checked, Ctrl-C and SIGTERM
        toy, toy_prompts = None, None
        if args.dataset is None:  # the built-in toy task; its SFT model is pi^(-1)
            import toy
            toy_dir = toy.ensure_built()
            args.ref_model = args.ref_model or os.path.join(toy_dir, "sft")
            args.dataset = os.path.join(toy_dir, "train_pairs.jsonl")
            args.eval_dataset = args.eval_dataset or os.path.join(toy_dir, "test_pairs.jsonl")
            toy_prompts = toy.test_prompts(toy_dir)
        tokenizer = load_tokenizer(args.model or args.ref_model, args.trust_remote_code)
        offline, held_out = load_pair_data(args, tokenizer)
        steps_of(args, len(offline), run.world)  # too few pairs for one step stops here
        record = run_record(args, tokenizer)
        if args.resume:
            check_resume(args, record)
        from transformers import AutoConfig
        for name in filter(None, (args.model, args.ref_model)):  # loadable, checked before anything is written
            from_pretrained(AutoConfig, name, "a causal LM", trust_remote_code=args.trust_remote_code)
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record, "dice")
        # pi^(t): the reference of the DPO model, the DPO model (given, or round 0's), then each round's
        models = {-1: args.ref_model, 0: args.model or os.path.join(args.output_dir, "round_0"),
                  **{t: os.path.join(args.output_dir, f"round_{t}") for t in range(1, args.rounds + 1)}}
        prompts = [list(p) for p in dict.fromkeys(tuple(p) for p, _, _ in offline)]  # distinct, in order
        sft = load_model(models[-1], args.dtype, run.device).eval() if toy else None  # the toy's KL is to the SFT model
        toy_curve = (lambda p: toy.evaluate(p, sft, tokenizer, toy_prompts, seed=args.seed)) if toy else None
        summaries, worked = [], False
        with torch_threads(1 if toy else None):
            for t in range(0 if toy else 1, args.rounds + 1):  # round 0: pi^(0), made here (toy, no --model)
                directory = os.path.join(args.output_dir, f"round_{t}")
                summary = finished_round(directory, args)
                if summary is None:
                    os.makedirs(directory, exist_ok=True)
                    summary, seconds, train = {"round": t, "trained": t > 0 or args.model is None}, {}, offline
                    policy = load_policy(run, models[t - 1] if summary["trained"] else models[0])[0]  # pi^(t-1)
                    if t > 0:  # pi^(t-1) labels its own samples with its implicit reward
                        samples, drops = sample(t, directory, policy, prompts, args, tokenizer, seconds)
                        scores = implicit_rewards(t, directory, policy, samples, models, args, tokenizer, run.device,
                                                  seconds)  # (P, K)
                        train, stats = pairs_and_replay(t, directory, samples, scores, offline, models, args,
                                                        tokenizer, toy, drops, seconds)  # alpha*, the pairs, D_t
                        summary.update(stats)
                    if summary["trained"]:  # pi^(t) = DPO on D_t from pi^(t-1), reference pi^(t-1)
                        started = time.time()
                        policy, summary["steps"] = train_round(t, run, policy, train, held_out, record, tokenizer,
                                                               toy_curve, summary)
                        seconds["training"] = time.time() - started
                    if toy:  # gold reward, length and KL to the SFT model of one sample per test prompt
                        started = time.time()
                        summary.update({f"toy/{k}": v for k, v in toy_curve(policy).items()})
                        summary.update({f"toy/sft_{k}": v for k, v in toy_curve(sft).items()} if t == 0 else {})
                        seconds["toy_evaluation"] = time.time() - started
                    summary["seconds"], worked = seconds, True
                    on_rank_0(write_json, os.path.join(directory, "summary.json"), summary)  # last: the round is done
                    print(f"round {t}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in
                          summary.items() if k not in ("round", "seconds", "scored_with")))
                    crash_point("round")
                summaries.append(summary)
        if worked or not os.path.exists(os.path.join(args.output_dir, "config.json")):
            save_final(args.output_dir, load_model(models[args.rounds], args.dtype, run.device, args.trust_remote_code),
                       tokenizer)  # pi^(T), last: its presence marks the run complete
        else:
            print(f"{args.output_dir}: this run is complete ({args.rounds} rounds); nothing to do")
        print(table(summaries))
        if toy:  # the other scripts' last line, in the same words: the SFT model (pi^(-1)) -> the last round's
            before, after = ({k[len(p):]: v for k, v in s.items() if k.startswith(p)}
                             for s, p in ((summaries[0], "toy/sft_"), (summaries[-1], "toy/")))
            print(f"toy task, {len(toy_prompts)} test prompts, one sample each:\n"
                  f"  gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}   "
                  f"length {before['length']:.1f} -> {after['length']:.1f} words   "
                  f"KL(policy || reference) {before['kl']:.2f} -> {after['kl']:.2f} nats")


if __name__ == "__main__":
    main()

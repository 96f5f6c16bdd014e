"""DICE: Bootstrapping Language Models with DPO Implicit Rewards.
Chen, Liu, Du, Pang, Liu, Sinha, Varakantham, Lin. ICLR 2025. https://arxiv.org/abs/2406.09760

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
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (agree, clip_grad_norm_, collate, crash_point, encode_prompt, encode_response, fingerprint,
                    from_pretrained, full_state, gather_objects, gather_shares, grouped_logps, init_distributed,
                    is_main, load_model, load_optimizer_state, load_rows, load_tokenizer, mean_over_ranks, my_share,
                    on_rank_0, parallelize, prompt_head_length, report_dropped, sample_responses, sequence_logps,
                    sync_gradients, this_rank, truncate, world_size)


@dataclass
class Args:
    model: str = field(default=None, metadata={"help": "the DPO model pi^(0): hub id or local directory (default: round 0 on the toy task)"})
    ref_model: str = field(default=None, metadata={"help": "the reference model --model was DPO-trained against, pi^(-1); round 1 scores with both (toy: the SFT model)"})
    dataset: str = field(default=None, metadata={"help": "offline preference data (prompt/chosen/rejected), for prompts and replay: hub name, .jsonl/.json/.parquet, or a save_to_disk folder (default: toy)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset to train on"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out preference data; default: hold out --eval_fraction of --dataset"})
    eval_fraction: float = field(default=0.02, metadata={"help": "fraction of --dataset held out when no --eval_dataset is given"})
    max_eval_pairs: int = field(default=512, metadata={"help": "at most this many held-out pairs are evaluated"})
    output_dir: str = field(default=None, metadata={"help": "where rounds, checkpoints and metrics go (default: runs/dice-<time>)"})
    rounds: int = field(default=2, metadata={"help": "DICE rounds T (paper: 2)"})
    round0_learning_rate: float = field(default=1e-4, metadata={"help": "learning rate of round 0, the DPO model made on the toy task when --model is not given (dpo.py's toy default)"})
    num_samples: int = field(default=16, metadata={"help": "responses K sampled per prompt (paper: 16)"})
    min_valid: int = field(default=8, metadata={"help": "prompts with fewer usable responses are dropped (authors: 8)"})
    max_prompts: int = field(default=None, metadata={"help": "sample for at most this many prompts (default: all that the replay can use)"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (paper: 0.7 Zephyr, 0.9 Llama-3)"})
    max_new_tokens: int = field(default=512, metadata={"help": "a response without EOS within this many tokens is dropped"})
    sample_batch_size: int = field(default=64, metadata={"help": "sequences per batch when sampling and scoring"})
    length_unit: str = field(default="chars", metadata={"help": "|y| in the length term: characters (authors' code) or tokens",
                                                        "choices": ["chars", "tokens"]})
    alpha: float = field(default=None, metadata={"help": "fix alpha instead of searching it (0: no length term, the paper's ablation)"})
    alpha_step: float = field(default=0.001, metadata={"help": "grid step of the alpha search (authors: 0.001)"})
    alpha_max: float = field(default=1.0, metadata={"help": "the alpha search stops below this (authors: 1)"})
    replay_ratio: float = field(default=0.5, metadata={"help": "gamma in [0, 1), the fraction of offline pairs in a round's data (paper: 0.5; 0: no replay)"})
    max_steps: int = field(default=None, metadata={"help": "optimizer steps per round (default: --epochs over the round's pairs)"})
    epochs: int = field(default=1, metadata={"help": "passes over a round's pairs, when --max_steps is not given"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch (one forward pass of 2 x batch_size rows)"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step (authors: batch 32)"})
    learning_rate: float = field(default=5e-7, metadata={"help": "peak learning rate (paper: 5e-7)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps, then constant (paper: 50)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or rmsprop", "choices": ["adamw", "rmsprop"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta of each DPO round (paper: 0.1)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing eps in [0, 0.5) (0 = plain DPO, as the paper)"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response; the prompt's middle is cut first"})
    max_prompt_length: int = field(default=None, metadata={"help": "a cut prompt keeps at least this many tokens (default max_length // 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling, the replay, the data order and everything random"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the held-out pairs every N steps"})
    save_every: int = field(default=500, metadata={"help": "write a checkpoint every N steps"})
    toy_eval_every: int = field(default=0, metadata={"help": "toy task only: every N steps also sample the test prompts and "
                                                             "log gold reward, length and KL, a training curve (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir, skipping every finished stage"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU",
                                                 "choices": ["auto", "float32", "bfloat16", "float16"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})
    ddp: bool = field(default=False, metadata={"help": "under torchrun: a full copy of the model a process (default below 1B parameters)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: the model sharded over the processes with FSDP2 (default from 1B parameters)"})


# The toy task: dpo.py's toy settings (round 0 is dpo.py's toy default), a 10x smaller learning rate in the DICE
# rounds (in trial runs, 1e-4 and 3e-5 took the KL to the SFT model from 5.4 to 29 and 11 nats in round 1, and
# the gold reward down), sampling at the temperature of the toy's evaluation; used when --dataset is not given.
TOY_DEFAULTS = dict(learning_rate=1e-5, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128, max_new_tokens=64, temperature=1.0, sample_batch_size=256)
positive, at_least_1 = (lambda v: 0 < v < math.inf, "a positive number"), (lambda v: v >= 1, "at least 1")
ARG_CHECKS = dict(batch_size=at_least_1, grad_accum=at_least_1, epochs=at_least_1, eval_every=at_least_1,
                  save_every=at_least_1, max_eval_pairs=at_least_1, max_length=(lambda v: v >= 2, "at least 2"),
                  max_steps=(lambda v: v is None or v >= 1, "at least 1"),
                  max_prompt_length=(lambda v: v is None or v >= 1, "at least 1"),
                  toy_eval_every=(lambda v: v >= 0, "0 or more"),
                  warmup_steps=(lambda v: v >= 0, "0 or more"), weight_decay=(lambda v: 0 <= v < math.inf, "0 or more"),
                  learning_rate=positive, beta=positive, max_grad_norm=positive,
                  eval_fraction=(lambda v: 0 < v < 1, "between 0 and 1"),
                  label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                  rounds=at_least_1, round0_learning_rate=positive, num_samples=(lambda v: v >= 2, "at least 2"), min_valid=(lambda v: v >= 2, "at least 2"),
                  max_prompts=(lambda v: v is None or v >= 1, "at least 1"), temperature=positive,
                  max_new_tokens=at_least_1, sample_batch_size=at_least_1, alpha_step=positive, alpha_max=positive,
                  alpha=(lambda v: v is None or 0 <= v < math.inf, "0 or more"),
                  replay_ratio=(lambda v: 0 <= v < 1, "in [0, 1)"))
RESUME_MAY_CHANGE = ("max_steps", "eval_every", "save_every", "toy_eval_every")  # every other flag must match the run's


# ---------------------------------------------------------------- arguments (TRY NOT TO MODIFY)
def parse_args(argv=None):
    """Flags as given, over the toy's defaults when --model is not given, over Args' defaults; every value is
    checked here, before anything is read or written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = "" if f.default is None or f.type is bool else f" (default: {f.default}" + (
            f"; toy: {TOY_DEFAULTS[f.name]})" if f.name in TOY_DEFAULTS else ")")
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type, choices=f.metadata.get("choices"))
        parser.add_argument(*flags, **kind, default=argparse.SUPPRESS, help=f.metadata["help"] + default)
    given = vars(parser.parse_args(argv))  # only the flags on the command line: an explicit one always wins
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    args = Args(**{**defaults, **(TOY_DEFAULTS if "model" not in given else {}), **given})
    for name, (ok, expected) in ARG_CHECKS.items():
        if not ok(getattr(args, name)):
            sys.exit(f"error: --{name} must be {expected} (got {getattr(args, name)})")
    if args.toy_eval_every and args.dataset:
        sys.exit("error: --toy_eval_every is for the built-in toy task (without --dataset)")
    if args.dataset and not args.model:
        sys.exit("error: --dataset needs --model (without --model, the built-in toy task runs on its own data)")
    if args.resume and not args.output_dir:
        sys.exit("error: --resume needs the --output_dir of the run to continue")
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


def pair_logps(model, pairs, pad_token_id, device):
    """Summed response log-probs of chosen and rejected, in one forward pass, each prompt computed once."""
    logps, _ = grouped_logps(model, [(p, [c, r]) for p, c, r in pairs], pad_token_id, device)  # (2B,): c, r, c, r...
    return logps[0::2], logps[1::2]


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's metric names, as one tensor per name (means over the pairs)."""
    return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(), "logps/rejected": policy_rejected_logps.detach().mean()}


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


# ---------------------------------------------------------------- data
def load_pairs(source, tokenizer, args, split="train"):
    """Tokenised (prompt_ids, chosen_ids, rejected_ids) triples; unusable rows are dropped and counted."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split)
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    dropped = {"empty prompt or response": [], "chosen identical to rejected": [],
               "prompt alone longer than --max_length": []}
    pairs, n_cut = [], 0
    for i, row in enumerate(tqdm(rows, desc=f"tokenizing {source}", disable=len(rows) < 10000), 1):
        if not all(text(row[k]).strip() for k in ("prompt", "chosen", "rejected")):
            dropped["empty prompt or response"].append(i)
        elif row["chosen"] == row["rejected"]:
            dropped["chosen identical to rejected"].append(i)
        else:
            prompt = encode_prompt(tokenizer, row["prompt"])
            if len(prompt) >= args.max_length:
                dropped["prompt alone longer than --max_length"].append(i)
                continue
            responses = [encode_response(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
            prompt, (chosen, rejected), cut = truncate(prompt, responses, args.max_length, args.max_prompt_length,
                                                       prompt_head_length(tokenizer, row["prompt"], prompt))
            pairs.append((prompt, chosen, rejected))
            n_cut += cut
    report_dropped(source, dropped, len(rows))
    if n_cut:
        print(f"{source}: truncated {n_cut} of {len(pairs)} pairs to --max_length {args.max_length}")
    return pairs


def load_data(args, tokenizer):
    """Training and held-out pairs: --eval_dataset, or --eval_fraction of --dataset held out by a seeded shuffle."""
    train = load_pairs(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out = load_pairs(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_pairs, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    print(f"{len(train)} training pairs, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return train, held_out[:args.max_eval_pairs]


@torch.no_grad()
def all_pair_logps(model, pairs, args, pad_token_id, device, desc=None):
    """(N, 2) summed log-probs of chosen and rejected of every pair, in eval mode. Under torchrun each rank
    computes its share and every rank gets the whole."""
    share, out, was_training = my_share(len(pairs)), [torch.zeros(0, 2)], model.training
    model.eval()
    for s in tqdm(range(0, len(share), 2 * args.batch_size), desc=desc, disable=desc is None):
        chunk = [pairs[i] for i in share[s:s + 2 * args.batch_size]]
        out.append(torch.stack(pair_logps(model, chunk, pad_token_id, device), -1).cpu())
        crash_point("reference")
    model.train(was_training)
    return gather_shares(torch.cat(out), len(pairs))


def reference_cache(args, policy, splits, record, pad_token_id, device, directory):
    """Reference log-probs of every pair, computed once and kept in the round's directory with the record of what
    they were computed from, so a resumed run reuses them (and never reuses another run's)."""
    path = os.path.join(directory, "reference_logps.pt")
    fixed = {k: v for k, v in record["args"].items() if k not in RESUME_MAY_CHANGE}, record["inputs"]
    if os.path.exists(path):
        cache = torch.load(path)
        if cache["record"] != fixed:
            sys.exit(f"error: {path} was computed for other flags or inputs; remove it to compute it again")
        return cache
    cache = {name: all_pair_logps(policy, pairs, args, pad_token_id, device, "reference log-probs")
             for name, pairs in splits.items()}
    if is_main():
        torch.save({**cache, "record": fixed}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cache


def evaluate(policy, pairs, reference_logps, args, pad_token_id, device):
    """Mean DPO metrics on held-out pairs, TRL's names with the eval_ prefix; the policy in eval mode."""
    policy_logps = all_pair_logps(policy, pairs, args, pad_token_id, device).unbind(-1)
    metrics = dpo_metrics(*dpo_loss(*policy_logps, *reference_logps.unbind(-1), args.beta, args.label_smoothing),
                          *policy_logps)
    return {f"eval_{k}": v.item() for k, v in metrics.items()}


# ---------------------------------------------------------------- a round's data: samples, scores, pairs
def write_jsonl(path, rows):
    """JSON Lines into a temporary file, then renamed: a kill leaves the whole file or none."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def torch_threads(n):
    """torch on n CPU threads inside the block. The toy's model is too small to share an operation among threads:
    on 2 busy cores, 512 samples of it took 51 s with 2 threads and 3.7 s with one, a DPO step 4x as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    dropped, total = cut + over, len(responses)
    fraction = dropped / total if total else 0.0
    metrics = {"samples/total": total, "samples/dropped_for_length": dropped,
               "samples/dropped_for_length_fraction": fraction, "samples/cut_at_max_new_tokens": cut,
               "samples/over_max_length": over}
    lines = [f"round {t}: {dropped} of {total} samples ({fraction:.1%}) dropped for length: {cut} with no EOS within "
             f"--max_new_tokens {max_new_tokens}, {over} longer than --max_length {max_length} with the prompt"]
    if fraction > warn_above:
        flags = " and ".join(flag for flag, n in (("--max_new_tokens", cut), ("--max_length", over)) if n)
        lines.append(f"warning: round {t}: {fraction:.0%} of the samples were dropped for length, more than "
                     f"{warn_above:.0%}: the alpha search sees the lengths without their long end; raise {flags} "
                     f"(the authors: 2048 new tokens, 4096 in all)")
    return metrics, lines


@torch.no_grad()
def sample(policy, tokenizer, prompts, args, seed):
    """K responses per prompt from pi^(t-1), batched: one row per prompt with ids, texts and which are usable.
    Under torchrun each rank samples its share of the prompts (its own seed) and every rank gets all rows."""
    mine = [prompts[i] for i in my_share(len(prompts))]
    K, flat, responses = args.num_samples, [p for p in mine for _ in range(args.num_samples)], []
    with torch.random.fork_rng():
        torch.manual_seed(seed * world_size() + this_rank())
        for s in tqdm(range(0, len(flat), args.sample_batch_size), desc=f"sampling {K} per prompt"):
            responses += sample_responses(policy, tokenizer, flat[s:s + args.sample_batch_size], args.max_new_tokens,
                                          args.temperature, args.sample_batch_size)
            crash_point("sample")
    rows = [{"prompt": tokenizer.decode(p), "prompt_ids": p, "response_ids": rs,
             "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in rs],
             "usable": [usable(p, r, tokenizer.eos_token_id, args.max_length) for r in rs]}
            for p, rs in zip(mine, (responses[i:i + K] for i in range(0, len(responses), K)))]
    return gather_shares(rows, len(prompts))


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


def round_data(t, directory, policy, models, offline, prompts, args, tokenizer, device, toy, seconds):
    """Round t's training pairs and what to log: samples of pi^(t-1), scored against pi^(t-2), pairs at alpha*,
    replay. Each stage's file is written once; a resumed run reads it instead of doing the stage again."""
    path = lambda name: os.path.join(directory, name)
    if not os.path.exists(path("samples.jsonl")):
        started = time.time()
        n = min(max(1, math.floor(len(prompts) * (1 - args.replay_ratio) + 1e-9)), args.max_prompts or len(prompts))
        prompts = random.Random(f"{args.seed}/prompts/{t}").sample(prompts, n)  # as many as the replay can use
        on_rank_0(write_jsonl, path("samples.jsonl"), sample(policy, tokenizer, prompts, args, seed=args.seed * 1000 + t))
        seconds["sampling"] = time.time() - started
    samples = read_jsonl(path("samples.jsonl"))
    drops, lines = length_drops(t, samples, tokenizer.eos_token_id, args.max_new_tokens, args.max_length)
    print("\n".join(lines))
    if not os.path.exists(path("scores.jsonl")):
        started = time.time()
        policy_logps = response_logps(policy, samples, args, tokenizer.pad_token_id, device)  # (P, K) pi^(t-1)
        reference = load_model(models[t - 2], args.dtype, device, args.trust_remote_code)  # pi^(t-2): one at a time
        parallelize(reference, args, trainable=False)
        reference_logps = response_logps(reference, samples, args, tokenizer.pad_token_id, device)  # (P, K)
        del reference
        listed = lambda row: [None if math.isnan(v) else v for v in row.tolist()]
        on_rank_0(write_jsonl, path("scores.jsonl"), [{"prompt": row["prompt"], "logps_policy": listed(p),
                                                       "logps_reference": listed(r), "scores": listed(p - r)}  # no beta
                                                      for row, p, r in zip(samples, policy_logps, reference_logps)])
        seconds["scoring"] = time.time() - started
    started = time.time()
    scores = torch.tensor([[math.nan if s is None else s for s in row["scores"]] for row in read_jsonl(path("scores.jsonl"))],
                          dtype=torch.float64)  # (P, K)
    lengths = torch.tensor([[len(r) for r in row["responses" if args.length_unit == "chars" else "response_ids"]]
                            for row in samples], dtype=torch.float64)  # (P, K)
    valid = torch.tensor([row["usable"] for row in samples]) & scores.isfinite()  # (P, K)
    keep = (valid.sum(-1) >= args.min_valid).nonzero().squeeze(-1).tolist()  # prompts with enough usable responses
    if not keep:
        sys.exit(f"error: round {t}: no prompt has --min_valid {args.min_valid} usable responses of {args.num_samples} "
                 f"(see {path('samples.jsonl')}); raise --max_new_tokens or --max_length, or lower --min_valid")
    scores, lengths, valid = scores[keep].nan_to_num(0.0), lengths[keep], valid[keep]  # (P', K)
    if args.alpha is None:
        alpha, trace = search_alpha(scores, lengths, valid, args.alpha_step, args.alpha_max)
    else:
        alpha, trace = args.alpha, [(args.alpha, length_gap(scores, lengths, valid, args.alpha))]
    chosen, rejected = select_pairs(scores, lengths, valid, alpha)  # (P',), (P',)
    chosen_0, rejected_0 = select_pairs(scores, lengths, valid, 0.0)  # without the length term, for the log
    rows = [{"prompt": samples[i]["prompt"], "chosen": samples[i]["responses"][w], "rejected": samples[i]["responses"][l],
             "score_chosen": scores[j, w].item(), "score_rejected": scores[j, l].item(),
             "prompt_ids": samples[i]["prompt_ids"], "chosen_ids": samples[i]["response_ids"][w],
             "rejected_ids": samples[i]["response_ids"][l]}
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
        gold = [(toy.gold_reward(r["chosen"]) > toy.gold_reward(r["rejected"])) + 0.5 * (toy.gold_reward(r["chosen"]) == toy.gold_reward(r["rejected"]))
                for r in rows]
        stats["gold_agreement"] = sum(gold) / len(gold)
    if is_main() and not os.path.exists(path("train_pairs.jsonl")):
        with open(path("alpha.json"), "w") as f:
            json.dump({"alpha": alpha, "searched": args.alpha is None, "length_unit": args.length_unit,
                       "trace": [{"alpha": a, "length_gap": g} for a, g in trace]}, f, indent=1)
        write_jsonl(path("pairs.jsonl"), rows)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        write_jsonl(path("train_pairs.jsonl"), [{"source": source, "prompt": decode(p), "chosen": decode(c), "rejected": decode(r),
                                                 "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                                for source, part in (("generated", generated), ("offline", replayed))
                                                for p, c, r in part])
    seconds["alpha_and_pairs"] = time.time() - started
    return generated + replayed, stats


# ---------------------------------------------------------------- the run directory (TRY NOT TO MODIFY)
def check_output_dir(args):
    """Refuse, before anything is loaded or written, a directory this run may not use: a file, a read-only
    place, another run's files without --resume, or --resume where no run is. Returns the newest checkpoint
    to resume from, or None (a run killed before its first checkpoint restarts from step 0)."""
    directory = args.output_dir
    if directory and os.path.exists(directory) and not os.path.isdir(directory):
        sys.exit(f"error: --output_dir {directory} is a file")
    parent = directory if directory and os.path.isdir(directory) else os.path.dirname(os.path.abspath(directory or "runs"))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        sys.exit(f"error: --output_dir {directory}: cannot write in {parent}")
    if args.resume:
        if not os.path.exists(os.path.join(directory, "args.json")):
            sys.exit(f"error: --resume: no run to continue in {directory} (no args.json)")
        checkpoints = list_checkpoints(directory)
        return checkpoints[-1] if checkpoints else None
    if directory and os.path.isdir(directory) and os.listdir(directory):
        sys.exit(f"error: --output_dir {directory} already holds files (another run?); pass --resume to continue "
                 f"it, or choose another --output_dir")
    return None


def run_record(args, tokenizer):
    """What the checkpoints and the reference cache depend on: every flag, and the content of every input."""
    inputs = {name: fingerprint(getattr(args, name)) for name in ("model", "ref_model", "dataset", "eval_dataset")}
    vocabulary = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, tokenizer.eos_token])
    inputs["tokenizer"] = hashlib.sha256(vocabulary.encode()).hexdigest()
    flags = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "resume")}  # not the run's
    flags["processes"] = world_size()  # torchrun's ranks: part of the batch, so a resume needs as many
    return {"args": flags, "inputs": inputs}


def check_resume(args, record):
    """A resumed run must have the flags and inputs of the run it continues, except RESUME_MAY_CHANGE."""
    path = os.path.join(args.output_dir, "args.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        sys.exit(f"error: {path}: not the record of a run ({e})")
    for section, values in record.items():
        for name, value in values.items():
            if name not in RESUME_MAY_CHANGE and saved.get(section, {}).get(name) != value:
                what = "the number of processes" if name == "processes" else f"--{name}" if section == "args" else f"the content of --{name}"
                sys.exit(f"error: --resume: {what} differs from the run in {args.output_dir} ({saved.get(section, {}).get(name)!r} "
                         f"there, {value!r} here); a resumed run may change only --{', --'.join(RESUME_MAY_CHANGE)}")


def claim_output_dir(args, record):
    """Make the directory this run's alone: args.json is linked into place, which fails if another run got there
    first (then the default name takes a suffix; an explicit --output_dir is an error)."""
    base = args.output_dir or time.strftime(f"runs/{os.path.basename(__file__)[:-3]}-%Y%m%d-%H%M%S")
    for n in range(1000):
        directory = base if n == 0 else f"{base}-{n}"
        try:
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".args-{os.getpid()}.json")
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
            try:
                os.link(tmp, os.path.join(directory, "args.json"))  # atomic, and fails if the file exists
            finally:
                os.remove(tmp)
            args.output_dir = directory
            return directory
        except FileExistsError:
            if args.output_dir:
                sys.exit(f"error: --output_dir {directory} was just taken by another run; choose another --output_dir")
        except OSError as e:
            sys.exit(f"error: --output_dir {directory}: {e}")


# ---------------------------------------------------------------- checkpoints and metrics (TRY NOT TO MODIFY)
def save_checkpoint(directory, policy, tokenizer, optimizer, scheduler, step):
    """Write checkpoint-<step> into a temporary directory, then rename it, then delete the older ones: a kill at
    any instant leaves at least one complete checkpoint."""
    final = os.path.join(directory, f"checkpoint-{step}")
    if os.path.exists(final):
        return final
    model_state, optimizer_state = full_state(policy, optimizer)  # under torchrun: gathered on rank 0
    rng = gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),  # every rank's
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if not is_main():
        return final
    tmp = os.path.join(directory, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=model_state)  # safetensors
    tokenizer.save_pretrained(tmp)
    crash_point("checkpoint")
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "rng": rng}, os.path.join(tmp, "training_state.pt"))
    os.rename(tmp, final)
    for old in list_checkpoints(directory)[:-1]:  # keep only the newest
        shutil.rmtree(old)
    return final


def list_checkpoints(directory):
    found = [d for d in os.listdir(directory) if d.startswith("checkpoint-")] if os.path.isdir(directory) else []
    return [os.path.join(directory, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def restore(checkpoint, policy, optimizer, scheduler):
    """Optimizer, scheduler and random state of a checkpoint (each rank's own); returns its step."""
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
    optimizer_state = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False) if is_main() else {}
    load_optimizer_state(policy, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][this_rank()]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    print(f"resuming from {checkpoint} at step {state['step']}")
    return state["step"]


def finished(directory, start_step, max_steps):
    """The final model is written last, and its config.json last of all: present means the run completed."""
    return start_step >= max_steps and os.path.exists(os.path.join(directory, "config.json"))


def save_final(directory, policy, tokenizer):
    """The final model in the output directory itself (so --model <output_dir> works), config.json last."""
    model_state, _ = full_state(policy)  # under torchrun: gathered on rank 0
    if not is_main():
        return
    tmp = os.path.join(directory, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp), key=lambda name: name == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)
    print(f"saved the final model to {directory}")


def open_metrics(directory, start_step):
    """metrics.jsonl without what an interrupted run logged after its checkpoint; returns log(row), which puts
    each row on disk before it returns (under torchrun: rank 0's log; the others' does nothing)."""
    if not is_main():
        return lambda row: None
    path = os.path.join(directory, "metrics.jsonl")
    kept = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by a kill
                    row = json.loads(line)
                    kept += [line] if row["step"] <= start_step and "toy/gold_reward_after" not in row else []
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    metrics_file = open(path, "a")

    def log(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
    return log


def stop(message, directory):
    last = list_checkpoints(directory)
    raise SystemExit(f"error: {message}; stopping. Last good checkpoint: {last[-1] if last else 'none'}")


@contextlib.contextmanager
def interrupts(resume_command):
    """SIGINT (Ctrl-C) and SIGTERM: while `stop_after_step` is set, ask the loop to stop after this step
    (`requested`); otherwise, or a second time, stop at once. Either way the last line says how to continue."""
    state = {"stop_after_step": False, "requested": None}

    def handler(signum, frame):
        if state["stop_after_step"] and not state["requested"]:
            state["requested"] = signum
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)")
        else:
            raise KeyboardInterrupt
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    except KeyboardInterrupt:
        sys.exit(f"interrupted. {resume_command() or 'Nothing was written.'}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(args, argv):
    """'Continue with: <the command line that continues this run>', or None before the run has its directory."""
    if not args.output_dir or not os.path.exists(os.path.join(args.output_dir, "args.json")):
        return None
    command = [sys.argv[0], *sys.argv[1:]] if argv is None else [os.path.basename(__file__), *argv]
    command += [] if any(a.startswith(("--output_dir", "--output-dir")) for a in command) else ["--output_dir", args.output_dir]
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] if world_size() > 1 else ["python"]
    return "Continue with: " + shlex.join(launcher + command + ([] if "--resume" in command else ["--resume"]))


# ---------------------------------------------------------------- a DPO round
def train_round(args, directory, policy, train, held_out, record, tokenizer, device, signals, argv, toy_curve=None,
                first_row=None):
    """One round of DPO in `directory` from `policy`, pi^(t-1), which is also its reference: dpo.py's training
    loop. Returns the trained policy, the round's steps and how many of them this call ran. toy_curve(policy): the
    toy's figures, logged every --toy_eval_every steps; first_row: more to log in the step-0 row (the samples
    dropped for length)."""
    rank, world = this_rank(), world_size()
    pairs_per_step = args.batch_size * args.grad_accum * world  # each rank batch_size x grad_accum of them
    steps_per_epoch = len(train) // pairs_per_step
    if steps_per_epoch == 0:
        sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                 f"{pairs_per_step} pairs per step, but {directory} has only {len(train)} training pairs")
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    checkpoint = (list_checkpoints(directory) or [None])[-1]
    if checkpoint and not os.path.exists(os.path.join(directory, "reference_logps.pt")):
        sys.exit(f"error: {directory} has checkpoints but no reference_logps.pt; it cannot be resumed")
    # the reference pi^(t-1) is the initial policy: its log-probs, computed once and kept with the round
    cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, tokenizer.pad_token_id, device, directory)
    ref = lambda chunk, idx, split: cache[split][idx].to(device).unbind(-1)
    if checkpoint:
        policy = load_model(checkpoint, args.dtype, device, args.trust_remote_code)
        parallelize(policy, args)
    if args.gradient_checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # the name since transformers 5.x; the old one before

    # optimizer, linear warm-up then constant
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                      fused=True)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    start_step = restore(checkpoint, policy, optimizer, scheduler) if checkpoint else 0
    if finished(directory, start_step, max_steps):
        return policy, max_steps, 0

    # ---------------------------------------------------------------- the training loop
    log = open_metrics(directory, start_step)  # forgets what a killed run logged after its checkpoint
    if start_step == 0:
        log({"step": 0, **(first_row or {}), **evaluate(policy, held_out, cache["eval"], args, tokenizer.pad_token_id,
                                                          device)})
    policy.train()
    signals["stop_after_step"] = True  # from here Ctrl-C / SIGTERM finish the step and save first
    save_seconds = 3 * sum(p.numel() * p.element_size() for p in policy.parameters()) / 2e8  # a guess at 200 MB/s
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=os.path.basename(directory))
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
        indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()[rank::world]
        sums = {}
        for micro in range(args.grad_accum):
            idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
            sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
            chunk = [train[i] for i in idx]
            policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, tokenizer.pad_token_id, device)
            reference_chosen_logps, reference_rejected_logps = ref(chunk, idx, "train")
            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                                reference_chosen_logps, reference_rejected_logps,
                                                                args.beta, args.label_smoothing)
            (losses.mean() / args.grad_accum).backward()
            metrics = dpo_metrics(losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
            sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
        grad_norm = clip_grad_norm_(policy, args.max_grad_norm)
        values = mean_over_ranks(torch.stack([*sums.values(), grad_norm.float()])).tolist()  # one host sync
        row = dict(zip([*sums, "grad_norm"], values))
        if not all(map(math.isfinite, values)):
            stop(f"non-finite loss or gradient at step {step + 1} of {directory} ({row})", directory)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        crash_point("step")
        row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3), learning_rate=scheduler.get_last_lr()[0])
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == max_steps:
            row.update(evaluate(policy, held_out, cache["eval"], args, tokenizer.pad_token_id, device))
            tqdm.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}, "
                       f"accuracy {row['eval_rewards/accuracies']:.3f}, margin {row['eval_rewards/margins']:.3f}")
        if toy_curve and args.toy_eval_every and (step + 1) % args.toy_eval_every == 0 and step + 1 < max_steps:
            row.update({f"toy/{k}": v for k, v in toy_curve(policy).items()})
        log(row)
        requested, slow_save = agree(signals["requested"] or 0, save_seconds >= 10)  # the same on every rank
        if (step + 1) % args.save_every == 0 or step + 1 == max_steps or requested and not slow_save:
            started = time.time()
            save_checkpoint(directory, policy, tokenizer, optimizer, scheduler, step + 1)
            save_seconds = time.time() - started
        if requested:
            bar.close()
            print(f"stopped after step {step + 1}; newest checkpoint: "
                  f"{(list_checkpoints(directory) or ['none (a resume starts at step 0)'])[-1]}. "
                  f"{resume_command(args, argv) or ''}", file=sys.stderr)
            raise SystemExit(128 + int(requested))
    signals["stop_after_step"] = False
    save_final(directory, policy, tokenizer)  # last: its presence marks the round's training complete
    return policy, max_steps, max_steps - start_step


# ---------------------------------------------------------------- main
def parse_dice_args(argv=None):
    """parse_args, and what DICE adds: --model with no --dataset is a DPO model of the toy task (a dpo.py run's
    directory), trained further with the toy's settings unless a flag says otherwise; real data needs --ref_model."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.model and not args.dataset:
        given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
        args = dataclasses.replace(args, **{k: v for k, v in TOY_DEFAULTS.items() if k not in given})
    if args.dataset and not args.ref_model:
        sys.exit("error: --model needs --ref_model, the model it was DPO-trained against (round 1 scores with the two)")
    if args.min_valid > args.num_samples:
        sys.exit(f"error: --min_valid {args.min_valid} is more than --num_samples {args.num_samples}")
    return args


def run_round(t, args, models, offline, held_out, prompts, record, tokenizer, device, signals, argv, toy, toy_prompts):
    """Round t in <output_dir>/round_t (round 0: the DPO model pi^(0), trained here on the toy if --model is not
    given). Returns its summary and whether this call did any of its work."""
    directory = os.path.join(args.output_dir, f"round_{t}")
    path = os.path.join(directory, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if not summary["trained"] or summary["steps"] >= (args.max_steps or summary["steps"]):
            return summary, False  # done (with as many steps as asked for now)
    os.makedirs(directory, exist_ok=True)
    trains = t > 0 or args.model is None
    policy = load_model(models[t - 1] if trains else models[0], args.dtype, device, args.trust_remote_code)
    parallelize(policy, args)  # under torchrun: DDP or FSDP2; else nothing
    summary, seconds = {"round": t, "trained": trains}, {}
    train = offline
    if t > 0:
        train, stats = round_data(t, directory, policy, models, offline, prompts, args, tokenizer, device, toy, seconds)
        summary.update(stats)
    sft = load_model(models[-1], args.dtype, device).eval() if toy else None  # the toy's KL is to the SFT model
    toy_curve = (lambda p: toy.evaluate(p, sft, tokenizer, toy_prompts, seed=args.seed)) if toy else None
    if trains:
        started = time.time()
        settings = dataclasses.replace(args, learning_rate=args.round0_learning_rate) if t == 0 else args
        drops = {k: v for k, v in summary.items() if k.startswith("samples/")}  # deviation 6, in metrics.jsonl
        policy, summary["steps"], ran = train_round(settings, directory, policy, train, held_out, record, tokenizer,
                                                    device, signals, argv, toy_curve, drops)
        seconds["training"] = time.time() - started
        for later in os.listdir(args.output_dir) if ran and is_main() else []:  # built on an older pi^(t) (a resume)
            if later.startswith("round_") and int(later[6:]) > t:
                shutil.rmtree(os.path.join(args.output_dir, later))
    if toy:  # gold reward, length and KL to the SFT model of one sample per test prompt
        started = time.time()
        summary.update({f"toy/{k}": v for k, v in toy.evaluate(policy, sft, tokenizer, toy_prompts, seed=args.seed).items()})
        if t == 0:
            summary.update({f"toy/sft_{k}": v for k, v in toy.evaluate(sft, sft, tokenizer, toy_prompts, seed=args.seed).items()})
        seconds["toy_evaluation"] = time.time() - started
    summary["seconds"] = seconds
    on_rank_0(write_json, path, summary)  # last: the round is done
    print(f"round {t}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                     if k not in ("round", "seconds", "scored_with")))
    crash_point("round")
    return summary, True


def table(summaries):
    """The run by round: alpha*, mean length (chars or tokens) of chosen / rejected without and with the length
    term, how often the implicit reward's order agrees with gold, and the toy's gold reward, length, KL."""
    cell = lambda s, k, f: format(s[k], f) if k in s else "-"
    lines = ["round     alpha*   chosen/rejected length   (alpha = 0)   implicit = gold   gold reward   words    KL"]
    if summaries and "toy/sft_gold_reward" in summaries[0]:
        s = {k.replace("sft_", ""): v for k, v in summaries[0].items()}
        lines.append(f"SFT            -                        -             -                 -   "
                     f"{s['toy/gold_reward']:+11.3f} {s['toy/length']:8.1f} {s['toy/kl']:5.2f}")
    for s in summaries:
        lengths = (f"{s['chosen_length']:7.1f} / {s['rejected_length']:<7.1f}  ({s['chosen_length_alpha0']:.1f} / "
                   f"{s['rejected_length_alpha0']:.1f})") if "alpha" in s else "-"
        lines.append(f"{s['round']:<5} {cell(s, 'alpha', '10.4f'):>10}   {lengths:>36}   {cell(s, 'gold_agreement', '15.3f'):>15}   "
                     f"{cell(s, 'toy/gold_reward', '+11.3f'):>11} {cell(s, 'toy/length', '8.1f'):>8} {cell(s, 'toy/kl', '5.2f'):>5}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_dice_args(argv)  # every flag checked; nothing read or written yet
    rank, world, device = init_distributed(args)  # (0, 1, "cuda" or "cpu") unless under torchrun
    on_rank_0(check_output_dir, args)  # reads only; a DICE run keeps its checkpoints in its rounds' directories
    with interrupts(lambda: resume_command(args, argv)) as signals:
        toy, toy_prompts = None, None
        if args.dataset is None:  # the built-in toy task; its SFT model is pi^(-1)
            import toy
            toy_dir = toy.ensure_built()
            args.ref_model = args.ref_model or os.path.join(toy_dir, "sft")
            args.dataset = os.path.join(toy_dir, "train_pairs.jsonl")
            args.eval_dataset = args.eval_dataset or os.path.join(toy_dir, "test_pairs.jsonl")
            toy_prompts = toy.test_prompts(toy_dir)
        tokenizer = load_tokenizer(args.model or args.ref_model, args.trust_remote_code)
        train, held_out = load_data(args, tokenizer)
        pairs_per_step = args.batch_size * args.grad_accum * world
        if len(train) < pairs_per_step:
            sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                     f"{pairs_per_step} pairs per step, but {args.dataset} gives only {len(train)} training pairs")
        record = run_record(args, tokenizer)
        if args.resume:
            check_resume(args, record)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        from transformers import AutoConfig
        for name in (args.model, args.ref_model):  # loadable, checked before anything is written; weights load later
            if name:
                from_pretrained(AutoConfig, name, "a causal LM", trust_remote_code=args.trust_remote_code)
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record)

        # pi^(t): the reference of the DPO model, the DPO model (given, or round 0's), then each round's
        models = {-1: args.ref_model, 0: args.model or os.path.join(args.output_dir, "round_0"),
                  **{t: os.path.join(args.output_dir, f"round_{t}") for t in range(1, args.rounds + 1)}}
        prompts = [list(p) for p in dict.fromkeys(tuple(p) for p, _, _ in train)]  # distinct, in order
        summaries, worked = [], False
        with torch_threads(1 if toy else None):
            for t in range(0 if toy else 1, args.rounds + 1):
                summary, did = run_round(t, args, models, train, held_out, prompts, record, tokenizer, device, signals,
                                         argv, toy, toy_prompts)
                summaries.append(summary)
                worked |= did
        if worked or not os.path.exists(os.path.join(args.output_dir, "config.json")):
            save_final(args.output_dir, load_model(models[args.rounds], args.dtype, device, args.trust_remote_code),
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

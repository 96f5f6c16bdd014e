"""D2PO: Discriminator-Guided DPO with Response Evaluation Models (online DPO with a discriminator).
Singhal, Lambert, Niekum, Goyal, Durrett. 2024. https://arxiv.org/abs/2405.01511 (authors' code: PrasannS/d2po)

Gold preference labels (people, a strong judge, a program) are expensive and come in a budget. The policy keeps
sampling; a discriminator, a Bradley-Terry reward model trained on the gold labels so far, silver-labels the many
pairs that get no gold label, and the policy trains with DPO on both, against the fixed initial policy:

    y_a, y_b   ~ pi_theta(. | x)                                 two samples per prompt, temperature 1, no top-k/top-p
    s(x, y)    = r_phi(x, y)                                     silver score of every sample
    r_phi      : at the start, a reward model trained on a small gold set (--disc_model, or --disc_pretrain pairs)
    gold       : in each window, --gold_per_window pairs with the smallest |s_a - s_b| ("conf") or random ones,
                 until the window's gold is spent; a window lasts --window_pairs pairs, its gold steps included
    L_phi      = - mean log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))  on a window's gold pairs, once it is spent
    (y_w, y_l) = the gold order where a pair has one, else argmax / argmin of s (a tie: no DPO term)
    L_DPO      = - E[ log sigmoid(beta * h) ],  h = [log pi(y_w|x) - log pi_0(y_w|x)] - [log pi(y_l|x) - log pi_0(y_l|x)]

--labels picks what the policy trains on, so the paper's comparisons run from this file at the same gold budget:
d2po (gold + discriminator silver labels), gold (online DPO where every pair is gold-labelled until the budget
is spent), static (the starting discriminator, with --initial_gold if given, never updated), self (the policy's own
implicit reward beta * (log pi - log pi_0) as the discriminator; gold still overrides in windows).
--gold says who labels: toy (the toy task's noisy annotator of its gold reward), rm:<hub id or path> (a
sequence-classification reward model), human (a terminal prompt: 1 / 2 / t for a tie / s to skip; piped stdin works).

The paper's discriminator starts from a reward model already trained on a small gold set (the authors' tiny_rm,
trained on the same initial gold data as their starting policy). So does this file's: on the toy, by default, it
first learns the toy's 1,920 annotated training pairs (the toy annotator's labels, --disc_pretrain; `--disc_pretrain
none` is the fresh-head ablation); on a real model give --disc_model (a reward model, or a small LM to start from)
or --disc_pretrain with preference pairs; a run with neither says at its start that it begins from a fresh head.
Those starting labels are not charged to --gold_budget: the authors' gold-label axis counts only the labels asked
for online, and their starting models are the same for every method they compare (on the toy, unlike there, the
gold-only baseline's policy has not seen them: compare D2PO with a static discriminator for that).

Run:
    python d2po.py                                       # built-in toy task, CPU, a few minutes
    python d2po.py --labels gold                         # the same gold budget, online DPO on gold labels only
    python d2po.py --disc_pretrain none --initial_gold 32   # the ablation: the discriminator from a fresh head
    python d2po.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset trl-lib/ultrafeedback-prompt --output_dir out \\
        --gold rm:Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --disc_model Qwen/Qwen2.5-0.5B-Instruct --gold_budget 500
    python d2po.py --model M --dataset prompts.jsonl --gold human --gold_budget 200 --output_dir out
    python d2po.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 d2po.py <the same flags>    # several GPUs: as dpo.py; each rank samples its share
                                                            # of the step's prompts, rank 0 alone asks for gold

Every gold label is appended to <output_dir>/gold.jsonl and flushed the moment it arrives; a resumed run reuses
a label it has (found by the pair's tokens) and never asks for it again, and the budget counts what is on disk.
A run with --gold human ends cleanly, with its labels and a checkpoint saved, when stdin ends. args.json,
--resume, Ctrl-C and SIGTERM behave as in dpo.py; checkpoints also hold the discriminator and its optimizer.

The reference pi_0 for fresh samples: a frozen copy of the initial policy (or --ref_model), held in memory for the
whole run: one more set of weights (2 bytes a parameter in bf16), with no gradients and no optimizer state, so
about a quarter of what the trained policy needs with AdamW. Each step scores the step's samples with it once
(no grad), which also gives the implicit reward of --labels self. The discriminator is a third model with its
own AdamW (its weights, gradients and optimizer state; --disc_model can be much smaller than the policy).
The discriminator and a reward-model judge read a pair's two rows with their common beginning (the prompt) once
(`score_pairs`, `common.grouped_scores`); the judge labels a step's pairs in one batch.

Deviations from the paper and the authors' code:
1. One process: sampling, labelling, the discriminator and the policy update run in turn (the authors run two
   policy workers and a discriminator server). A window is --window_pairs pairs from its opening to the next
   window's, its gold steps included: the authors' SAMPN counts a window's texts, 256 by default, so 128 pairs, of
   which R = 16 are gold (1/8, the default here); a window's gold is taken from consecutive steps until spent.
2. Full fine-tuning with AdamW, and the DPO loss is the mean over a step's pairs (the authors: LoRA, Adam, the sum
   over a minibatch's pairs at lr 5e-5); --updates_per_step updates on them (their PPOUPDATES, 1 by default), each
   one an optimizer and scheduler step (so --warmup_steps counts updates).
3. The discriminator is a sequence classifier with one output, scored at the last non-padding token, trained in
   full (the authors: LoRA on a small reward model, input "Question: x\\n\\nAnswer: y"; here the prompt's and the
   response's tokens as the policy sees them). --disc_replay trains on all gold so far (the authors: the newest
   window only, the default). No gradient clipping of the discriminator, as the authors.
4. Pairs whose two samples are identical get no gold label and no DPO term (zero gradient), and so do pairs whose
   silver scores tie with no gold winner (the authors' argmax and argmin then pick one response twice). A gold tie
   is charged, gives no discriminator data and keeps the silver order (in --labels gold it drops the pair); a skip
   (human) is recorded and not charged.
5. The samples' length is free up to --max_new_tokens (the authors draw max_new_tokens near 50 and do not force
   EOS). Prompts are cut (their middle first) to leave --max_new_tokens of room within --max_length.
6. --labels self uses beta * (log pi - log pi_0) of the response tokens (the authors' code reverses prompt and
   response there and hard-codes the reference model).
7. The starting discriminator on the toy is the SFT model with a scalar head, trained for --disc_pretrain_epochs on
   the toy's annotated pairs (2 on the toy: held-out accuracy 0.77 against the annotator, 0.67 after 1) with an
   AdamW of its own; the online updates then use a fresh one (the authors: an
   OPT-125m-sized reward model with a new LoRA and a fresh AdamW; the size of their initial gold set is not
   recoverable from their code).
"""
import argparse
import contextlib
import copy
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

from common import (agree, check_rows, clip_grad_norm_, crash_point, disable_dropout, encode_prompt, encode_response,
                    fingerprint, from_pretrained, full_state, gather_objects, gather_shares, grouped_logps,
                    grouped_scores, init_distributed, is_main, load_model, load_model_state, load_optimizer_state,
                    load_rows, load_tokenizer, mean_over_ranks, my_share, on_rank_0, parallelize, prompt_head_length,
                    report_dropped, sample_responses, sync_gradients, this_rank, through_wrapper, truncate, world_size)


@dataclass
class Args:
    model: str = field(default=None, metadata={"help": "policy to train: hub id or local directory (default: the built-in toy model)"})
    ref_model: str = field(default=None, metadata={"help": "frozen reference model; default: a frozen copy of --model's initial weights"})
    dataset: str = field(default=None, metadata={"help": "prompts (a prompt column) or preference pairs (their prompts): hub name, .jsonl/.json/.parquet, or a save_to_disk folder (default: toy)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset to train on"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out preference data; default: hold out --eval_fraction of --dataset's pairs (none for prompts only)"})
    eval_fraction: float = field(default=0.02, metadata={"help": "fraction of --dataset's pairs held out when no --eval_dataset is given"})
    max_eval_pairs: int = field(default=512, metadata={"help": "at most this many held-out pairs are evaluated"})
    output_dir: str = field(default=None, metadata={"help": "where checkpoints, gold labels and metrics go (default: runs/d2po-<time>)"})
    max_steps: int = field(default=None, metadata={"help": "policy steps (default: --epochs over the prompts; --labels gold stops when the budget is spent)"})
    epochs: int = field(default=1, metadata={"help": "passes over the prompts, when --max_steps is not given"})
    batch_size: int = field(default=8, metadata={"help": "prompts (pairs) per micro-batch of the DPO update"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per step (authors: 16 prompts a step)"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate of the policy (authors: 5e-5 with LoRA)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps, then constant"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or rmsprop", "choices": ["adamw", "rmsprop"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm of the policy"})
    beta: float = field(default=0.05, metadata={"help": "KL strength beta (paper: 0.05)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing eps in [0, 0.5) (0 = plain DPO, as the paper)"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response; the prompt's middle is cut first"})
    max_prompt_length: int = field(default=None, metadata={"help": "a cut prompt keeps at least this many tokens (default max_length // 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt order, the sampling and everything random"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the held-out pairs every N steps"})
    save_every: int = field(default=500, metadata={"help": "write a checkpoint every N steps"})
    toy_eval_every: int = field(default=0, metadata={"help": "toy task only: every N steps also sample the test prompts and "
                                                             "log gold reward, length and KL, a training curve (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its newest checkpoint, reusing its gold labels"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU",
                                                 "choices": ["auto", "float32", "bfloat16", "float16"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})
    ddp: bool = field(default=False, metadata={"help": "under torchrun: a full copy of the model a process (default below 1B parameters)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: the model sharded over the processes with FSDP2 (default from 1B parameters)"})
    labels: str = field(default="d2po", metadata={"help": "what the policy trains on: gold + silver (d2po), gold only, a static discriminator, or its own implicit reward (self)",
                                                  "choices": ["d2po", "gold", "static", "self"]})
    gold: str = field(default=None, metadata={"help": "who gives gold labels: rm:<hub id or path> (a reward model), human (stdin), or toy (the toy's annotator, which knows only its sentiment words); needed with --model"})
    gold_budget: int = field(default=1000, metadata={"help": "gold labels in all, --initial_gold included, across resumes (ties are charged)"})
    gold_per_window: int = field(default=16, metadata={"help": "gold labels R per window (authors: 2-100)"})
    window_pairs: int = field(default=128, metadata={"help": "pairs from one window's opening to the next's, its gold steps included (authors' SAMPN: 256 texts)"})
    gold_select: str = field(default="conf", metadata={"help": "which pairs get gold: the least confident (smallest |s_a - s_b|) or random",
                                                       "choices": ["conf", "rand"]})
    initial_gold: int = field(default=0, metadata={"help": "gold-labelled pairs of the initial policy to train the discriminator on before step 1 (charged)"})
    disc_model: str = field(default=None, metadata={"help": "the discriminator's initial weights, a reward model as the paper's (default: --model's, with a fresh scalar head)"})
    disc_pretrain: str = field(default=None, metadata={"help": "preference pairs the discriminator learns before step 1, as the paper's starting reward model "
                                                               "(not charged; default: the toy's annotated pairs on the toy, else none; none: a fresh head)"})
    disc_pretrain_epochs: int = field(default=1, metadata={"help": "epochs over --disc_pretrain's pairs"})
    disc_learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the discriminator (authors: 1e-4 with LoRA)"})
    disc_epochs: int = field(default=4, metadata={"help": "epochs U over a window's gold pairs (authors: 2-8)"})
    disc_batch_size: int = field(default=16, metadata={"help": "gold pairs per discriminator step (authors: 16)"})
    disc_replay: bool = field(default=False, metadata={"help": "train the discriminator on all gold so far at each window, not the newest window only"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens a sampled response has"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (paper: 1)"})
    sample_batch_size: int = field(default=64, metadata={"help": "sequences per batch when sampling and scoring"})
    updates_per_step: int = field(default=1, metadata={"help": "policy updates on each step's pairs (authors' PPOUPDATES: 1; 1-8 in their gold-only baselines)"})


# The toy task: dpo.py's toy settings where they apply; used when --model is not given.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=6, eval_every=40,
                    save_every=100, max_length=128, max_new_tokens=64, sample_batch_size=256, gold_budget=256,
                    gold_per_window=16, disc_learning_rate=1e-4, disc_pretrain_epochs=2, gold="toy")
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
                  gold=(lambda v: v in ("toy", "human") or (v or "").startswith("rm:") and len(v) > 3,
                        "toy, human or rm:<hub id or path>, and given with --model"),
                  gold_budget=(lambda v: v >= 0, "0 or more"), gold_per_window=at_least_1, window_pairs=at_least_1,
                  initial_gold=(lambda v: v >= 0, "0 or more"), disc_learning_rate=positive, disc_epochs=at_least_1,
                  disc_pretrain_epochs=at_least_1,
                  disc_batch_size=at_least_1, max_new_tokens=at_least_1, temperature=positive, sample_batch_size=at_least_1,
                  updates_per_step=at_least_1)
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


# ---------------------------------------------------------------- ALGO LOGIC: the loss
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



# ---------------------------------------------------------------- ALGO LOGIC: the discriminator and the gold labels
def bradley_terry_loss(chosen_scores, rejected_scores):
    """Per-pair Bradley-Terry loss of the discriminator, - log sigmoid(r(x, y_w) - r(x, y_l)): (B,), (B,) -> (B,)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def order_accuracy(scores_a, scores_b, a_wins):
    """How often the scores order a pair as gold does (a score tie counts 1/2): (B,), (B,), (B,) bool -> float."""
    agree = torch.where(a_wins, scores_a > scores_b, scores_b > scores_a).float() + 0.5 * (scores_a == scores_b).float()
    return agree.mean().item()


def gold_candidates(margins, eligible, n, how, generator):
    """Which pairs of a step get gold labels: of the eligible ones, the n with the smallest |s_a - s_b| ("conf",
    ties in the order of the batch) or n random ones ("rand"). margins (P,) = s_a - s_b, eligible (P,) bool."""
    index = eligible.nonzero().squeeze(-1)  # (E,)
    if how == "conf":
        index = index[margins[index].abs().argsort(stable=True)]
    else:
        index = index[torch.randperm(len(index), generator=generator)]
    return index[:n].tolist()


def pair_order(margins, gold):
    """Index (0 for a, 1 for b) of y_w of each pair: the gold winner where the pair has one ("a" / "b" in `gold`, a
    dict pair -> label), else the higher silver score; None for a silver tie without a gold winner, which gets no
    DPO term (the authors' argmax and argmin pick the same response: h = 0 and no gradient). margins (P,) = s_a - s_b."""
    return [{"a": 0, "b": 1}.get(gold.get(i), 0 if m > 0 else 1 if m < 0 else None) for i, m in enumerate(margins.tolist())]


def dpo_pairs(margins, gold, eligible, gold_only=False):
    """The pairs of a step the policy trains on and the index of each one's y_w (0: y_a, 1: y_b), in the order of
    `pair_order`; no pair of identical samples (eligible (P,) bool), no silver tie without a gold winner, and with
    gold_only no pair without a gold winner. Returns (kept pair indices, their winners)."""
    winners = pair_order(margins, gold)
    keep = [i for i, win in enumerate(winners) if eligible[i] and win is not None
            and (not gold_only or gold.get(i) in ("a", "b"))]
    return keep, [winners[i] for i in keep]


@torch.no_grad()
def response_logps(model, groups, pad_token_id, device, batch_size):
    """(K,) summed log-probs of every response of the (prompt_ids, [response_ids, ...]) groups, in eval mode. Under
    torchrun each rank computes its share of the groups and every rank gets all (the groups' sizes must be equal)."""
    mine, out, was_training = [groups[i] for i in my_share(len(groups))], [torch.zeros(0)], model.training
    model.eval()
    per_batch = max(1, batch_size // max(len(r) for _, r in groups))
    for s in range(0, len(mine), per_batch):
        out.append(grouped_logps(model, mine[s:s + per_batch], pad_token_id, device)[0].float().cpu())
    model.train(was_training)
    return gather_shares(torch.cat(out), sum(len(r) for _, r in groups))


def scalar_scores(model, rows, pad_token_id, device):
    """r(x, y) of each token-id row from a sequence classifier with one output, at the row's last non-padding token
    (right padding; transformers' pooling takes the rightmost token that is not the pad token): (B,) fp32."""
    B, T = len(rows), max(map(len, rows))
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)], attention_mask[i, :len(row)] = torch.tensor(row), 1
    forward = lambda: model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return through_wrapper(model, forward)[:, 0].float()  # (B,); under torchrun inside the DDP/FSDP2 wrapper


def prefix_groups(row_pairs):
    """[(row_a, row_b)] -> [(their common beginning, [the rest of a, the rest of b])], each rest at least one token
    long (common.grouped_scores' groups); None if some pair's rows differ in their first token."""
    groups = []
    for a, b in row_pairs:
        n = 0
        while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
            n += 1
        if n == 0:
            return None
        groups.append((a[:n], [a[n:], b[n:]]))
    return groups


def pair_scores(model, row_pairs, pad_token_id, device, alone=False):
    """(B, 2) scores of [(row_a, row_b)] in one forward pass of the classifier, the pairs' common beginnings (their
    prompts) computed once (common.grouped_scores); row by row if some pair has none. With gradients if enabled."""
    groups = prefix_groups(row_pairs)
    if groups is None:
        return scalar_scores(model, [r for pair in row_pairs for r in pair], pad_token_id, device).view(-1, 2)
    return grouped_scores(model, groups, pad_token_id, device, alone).view(-1, 2)


@torch.no_grad()
def score_pairs(model, row_pairs, pad_token_id, device, batch_size, alone=False):
    """(P, 2) scores of [(row_a, row_b)] token-id rows (`pair_scores`), in eval mode, batch_size rows a forward pass.
    Under torchrun each rank scores its share of the pairs and every rank gets all; alone=True: this process
    scores them all by itself (the judge, which rank 0 asks alone)."""
    was_training, mine = model.training, row_pairs if alone else [row_pairs[i] for i in my_share(len(row_pairs))]
    model.eval()
    per = max(1, batch_size // 2)
    out = torch.cat([torch.zeros(0, 2)] + [pair_scores(model, mine[s:s + per], pad_token_id, device, alone).cpu()
                                           for s in range(0, len(mine), per)])
    model.train(was_training)
    return out if alone else gather_shares(out, len(row_pairs))


def train_discriminator(model, optimizer, pairs, args, pad_token_id, device, generator, epochs=None):
    """U epochs (--disc_epochs, or `epochs`) of the Bradley-Terry loss over `pairs` [(chosen_row, rejected_row)] in
    shuffled batches of --disc_batch_size, continuing from the model's and optimizer's state; returns the last
    epoch's mean loss."""
    model.train()
    for _ in range(epochs or args.disc_epochs):
        total = 0.0
        for batch in torch.randperm(len(pairs), generator=generator).split(args.disc_batch_size):
            scores = pair_scores(model, [pairs[i] for i in batch.tolist()], pad_token_id, device)  # (b, 2)
            loss = bradley_terry_loss(scores[:, 0], scores[:, 1]).mean()  # every rank the same batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    model.eval()
    return total / len(pairs)


class GoldLog:
    """<output_dir>/gold.jsonl: one line per gold label, appended and flushed to disk the moment it arrives. A label
    is found again by its pair's tokens; the budget counts the charged labels on disk (skips are free)."""

    def __init__(self, path):
        self.path, self.rows = path, {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                raw = f.read()
            complete = raw[:raw.rfind(b"\n") + 1]  # a line cut short by a kill is dropped: that label is asked again
            if len(complete) < len(raw):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for line in complete.decode().splitlines():
                row = json.loads(line)
                self.rows[row["key"]] = row
        self.charged = sum(row["label"] != "skip" for row in self.rows.values())
        self.file = open(path, "a")

    @staticmethod
    def key(prompt_ids, a_ids, b_ids):
        return hashlib.sha256(json.dumps([prompt_ids, a_ids, b_ids]).encode()).hexdigest()[:32]

    def get(self, key):
        return self.rows.get(key)

    def append(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.rows[row["key"]] = row
        self.charged += row["label"] != "skip"


class InputEnded(Exception):
    """The human labeller's stdin ended."""


def toy_gold(seed):
    """The toy task's annotator: a noisy Bradley-Terry judge of the toy's gold reward (76% agreement with it on the
    toy's pairs), drawn from a random stream of its own for each pair, so a label asked again is the same."""
    import toy

    def ask(pair):
        ga, gb = toy.gold_reward(pair["a"]), toy.gold_reward(pair["b"])
        rng = random.Random(f"{seed}/gold/{pair['key']}")
        return "a" if toy.annotate(ga, gb, len(pair["a"].split()), len(pair["b"].split()), rng) else "b"
    return ask


def reward_model_gold(name, args, device):
    """A Hugging Face sequence-classification reward model with one output as the judge: the higher score wins
    (equal scores are a tie). Chat prompts are rendered with its tokenizer's chat template. `ask.prepare(pairs)`
    scores a step's pairs in batches of --sample_batch_size rows; `ask(pair)` then returns the pair's verdict."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = from_pretrained(AutoConfig, name, "a reward model's config", trust_remote_code=args.trust_remote_code)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise SystemExit(f"error: --gold rm:{name}: not a sequence-classification reward model with one output "
                         f"(architectures {architectures}, num_labels {config.num_labels})")
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    model = from_pretrained(AutoModelForSequenceClassification, name, "a reward model", trust_remote_code=args.trust_remote_code,
                            dtype=torch_dtype(args.dtype, device)).to(device).eval()
    model.config.pad_token_id = tokenizer.pad_token_id

    def rows(pair):
        if isinstance(pair["raw_prompt"], list) and tokenizer.chat_template:
            texts = [tokenizer.apply_chat_template(pair["raw_prompt"] + [{"role": "assistant", "content": pair[k]}],
                                                   tokenize=False) for k in ("a", "b")]
            return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [tokenizer(pair["prompt"] + pair[k])["input_ids"] for k in ("a", "b")]

    verdicts = {}  # pair key -> "a", "b" or "tie", of the pairs prepared last

    def prepare(pairs):  # the judge runs on rank 0 alone
        scores = score_pairs(model, [rows(pair) for pair in pairs], tokenizer.pad_token_id, device,
                             args.sample_batch_size, alone=True).tolist()
        verdicts.clear()
        verdicts.update({pair["key"]: "a" if a > b else "b" if b > a else "tie" for pair, (a, b) in zip(pairs, scores)})

    def ask(pair):
        if pair["key"] not in verdicts:
            prepare([pair])
        return verdicts[pair["key"]]
    ask.prepare = prepare
    return ask


def human_gold(stdin=None, out=None):
    """A terminal prompt: shows the prompt and both responses, reads 1, 2, t (tie) or s (skip) from stdin (a pipe
    works); raises InputEnded when stdin ends."""
    def ask(pair):
        stream_in, stream_out = stdin or sys.stdin, out or sys.stderr
        stream_out.write(f"\n=== prompt\n{pair['prompt']}\n=== response 1\n{pair['a']}\n=== response 2\n{pair['b']}\n"
                         f"which is better? 1 / 2 / t (tie) / s (skip): ")
        stream_out.flush()
        while True:
            line = stream_in.readline()
            if not line:
                raise InputEnded
            answer = {"1": "a", "2": "b", "t": "tie", "s": "skip"}.get(line.strip().lower())
            if answer:
                return answer
            stream_out.write("please type 1, 2, t or s: ")
            stream_out.flush()
    return ask


def gold_on_rank_0(ask, log, pairs, budget, meta):
    """collect_gold on rank 0 alone (the only one that asks and writes gold.jsonl), its labels given to every rank;
    InputEnded on every rank when the labeller's stdin ended."""
    def ask_once():
        try:
            return collect_gold(ask, log, pairs, budget, meta)
        except InputEnded:
            return None
    result = on_rank_0(ask_once)
    if result is None:
        raise InputEnded
    return result


def collect_gold(ask, log, pairs, budget, meta):
    """Gold labels of `pairs` (dicts with key, prompt, a, b), in order: the one on disk if the pair has one, else
    asked and appended to the log at once, while the charged labels on disk stay within `budget`. Returns the
    labels of the pairs it could label (a prefix of `pairs`) and how many of them were asked now."""
    labels, asked = [], 0
    if hasattr(ask, "prepare"):  # a judge that labels many pairs at once (a reward model), each label charged
        todo = [pair for pair in pairs if log.get(pair["key"]) is None][:max(0, budget - log.charged)]
        if todo:
            ask.prepare(todo)
    for pair in pairs:
        row = log.get(pair["key"])
        if row is None:
            if log.charged >= budget:
                break
            label = ask(pair)  # may raise InputEnded
            crash_point("gold")  # a kill here loses this label, which was not charged: asked again on resume
            row = {"key": pair["key"], "label": label, **meta, "prompt": pair["prompt"], "response_a": pair["a"],
                   "response_b": pair["b"]}
            log.append(row)
            asked += 1
        labels.append(row["label"])
    return labels, asked


class TrainingState:
    """The policy's optimizer plus what else a D2PO checkpoint needs (the discriminator's weights and optimizer, the
    window bookkeeping): dpo.py's save_checkpoint and restore see it as one optimizer."""

    def __init__(self, policy, optimizer, discriminator, disc_optimizer, window):
        self.policy, self.optimizer, self.window = policy, optimizer, window
        self.discriminator, self.disc_optimizer = discriminator, disc_optimizer

    def state_dict(self):  # full states, keyed by name; under torchrun every rank calls it and rank 0's is saved
        disc, disc_optimizer = full_state(self.discriminator, self.disc_optimizer) if self.discriminator else (None, None)
        return {"policy": full_state(self.policy, self.optimizer, weights=False)[1], "window": copy.deepcopy(self.window),
                "discriminator": disc, "disc_optimizer": disc_optimizer}

    def load_state_dict(self, state):  # under torchrun only rank 0 has read `state`: the rest comes from there
        load_optimizer_state(self.policy, self.optimizer, state.get("policy"))
        self.window.clear()
        self.window.update(on_rank_0(lambda: state["window"]))
        if self.discriminator:
            load_model_state(self.discriminator, state.get("discriminator"))
            load_optimizer_state(self.discriminator, self.disc_optimizer, state.get("disc_optimizer"))


def new_window_state(args):
    """Window 1 opens at step 1; `seen` counts the pairs since the open window opened (its gold steps included)."""
    return {"number": 1, "open": True, "left": args.gold_per_window, "seen": 0, "pairs": [], "all_gold": [],
            "accuracies": [], "disc_loss": None, "gold_used": 0, "ended": False}


# ---------------------------------------------------------------- data
def load_pairs(source, tokenizer, args, split="train", rows=None):
    """Tokenised (prompt_ids, chosen_ids, rejected_ids) triples; unusable rows are dropped and counted."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split) if rows is None else rows
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
    """Training prompts [(prompt as given, prompt_ids)], distinct, each cut to leave --max_new_tokens of room; and
    held-out pairs: --eval_dataset, or --eval_fraction of --dataset's pairs (by a seeded shuffle) if it has pairs."""
    rows = load_rows(args.dataset, ["prompt"], args.dataset_split)  # a prompt column, or the prompts of pairs
    paired = bool(rows) and {"chosen", "rejected"} <= set(rows[0])
    if paired:
        check_rows(args.dataset, rows, ["prompt", "chosen", "rejected"])
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    usable = [i for i in order if paired and all(text(rows[i][k]).strip() for k in ("prompt", "chosen", "rejected"))
              and rows[i]["chosen"] != rows[i]["rejected"]]  # pairs that can be held out
    n_eval = 0 if args.eval_dataset or not usable else max(1, min(args.max_eval_pairs, int(len(rows) * args.eval_fraction)))
    held = set(usable[:n_eval])
    held_out = (load_pairs(args.eval_dataset, tokenizer, args, "test") if args.eval_dataset else
                load_pairs(args.dataset, tokenizer, args, rows=[rows[i] for i in usable[:n_eval]]) if n_eval else [])
    max_prompt_length = min(args.max_prompt_length or args.max_length // 2, args.max_length - args.max_new_tokens)
    dropped, prompts, seen, n_cut = {"empty prompt": [], "repeated prompt": []}, [], set(), 0
    for i in (i for i in range(len(rows)) if i not in held):
        prompt, key = rows[i]["prompt"], json.dumps(rows[i]["prompt"])
        if not text(prompt).strip():
            dropped["empty prompt"].append(i + 1)
        elif key in seen:
            dropped["repeated prompt"].append(i + 1)
        else:
            seen.add(key)
            ids = encode_prompt(tokenizer, prompt)
            ids, _, cut = truncate(ids, [[0] * args.max_new_tokens], args.max_length, max_prompt_length,
                                   prompt_head_length(tokenizer, prompt, ids))
            prompts.append((prompt, ids))
            n_cut += cut
    report_dropped(args.dataset, {k: v for k, v in dropped.items() if k != "repeated prompt"}, len(rows) - n_eval)
    if n_cut:
        print(f"{args.dataset}: cut {n_cut} of {len(prompts)} prompts to leave --max_new_tokens {args.max_new_tokens} "
              f"of --max_length {args.max_length}")
    print(f"{len(prompts)} distinct training prompts, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return prompts, held_out[:args.max_eval_pairs]



@torch.no_grad()
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


def evaluate(policy, pairs, reference_logps, args, pad_token_id, device):
    """Mean DPO metrics on held-out pairs, TRL's names with the eval_ prefix; the policy in eval mode."""
    policy_logps = all_pair_logps(policy, pairs, args, pad_token_id, device).unbind(-1)
    metrics = dpo_metrics(*dpo_loss(*policy_logps, *reference_logps.unbind(-1), args.beta, args.label_smoothing),
                          *policy_logps)
    return {f"eval_{k}": v.item() for k, v in metrics.items()}


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


# ---------------------------------------------------------------- models, sampling
def torch_dtype(name, device):
    """common.load_model's choice: bf16 on a CUDA device that has it, fp32 elsewhere, unless --dtype says otherwise."""
    if name == "auto":
        name = "bfloat16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return getattr(torch, name)


def load_discriminator(args, device):
    """The discriminator r_phi: --disc_model (default --model) as a sequence classifier with one output, a fresh
    scalar head on a causal LM's weights; dropout off. Returns it and its tokenizer."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    name = args.disc_model or args.model
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights (the score head) are newly initialized": expected here
    try:
        model = from_pretrained(AutoModelForSequenceClassification, name, "a sequence classifier (the discriminator)",
                                num_labels=1, dtype=torch_dtype(args.dtype, device), trust_remote_code=args.trust_remote_code)
    finally:
        logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model).to(device).eval(), tokenizer


def sample_pairs(policy, tokenizer, prompt_ids, args, seed):
    """Two samples y_a, y_b of the policy for each prompt, batched with the KV cache, from a seed of the step's own.
    Under torchrun each rank samples its share of the prompts (its own seed) and every rank gets all samples."""
    mine = [prompt_ids[i] for i in my_share(len(prompt_ids))]
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed * world_size() + this_rank())
        responses = sample_responses(policy, tokenizer, mine + mine, args.max_new_tokens, args.temperature,
                                     args.sample_batch_size)
    crash_point("sample")
    pairs = gather_shares(list(zip(responses[:len(mine)], responses[len(mine):])), len(prompt_ids))
    return [a for a, _ in pairs], [b for _, b in pairs]


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


def pretrain_discriminator(discriminator, pairs, held_out, to_disc, args, pad_token_id, device):
    """The paper's starting discriminator (the authors' tiny_rm, a reward model trained on a small initial gold set):
    --disc_pretrain_epochs of the Bradley-Terry loss on `pairs` [(chosen_row, rejected_row)] with an AdamW of its
    own, before step 1. Its labels are not charged to --gold_budget, as the authors' plots count only the labels
    collected online. Returns what it logs: the pairs, the last epoch's loss, held-out order accuracy."""
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.disc_learning_rate)
    loss = train_discriminator(discriminator, optimizer, pairs, args, pad_token_id, device,
                               torch.Generator().manual_seed(args.seed), epochs=args.disc_pretrain_epochs)
    if not math.isfinite(loss):
        raise SystemExit(f"error: the discriminator's loss is {loss} after pretraining on {args.disc_pretrain}")
    logged = {"disc/pretrain_pairs": len(pairs), "disc/pretrain_loss": loss}
    if held_out:
        scores = score_pairs(discriminator, [(to_disc(p, c), to_disc(p, r)) for p, c, r in held_out], pad_token_id,
                             device, args.sample_batch_size)  # (n, 2)
        logged["disc/pretrain_eval_accuracy"] = order_accuracy(scores[:, 0], scores[:, 1],
                                                               torch.ones(len(held_out), dtype=torch.bool))
    tqdm.write(f"discriminator: {args.disc_pretrain_epochs} epoch(s) on {len(pairs)} pairs of {args.disc_pretrain} "
               f"before step 1 (loss {loss:.3f}" + (f", held-out accuracy {logged['disc/pretrain_eval_accuracy']:.3f}"
                                                    if held_out else "") + "; not charged to the gold budget)")
    return logged


def close_window(w, args, discriminator, disc_optimizer, pad_token_id, device):
    """A window's gold is spent: the discriminator's accuracy on it (with the scores it had when the pairs were
    labelled, so before training on them), then, for --labels d2po, U epochs on it (or on all gold, --disc_replay)."""
    if w["pairs"]:
        w["accuracies"].append(order_accuracy(torch.tensor([p["score_chosen"] for p in w["pairs"]]),
                                              torch.tensor([p["score_rejected"] for p in w["pairs"]]),
                                              torch.ones(len(w["pairs"]), dtype=torch.bool)))
        if discriminator is not None:
            w["all_gold"] += [(p["chosen"], p["rejected"]) for p in w["pairs"]] if args.disc_replay else []
            data = w["all_gold"] if args.disc_replay else [(p["chosen"], p["rejected"]) for p in w["pairs"]]
            generator = torch.Generator().manual_seed(args.seed * 1000 + w["number"])
            w["disc_loss"] = train_discriminator(discriminator, disc_optimizer, data, args, pad_token_id, device, generator)
            if not math.isfinite(w["disc_loss"]):
                raise SystemExit(f"error: the discriminator's loss is {w['disc_loss']} after window {w['number']}")
    w.update(pairs=[], open=False, left=0, number=w["number"] + 1)


def check_flags(args):
    """D2PO's checks of flags that depend on each other, before anything is read. A default that depends on other
    flags follows from them (no starting discriminator where there is none), and an error names what was given."""
    if args.max_new_tokens >= args.max_length:
        sys.exit(f"error: --max_new_tokens {args.max_new_tokens} must be less than --max_length {args.max_length}")
    has_discriminator = args.labels in ("d2po", "static")
    for name in ("initial_gold", "disc_pretrain", "disc_model"):
        if getattr(args, name) not in (None, 0, "none") and not has_discriminator:
            sys.exit(f"error: --{name} is for the discriminator, which --labels {args.labels} does not have")
    if args.disc_pretrain is None:  # the paper's starting point where the toy has one: a reward model on its pairs
        args.disc_pretrain = "toy" if args.model is None and has_discriminator and not args.disc_model else "none"
    if args.labels == "static" and not (args.initial_gold or args.disc_model or args.disc_pretrain != "none"):
        sys.exit("error: --labels static needs a trained discriminator: --initial_gold N, --disc_pretrain or "
                 "--disc_model (its discriminator is never updated)")
    if args.initial_gold > args.gold_budget:
        sys.exit(f"error: --initial_gold {args.initial_gold} is more than the gold budget ({args.gold_budget})")


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    check_flags(args)  # D2PO's own, and the defaults that follow from other flags
    rank, world, device = init_distributed(args)  # (0, 1, "cuda" or "cpu") unless under torchrun
    checkpoint = on_rank_0(check_output_dir, args)  # reads only
    with interrupts(lambda: resume_command(args, argv)) as signals:
        toy = None
        if args.model is None:  # the built-in toy task
            import toy
            toy_dir = toy.ensure_built()
            args.model, args.dataset = os.path.join(toy_dir, "sft"), os.path.join(toy_dir, "train_pairs.jsonl")
            args.eval_dataset = args.eval_dataset or os.path.join(toy_dir, "test_pairs.jsonl")
            if args.disc_pretrain == "toy":  # the toy's annotated pairs (the annotator's labels, as gold's)
                args.disc_pretrain = os.path.join(toy_dir, "train_pairs.jsonl")
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        prompts, held_out = load_data(args, tokenizer)
        prompts_per_step = args.batch_size * args.grad_accum * world  # each rank samples batch_size x grad_accum
        steps_per_epoch = len(prompts) // prompts_per_step
        if steps_per_epoch == 0:
            sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                     f"{prompts_per_step} prompts per step, but {args.dataset} gives only {len(prompts)} distinct "
                     f"training prompts")
        max_steps = args.max_steps or args.epochs * steps_per_epoch
        record = run_record(args, tokenizer)
        record["inputs"].update(disc_model=fingerprint(args.disc_model),
                                disc_pretrain=None if args.disc_pretrain == "none" else fingerprint(args.disc_pretrain),
                                gold=fingerprint(args.gold[3:]) if args.gold.startswith("rm:") else args.gold)
        if args.resume:
            check_resume(args, record)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        policy = load_model(checkpoint or args.model, args.dtype, device, args.trust_remote_code)
        if args.gradient_checkpointing:
            enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
            enable({"use_reentrant": False})  # the name since transformers 5.x; the old one before
        parallelize(policy, args)  # under torchrun: DDP or FSDP2; else nothing
        # pi_0 for the fresh samples: a frozen copy of the initial weights (see the docstring for its memory)
        reference = load_model(args.ref_model or args.model, args.dtype, device, args.trust_remote_code)
        reference.eval().requires_grad_(False)
        parallelize(reference, args, trainable=False)
        discriminator = disc_tokenizer = disc_optimizer = None
        disc_pretrain_pairs = []  # the starting reward model's data (--disc_pretrain), none when resumed
        if args.labels in ("d2po", "static"):
            discriminator, disc_tokenizer = load_discriminator(args, device)
            parallelize(discriminator, args)
            disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.disc_learning_rate)
            if not args.disc_model and args.disc_pretrain == "none":
                print(f"the discriminator starts from {args.model} with a fresh scalar head; the paper starts it from "
                      f"a reward model trained on a small gold set (--disc_model, or --disc_pretrain pairs)")
            disc_pretrain_pairs = [] if args.disc_pretrain == "none" or checkpoint else \
                load_pairs(args.disc_pretrain, tokenizer, args, args.dataset_split)
        ask = None if not is_main() else (  # the gold labeller lives on rank 0
            toy_gold(args.seed) if args.gold == "toy" else human_gold() if args.gold == "human" else
            reward_model_gold(args.gold[3:], args, device))
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record)
        held_out_ref = all_pair_logps(reference, held_out, args, tokenizer.pad_token_id, device) if held_out else None
        same_vocab = disc_tokenizer is None or disc_tokenizer.get_vocab() == tokenizer.get_vocab()
        to_disc = lambda p, r: ((p + r) if same_vocab else disc_tokenizer(tokenizer.decode(p + r))["input_ids"])[-args.max_length:]
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        disc_pad = disc_tokenizer.pad_token_id if disc_tokenizer else None

        # optimizer, linear warm-up then constant
        if args.optimizer == "adamw":
            optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                          fused=True)  # one kernel per step: 1.1-1.2x faster steps at vocab 128k (bench/)
        else:
            optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
        window = new_window_state(args)
        state = TrainingState(policy, optimizer, discriminator, disc_optimizer, window)  # saved, restored as "the optimizer"
        start_step = restore(checkpoint, policy, state, scheduler) if checkpoint else 0
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return
        if args.labels == "gold" and window["gold_used"] >= args.gold_budget and finished(args.output_dir, 0, 0):
            print(f"{args.output_dir}: this run is complete (its gold budget was spent at step {start_step}); nothing to do")
            return
        gold_log = GoldLog(os.path.join(args.output_dir, "gold.jsonl")) if is_main() else None  # rank 0 writes it

        def pair_items(batch, responses_a, responses_b):
            return [dict(key=GoldLog.key(ids, a, b), prompt=decode(ids), a=decode(a), b=decode(b), raw_prompt=raw)
                    for (raw, ids), a, b in zip(batch, responses_a, responses_b)]

        step, pretrained = start_step, {}
        try:
            with torch_threads(1 if toy else None):
                if toy:  # the toy's gold reward, length and KL of samples before training
                    toy_prompts = toy.test_prompts(toy_dir)
                    before = toy.evaluate(reference, reference, tokenizer, toy_prompts, seed=args.seed)

                if discriminator is not None and disc_pretrain_pairs:  # the starting reward model, before step 1
                    pretrained = pretrain_discriminator(discriminator, [(to_disc(p, c), to_disc(p, r)) for p, c, r in
                                                                        disc_pretrain_pairs], held_out, to_disc, args,
                                                        disc_pad, device)

                if args.initial_gold and not checkpoint:  # gold labels of the initial policy's samples, before step 1
                    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
                    batch = [prompts[order[i % len(prompts)]] for i in range(args.initial_gold)]
                    responses_a, responses_b = sample_pairs(reference, tokenizer, [ids for _, ids in batch], args, args.seed * 1000003)
                    items = [item for item, a, b in zip(pair_items(batch, responses_a, responses_b), responses_a, responses_b) if a != b]
                    labels, _ = gold_on_rank_0(ask, gold_log, items, args.gold_budget, {"step": 0, "window": 0})
                    window["gold_used"] = sum(label != "skip" for label in labels)
                    rows = [(to_disc(ids, a), to_disc(ids, b)) for (_, ids), a, b in zip(batch, responses_a, responses_b) if a != b]
                    scores = score_pairs(discriminator, rows, disc_pad, device, args.sample_batch_size)  # (n, 2)
                    window.update(pairs=[{"chosen": rows[i][label == "b"], "rejected": rows[i][label == "a"],
                                          "score_chosen": scores[i, int(label == "b")].item(),
                                          "score_rejected": scores[i, int(label == "a")].item()}
                                         for i, label in enumerate(labels) if label in ("a", "b")], number=0)
                    close_window(window, args, discriminator, disc_optimizer, disc_pad, device)  # window 0
                    window.update(open=args.labels == "d2po", left=args.gold_per_window)

                # ---------------------------------------------------------------- the training loop
                log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
                if start_step == 0 and (held_out or pretrained):
                    log({"step": 0, **pretrained,
                         **(evaluate(policy, held_out, held_out_ref, args, tokenizer.pad_token_id, device) if held_out else {})})
                policy.train()
                signals["stop_after_step"] = True  # from here Ctrl-C / SIGTERM finish the step and save first
                save_seconds = 3 * sum(p.numel() * p.element_size() for p in policy.parameters()) / 2e8  # a guess at 200 MB/s
                bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=f"d2po ({args.labels})")
                for step in bar:
                    epoch, position = divmod(step, steps_per_epoch)  # the prompts follow from the step: resumable
                    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
                    batch = [prompts[i] for i in order[position * prompts_per_step:(position + 1) * prompts_per_step].tolist()]
                    responses_a, responses_b = sample_pairs(policy, tokenizer, [ids for _, ids in batch], args,
                                                            args.seed * 1000003 + step + 1)
                    groups = [(ids, [a, b]) for (_, ids), a, b in zip(batch, responses_a, responses_b)]
                    reference_logps = response_logps(reference, groups, tokenizer.pad_token_id, device,
                                                     args.sample_batch_size).view(-1, 2)  # (P, 2) log pi_0 of y_a, y_b
                    crash_point("reference")
                    items = pair_items(batch, responses_a, responses_b)
                    eligible = torch.tensor([a != b for a, b in zip(responses_a, responses_b)])  # (P,)

                    # silver scores s(x, y_a), s(x, y_b): the discriminator, or the policy's implicit reward
                    if discriminator is not None:
                        rows = [(to_disc(ids, a), to_disc(ids, b)) for ids, (a, b) in groups]
                        scores = score_pairs(discriminator, rows, disc_pad, device, args.sample_batch_size)  # (P, 2)
                    elif args.labels == "self":
                        scores = args.beta * (response_logps(policy, groups, tokenizer.pad_token_id, device,
                                                             args.sample_batch_size).view(-1, 2) - reference_logps)  # (P, 2)
                    else:
                        scores = torch.zeros(len(batch), 2)
                    margins = scores[:, 0] - scores[:, 1]  # (P,)

                    # gold labels: in windows on the least confident pairs (gold: every pair) while the budget lasts
                    w = copy.deepcopy(window)  # the step's bookkeeping, committed when the step is done
                    if args.labels in ("d2po", "self") and not w["open"] and w["seen"] >= args.window_pairs \
                            and w["gold_used"] < args.gold_budget:  # the next window: --window_pairs after the last
                        w.update(open=True, left=args.gold_per_window, seen=0)
                    was_open, gold = w["open"] and args.labels in ("d2po", "self"), {}
                    if args.labels == "gold" or was_open:
                        n = len(batch) if args.labels == "gold" else w["left"]
                        chosen = gold_candidates(margins, eligible, n, args.gold_select if args.labels != "gold" else "conf",
                                                 torch.Generator().manual_seed(args.seed * 1000003 + step + 1))
                        labels, _ = gold_on_rank_0(ask, gold_log, [items[i] for i in chosen], args.gold_budget,
                                                   {"step": step + 1, "window": w["number"] if was_open else None})
                        gold = dict(zip(chosen, labels))
                        charged = sum(label != "skip" for label in labels)
                        w["gold_used"] += charged
                        if was_open:
                            w["left"] -= charged
                            for i, label in gold.items():
                                if label in ("a", "b"):
                                    win = int(label == "b")
                                    w["pairs"].append({"chosen": to_disc(groups[i][0], groups[i][1][win]) if discriminator else None,
                                                       "rejected": to_disc(groups[i][0], groups[i][1][1 - win]) if discriminator else None,
                                                       "score_chosen": scores[i, win].item(), "score_rejected": scores[i, 1 - win].item()})
                            if w["left"] <= 0 or len(labels) < len(chosen) or w["gold_used"] >= args.gold_budget:
                                close_window(w, args, discriminator if args.labels == "d2po" else None, disc_optimizer, disc_pad, device)
                    if args.labels in ("d2po", "self"):
                        w["seen"] += len(batch)  # the authors count a window's texts, two a pair, gold steps included
                    if args.labels == "gold" and not any(label in ("a", "b") for label in gold.values()) \
                            and w["gold_used"] >= args.gold_budget:
                        if step > 0:
                            save_checkpoint(args.output_dir, policy, tokenizer, state, scheduler, step)
                        tqdm.write(f"the gold budget ({args.gold_budget}) is spent: online DPO on gold labels stops after step {step}")
                        max_steps = step
                        break

                    # the step's pairs: the gold order where there is one, else the silver order
                    keep, winners = dpo_pairs(margins, gold, eligible, gold_only=args.labels == "gold")
                    step_pairs = [(groups[i][0], groups[i][1][win], groups[i][1][1 - win]) for i, win in zip(keep, winners)]
                    kept, first = torch.tensor(keep, dtype=torch.long), torch.tensor(winners, dtype=torch.long)
                    step_reference = torch.stack([reference_logps[kept, first], reference_logps[kept, 1 - first]], -1)  # (n, 2)
                    n_gold = sum(gold.get(i) in ("a", "b") for i in keep)

                    # DPO updates on the step's pairs against the fixed pi_0 (mean over the pairs: deviation 2); under
                    # torchrun each rank takes its share (weight 0 on the repeats that even the shares out)
                    share, weights = my_share(len(step_pairs), weights=True)
                    for update in range(args.updates_per_step):
                        sums = {}
                        for s in range(0, len(share), args.batch_size):
                            chunk, weight = [step_pairs[i] for i in share[s:s + args.batch_size]], weights[s:s + args.batch_size]
                            policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, tokenizer.pad_token_id, device)
                            reference_chosen_logps, reference_rejected_logps = step_reference[share[s:s + args.batch_size]].to(device).unbind(-1)
                            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                                                reference_chosen_logps, reference_rejected_logps,
                                                                                args.beta, args.label_smoothing)
                            sync_gradients(policy, s + args.batch_size >= len(share))  # under torchrun: once an update
                            ((losses * weight.to(device)).sum() * world / len(step_pairs)).backward()  # x world: ranks average
                            real = weight.nonzero().squeeze(-1)  # (n,) on the host: the rank's own pairs, not repeats
                            pick = lambda t: t if len(real) in (0, len(chunk)) else t.index_select(0, real.to(t.device))
                            metrics = dpo_metrics(*map(pick, (losses.detach(), chosen_rewards, rejected_rewards,
                                                              policy_chosen_logps, policy_rejected_logps)))
                            sums = {k: sums.get(k, 0) + v * len(real) / len(step_pairs) for k, v in metrics.items()}
                        grad_norm = clip_grad_norm_(policy, args.max_grad_norm)
                        summed = mean_over_ranks(torch.stack([*sums.values()])) * world if sums else grad_norm.new_zeros(0)
                        values = torch.cat([summed.float(), grad_norm.float()[None]]).tolist()  # the update's one host sync
                        if update == 0:
                            row = dict(zip([*sums, "grad_norm"], values))  # the first update's: on the samples' policy
                        if not all(map(math.isfinite, values)):
                            stop(f"non-finite loss or gradient at step {step + 1} ({dict(zip([*sums, 'grad_norm'], values))})",
                                 args.output_dir)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    window.clear()
                    window.update(w)  # the step is done
                    crash_point("step")
                    row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3), learning_rate=scheduler.get_last_lr()[0])
                    row.update({"gold/used": w["gold_used"], "gold/pairs": n_gold, "silver/pairs": len(keep) - n_gold,
                                "disc/accuracy": (w["accuracies"] or [None])[-1], "disc/loss": w["disc_loss"],
                                "window": w["number"]})
                    if args.gold == "toy":  # the gold program: the step's mean gold reward, how often silver orders as it does
                        rewards = torch.tensor([[toy_reward(item[k]) for k in ("a", "b")] for item in items])  # (P, 2)
                        row["gold/reward"] = rewards.mean().item()
                        differ = eligible & (rewards[:, 0] != rewards[:, 1])  # (P,)
                        if args.labels != "gold" and differ.any():
                            row["silver/agreement"] = order_accuracy(scores[differ, 0], scores[differ, 1],
                                                                     rewards[differ, 0] > rewards[differ, 1])
                    bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", gold=w["gold_used"],
                                    disc_acc=f"{(w['accuracies'] or [math.nan])[-1]:.2f}")
                    if held_out and ((step + 1) % args.eval_every == 0 or step + 1 == max_steps):
                        row.update(evaluate(policy, held_out, held_out_ref, args, tokenizer.pad_token_id, device))
                        tqdm.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}, "
                                   f"accuracy {row['eval_rewards/accuracies']:.3f}, margin {row['eval_rewards/margins']:.3f}")
                    if toy and args.toy_eval_every and (step + 1) % args.toy_eval_every == 0 and step + 1 < max_steps:
                        row.update({f"toy/{k}": v for k, v in toy.evaluate(policy, reference, tokenizer, toy_prompts,
                                                                              seed=args.seed).items()})
                    log(row)
                    requested, slow_save = agree(signals["requested"] or 0, save_seconds >= 10)  # the same on every rank
                    if (step + 1) % args.save_every == 0 or step + 1 == max_steps or requested and not slow_save:
                        started = time.time()
                        save_checkpoint(args.output_dir, policy, tokenizer, state, scheduler, step + 1)
                        save_seconds = time.time() - started
                    if requested:
                        bar.close()
                        print(f"stopped after step {step + 1}; newest checkpoint: "
                              f"{(list_checkpoints(args.output_dir) or ['none (a resume starts at step 0)'])[-1]}. "
                              f"{resume_command(args, argv) or ''}", file=sys.stderr)
                        raise SystemExit(128 + int(requested))
                signals["stop_after_step"] = False

                if toy:
                    after = toy.evaluate(policy, reference, tokenizer, toy_prompts, seed=args.seed)
                    log({"step": max_steps, **{f"toy/{k}_before": v for k, v in before.items()},
                         **{f"toy/{k}_after": v for k, v in after.items()}})
                    print(f"toy task, {len(toy_prompts)} test prompts, one sample each:\n"
                          f"  gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}   "
                          f"length {before['length']:.1f} -> {after['length']:.1f} words   "
                          f"KL(policy || reference) {before['kl']:.2f} -> {after['kl']:.2f} nats")
        except InputEnded:  # the human labeller's stdin ended: keep the finished steps and every label, and stop
            signals["stop_after_step"] = False
            if step > start_step:
                save_checkpoint(args.output_dir, policy, tokenizer, state, scheduler, step)
            if is_main():
                print(f"\nstdin ended: {gold_log.charged} gold labels are in {gold_log.path}; the run stopped after step "
                      f"{step}. {resume_command(args, argv) or ''}", file=sys.stderr)
            return
        accuracies, on_disk = window["accuracies"], f"{gold_log.charged} in {gold_log.path}" if is_main() else ""
        print(f"gold labels: {window['gold_used']} used of --gold_budget {args.gold_budget} ({on_disk})" + (f"; discriminator accuracy against gold on each new window, before training on it: "
                                     f"{accuracies[0]:.2f} (first) -> {accuracies[-1]:.2f} (newest), mean "
                                     f"{sum(accuracies) / len(accuracies):.2f} over {len(accuracies)} windows" if accuracies else ""))
        if discriminator is not None:
            disc_state, _ = full_state(discriminator)  # under torchrun: gathered on rank 0
            if is_main():
                discriminator.save_pretrained(os.path.join(args.output_dir, "discriminator"), state_dict=disc_state)
                disc_tokenizer.save_pretrained(os.path.join(args.output_dir, "discriminator"))
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


def toy_reward(text):
    import toy
    return toy.gold_reward(text)


if __name__ == "__main__":
    main()

"""Distilled DPO: Robust Preference Optimization through Reward Model Distillation.
Fisch, Eisenstein, Zayats, Agarwal, Beirami, Nagpal, Shaw, Berant. TMLR 2025. https://arxiv.org/abs/2405.19316
(no public code)

DPO's loss on one label per pair is minimised by implicit margins that grow without bound. Distillation instead
regresses the policy's implicit reward margin onto an explicit reward model's, a finite target:

    u(x, y)   = log pi(y|x) - log pi_ref(y|x)                     (summed over tokens)
    m         = beta * (u(x, y_1) - u(x, y_2))                    the implicit reward margin of a pair
    Delta_k   = r_k(x, y_1) - r_k(x, y_2)                         teacher k's margin, calibrated (below)
    distill:          L = E[ (Delta_1 - m)^2 ]                                        (one reward model, d-DPO)
    ensemble:         L = min_k E_batch[ (Delta_k - m)^2 ]                            (e-DPO, K reward models)
    pessimistic_dpo:  L = - E[ log sigmoid(m) ] + gamma * E_x KL(pi_ref || pi)        (p-DPO)
    dpo:              L = - E[ log sigmoid(m) ]                                        (the baseline, dpo.py's loss)
    KL(pi_ref || pi) = E_{y ~ pi_ref}[ log pi_ref(y|x) - log pi(y|x) ]   on samples drawn once from pi_ref
    teachers (Bradley-Terry):  L_RM = - E[ log sigmoid(r(x, y_w) - r(x, y_l)) ]

Three stages, each written once into --output_dir and skipped by --resume:
  1. teachers: --num_reward_models K reward models (AutoModelForSequenceClassification, one output, initialised
     from the policy's model or --reward_model_init), each on a bootstrap resample of the training pairs with a
     seed of its own, saved with save_pretrained in reward_model_<k>/ (a kill inside one retrains that one);
     or given ones (--reward_models a,b,...); or precomputed margins r(chosen) - r(rejected) (--margin_column c,...).
  2. margins.pt: every training and held-out pair's margin under every teacher, raw and calibrated; teachers.json
     with each teacher's held-out accuracy (on its out-of-bag pairs; on the held-out pairs).
  3. the policy: reference_logps.pt (and reference_samples.pt for the forward KL), then training as dpo.py.

Calibration (--calibration temperature, the default): teacher k's margins are divided by the temperature tau_k that
minimises -E log sigmoid(Delta / tau_k) on pairs it was not trained on (its out-of-bag pairs; a given teacher: all
training pairs), so sigmoid(Delta_k) is its calibrated probability that y_1 is preferred. Why: a Bradley-Terry
model's scale is set only by how far its training went (an overfit one has margins of +-10 or more), while the
target m = beta (u_1 - u_2) is in the same log-odds units as DPO's implicit reward: once calibrated, beta means
what it means in DPO, and the minimiser is the RLHF optimum pi_ref exp(r / beta) for the calibrated r. A teacher
that separates its held-out pairs is capped at a mean calibrated |Delta| of 10. --calibration standardize divides
by the standard deviation of the training margins (one std = one log-odd); none keeps them as they are.

Run:
    python distilled_dpo.py                    # toy task: 3 reward models, ensemble, annotator with length bias 1
    python distilled_dpo.py --objective dpo --length_bias 2       # the baseline on more biased labels
    python distilled_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --objective ensemble --num_reward_models 3 --rm_learning_rate 1e-5 --output_dir out
    python distilled_dpo.py --model M --dataset pairs.jsonl --objective ensemble --reward_models rm_a,rm_b,rm_c --output_dir out
    python distilled_dpo.py --model M --dataset scored_pairs.jsonl --objective distill --margin_column margin --output_dir out
    python distilled_dpo.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 distilled_dpo.py --model meta-llama/Llama-3.1-8B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out
Under torchrun each process takes --batch_size x --grad_accum pairs of every step (a step is that many times the
number of processes), for the reward models and for the policy; the margins, the reference log-probs and the
reference samples are computed each process its share; --ddp keeps a whole copy of each model on each GPU,
--fsdp shards it (PyTorch's FSDP2; the default from 1B parameters). Only rank 0 prints and writes. A run owns
its --output_dir and resumes exactly, under the same number of processes, as dpo.py's (see its docstring).

On the toy task the training pairs are the toy's, relabelled by an annotator that adds --length_bias reward per
10 words of extra length (toy.relabelled_pairs, seeded by --seed); the held-out pairs keep the toy's unbiased labels.

Deviations from the paper (whose exact losses and settings we could not read; see the notes in each item):
1. The ensemble takes the min over teachers of each micro-batch's mean squared loss (--ensemble_min batch): the
   theory's min is over the whole objective, which SGD cannot see; per batch is the closest reading that keeps one
   teacher per gradient. --ensemble_min example takes the min per pair (a larger, product family of rewards).
2. The family is K Bradley-Terry models on bootstrap resamples with distinct seeds; the paper's recipe is not known.
   A family trained on the same biased labels shares their bias: pessimism over it cannot remove that bias.
3. The forward KL of pessimistic_dpo is estimated on --kl_samples pure samples per training prompt from the
   reference, drawn once before training; each micro-batch uses its prompts' samples. gamma > 0 may be added to
   distill and ensemble too; the paper's exact forms and gamma are not known (default gamma 0.1).
4. Margins are calibrated (see above); the teachers read every pair as dpo.py tokenises it, with their own tokenizer.
5. As dpo.py: reference log-probs precomputed once; each pair's prompt computed once (common.grouped_logps);
   AdamW, linear warm-up then constant. The held-out metrics are the objective's pair loss without the KL term.
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

from common import (agree, clip_grad_norm_, collate, crash_point, disable_dropout, encode_prompt, encode_response,
                    fingerprint, from_pretrained, full_state, gather_objects, gather_shares, grouped_logps,
                    grouped_scores, init_distributed, is_main, load_model, load_optimizer_state, load_rows,
                    load_tokenizer, mean_over_ranks, my_share, on_rank_0, parallelize, prompt_head_length,
                    report_dropped, sample_responses, sequence_logps, sync_gradients, this_rank, truncate, where,
                    world_size)


@dataclass
class Args:
    model: str = field(default=None, metadata={"help": "policy to train: hub id or local directory (default: the built-in toy model)"})
    ref_model: str = field(default=None, metadata={"help": "frozen reference model; default: reference log-probs precomputed with the initial policy"})
    dataset: str = field(default=None, metadata={"help": "preference data (prompt/chosen/rejected): hub name, .jsonl/.json/.parquet, or a save_to_disk folder (default: toy)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset to train on"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out preference data; default: hold out --eval_fraction of --dataset"})
    eval_fraction: float = field(default=0.02, metadata={"help": "fraction of --dataset held out when no --eval_dataset is given"})
    max_eval_pairs: int = field(default=512, metadata={"help": "at most this many held-out pairs are evaluated"})
    objective: str = field(default="ensemble", metadata={"help": "distill (one reward model), ensemble (min over K), pessimistic_dpo (DPO + gamma forward KL), dpo",
                                                         "choices": ["distill", "ensemble", "pessimistic_dpo", "dpo"]})
    num_reward_models: int = field(default=None, metadata={"help": "K reward models to train (default: 1 for distill, 3 for ensemble)"})
    reward_models: str = field(default=None, metadata={"help": "given reward models instead (comma-separated hub ids or directories of sequence classifiers with one output)"})
    margin_column: str = field(default=None, metadata={"help": "precomputed margins r(chosen) - r(rejected) instead (comma-separated columns of --dataset and --eval_dataset)"})
    reward_model_init: str = field(default=None, metadata={"help": "what the reward models are trained from (default: --model)"})
    rm_learning_rate: float = field(default=1e-5, metadata={"help": "learning rate of the reward models"})
    rm_epochs: int = field(default=1, metadata={"help": "passes of each reward model over its bootstrap resample"})
    calibration: str = field(default="temperature", metadata={"help": "scale of the teachers' margins: temperature-scaled log-odds, unit std, or as they are",
                                                              "choices": ["temperature", "standardize", "none"]})
    ensemble_min: str = field(default="batch", metadata={"help": "ensemble: the min over teachers of each micro-batch's loss, or of each pair's",
                                                         "choices": ["batch", "example"]})
    gamma: float = field(default=None, metadata={"help": "weight of the forward KL(pi_ref || pi) (default: 0.1 for pessimistic_dpo, else 0)"})
    kl_samples: int = field(default=1, metadata={"help": "reference samples per training prompt for the forward KL"})
    max_new_tokens: int = field(default=256, metadata={"help": "length limit of the reference samples"})
    length_bias: float = field(default=0.0, metadata={"help": "toy task only: the annotator's extra reward per 10 words of extra length"})
    output_dir: str = field(default=None, metadata={"help": "where checkpoints and metrics go (default: runs/distilled_dpo-<time>)"})
    max_steps: int = field(default=None, metadata={"help": "optimizer steps (default: --epochs over the data)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs, when --max_steps is not given"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch (one forward pass of 2 x batch_size rows)"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate (DPO paper: 1e-6)"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps, then constant (DPO paper: 150)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or rmsprop (the DPO paper's)", "choices": ["adamw", "rmsprop"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm (DPO reference code: 10)"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (DPO paper: 0.1; 0.5 for TL;DR)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing eps in [0, 0.5) for dpo and pessimistic_dpo (0 = plain DPO)"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response; the prompt's middle is cut first"})
    max_prompt_length: int = field(default=None, metadata={"help": "a cut prompt keeps at least this many tokens (default max_length // 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, the bootstrap, the samples and everything random"})
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


# The toy task: dpo.py's toy settings, reward models at a larger step size, and an annotator biased toward length.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128, rm_learning_rate=3e-4, max_new_tokens=64, length_bias=1.0)
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
                  num_reward_models=(lambda v: v is None or v >= 1, "at least 1"), rm_learning_rate=positive,
                  rm_epochs=at_least_1, gamma=(lambda v: v is None or 0 <= v < math.inf, "0 or more"),
                  kl_samples=at_least_1, max_new_tokens=at_least_1, length_bias=(math.isfinite, "a finite number"))
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


# ---------------------------------------------------------------- ALGO LOGIC: the losses
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-pair DPO loss (Eq. 7 of arXiv 2305.18290; cDPO if label_smoothing > 0) and implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def distill_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 teacher_margins, beta, ensemble_min="batch"):
    """Per-pair squared distillation loss (Delta_k - beta h)^2 toward teacher margins (B, K), min over the K
    teachers of the batch's mean loss (ensemble_min "batch"; under torchrun the batch of all processes) or of each
    pair's ("example"); K = 1 is distill. Returns the losses (B,), the teacher each pair used (B,) and the
    implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_1)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_2)
    h = chosen_logratios - rejected_logratios  # (B,)
    squared = (teacher_margins - beta * h[:, None]) ** 2  # (B, K)
    if ensemble_min == "example":
        losses, teacher = squared.min(-1)  # (B,), (B,)
    else:
        teacher = mean_over_ranks(squared.detach().mean(0)).argmin().expand(len(h))  # (B,): one teacher for the batch
        losses = squared.gather(-1, teacher[:, None]).squeeze(-1)  # (B,)
    return losses, teacher, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def forward_kl(policy_sample_logps, reference_sample_logps):
    """KL(pi_ref || pi) per sample y ~ pi_ref: log pi_ref(y|x) - log pi(y|x) (S,); its gradient is SFT on the samples."""
    return reference_sample_logps - policy_sample_logps


def bradley_terry_loss(chosen_scores, rejected_scores):
    """The reward model's loss -log sigmoid(r(x, y_w) - r(x, y_l)) per pair (B,), and whether it ranks y_w first."""
    return -F.logsigmoid(chosen_scores - rejected_scores), (chosen_scores > rejected_scores).float()


def fit_temperature(margins, max_mean_log_odds=10.0):
    """tau minimising -mean log sigmoid(margin / tau) over pairs whose first response won (temperature scaling,
    Guo et al. 2017). The loss is convex in a = 1/tau, so a bisection on its derivative -E[m sigmoid(-a m)] finds it.
    inf when the margins rank no better than chance (mean <= 0: they carry nothing); when they separate the pairs
    the optimum is a = inf, and a is capped so that the mean calibrated |margin| is max_mean_log_odds."""
    m = margins.double()
    slope = lambda a: -(m * torch.sigmoid(-a * m)).mean().item()
    if len(m) == 0 or slope(0.0) >= 0:
        return math.inf
    cap = max_mean_log_odds / m.abs().mean().item()
    if slope(cap) <= 0:
        return 1 / cap
    low, high = 0.0, cap
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if slope(middle) < 0 else (low, middle)
    return 2 / (low + high)


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, targets=None):
    """TRL's metric names, as one tensor per name (means over the pairs), the mean size of the implicit margins,
    and for distillation the mean target margin that the pairs used."""
    margins = chosen_rewards - rejected_rewards  # (B,)
    metrics = {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(), "rewards/margins": margins.mean(),
               "rewards/abs_margins": margins.abs().mean(),
               "logps/chosen": policy_chosen_logps.detach().mean(), "logps/rejected": policy_rejected_logps.detach().mean()}
    return metrics if targets is None else {**metrics, "distill/target_margins": targets.mean()}


def objective_loss(args, policy_logps, ref_logps, teacher_margins):
    """The objective's per-pair loss, implicit rewards and metrics (the KL term is added in the loop)."""
    if args.objective in ("dpo", "pessimistic_dpo"):
        losses, chosen_rewards, rejected_rewards = dpo_loss(*policy_logps, *ref_logps, args.beta, args.label_smoothing)
        targets = None
    else:
        losses, teacher, chosen_rewards, rejected_rewards = distill_loss(*policy_logps, *ref_logps, teacher_margins,
                                                                         args.beta, args.ensemble_min)
        targets = teacher_margins.gather(-1, teacher[:, None]).squeeze(-1)  # (B,)
    return losses, pair_metrics(losses.detach(), chosen_rewards, rejected_rewards, *policy_logps, targets)


def pair_logps(model, pairs, pad_token_id, device):
    """Summed response log-probs of chosen and rejected, in one forward pass, each prompt computed once."""
    logps, _ = grouped_logps(model, [(p, [c, r]) for p, c, r in pairs], pad_token_id, device)  # (2B,): c, r, c, r...
    return logps[0::2], logps[1::2]


def pair_scores(reward_model, pairs, pad_token_id, device):
    """A reward model's scores of chosen and rejected (B,), (B,), in one forward pass with each prompt computed once
    (common.grouped_scores), read where the model's own class reads them (the last token that is not padding)."""
    scores = grouped_scores(reward_model, [(p, [c, r]) for p, c, r in pairs], pad_token_id, device)  # (2B,): c, r, ...
    return scores[0::2], scores[1::2]


# ---------------------------------------------------------------- data
def load_pairs(source, tokenizer, args, split="train"):
    """Tokenised (prompt_ids, chosen_ids, rejected_ids) triples, and the rows they come from as (source, index,
    row); unusable rows are dropped and counted."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split)
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    dropped = {"empty prompt or response": [], "chosen identical to rejected": [],
               "prompt alone longer than --max_length": []}
    pairs, kept, n_cut = [], [], 0
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
            kept.append((source, i - 1, row))
            n_cut += cut
    report_dropped(source, dropped, len(rows))
    if n_cut:
        print(f"{source}: truncated {n_cut} of {len(pairs)} pairs to --max_length {args.max_length}")
    return pairs, kept


def load_data(args, tokenizer):
    """Training and held-out pairs (and their rows): --eval_dataset, or --eval_fraction of --dataset held out by a
    seeded shuffle."""
    train, train_rows = load_pairs(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out, held_out_rows = load_pairs(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_pairs, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
        held_out_rows, train_rows = [train_rows[i] for i in order[:n_eval]], [train_rows[i] for i in order[n_eval:]]
    print(f"{len(train)} training pairs, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return train, held_out[:args.max_eval_pairs], train_rows, held_out_rows[:args.max_eval_pairs]


def encode_rows(rows, tokenizer, args):
    """The pairs of (source, index, row) rows under another tokenizer (a teacher's), cut to --max_length as load_pairs."""
    pairs = []
    for _, _, row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        responses = [encode_response(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
        prompt, responses, _ = truncate(prompt, responses, args.max_length, args.max_prompt_length,
                                        prompt_head_length(tokenizer, row["prompt"], prompt))
        pairs.append((prompt, *responses))
    return pairs


def column_margins(rows, column):
    """A margin column as a tensor (N,); a missing, non-numeric or non-finite value stops with its file, line, field."""
    values = []
    for source, i, row in rows:
        value = row.get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            sys.exit(f"error: {source}: {where(source, i)}: field '{column}': expected a finite number "
                     f"(a margin r(chosen) - r(rejected)), got {value!r}")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


def check_reward_model(name, trust_remote_code):
    """A given teacher must be a sequence classifier with one output; checked on its config, before anything is written."""
    from transformers import AutoConfig
    config = from_pretrained(AutoConfig, name, "a reward model", trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        sys.exit(f"error: --reward_models {name}: not a reward model (a sequence classifier with one output): its "
                 f"config says architectures {architectures}, {config.num_labels} outputs")
    load_tokenizer(name, trust_remote_code)


def load_reward_model(name, args, device, num_labels=None):
    """AutoModelForSequenceClassification from a hub id or directory (num_labels=1 puts a new one-output head on
    a causal LM), dropout off, padding id set so the model finds each row's last token."""
    from transformers import AutoModelForSequenceClassification
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32")
    extra = {} if num_labels is None else {"num_labels": num_labels}
    model = from_pretrained(AutoModelForSequenceClassification, name, "a reward model", dtype=getattr(torch, dtype),
                            trust_remote_code=args.trust_remote_code, **extra)
    model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model).to(device), tokenizer


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


def cached(path, record, compute):
    """compute() once, kept at `path` with the record of what it was computed from; a resumed run reuses it (and
    never another run's). Under torchrun every rank computes (its share), rank 0 writes."""
    fixed = {k: v for k, v in record["args"].items() if k not in RESUME_MAY_CHANGE}, record["inputs"]
    if on_rank_0(os.path.exists, path):  # the same answer on every rank
        cache = torch.load(path, weights_only=False)
        if cache["record"] != fixed:
            sys.exit(f"error: {path} was computed for other flags or inputs; remove it to compute it again")
        return cache
    cache = compute()
    if is_main():
        torch.save({**cache, "record": fixed}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cache


def reference_cache(args, policy, splits, record, pad_token_id, device):
    """Reference log-probs of every pair under the initial policy (deviation 5), computed once and kept in the run
    directory."""
    return cached(os.path.join(args.output_dir, "reference_logps.pt"), record,
                  lambda: {name: all_pair_logps(policy, pairs, args, pad_token_id, device, "reference log-probs")
                           for name, pairs in splits.items()})


# ---------------------------------------------------------------- stage 1: the teachers
def bootstrap(n, seed, k):
    """Teacher k's resample of n training pairs (drawn with replacement) and its out-of-bag pairs, from the seed."""
    bag = torch.randint(n, (n,), generator=torch.Generator().manual_seed(seed * 1000 + k)).tolist()
    return bag, sorted(set(range(n)) - set(bag))


def train_reward_model(k, args, rows, device, directory):
    """Teacher k: a Bradley-Terry reward model from --reward_model_init (or --model) on a bootstrap resample, with
    a seed of its own; saved with save_pretrained in `directory` (written whole, then renamed). Under torchrun
    each rank takes its share of every step's pairs, as the policy's do."""
    init = args.reward_model_init or args.model
    bag, _ = bootstrap(len(rows), args.seed, k)
    with torch.random.fork_rng(devices=[]):  # the new head's weights: from the teacher's seed, not the global stream
        torch.manual_seed(args.seed * 1000 + k)
        model, tokenizer = load_reward_model(init, args, device, num_labels=1)
    parallelize(model, args)  # under torchrun: DDP or FSDP2; else nothing
    pairs = encode_rows(rows, tokenizer, args)
    rank, world = this_rank(), world_size()
    pairs_per_step = args.batch_size * args.grad_accum * world  # each rank batch_size x grad_accum of them
    steps_per_epoch = max(1, len(bag) // pairs_per_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rm_learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    model.train()
    bar = tqdm(range(args.rm_epochs * steps_per_epoch), desc=f"reward model {k}")
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(len(bag), generator=torch.Generator().manual_seed(args.seed * 1000 + k + 1 + epoch))
        indices = [bag[i] for i in order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()]
        loss = accuracy = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            whole = indices[micro * args.batch_size * world:(micro + 1) * args.batch_size * world]  # every rank's
            if not whole:  # a bag smaller than a step: the same on every rank
                break
            sync_gradients(model, (micro + 1) * args.batch_size * world >= len(indices))  # its last micro-batch
            idx = whole[rank::world]  # every rank a forward pass (FSDP2 needs it); an empty share weighs 0
            chunk = [pairs[i] for i in idx or whole[:1]]
            losses, correct = bradley_terry_loss(*pair_scores(model, chunk, tokenizer.pad_token_id, device))
            weight = world / len(indices) if idx else 0.0  # the ranks' gradients are averaged: the step's mean
            (losses.sum() * weight).backward()
            loss, accuracy = loss + losses.sum().detach() * weight, accuracy + correct.sum() * weight
        clip_grad_norm_(model, args.max_grad_norm)
        loss, accuracy = mean_over_ranks(torch.stack([loss, accuracy])).tolist()
        if not math.isfinite(loss):
            sys.exit(f"error: non-finite loss training reward model {k} at step {step + 1}; try a lower --rm_learning_rate")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.2f}")
        crash_point("reward_model")
    model_state, _ = full_state(model)  # under torchrun: gathered on rank 0

    def write():
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, directory)
    on_rank_0(write)  # the other ranks wait for it: they read it next


def teachers(args):
    """The teachers as (kind, name): margin columns, given reward models, or trained ones (their directories)."""
    if args.objective in ("dpo", "pessimistic_dpo"):
        return []
    if args.margin_column:
        return [("column", c) for c in args.margin_column.split(",")]
    if args.reward_models:
        return [("given", name) for name in args.reward_models.split(",")]
    return [("trained", os.path.join(args.output_dir or "", f"reward_model_{k}")) for k in range(args.num_reward_models)]


# ---------------------------------------------------------------- stage 2: the margins
@torch.no_grad()
def model_margins(name, splits, args, device):
    """r(x, y_1) - r(x, y_2) of every row of each split under a reward model, (N,) float64 each, the pairs
    tokenised by its tokenizer. Under torchrun each rank computes its share and every rank gets the whole."""
    model, tokenizer = load_reward_model(name, args, device)
    model.eval().requires_grad_(False)
    parallelize(model, args, trainable=False)  # under torchrun: sharded under FSDP2, whole under DDP
    margins = []
    for rows in splits:
        pairs, out = encode_rows(rows, tokenizer, args), [torch.zeros(0, dtype=torch.float64)]
        share = my_share(len(pairs))
        for s in tqdm(range(0, len(share), 2 * args.batch_size), desc=f"margins of {name}"):
            chunk = [pairs[i] for i in share[s:s + 2 * args.batch_size]]
            chosen, rejected = pair_scores(model, chunk, tokenizer.pad_token_id, device)
            out.append((chosen - rejected).double().cpu())
            crash_point("margins")
        margins.append(gather_shares(torch.cat(out), len(pairs)))
    return margins


def compute_margins(args, teacher_list, train_rows, held_out_rows, device):
    """Raw margins of every pair under every teacher, each teacher's scale (deviation 4) and its accuracies."""
    raw, scales, summary = {"train": [], "eval": []}, [], []
    for k, (kind, name) in enumerate(teacher_list):
        splits = [train_rows, held_out_rows]
        margins = [column_margins(rows, name) for rows in splits] if kind == "column" else model_margins(name, splits, args, device)
        raw["train"].append(margins[0])
        raw["eval"].append(margins[1])
        train = raw["train"][-1]
        held = bootstrap(len(train_rows), args.seed, k)[1] if kind == "trained" else list(range(len(train_rows)))
        if args.calibration == "temperature":
            temperature = fit_temperature(train[held])
            scale = 0.0 if math.isinf(temperature) else 1 / temperature
        else:
            std = train.std().item() if len(train) > 1 else 0.0
            scale = (1 / std if std > 0 else 0.0) if args.calibration == "standardize" else 1.0
        scales.append(scale)
        entry = {"teacher": k, "kind": kind, "name": name, "scale": scale, "held_out": "out-of-bag" if kind == "trained" else "training pairs",
                 "held_out_pairs": len(held), "held_out_accuracy": (train[held] > 0).double().mean().item() if held else None,
                 "eval_accuracy": (raw["eval"][-1] > 0).double().mean().item(),
                 "mean_abs_margin": train.abs().mean().item(), "mean_abs_calibrated_margin": scale * train.abs().mean().item()}
        if all("score_chosen" in row for _, _, row in train_rows):  # the toy: agreement with the gold reward's order
            gold = torch.tensor([row["score_chosen"] - row["score_rejected"] for _, _, row in train_rows])
            longer = torch.tensor([len(row["chosen"].split()) - len(row["rejected"].split()) for _, _, row in train_rows])
            entry["gold_agreement"] = ((train > 0) == (gold > 0)).double()[gold != 0].mean().item()
            entry["prefers_longer"] = ((train > 0) == (longer > 0)).double()[longer != 0].mean().item()
        summary.append(entry)
        print(f"teacher {k} ({kind} {name}): held-out accuracy {entry['held_out_accuracy'] if held else math.nan:.3f} on "
              f"{len(held)} {entry['held_out']}, accuracy {entry['eval_accuracy']:.3f} on {len(held_out_rows)} held-out "
              f"pairs, scale {scale:.4g}, mean |margin| {entry['mean_abs_margin']:.3f} -> {entry['mean_abs_calibrated_margin']:.3f}"
              + (f", agrees with gold {entry['gold_agreement']:.3f}, prefers the longer {entry['prefers_longer']:.3f}"
                 if "gold_agreement" in entry else ""))
    scale = torch.tensor(scales, dtype=torch.float64)  # (K,)
    stack = lambda split: torch.stack(raw[split], -1) if raw[split] else torch.zeros(0, 0, dtype=torch.float64)
    return {"raw_train": stack("train"), "raw_eval": stack("eval"), "train": (stack("train") * scale).float(),
            "eval": (stack("eval") * scale).float(), "scale": scale, "teachers": summary}


# ---------------------------------------------------------------- stage 3: reference samples for the forward KL
@torch.no_grad()
def reference_samples(model, tokenizer, train, args, device):
    """--kl_samples pure samples from the reference for every distinct training prompt, cut to fit --max_length, and
    their summed log-probs under it; drawn once (in eval mode) from the seed. Under torchrun each rank draws and
    scores its share (from a seed of its own) and every rank gets the whole."""
    prompts = [list(p) for p in dict.fromkeys(tuple(p) for p, _, _ in train)]
    flat = [p for p in prompts for _ in range(args.kl_samples)]
    mine = [flat[i] for i in my_share(len(flat))]  # every rank as many (FSDP2: the same forward passes)
    responses, was_training = [], model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1000003 * this_rank())
        for s in tqdm(range(0, len(mine), 64), desc="reference samples"):
            responses += sample_responses(model, tokenizer, mine[s:s + 64], args.max_new_tokens, 1.0, 64)
            crash_point("sample")
    responses = [(r[:max(1, args.max_length - len(p))] or [tokenizer.eos_token_id]) for p, r in zip(mine, responses)]
    model.eval()
    logps = [torch.zeros(0)]
    for s in range(0, len(mine), 64):
        batch = collate(list(zip(mine[s:s + 64], responses[s:s + 64])), tokenizer.pad_token_id)
        logps.append(sequence_logps(model, {k: v.to(device) for k, v in batch.items()})[0].cpu())
    model.train(was_training)
    responses = gather_shares(responses, len(flat))  # the ranks' shares, in order
    return {"prompts": flat, "responses": responses, "logps": gather_shares(torch.cat(logps), len(flat))}


@torch.no_grad()
def evaluate(policy, pairs, reference_logps, margins, args, pad_token_id, device):
    """Mean metrics of the objective's pair loss on held-out pairs, TRL's names with the eval_ prefix; eval mode.
    The log-probs are computed once (under torchrun, each rank its share); the loss a chunk of 2 x --batch_size
    pairs at a time (the ensemble's teacher is chosen per chunk)."""
    policy_logps = all_pair_logps(policy, pairs, args, pad_token_id, device).to(device)  # (N, 2)
    reference_logps = reference_logps.to(device)  # (N, 2)
    totals = {}
    for s in range(0, len(pairs), 2 * args.batch_size):
        span = range(s, min(s + 2 * args.batch_size, len(pairs)))
        _, metrics = objective_loss(args, policy_logps[s:span.stop].unbind(-1), reference_logps[s:span.stop].unbind(-1),
                                    margins("eval", span))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(span)
    return {f"eval_{k}": v / len(pairs) for k, v in totals.items()}


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


# ---------------------------------------------------------------- main
def parse_distill_args(argv=None):
    """parse_args, the defaults that depend on --objective, and the checks between the new flags."""
    args = parse_args(argv)
    if args.num_reward_models is None:
        args.num_reward_models = 1 if args.objective == "distill" else 3
    if args.gamma is None:
        args.gamma = 0.1 if args.objective == "pessimistic_dpo" else 0.0
    if args.reward_models and args.margin_column:
        sys.exit("error: give the teachers once: --reward_models or --margin_column, not both")
    if args.objective in ("dpo", "pessimistic_dpo") and (args.reward_models or args.margin_column or args.reward_model_init):
        sys.exit(f"error: --objective {args.objective} uses no reward model; --reward_models, --margin_column and "
                 f"--reward_model_init are for distill and ensemble")
    if args.objective == "distill" and len(teachers(args)) != 1:
        sys.exit(f"error: --objective distill distills one reward model, got {len(teachers(args))} (use --objective ensemble)")
    if args.objective == "dpo" and args.gamma > 0:
        sys.exit("error: --objective dpo with --gamma > 0 is pessimistic DPO: use --objective pessimistic_dpo")
    if args.objective == "pessimistic_dpo" and args.gamma == 0:
        sys.exit("error: --objective pessimistic_dpo needs --gamma > 0 (with 0 it is --objective dpo)")
    if args.model and args.length_bias != 0:
        sys.exit("error: --length_bias relabels the toy task's pairs; it cannot be used with --model")
    return args


def main(argv=None):
    args = parse_distill_args(argv)  # every flag checked; nothing read or written yet
    rank, world, device = init_distributed(args)  # (0, 1, "cuda" or "cpu") unless under torchrun
    checkpoint = on_rank_0(check_output_dir, args)  # reads only
    with interrupts(lambda: resume_command(args, argv)) as signals:
        toy = None
        if args.model is None:  # the built-in toy task, its training pairs relabelled by a length-biased annotator
            import toy
            toy_dir = toy.ensure_built()
            args.model, args.dataset = os.path.join(toy_dir, "sft"), toy.relabelled_pairs(toy_dir, args.length_bias, args.seed)
            args.eval_dataset = args.eval_dataset or os.path.join(toy_dir, "test_pairs.jsonl")
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        train, held_out, train_rows, held_out_rows = load_data(args, tokenizer)
        pairs_per_step = args.batch_size * args.grad_accum * world  # each rank batch_size x grad_accum of them
        steps_per_epoch = len(train) // pairs_per_step
        if steps_per_epoch == 0:
            sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                     f"{pairs_per_step} pairs per step, but {args.dataset} gives only {len(train)} training pairs")
        max_steps = args.max_steps or args.epochs * steps_per_epoch
        if toy is None and args.warmup_steps > max_steps:
            print(f"warning: --warmup_steps {args.warmup_steps} is longer than the run ({max_steps} steps): the "
                  f"learning rate never reaches --learning_rate {args.learning_rate}")
        record = run_record(args, tokenizer)
        record["inputs"].update({f"reward_model_{k}": fingerprint(name) for k, (kind, name) in enumerate(teachers(args))
                                 if kind == "given"})
        record["inputs"]["reward_model_init"] = fingerprint(args.reward_model_init)
        if args.resume:
            check_resume(args, record)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        policy = load_model(checkpoint or args.model, args.dtype, device, args.trust_remote_code)
        if args.gradient_checkpointing:
            enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
            enable({"use_reentrant": False})  # the name since transformers 5.x; the old one before
        parallel = parallelize(policy, args)  # under torchrun: DDP or FSDP2; else nothing
        reference = load_model(args.ref_model, args.dtype, device, args.trust_remote_code) if args.ref_model else None
        for kind, name in teachers(args):  # every teacher usable, checked before anything is written
            if kind == "given":
                check_reward_model(name, args.trust_remote_code)
            elif kind == "column":
                column_margins(train_rows, name), column_margins(held_out_rows, name)
        if teachers(args) and teachers(args)[0][0] == "trained" and args.reward_model_init:
            from transformers import AutoConfig
            from_pretrained(AutoConfig, args.reward_model_init, "a model to train reward models from", trust_remote_code=args.trust_remote_code)
            load_tokenizer(args.reward_model_init, args.trust_remote_code)
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record)
        if parallel:
            print(f"{world} processes, {parallel.upper()}: {args.batch_size * args.grad_accum} pairs a process a step")

        # stage 1: the teachers (trained ones once each, kept in reward_model_<k>/); stage 2: their margins
        teacher_list = teachers(args)
        for k, (kind, name) in enumerate(teacher_list):
            if kind == "trained" and not on_rank_0(os.path.exists, name):  # the same answer on every rank
                train_reward_model(k, args, train_rows, device, name)
        margins_cache = cached(os.path.join(args.output_dir, "margins.pt"), record,
                               lambda: compute_margins(args, teacher_list, train_rows, held_out_rows, device)) if teacher_list else None
        if teacher_list and is_main() and not os.path.exists(os.path.join(args.output_dir, "teachers.json")):
            with open(os.path.join(args.output_dir, "teachers.json.tmp"), "w") as f:
                json.dump(margins_cache["teachers"], f, indent=1)
            os.replace(os.path.join(args.output_dir, "teachers.json.tmp"), os.path.join(args.output_dir, "teachers.json"))
        margins = lambda split, idx: margins_cache[split][list(idx)].to(device) if margins_cache else None  # (B, K)

        # stage 3: the reference: a frozen model, or log-probs precomputed with the initial policy and kept with the run
        if checkpoint and not os.path.exists(os.path.join(args.output_dir, "reference_logps.pt")):
            sys.exit(f"error: {args.output_dir} has checkpoints but no reference_logps.pt; it cannot be resumed")
        if reference is not None:
            reference.eval().requires_grad_(False)
            parallelize(reference, args, trainable=False)
            ref = lambda chunk, idx, split: pair_logps(reference, chunk, tokenizer.pad_token_id, device)
            held_out_ref = all_pair_logps(reference, held_out, args, tokenizer.pad_token_id, device)
        else:
            cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, tokenizer.pad_token_id, device)
            ref = lambda chunk, idx, split: cache[split][idx].to(device).unbind(-1)
            held_out_ref = cache["eval"]
        if args.gamma > 0:  # samples of the reference for the forward KL, drawn once
            samples = cached(os.path.join(args.output_dir, "reference_samples.pt"), record,
                             lambda: reference_samples(reference or policy, tokenizer, train, args, device))
            of_prompt = {}
            for s, prompt in enumerate(samples["prompts"]):
                of_prompt.setdefault(tuple(prompt), []).append(s)

        # optimizer, linear warm-up then constant (paper App. B)
        if args.optimizer == "adamw":
            optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                          fused=True)  # one kernel per step: 1.1-1.2x faster steps at vocab 128k (bench/)
        else:
            optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
        start_step = restore(checkpoint, policy, optimizer, scheduler) if checkpoint else 0
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return

        if toy:  # the toy's gold reward, length and KL of samples before training
            toy_reference = load_model(args.ref_model or args.model, args.dtype, device).eval()
            toy_prompts = toy.test_prompts(toy_dir)
            before = toy.evaluate(toy_reference, toy_reference, tokenizer, toy_prompts, seed=args.seed)

        # ---------------------------------------------------------------- the training loop
        log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
        if start_step == 0:
            log({"step": 0, **evaluate(policy, held_out, held_out_ref, margins, args, tokenizer.pad_token_id, device)})
        policy.train()
        signals["stop_after_step"] = True  # from here Ctrl-C / SIGTERM finish the step and save first
        save_seconds = 3 * sum(p.numel() * p.element_size() for p in policy.parameters()) / 2e8  # a guess at 200 MB/s
        bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=args.objective)
        for step in bar:
            epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()[rank::world]
            sums = {}
            for micro in range(args.grad_accum):
                idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
                sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
                chunk = [train[i] for i in idx]
                policy_logps = pair_logps(policy, chunk, tokenizer.pad_token_id, device)
                losses, metrics = objective_loss(args, policy_logps, ref(chunk, idx, "train"), margins("train", idx))
                loss = losses.mean()
                if args.gamma > 0:  # + gamma KL(pi_ref || pi) on the reference's samples for these prompts
                    rows = [s for p, _, _ in chunk for s in of_prompt[tuple(p)]]
                    batch = collate([(samples["prompts"][s], samples["responses"][s]) for s in rows], tokenizer.pad_token_id)
                    policy_sample_logps = sequence_logps(policy, {k: v.to(device) for k, v in batch.items()})[0]  # (S,)
                    kl = forward_kl(policy_sample_logps, samples["logps"][rows].to(device)).mean()
                    loss = loss + args.gamma * kl
                    metrics.update({"loss": loss.detach(), "kl/forward": kl.detach()})
                (loss / args.grad_accum).backward()
                sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
            grad_norm = clip_grad_norm_(policy, args.max_grad_norm)
            values = mean_over_ranks(torch.stack([*sums.values(), grad_norm.float()])).tolist()  # one host sync
            row = dict(zip([*sums, "grad_norm"], values))
            if not all(map(math.isfinite, values)):
                stop(f"non-finite loss or gradient at step {step + 1} ({row})", args.output_dir)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            crash_point("step")
            row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3), learning_rate=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == max_steps:
                row.update(evaluate(policy, held_out, held_out_ref, margins, args, tokenizer.pad_token_id, device))
                tqdm.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}, "
                           f"accuracy {row['eval_rewards/accuracies']:.3f}, margin {row['eval_rewards/margins']:.3f}")
            if toy and args.toy_eval_every and (step + 1) % args.toy_eval_every == 0 and step + 1 < max_steps:
                row.update({f"toy/{k}": v for k, v in toy.evaluate(policy, toy_reference, tokenizer, toy_prompts,
                                                                      seed=args.seed).items()})
            log(row)
            requested, slow_save = agree(signals["requested"] or 0, save_seconds >= 10)  # the same on every rank
            if (step + 1) % args.save_every == 0 or step + 1 == max_steps or requested and not slow_save:
                started = time.time()
                save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler, step + 1)
                save_seconds = time.time() - started
            if requested:
                bar.close()
                print(f"stopped after step {step + 1}; newest checkpoint: "
                      f"{(list_checkpoints(args.output_dir) or ['none (a resume starts at step 0)'])[-1]}. "
                      f"{resume_command(args, argv) or ''}", file=sys.stderr)
                raise SystemExit(128 + int(requested))
        signals["stop_after_step"] = False

        if toy:
            after = toy.evaluate(policy, toy_reference, tokenizer, toy_prompts, seed=args.seed)
            log({"step": max_steps, **{f"toy/{k}_before": v for k, v in before.items()},
                 **{f"toy/{k}_after": v for k, v in after.items()}})
            print(f"toy task, {len(toy_prompts)} test prompts, one sample each:\n"
                  f"  gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}   "
                  f"length {before['length']:.1f} -> {after['length']:.1f} words   "
                  f"KL(policy || reference) {before['kl']:.2f} -> {after['kl']:.2f} nats")
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


if __name__ == "__main__":
    main()

"""DPO: Direct Preference Optimization: Your Language Model is Secretly a Reward Model.
Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. NeurIPS 2023. https://arxiv.org/abs/2305.18290

    h      = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]   (summed over tokens)
    L_DPO  = - E[ log sigmoid(beta * h) ]                                                  (Eq. 7)
    cDPO   = - (1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)                (--label_smoothing eps)

Run:
    python dpo.py                                          # built-in toy task, CPU, about two minutes
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out
    python dpo.py --model out --resume --output_dir out   # or: continue an interrupted run with --resume
Single process, one device; multi-GPU (torchrun / FSDP) is not implemented.

Deviations from the paper and the reference code (eric-mitchell/direct-preference-optimization):
1. The reference log-probs are computed once, before training, with the initial policy (pi = pi_ref at
   step 0), so no second model is held in memory. --ref_model loads a frozen reference model instead.
2. AdamW by default (the paper uses RMSprop: --optimizer rmsprop); linear warm-up, then constant, as in the paper.
3. The LM head runs only on positions that score a response token, in chunks (common.sequence_logps).
4. On CUDA the default dtype is bf16 for the weights and the optimizer state. With learning rates near
   1e-6 many bf16 updates round away; use --dtype float32 if memory allows.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (collate, encode_prompt, encode_response, load_model, load_rows, load_tokenizer,
                    report_dropped, sequence_logps, truncate)


@dataclass
class Args:
    model: str = field(default=None, metadata={"help": "policy to train: hub id or local directory (default: the built-in toy model)"})
    ref_model: str = field(default=None, metadata={"help": "frozen reference model; default: reference log-probs precomputed with the initial policy"})
    dataset: str = field(default=None, metadata={"help": "preference data (prompt/chosen/rejected): hub name or .json/.jsonl/.parquet (default: toy)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset to train on"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out preference data; default: hold out --eval_fraction of --dataset"})
    eval_fraction: float = field(default=0.02, metadata={"help": "fraction of --dataset held out when no --eval_dataset is given"})
    max_eval_pairs: int = field(default=512, metadata={"help": "at most this many held-out pairs are evaluated"})
    output_dir: str = field(default=None, metadata={"help": "where checkpoints and metrics go (default: runs/dpo-<time>)"})
    max_steps: int = field(default=None, metadata={"help": "optimizer steps (default: --epochs over the data)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs, when --max_steps is not given"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch (one forward pass of 2 x batch_size rows)"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate (paper: 1e-6)"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps, then constant (paper: 150)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or rmsprop (the paper's)", "choices": ["adamw", "rmsprop"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm (reference code: 10)"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (paper: 0.1; 0.5 for TL;DR)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing eps (0 = plain DPO)"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response; the prompt is cut first"})
    max_prompt_length: int = field(default=None, metadata={"help": "a cut prompt keeps at least this many tokens (default max_length // 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and of everything random"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the held-out pairs every N steps"})
    save_every: int = field(default=500, metadata={"help": "write a checkpoint every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last checkpoint"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU",
                                                 "choices": ["auto", "float32", "bfloat16", "float16"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


# The toy task needs a larger step size and smaller batches than a pretrained LLM; used when --model is not given.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.type is bool:
            parser.add_argument(*flags, action="store_true", help=f.metadata["help"])
            continue
        default = "" if f.default is None else f" (default: {f.default}" + (
            f"; toy: {TOY_DEFAULTS[f.name]})" if f.name in TOY_DEFAULTS else ")")
        parser.add_argument(*flags, type=f.type, default=f.default, help=f.metadata["help"] + default,
                            choices=f.metadata.get("choices"))
    given = parser.parse_args(argv)
    args = Args(**vars(given))
    if args.model is None:  # the toy: its own defaults for whatever the user did not set
        for name, value in TOY_DEFAULTS.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    args.output_dir = args.output_dir or time.strftime("runs/dpo-%Y%m%d-%H%M%S")
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
    """Summed response log-probs of chosen and rejected, in one forward pass over 2B rows."""
    batch = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_token_id)
    logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})  # (2B,)
    return logps[:len(pairs)], logps[len(pairs):]


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's metric names, as one tensor per name (means over the pairs)."""
    return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(), "logps/rejected": policy_rejected_logps.detach().mean()}


# ---------------------------------------------------------------- data
def load_pairs(source, tokenizer, args, split="train"):
    """Tokenised (prompt_ids, chosen_ids, rejected_ids) triples; unusable rows are dropped and counted."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split)
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    dropped = {"empty prompt or response": [], "chosen identical to rejected": [],
               "prompt alone longer than --max_length": []}
    pairs, n_cut = [], 0
    for i, row in enumerate(tqdm(rows, desc=f"tokenizing {source}", disable=len(rows) < 10000)):
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
            prompt, (chosen, rejected), cut = truncate(prompt, responses, args.max_length, args.max_prompt_length)
            pairs.append((prompt, chosen, rejected))
            n_cut += cut
    report_dropped(dropped, len(rows))
    if n_cut:
        print(f"{source}: truncated {n_cut} of {len(pairs)} pairs to --max_length {args.max_length}")
    return pairs


@torch.no_grad()
def reference_logps(model, pairs, args, pad_token_id, device):
    """(N, 2) summed log-probs of chosen and rejected under the initial policy (deviation 1)."""
    out = []
    for s in tqdm(range(0, len(pairs), 2 * args.batch_size), desc="reference log-probs"):
        out.append(torch.stack(pair_logps(model, pairs[s:s + 2 * args.batch_size], pad_token_id, device), -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate(policy, pairs, ref, args, pad_token_id, device):
    """Mean DPO metrics on held-out pairs, TRL's names with the eval_ prefix."""
    totals = {}
    for s in range(0, len(pairs), 2 * args.batch_size):
        chunk = pairs[s:s + 2 * args.batch_size]
        policy_logps = pair_logps(policy, chunk, pad_token_id, device)
        ref_logps = ref(chunk, range(s, s + len(chunk)))
        metrics = dpo_metrics(*dpo_loss(*policy_logps, *ref_logps, args.beta, args.label_smoothing), *policy_logps)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(chunk)
    return {f"eval_{k}": v / len(pairs) for k, v in totals.items()}


# ---------------------------------------------------------------- checkpoints (TRY NOT TO MODIFY)
def save_checkpoint(directory, policy, tokenizer, optimizer, scheduler, step):
    """Write checkpoint-<step> into a temporary directory, then rename it: a kill leaves no half checkpoint."""
    tmp = os.path.join(directory, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, "training_state.pt"))
    final = os.path.join(directory, f"checkpoint-{step}")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in list_checkpoints(directory)[:-1]:  # keep only the newest
        shutil.rmtree(old)
    return final


def list_checkpoints(directory):
    found = [d for d in os.listdir(directory) if d.startswith("checkpoint-")] if os.path.isdir(directory) else []
    return [os.path.join(directory, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def stop(message, directory):
    last = list_checkpoints(directory)
    raise SystemExit(f"error: {message}; stopping. Last good checkpoint: {last[-1] if last else 'none'}")


def main(argv=None):
    args = parse_args(argv)
    given = dataclasses.asdict(args)  # as the user gave them, before the toy fills in its paths
    # TRY NOT TO MODIFY: output directory, seeding
    checkpoints = list_checkpoints(args.output_dir)
    if args.resume and checkpoints:
        with open(os.path.join(args.output_dir, "args.json")) as f:
            saved = json.load(f)
        changed = {k: (saved[k], v) for k, v in given.items()
                   if k in saved and saved[k] != v and k not in ("resume", "max_steps", "output_dir")}
        if changed:
            print(f"warning: resuming with settings that differ from the original run: {changed}")
    elif os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        sys.exit(f"error: --output_dir {args.output_dir} already holds files and no checkpoint-* to resume from "
                 f"(another run?); choose another --output_dir" if args.resume else
                 f"error: --output_dir {args.output_dir} already holds files (another run?); pass --resume to "
                 f"continue it, or choose another --output_dir")
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    toy = None
    if args.model is None:
        import toy
        toy_dir = toy.ensure_built()
        args.model = os.path.join(toy_dir, "sft")
        args.dataset = args.dataset or os.path.join(toy_dir, "train_pairs.jsonl")
        args.eval_dataset = args.eval_dataset or os.path.join(toy_dir, "test_pairs.jsonl")
    if args.dataset is None:
        sys.exit("error: --dataset is required with --model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    policy = load_model(checkpoints[-1] if args.resume and checkpoints else args.model, args.dtype, device,
                        args.trust_remote_code)
    if args.gradient_checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # the name since transformers 5.x; the old one before

    # data
    train = load_pairs(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out = load_pairs(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_pairs, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    held_out = held_out[:args.max_eval_pairs]
    print(f"{len(train)} training pairs, {len(held_out)} held-out pairs")
    os.makedirs(args.output_dir, exist_ok=True)  # only now: a run that fails on its inputs leaves nothing behind
    if not checkpoints:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(given, f, indent=1)

    # the reference: precomputed log-probs (saved with the run, so a resumed run reuses them) or a frozen model
    if args.ref_model:
        reference = load_model(args.ref_model, args.dtype, device, args.trust_remote_code).eval().requires_grad_(False)
        ref = lambda chunk, idx: pair_logps(reference, chunk, tokenizer.pad_token_id, device)
        ref_eval = ref
    else:
        path = os.path.join(args.output_dir, "reference_logps.pt")
        if not os.path.exists(path):
            cache = {"train": reference_logps(policy, train, args, tokenizer.pad_token_id, device),
                     "eval": reference_logps(policy, held_out, args, tokenizer.pad_token_id, device)}
            torch.save(cache, path + ".tmp")
            os.replace(path + ".tmp", path)
        cache = torch.load(path)
        ref = lambda chunk, idx: cache["train"][list(idx)].to(device).unbind(-1)
        ref_eval = lambda chunk, idx: cache["eval"][list(idx)].to(device).unbind(-1)

    # optimizer, linear warm-up then constant (paper App. B)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                      fused=True)  # one kernel per step: 1.1-1.2x faster steps at vocab 128k (bench/)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    pairs_per_step = args.batch_size * args.grad_accum
    steps_per_epoch = len(train) // pairs_per_step
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train)} training pairs are fewer than one step's batch_size x grad_accum = {pairs_per_step}")
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    start_step = 0
    if args.resume and checkpoints:
        state = torch.load(os.path.join(checkpoints[-1], "training_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start_step = state["step"]
        print(f"resuming from {checkpoints[-1]} at step {start_step}")

    if toy:  # the toy's gold reward, length and KL of samples before training
        toy_reference = load_model(args.ref_model or args.model, args.dtype, device).eval()
        toy_prompts = toy.test_prompts(toy_dir)
        before = toy.evaluate(toy_reference, toy_reference, tokenizer, toy_prompts, seed=args.seed)

    # ---------------------------------------------------------------- the training loop
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if start_step:  # forget what the interrupted run logged after its last checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    metrics_file = open(metrics_path, "a")
    log = lambda row: metrics_file.write(json.dumps(row) + "\n") or metrics_file.flush()
    if start_step == 0:
        log({"step": 0, **evaluate(policy, held_out, ref_eval, args, tokenizer.pad_token_id, device)})
    policy.train()
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="dpo")
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
        indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()
        sums = {}
        for micro in range(args.grad_accum):
            idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
            chunk = [train[i] for i in idx]
            policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, tokenizer.pad_token_id, device)
            reference_chosen_logps, reference_rejected_logps = ref(chunk, idx)
            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                                reference_chosen_logps, reference_rejected_logps,
                                                                args.beta, args.label_smoothing)
            (losses.mean() / args.grad_accum).backward()
            metrics = dpo_metrics(losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
            sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        values = torch.stack([*sums.values(), grad_norm.float()]).tolist()  # the step's one host sync
        row = dict(zip([*sums, "grad_norm"], values))
        if not all(map(math.isfinite, values)):
            stop(f"non-finite loss or gradient at step {step + 1} ({row})", args.output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3), learning_rate=scheduler.get_last_lr()[0])
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == max_steps:
            row.update(evaluate(policy, held_out, ref_eval, args, tokenizer.pad_token_id, device))
            policy.train()
            tqdm.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}, "
                       f"accuracy {row['eval_rewards/accuracies']:.3f}, margin {row['eval_rewards/margins']:.3f}")
        log(row)
        if (step + 1) % args.save_every == 0 or step + 1 == max_steps:
            save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler, step + 1)

    # the final model, in the output directory itself (so --model <output_dir> works), written atomically
    tmp = os.path.join(args.output_dir, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
    os.rmdir(tmp)
    print(f"saved the final model to {args.output_dir}")

    if toy:
        after = toy.evaluate(policy, toy_reference, tokenizer, toy_prompts, seed=args.seed)
        log({"step": max_steps, **{f"toy/{k}_before": v for k, v in before.items()},
             **{f"toy/{k}_after": v for k, v in after.items()}})
        print(f"toy task, {len(toy_prompts)} test prompts, one sample each:\n"
              f"  gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}   "
              f"length {before['length']:.1f} -> {after['length']:.1f} words   "
              f"KL(policy || reference) {before['kl']:.2f} -> {after['kl']:.2f} nats")
    metrics_file.close()


if __name__ == "__main__":
    main()

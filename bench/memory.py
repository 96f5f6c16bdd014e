"""Where dpo.py's (or pointwise_dpo.py's) peak resident memory goes, phase by phase, over a few steps.

    python bench/memory.py --model 20M-128k          # about 1 minute
    python bench/memory.py --model 20M-128k --gradient-checkpointing
    python bench/memory.py --model 20M --trainer pointwise --batch-size 16      # vs_kto.py's step and batch

A thread samples the resident set (/proc/self/statm) every 2 ms while dpo.py's step runs (synthetic.dpo_step:
precomputed reference, fused AdamW, batch 8 pairs of the vs_trl.py data). For each step it prints:
    floor       RSS after the previous step, once glibc has given back the memory it keeps for reuse
                (malloc_trim): runtime + weights + AdamW moments + data, what persists between steps
    forward     RSS at the end of the forward, and the highest RSS during it
    backward    the highest RSS during backward
    step        the highest RSS during clip + AdamW step + zero_grad
The floor is measured by trimming after each step, which this script does and dpo.py does not: it costs page
faults in the next step, so the step times printed here are not the benchmark's.
--trainer pointwise runs vs_kto.py's step instead (pointwise_dpo.py's functions, precomputed reference, batch of
--batch-size completions of vs_kto.py's data).

A second table: what autograd keeps for backward in the first step's forward pass (tensors saved by the graph,
each storage counted once), summed by the line of the model's (or common.py's) code that made it, with the
positions the forward ran over (rows x row length, padding included): the activations that set the peak. The
parameters the graph points at are listed apart: they are the weights, not copies.
"""
import argparse
import collections
import ctypes
import threading
import time
import traceback

import torch

from synthetic import VOCAB, build_model, dpo_optimizer, dpo_step, load_model, make_pairs, n_params, \
    precomputed_reference, rss_mib


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20M-128k", choices=list(VOCAB))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (pointwise: completions)")
    parser.add_argument("--trainer", default="dpo", choices=["dpo", "pointwise"], help="whose step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as dpo.py --gradient_checkpointing")
    return parser.parse_args()


class Sampler:
    """Highest RSS since the last `take()`, sampled every 2 ms in a background thread."""

    def __init__(self):
        self.high = rss_mib()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.high = max(self.high, rss_mib())
            time.sleep(0.002)

    def take(self):
        high, self.high = max(self.high, rss_mib()), rss_mib()
        return high


def saved_for_backward(step, policy):
    """What autograd keeps from one call of step(): ({where it was made: MiB}, the positions of the forward: the
    first input_ids the model saw). Parameters the graph points at count under "parameters (the weights)"."""
    seen, where, params, positions = set(), collections.Counter(), {p.untyped_storage().data_ptr() for p in policy.parameters()}, []
    hook = policy.get_input_embeddings().register_forward_pre_hook(lambda m, inputs: positions.append(inputs[0].numel()))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            frames = [f for f in traceback.extract_stack() if "transformers" in f.filename or f.filename.endswith("common.py")]
            made = "parameters (the weights)" if key in params else (
                f"{frames[-1].name}: {(frames[-1].line or '').strip()[:70]}" if frames else "elsewhere")
            where[made] += t.untyped_storage().nbytes() / 2**20
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    hook.remove()
    return where, positions[0]


def main():
    args = parse_args()
    libc = ctypes.CDLL("libc.so.6")
    imports = rss_mib()
    path = build_model(args.model)
    policy = load_model(path).train()
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = dpo_optimizer(policy)
    if args.trainer == "dpo":
        pairs = make_pairs(VOCAB[args.model], args.steps * args.batch_size)
        ref = precomputed_reference(policy, pairs, args.batch_size)
        step = lambda i, mark: dpo_step(policy, optimizer, pairs[i * args.batch_size:(i + 1) * args.batch_size], ref, mark=mark)
    else:  # vs_kto.py's data and pointwise_dpo.py's step, with its default precomputed reference
        from types import SimpleNamespace
        from pointwise_dpo import all_example_logps
        from synthetic import PAD
        from vs_kto import make_examples, pointwise_step
        examples = make_examples(SimpleNamespace(model=args.model, examples=args.steps * args.batch_size, lengths="equal"))
        cache = all_example_logps(policy, examples, SimpleNamespace(batch_size=args.batch_size, logps="mean"), PAD, "cpu")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        step = lambda i, mark: pointwise_step(policy, optimizer, scheduler, examples[i * args.batch_size:(i + 1) * args.batch_size],
                                              range(i * args.batch_size, (i + 1) * args.batch_size),
                                              lambda chunk, idx: cache[list(idx)], mark=mark)
    weights = n_params(policy) * 4 / 2**20
    print(f"model {args.model}: {n_params(policy) / 1e6:.1f}M parameters; fp32 weights {weights:.0f} MiB, "
          f"their gradients {weights:.0f} MiB, AdamW moments {2 * weights:.0f} MiB; RSS after imports {imports:.0f} MiB; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; {args.trainer}'s step, batch "
          f"{args.batch_size}\n")
    print("| step | floor (MiB) | end of forward | peak in forward | peak in backward | peak in step | seconds |")
    print("|---|---|---|---|---|---|---|")
    sampler = Sampler()
    for i in range(args.steps):
        libc.malloc_trim(0)
        floor = rss_mib()
        sampler.take()
        row = {}

        def mark(phase):
            row[phase] = sampler.take()
            if phase == "forward":
                row["end of forward"] = rss_mib()

        start = time.perf_counter()
        if i == 0:
            where, positions = saved_for_backward(lambda: step(i, mark), policy)
        else:
            step(i, mark)
        seconds = time.perf_counter() - start
        print(f"| {i + 1} | {floor:.0f} | {row['end of forward']:.0f} | {row['forward']:.0f} | {row['backward']:.0f} "
              f"| {row['step']:.0f} | {seconds:.2f} |", flush=True)
    activations = sum(v for k, v in where.items() if not k.startswith("parameters"))
    print(f"\nSaved for backward in step 1's forward: {activations:.0f} MiB of activations over {positions} positions "
          f"({activations * 2**20 / positions / 1024:.0f} KiB a position), by the line that made them:")
    print("| made by | MiB |")
    print("|---|---|")
    for made, mib in where.most_common():
        if mib >= 0.5:
            print(f"| `{made}` | {mib:.0f} |")


if __name__ == "__main__":
    main()

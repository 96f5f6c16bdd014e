"""Where dpo.py's peak resident memory goes, phase by phase, over a few DPO steps.

    python bench/memory.py --model 20M-128k          # about 1 minute
    python bench/memory.py --model 20M-128k --gradient-checkpointing

A thread samples the resident set (/proc/self/statm) every 2 ms while dpo.py's step runs (synthetic.dpo_step:
precomputed reference, fused AdamW, batch 8 pairs of the vs_trl.py data). For each step it prints:
    floor       RSS after the previous step, once glibc has given back the memory it keeps for reuse
                (malloc_trim): runtime + weights + AdamW moments + data, what persists between steps
    forward     RSS at the end of the forward, and the highest RSS during it
    backward    the highest RSS during backward
    step        the highest RSS during clip + AdamW step + zero_grad
The floor is measured by trimming after each step, which this script does and dpo.py does not: it costs page
faults in the next step, so the step times printed here are not the benchmark's.
"""
import argparse
import ctypes
import threading
import time

import torch

from synthetic import VOCAB, build_model, dpo_optimizer, dpo_step, load_model, make_pairs, n_params, \
    precomputed_reference, rss_mib


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20M-128k", choices=list(VOCAB))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
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


def main():
    args = parse_args()
    libc = ctypes.CDLL("libc.so.6")
    imports = rss_mib()
    path = build_model(args.model)
    pairs = make_pairs(VOCAB[args.model], args.steps * args.batch_size)
    policy = load_model(path).train()
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable({"use_reentrant": False})
    ref = precomputed_reference(policy, pairs, args.batch_size)
    optimizer = dpo_optimizer(policy)
    weights = n_params(policy) * 4 / 2**20
    print(f"model {args.model}: {n_params(policy) / 1e6:.1f}M parameters; fp32 weights {weights:.0f} MiB, "
          f"their gradients {weights:.0f} MiB, AdamW moments {2 * weights:.0f} MiB; RSS after imports {imports:.0f} MiB; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}\n")
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
        dpo_step(policy, optimizer, pairs[i * args.batch_size:(i + 1) * args.batch_size], ref, mark=mark)
        seconds = time.perf_counter() - start
        print(f"| {i + 1} | {floor:.0f} | {row['end of forward']:.0f} | {row['forward']:.0f} | {row['backward']:.0f} "
              f"| {row['step']:.0f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()

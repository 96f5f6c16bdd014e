"""The log-prob path alone: common.token_logps against the naive recipe and TRL's two approaches.

    python bench/logprobs.py                                   # the default grid, see --help
    python bench/logprobs.py --vocab 151936 --seq 2048 --dtype float32

For N = batch x seq hidden states (N, H) and an LM head (V, H), each method computes log p(label) per row:
    ours           common.token_logps: the head in chunks of rows, never (N, V) logits; backward recomputes a chunk
    naive          logits = hidden @ W.T, .float().log_softmax(-1).gather(...)   (the textbook recipe)
    trl-selective  full logits, then trl.trainer.utils.selective_log_softmax (a logsumexp per sequence)
    trl-chunked    trl.kernels.ChunkedLogProbFunction, what TRL 1.16's DPOTrainer uses (torch path on a CPU)
"forward" runs under torch.no_grad (a reference pass); "fwd+bwd" runs forward then backward with a random
upstream gradient. Each (configuration, method) runs in its own process; memory is the peak resident set
during the call minus the resident set just before it (Linux VmHWM, reset with /proc/self/clear_refs), so
it is the memory each method needs beyond the hidden states and the weight. In fwd+bwd it includes the
gradients of hidden and weight themselves, (N + V) x H values, which every method has to produce.
A configuration whose naive path would need more than --memory-budget-gib has its batch shrunk (halved
until it fits) for every method alike, and the table says so.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from synthetic import ROOT, median, quietly

METHODS = ["ours", "naive", "trl-selective", "trl-chunked"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936], help="vocabulary sizes")
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (shrunk if naive does not fit)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H (the 20M benchmark model's)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="dtypes of hidden and weight")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="subset of " + " ".join(METHODS))
    parser.add_argument("--chunk-size", type=int, default=None, help="ours: rows per chunk (default: token_logps')")
    parser.add_argument("--common", default=None, help="ours: take token_logps from this copy of common.py (before/after)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up call")
    parser.add_argument("--memory-budget-gib", type=float, default=10.0, help="what the naive path may use")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(fn):
    """(seconds, extra MiB) of one call: peak RSS during it minus RSS before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, (status_kib("VmHWM") - before) / 1024


def child(args):
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("common", args.common or os.path.join(ROOT, "common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    token_logps = common.token_logps
    config = json.loads(args.child)
    B, T, V, H, method = config["batch"], config["seq"], config["vocab"], args.hidden, config["method"]
    dtype = getattr(torch, config["dtype"])
    torch.manual_seed(0)
    hidden = (torch.randn(B * T, H) / H ** 0.5).to(dtype)  # (N, H)
    weight = torch.randn(V, H).to(dtype)  # (V, H)
    labels = torch.randint(V, (B * T,))  # (N,)
    upstream = torch.randn(B * T)  # (N,)

    if method == "ours":
        logps = lambda h, w: token_logps(h, w, None, labels, args.chunk_size)
    elif method == "naive":
        logps = lambda h, w: (h @ w.t()).float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    elif method == "trl-selective":
        from trl.trainer.utils import selective_log_softmax
        logps = lambda h, w: selective_log_softmax((h @ w.t()).view(B, T, V), labels.view(B, T)).flatten()
    else:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        logps = lambda h, w: ChunkedLogProbFunction.apply(h, w, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                          None, 1.0, ("log_probs",))[0]

    def forward():
        with torch.no_grad():
            return logps(hidden, weight)

    def forward_backward():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logps(h, w).float().backward(upstream)
        return h.grad, w.grad

    out = {}
    for name, fn in (("forward", forward), ("fwd+bwd", forward_backward)):
        fn()  # warm-up
        runs = [measure(fn) for _ in range(args.repeats)]
        out[name] = (median([t for t, _ in runs]), max(m for _, m in runs))
    if method != "naive":  # the values, against the naive recipe on the first 256 rows (in fp32)
        with torch.no_grad():
            reference = (hidden[:256].float() @ weight.float().t()).log_softmax(-1).gather(-1, labels[:256, None]).squeeze(-1)
            out["max_error"] = (forward()[:256].float() - reference).abs().max().item()
    print(json.dumps(out))


def main():
    args = parse_args()
    if args.child:
        return child(args)
    print(f"hidden size {args.hidden}, memory budget for the naive path {args.memory_budget_gib} GiB, "
          f"median of {args.repeats} calls after a warm-up, each configuration and method in its own process")
    print("\n| vocab | seq | batch | dtype | method | forward (s) | forward extra (MiB) | fwd+bwd (s) | "
          "fwd+bwd extra (MiB) | fp32 logits N x V (MiB) | max error | others' CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for V in args.vocab:
        for T in args.seq:
            B = args.batch
            while B > 1 and 4 * (B * T * V * 4) > args.memory_budget_gib * 2**30:  # naive fwd+bwd: ~4 fp32 N x V
                B //= 2
            for dtype in args.dtype:
                for method in args.methods:
                    config = dict(vocab=V, seq=T, batch=B, dtype=dtype, method=method)
                    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config),
                               f"--hidden={args.hidden}", f"--repeats={args.repeats}"]
                    if args.chunk_size:
                        command.append(f"--chunk-size={args.chunk_size}")
                    if args.common:
                        command.append(f"--common={os.path.abspath(args.common)}")
                    # every large block straight from mmap and back to the OS on free, so RSS follows the tensors
                    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
                    done, others = quietly(lambda: subprocess.run(command, capture_output=True, text=True, env=env))
                    if done.returncode:
                        print(f"| {V} | {T} | {B} | {dtype} | {method} | failed: {done.stderr.strip().splitlines()[-1]} |")
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    error = f"{r['max_error']:.1e}" if "max_error" in r else "-"
                    shrunk = f"{B} (of {args.batch})" if B < args.batch else f"{B}"
                    print(f"| {V} | {T} | {shrunk} | {dtype} | {method} | {r['forward'][0]:.3f} | {r['forward'][1]:.0f} | "
                          f"{r['fwd+bwd'][0]:.3f} | {r['fwd+bwd'][1]:.0f} | {B * T * V * 4 / 2**20:.0f} | {error} | {others:.0%} |",
                          flush=True)


if __name__ == "__main__":
    main()

"""What the benchmarks share: the two Llama-style models, synthetic preference pairs, a tokenizer, peak RSS.

Everything is built offline from a seed: random weights from a LlamaConfig, random token ids as data.
    20M       hidden 512, 6 layers, 8 heads (4 KV heads), MLP 1536, vocab 2,048, tied embeddings: 19.9M parameters
    20M-128k  the same backbone with Llama 3's vocabulary size, 128,256 (tied, as in Llama 3.2 1B/3B): 84.5M
"""
import os
import random
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so that `import common, dpo, toy` works from anywhere

import torch  # noqa: E402

PAD, EOS = 0, 1
VOCAB = {"20M": 2048, "20M-128k": 128256}
CACHE = os.environ.get("DPO_BENCH_DIR", "/tmp/dpo_bench")


def llama_config(vocab_size, max_positions=4096):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max_positions,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)


def build_model(name, seed=0):
    """A saved model directory (built once, then reused), so that every process loads the same weights."""
    from transformers import LlamaForCausalLM
    path = os.path.join(CACHE, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(seed)
        LlamaForCausalLM(llama_config(VOCAB[name])).save_pretrained(path)
        build_tokenizer(VOCAB[name]).save_pretrained(path)
    return path


def load_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def build_tokenizer(vocab_size):
    """A word-level tokenizer over "t2" ... "t{V-1}" plus <pad>=0, <eos>=1: the ids are the data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_pairs(vocab_size, n=1000, seed=0, prompt_len=(30, 80), response_len=(30, 80)):
    """(prompt_ids, chosen_ids, rejected_ids) with random tokens; each response ends with EOS.
    Prompt and responses are 55 tokens on average (1:1), so prompt + response is about 110 tokens."""
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(2, vocab_size) for _ in range(k)]
    return [(tokens(rng.randint(*prompt_len)), tokens(rng.randint(*response_len) - 1) + [EOS],
             tokens(rng.randint(*response_len) - 1) + [EOS]) for _ in range(n)]


def peak_rss_mib():
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- a shared 2-core machine: measure only when it is quiet
CPU = []  # this process's CPU seconds (time.process_time) at every step end, beside the wall-clock `ends`


def tick(ends):
    """A step ended: wall-clock time into `ends`, this process's CPU time into CPU. With one thread the CPU time
    of a step hardly depends on what other processes do; the wall-clock time does, on a shared machine."""
    CPU.append(time.process_time())
    ends.append(time.perf_counter())
    return ends


def _cpu_jiffies():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # busy (all but idle and iowait), total


def wait_for_quiet(threshold=0.1, max_wait=None, window=2.0):
    """Block until other processes use less than `threshold` of the machine's cores over `window` seconds
    (at most `max_wait` seconds, default $DPO_BENCH_MAX_WAIT or 900). Returns the busy fraction seen last."""
    max_wait = float(os.environ.get("DPO_BENCH_MAX_WAIT", 900)) if max_wait is None else max_wait
    start = time.time()
    while True:
        busy0, total0 = _cpu_jiffies()
        time.sleep(window)
        busy1, total1 = _cpu_jiffies()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        if busy < threshold or time.time() - start > max_wait:
            return busy


class OthersLoad:
    """Share of the machine's CPU time that other processes used while a block ran (this process and its
    children excluded):  with OthersLoad() as load: ...;  load.share"""

    @staticmethod
    def _ours():
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in usage)

    def __enter__(self):
        self.jiffies, self.wall, self.ours = _cpu_jiffies(), time.time(), self._ours()
        return self

    def __exit__(self, *exc):
        (busy0, total0), (busy1, total1) = self.jiffies, _cpu_jiffies()
        capacity = os.cpu_count() * (time.time() - self.wall)  # CPU-seconds the machine had
        all_busy = (busy1 - busy0) / max(1, total1 - total0) * capacity
        self.share = max(0.0, all_busy - (self._ours() - self.ours)) / capacity


def quietly(measure, tries=3, threshold=0.15):
    """measure() after waiting for a quiet machine; again (at most `tries` times) if others used more than
    `threshold` of the CPUs meanwhile. Returns (result, share of the CPUs others used) of the quietest try."""
    best = None
    for _ in range(tries):
        wait_for_quiet()
        with OthersLoad() as load:
            result = measure()
        if best is None or load.share < best[1]:
            best = (result, load.share)
        if load.share <= threshold:
            break
    return best


# ---------------------------------------------------------------- dpo.py's step
def dpo_step(policy, optimizer, chunk, ref, beta=0.1, max_grad_norm=10.0, mark=lambda phase: None):
    """One optimizer step of dpo.py's training loop with grad_accum = 1, made of dpo.py's own functions:
    one forward of 2B rows, the loss, backward, clip, the step's one host sync, AdamW step.
    `ref(chunk)` gives the reference log-probs of chosen and rejected (precomputed or from a frozen model).
    `mark(phase)` is called at the end of "forward", "backward" and "step" (memory.py's timeline)."""
    from dpo import dpo_loss, dpo_metrics, pair_logps
    policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, PAD, "cpu")
    reference_chosen_logps, reference_rejected_logps = ref(chunk)
    mark("forward")
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                        reference_chosen_logps, reference_rejected_logps, beta)
    losses.mean().backward()
    mark("backward")
    metrics = dpo_metrics(losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    row = dict(zip([*metrics, "grad_norm"], torch.stack([*metrics.values(), grad_norm.float()]).tolist()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("step")
    return row


def dpo_optimizer(policy, learning_rate=1e-4, fused=True):
    """dpo.py's optimizer: AdamW without weight decay, fused (one kernel per step); fused=False is the plain one."""
    return torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0, fused=fused)


def precomputed_reference(policy, pairs, batch_size=8):
    """dpo.py's default reference: log-probs of every pair under the initial policy, looked up per chunk."""
    from types import SimpleNamespace
    from dpo import all_pair_logps
    cache = all_pair_logps(policy, pairs, SimpleNamespace(batch_size=batch_size), PAD, "cpu")  # (N, 2)
    index = {id(pair): i for i, pair in enumerate(pairs)}
    return lambda chunk: cache[[index[id(pair)] for pair in chunk]].unbind(-1)


def frozen_reference(reference):
    from dpo import pair_logps
    reference.eval().requires_grad_(False)
    return lambda chunk: pair_logps(reference, chunk, PAD, "cpu")


# ---------------------------------------------------------------- a reward model on the same backbone
def build_reward_model(name, seed=0):
    """A saved sequence classifier with one output (AutoModelForSequenceClassification, num_labels=1) on the
    weights of build_model(name), its new score head drawn from `seed`; built once, then reused, so that every
    process loads the same reward model."""
    from transformers import AutoModelForSequenceClassification
    path = os.path.join(CACHE, f"{name}-rm")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(build_model(name), num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = PAD
        model.save_pretrained(path)
        build_tokenizer(VOCAB[name]).save_pretrained(path)
    return path

"""What the benchmarks share: the two Llama-style models, synthetic preference pairs, a tokenizer, peak RSS.

Everything is built offline from a seed: random weights from a LlamaConfig, random token ids as data.
    20M       hidden 512, 6 layers, 8 heads (4 KV heads), MLP 1536, vocab 2,048, tied embeddings: 19.9M parameters
    20M-128k  the same backbone with Llama 3's vocabulary size, 128,256 (tied, as in Llama 3.2 1B/3B): 84.6M
"""
import os
import random
import resource
import sys

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

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the tiny models here run faster on one thread, and much faster on busy cores


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer trained on toy reviews, with a chat template (built in a second)."""
    import random
    import toy
    rng = random.Random(0)
    return toy.build_tokenizer([toy.review(rng) for _ in range(500)], vocab_size=300)


def tiny_llama(vocab_size=300, tie=True, seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=0, pad_token_id=1)
    return LlamaForCausalLM(config).to(dtype)


@pytest.fixture(scope="session")
def toy_dir():
    """The real toy task (built once, 1.5-2.5 minutes on 2 cores, then cached in $DPO_TOY_DIR or ~/.cache). With
    several test workers (pytest -n), one builds it while the others wait on a lock file beside it."""
    import fcntl
    import toy
    os.makedirs(os.path.dirname(os.path.abspath(toy.DEFAULT_DIR)), exist_ok=True)
    with open(os.path.abspath(toy.DEFAULT_DIR) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return toy.ensure_built()

"""Dropout off in every family: at step 0 the policy in train() mode (as dpo.py trains it) is its own reference."""
import math
import random

import pytest
import torch

import dpo
from common import load_model

P = 0.3  # in every dropout field of each family's config
SIZE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=1)
CONFIGS = {"opt": lambda T: T.OPTConfig(dropout=P, attention_dropout=P, layerdrop=P, ffn_dim=64,
                                        word_embed_proj_dim=32),
           "falcon": lambda T: T.FalconConfig(hidden_dropout=P, attention_dropout=P),
           "bloom": lambda T: T.BloomConfig(hidden_dropout=P, attention_dropout=P),
           "gpt2": lambda T: T.GPT2Config(resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, summary_first_dropout=P),
           "llama": lambda T: T.LlamaConfig(attention_dropout=P, intermediate_size=64, num_key_value_heads=2)}


@pytest.mark.parametrize("family", CONFIGS)
def test_dpo_loss_is_log2_at_step_0_in_train_mode(family, tmp_path):
    import transformers as T
    torch.manual_seed(0)
    config = CONFIGS[family](T)
    for name, value in SIZE.items():  # tiny: hidden 32, 2 layers, vocab 300 (GPT-2 and BLOOM map the names)
        setattr(config, name, value)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(2, 300) for _ in range(n)]
    pairs = [(tokens(rng.randint(3, 8)), tokens(rng.randint(3, 8)) + [0], tokens(rng.randint(3, 8)) + [0])
             for _ in range(4)]  # 4 pairs, prompts and responses of 3-8 tokens

    policy = load_model(str(tmp_path), "float32", "cpu")
    with torch.no_grad():
        reference = dpo.pair_logps(policy.eval(), pairs, 1, "cpu")
        dropout_on = dpo.pair_logps(T.AutoModelForCausalLM.from_pretrained(tmp_path).train(), pairs, 1, "cpu")
    assert not torch.allclose(dropout_on[0], reference[0], atol=1e-3)  # the config's dropout is live: not vacuous
    policy_logps = dpo.pair_logps(policy.train(), pairs, 1, "cpu")
    losses, _, _ = dpo.dpo_loss(*policy_logps, *reference, beta=0.1)
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    for got, expected in zip(policy_logps, reference):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)

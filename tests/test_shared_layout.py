"""The shared-prompt layout (common.collate_shared / grouped_logps): each prompt computed once, its responses after
it, several groups packed in a row. Oracle: every response scored alone, in a sequence of its own, by the model's
own logits (no code from common.py), and the mask against one written out by hand."""
import random

import pytest
import torch
import transformers as T

from common import collate, collate_shared, grouped_logps, sequence_logps


def tiny(family):
    """A random 2-layer model of a family (hidden 32, vocab 300), in eval mode."""
    torch.manual_seed(0)
    size = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=1)
    config = {"llama": lambda: T.LlamaConfig(**size),
              "qwen2": lambda: T.Qwen2Config(**size),
              "gemma2": lambda: T.Gemma2Config(**size, head_dim=8, final_logit_softcapping=0.5),
              "gpt2": lambda: T.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0),  # learned absolute positions
              "opt": lambda: T.OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, pad_token_id=1),  # learned positions, offset 2
              "cohere": lambda: T.CohereConfig(**size, logit_scale=0.25, bos_token_id=0, eos_token_id=0),
              "bloom": lambda: T.BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4),  # ALiBi
              "falcon_h1": lambda: T.FalconH1Config(**size, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4,
                                                    mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16),  # + Mamba
              }[family]()
    return T.AutoModelForCausalLM.from_config(config).eval()


def random_groups(rng, n, responses=2, vocab=300):
    """n prompts of 1-12 tokens, each with `responses` responses of 1-9 tokens ending in EOS (0)."""
    word = lambda k: [rng.randrange(2, vocab) for _ in range(k)]
    return [(word(rng.randint(1, 12)), [word(rng.randint(0, 8)) + [0] for _ in range(responses)]) for _ in range(n)]


@torch.no_grad()
def alone(model, groups):
    """Each response in a sequence of its own, scored with the model's own logits: sum_t log p(y_t | x, y_<t)."""
    out = []
    for p, responses in groups:
        for r in responses:
            logprobs = model(input_ids=torch.tensor([p + r])).logits[0].double().log_softmax(-1)  # (T, V)
            out.append(sum(logprobs[len(p) + t - 1, r[t]] for t in range(len(r))))
    return torch.stack(out).float()


SHARED = {"llama": True, "qwen2": True, "gemma2": True, "gpt2": True, "opt": True, "cohere": True,
          "bloom": False,  # builds its own ALiBi mask from a 2D one: a 4D mask is refused
          "falcon_h1": False}  # Mamba layers carry every earlier token in their state, whatever the mask


@pytest.mark.parametrize("family", list(SHARED))
def test_each_response_scores_as_if_alone(family, capsys):
    """One group a row and several packed in a row give every response the log-prob it has alone; a family that
    cannot take the layout is told once and computes each response on its own."""
    model = tiny(family)
    groups = random_groups(random.Random(3), 5)
    expected = alone(model, groups)
    with torch.no_grad():
        got, n_tokens = grouped_logps(model, groups, pad_token_id=1, device="cpu")
        if SHARED[family]:
            packed = collate_shared(groups, 1, row_tokens=60)  # several groups a row
            assert len(packed["input_ids"]) < len(groups)
            torch.testing.assert_close(sequence_logps(model, packed)[0], expected, atol=2e-5, rtol=2e-5)
            three = random_groups(random.Random(4), 4, responses=3)  # three responses to a prompt
            torch.testing.assert_close(grouped_logps(model, three, 1, "cpu")[0], alone(model, three), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert n_tokens.tolist() == [len(r) for _, rs in groups for r in rs]
    said = capsys.readouterr().out
    assert model._prompt_shared == SHARED[family]
    assert said.count("does not take a shared-prompt layout") == (0 if SHARED[family] else 1), said


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_both_attention_implementations_take_the_mask(attention):
    """SDPA takes the boolean mask as it is, eager attention an additive one."""
    model = tiny("llama")
    model.set_attn_implementation(attention)
    groups = random_groups(random.Random(7), 6, responses=3)
    with torch.no_grad():
        got = sequence_logps(model, collate_shared(groups, 1, row_tokens=80))[0]
    torch.testing.assert_close(got, alone(model, groups), atol=2e-5, rtol=2e-5)


def test_gradients_equal_the_separate_layouts():
    """The same DPO loss through both layouts gives the same gradient, parameter by parameter."""
    model = tiny("llama").train()
    groups = random_groups(random.Random(5), 6)
    rows = [(p, r) for p, rs in groups for r in rs]
    grads = []
    for batch in (collate_shared(groups, 1, row_tokens=50), collate(rows, 1)):
        model.zero_grad()
        logps = sequence_logps(model, batch)[0]  # (2B,): chosen, rejected, chosen, ...
        (-torch.nn.functional.logsigmoid(0.1 * (logps[0::2] - logps[1::2]))).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_mask_positions_and_indices_of_two_packed_groups():
    """The layout of two groups in one row, against the mask, positions and scoring indices written by hand."""
    batch = collate_shared([([5, 6], [[7, 8], [9, 10]]), ([11], [[12], [13]])], pad_token_id=1, row_tokens=12)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 1, 0, 0, 0]]
    sees = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 4], 5: [0, 1, 4, 5],
            6: [6], 7: [6, 7], 8: [6, 8], 9: [9], 10: [9, 10], 11: [9, 10, 11]}  # padding sees only padding
    expected = torch.zeros(12, 12, dtype=torch.bool)
    for q, keys in sees.items():
        expected[q, keys] = True
    assert torch.equal(batch["attention_mask"][0, 0], expected)
    # a response's first token is scored at its prompt's last position, the others at the position before them
    assert batch["score_index"].tolist() == [1, 2, 1, 4, 6, 6]
    assert batch["labels"].tolist() == [7, 8, 9, 10, 12, 13]
    assert batch["response_of_token"].tolist() == [0, 0, 1, 1, 2, 3]
    assert batch["n_tokens"].tolist() == [2, 2, 1, 1]


@pytest.mark.parametrize("seed", range(6))
def test_packing_removes_padding_with_rows_at_most_twice_the_longest_group(seed):
    """Rows are from the longest group's length to twice that, and hold no more positions than rows as long as
    the longest group, which hold fewer than one group a row."""
    groups = random_groups(random.Random(seed), 16)
    sizes = [len(p) + sum(map(len, rs)) for p, rs in groups]
    batch = collate_shared(groups, 1)
    assert max(sizes) <= batch["input_ids"].shape[1] <= 2 * max(sizes)
    assert int((batch["input_ids"] != 1).sum()) == sum(sizes)  # every token is there (pad id 1 is never drawn)
    at_longest = collate_shared(groups, 1, row_tokens=max(sizes))
    assert at_longest["input_ids"].shape[1] == max(sizes)
    assert batch["input_ids"].numel() <= at_longest["input_ids"].numel() < len(groups) * max(sizes)


@pytest.mark.parametrize("family,pad", [("llama", 1), ("llama", 0), ("qwen2", 1), ("bloom", 1)])
def test_reward_model_scores_each_response_as_if_alone(family, pad, capsys):
    """grouped_scores against the classifier's own forward on each prompt + response alone (no padding, so the
    class reads its last token that is not the pad token). pad 0 = EOS: a response's EOS is then a pad token, and
    the class reads the token before it. BLOOM (ALiBi) cannot take the layout and must fall back, same scores."""
    from common import grouped_scores
    torch.manual_seed(0)
    causal = tiny(family)
    causal.config.pad_token_id, causal.config.num_labels = pad, 1
    model = T.AutoModelForSequenceClassification.from_config(causal.config).eval()
    groups = random_groups(random.Random(1), 5)
    with torch.no_grad():
        scores = grouped_scores(model, groups, pad, "cpu")
        expected = [model(input_ids=torch.tensor([p + r])).logits[0, 0].item() for p, rs in groups for r in rs]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert model._scores_shared == (family != "bloom")
    assert ("does not take a shared-prompt layout" in capsys.readouterr().out) == (family == "bloom")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt", "cohere", "bloom", "falcon_h1"])
def test_rows_that_share_a_prompt_draw_what_generate_draws_from_the_whole_batch(family, monkeypatch):
    """sample_responses computes a prompt that several rows share once and copies its KV cache to those rows.
    generate's next-token logits from that cache must be those of generate over the whole batch, at every new
    token, and from the same seed sample_responses must draw the very same tokens."""
    from types import SimpleNamespace
    import common
    model = tiny(family)
    tokenizer = SimpleNamespace(pad_token_id=1, eos_token_id=0)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 8, 9], [12, 13, 14], [10, 11], [5, 6, 7, 8, 9]]  # left-padded
    first = [0, 1, 0, 3, 1, 0]
    ids = torch.tensor([[1] * (5 - len(p)) + p for p in prompts])
    mask = (torch.arange(5) >= torch.tensor([5 - len(p) for p in prompts])[:, None]).long()
    greedy = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=1,
                  eos_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cache = common._prompt_cache(model, ids, mask, first)
        assert (cache is None) == (family == "falcon_h1")  # a Mamba state is not copied: every row computed
        if cache is not None:
            whole, shared = model.generate(**greedy), model.generate(**greedy, past_key_values=cache)
            for a, b in zip(whole.scores, shared.scores):
                assert torch.allclose(a, b, atol=1e-4)
    used = []
    monkeypatch.setattr(common, "_prompt_cache", lambda *a, f=common._prompt_cache: used.append(a[3]) or f(*a))
    torch.manual_seed(0)
    drawn = common.sample_responses(model, tokenizer, prompts, 12)
    monkeypatch.setattr(common, "_prompt_cache", lambda *a: None)
    torch.manual_seed(0)
    assert drawn == common.sample_responses(model, tokenizer, prompts, 12) and used == [first]


def test_a_model_whose_generation_config_names_its_own_cache_is_sampled_whole():
    """generate refuses a cache given beside a generation config's cache_implementation (Gemma's checkpoints name
    one): sample_responses then computes every row, and draws what generate draws."""
    from types import SimpleNamespace
    import common
    model = tiny("llama")
    model.generation_config.cache_implementation = "static"
    ids, mask = torch.tensor([[5, 6, 7], [5, 6, 7]]), torch.ones(2, 3, dtype=torch.long)
    assert common._prompt_cache(model, ids, mask, [0, 0]) is None
    tokenizer = SimpleNamespace(pad_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    drawn = common.sample_responses(model, tokenizer, [[5, 6, 7], [8, 9], [5, 6, 7]], 6)
    torch.manual_seed(0)
    out = model.generate(input_ids=torch.tensor([[5, 6, 7], [1, 8, 9], [5, 6, 7]]), attention_mask=torch.tensor(
        [[1, 1, 1], [0, 1, 1], [1, 1, 1]]), do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6, pad_token_id=1,
        eos_token_id=0)
    assert drawn == [r[:r.index(0) + 1] if 0 in r else r for r in out[:, 3:].tolist()]

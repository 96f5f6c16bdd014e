"""common.py's log-prob path against a naive log_softmax + gather written here."""
import random

import pytest
import torch

from common import collate, sequence_logps, token_logps
from conftest import tiny_llama


def naive_token_logps(hidden, weight, bias, labels):
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    return logits.float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_logps_values_and_gradients(dtype, tol, with_bias):
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True) if with_bias else None
    labels = torch.randint(V, (N,))
    upstream = torch.randn(N)
    params = [hidden, weight] + ([bias] if with_bias else [])
    expected = naive_token_logps(hidden, weight, bias, labels)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    for chunk in (1, 5, 16, 1000):  # the result must not depend on the chunk size
        got = token_logps(hidden, weight, bias, labels, chunk_size=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        grads = torch.autograd.grad((got * upstream).sum(), params)
        for g, e in zip(grads, expected_grads):
            assert g.dtype == e.dtype
            torch.testing.assert_close(g.float(), e.float(), atol=tol * 10, rtol=tol)


def test_bf16_weight_gradient_of_a_large_vocabulary_matches_fp32():
    # above 8,192 rows the bf16 weight gradient is summed into fp32 in row blocks: every block must land
    torch.manual_seed(0)
    N, H, V = 24, 8, 17_001
    hidden = torch.randn(N, H).bfloat16()
    weight = torch.randn(V, H).bfloat16().requires_grad_()
    labels = torch.randint(V, (N,))
    labels[:3] = torch.tensor([0, 8_192, V - 1])  # rows in the first, a middle and the last block
    upstream = torch.randn(N)
    (got,) = torch.autograd.grad((token_logps(hidden, weight, None, labels, chunk_size=7) * upstream).sum(), [weight])
    w32 = weight.detach().float().requires_grad_()
    (expected,) = torch.autograd.grad((naive_token_logps(hidden.float(), w32, None, labels) * upstream).sum(), [w32])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=5e-2)  # bf16 logits


def test_float64_stays_float64_and_passes_gradcheck():
    """fp64 inputs are computed in fp64: values to 1e-12 of a naive fp64 computation, and finite differences."""
    torch.manual_seed(0)
    N, H, V = 7, 4, 13
    hidden, weight, bias = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                            for shape in ((N, H), (V, H), (V,)))
    labels = torch.randint(V, (N,))
    expected = (hidden @ weight.t() + bias).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)  # (N,) fp64
    for chunk in (1, 4, 100):
        got = token_logps(hidden, weight, bias, labels, chunk_size=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        assert torch.autograd.gradcheck(lambda h, w, b: token_logps(h, w, b, labels, chunk), (hidden, weight, bias))


def random_rows(rng, n, vocab):
    """Random prompt and response lengths, so padding and response positions differ per row."""
    return [([rng.randrange(2, vocab) for _ in range(rng.randint(1, 9))],
             [rng.randrange(2, vocab) for _ in range(rng.randint(1, 7))] + [0]) for _ in range(n)]


def naive_sequence_logps(model, batch):
    """The textbook recipe: full logits, shift by one, log_softmax, gather, mask with the response mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["response_mask"][:, 1:]
    return (logprobs * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
@pytest.mark.parametrize("tie", [True, False])
def test_sequence_logps_matches_naive(dtype, tol, tie):
    rng = random.Random(1)
    model = tiny_llama(tie=tie, dtype=dtype)
    batch = collate(random_rows(rng, 6, 300), pad_token_id=1)
    expected, expected_n = naive_sequence_logps(model, batch)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    for chunk in (3, 64):
        got, n = sequence_logps(model, batch, chunk_size=chunk)
        assert torch.equal(n, expected_n)
        torch.testing.assert_close(got, expected, atol=tol, rtol=1e-3)
        grads = torch.autograd.grad(got.sum(), list(model.parameters()))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g.float(), e.float(), atol=tol, rtol=5e-2 if dtype == torch.bfloat16 else 1e-3)


def test_padding_does_not_change_a_rows_logps():
    """A row scored alone and in a batch padded to a longer row gives the same log-prob."""
    model = tiny_llama()
    short, long = ([5, 6, 7], [8, 9, 0]), ([5] * 10, [3] * 12 + [0])
    alone, _ = sequence_logps(model, collate([short], 1))
    batched, n = sequence_logps(model, collate([short, long], 1))
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert n.tolist() == [3, 13]


def test_first_response_token_is_scored_by_last_prompt_position():
    """Change only the first response token: the log-prob changes by exactly the difference of the two
    tokens' log-probs at the last prompt position (an off-by-one would change something else)."""
    model = tiny_llama()
    prompt = [4, 5, 6]
    a, b = collate([(prompt, [10, 11, 0])], 1), collate([(prompt, [12, 11, 0])], 1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        la, lb = sequence_logps(model, a)[0][0], sequence_logps(model, b)[0][0]
        # the tokens after the first differ in context too, so compare the first token's share directly
        first_a = la - naive_tail(model, prompt, [10, 11, 0])
        first_b = lb - naive_tail(model, prompt, [12, 11, 0])
    torch.testing.assert_close(first_a, logits[10], atol=1e-5, rtol=0)
    torch.testing.assert_close(first_b, logits[12], atol=1e-5, rtol=0)


def naive_tail(model, prompt, response):
    """Sum of log-probs of response[1:], each scored by the position before it."""
    ids = torch.tensor([prompt + response])
    lp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(lp[len(prompt) + j - 1, response[j]] for j in range(1, len(response)))


def tiny_model(family):
    """A random 2-layer model of a family (hidden 32, vocab 300), in eval mode: GPT-2's dropout is on by default."""
    import transformers as T
    torch.manual_seed(0)
    size = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=1)
    config = {"llama": lambda: T.LlamaConfig(**size),
              "gpt2": lambda: T.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=0),
              "opt": lambda: T.OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, pad_token_id=1),
              "gemma2": lambda: T.Gemma2Config(**size, head_dim=8, final_logit_softcapping=0.5),  # tanh cap
              "granite": lambda: T.GraniteConfig(**size, logits_scaling=4.0),  # logits / 4
              "cohere": lambda: T.CohereConfig(**size, logit_scale=0.25),  # logits * 0.25
              "falcon_h1": lambda: T.FalconH1Config(**size, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                                    mamba_d_state=8, mamba_chunk_size=16, lm_head_multiplier=3.0),
              }[family]()
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family,plain_head", [("llama", True), ("gpt2", True), ("opt", True), ("gemma2", False),
                                               ("granite", False), ("cohere", False), ("falcon_h1", False)])
def test_sequence_logps_matches_the_models_own_logits(family, plain_head, capsys):
    """Whatever a family does after its LM head, the log-probs are those of model(...).logits; a model whose
    head is plain keeps the fused path, one that transforms its logits is told once and takes the full logits."""
    model = tiny_model(family)
    batch = collate(random_rows(random.Random(2), 5, 300), pad_token_id=1)
    expected, _ = naive_sequence_logps(model, batch)
    for _ in range(2):
        torch.testing.assert_close(sequence_logps(model, batch)[0], expected, atol=1e-5, rtol=1e-5)
    said = capsys.readouterr().out
    assert said.count("transforms the LM head's logits") == (0 if plain_head else 1), said

"""What every DPO-family script needs, and nothing algorithm-specific.

1. `sequence_logps`: summed log pi(y|x) of each response from one forward pass, with the LM head
   run only on the positions that score a response token, in chunks, never holding [B, T, V] logits.
   `grouped_logps`: the same for a prompt with several responses, the prompt computed once (`collate_shared`).
2. `encode_prompt` / `encode_response` / `truncate` / `collate`: (prompt, response) -> padded batch.
3. `load_model` / `load_tokenizer` / `load_rows`: hub id or local path, with clear errors on bad data.
"""
import argparse
import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm


# ---------------------------------------------------------------- log-probs
class _ChunkedLogProb(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[label] row by row, `chunk_size` rows of logits at a time, in
    fp32 (fp64 for fp64 inputs). Backward recomputes each chunk's logits instead of storing them: memory is
    O(chunk_size * V), one buffer reused by every chunk, and the fp32 weight gradient (for bf16/fp16
    weights also an fp32 chunk buffer and a (V, H) one in the weight's dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):  # hidden (N, H), labels (N,)
        lse = torch.empty(hidden.shape[0], dtype=_acc_dtype(weight), device=hidden.device)  # (N,)
        out = torch.empty_like(lse)  # (N,)
        buffers = _chunk_buffers(hidden, weight, chunk_size)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[s:s + chunk_size], weight, bias, buffers)  # (n, V) fp32
            out[s:s + chunk_size] = logits.gather(-1, labels[s:s + chunk_size, None]).squeeze(-1)
            top = logits.amax(-1, keepdim=True)  # (n, 1): logsumexp in place, no second (n, V) tensor
            lse[s:s + chunk_size] = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return out.sub_(lse)

    @staticmethod
    def backward(ctx, grad_out):  # d log p(label) / d logits = onehot(label) - softmax(logits)
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=_acc_dtype(weight)) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=_acc_dtype(weight)) if need_b else None
        buffers = _chunk_buffers(hidden, weight, ctx.chunk_size)
        low_w = None if not need_w or weight.dtype == _acc_dtype(weight) else torch.empty_like(weight)  # (V, H)
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h, g_out = hidden[s:s + ctx.chunk_size], grad_out[s:s + ctx.chunk_size, None]  # (n, H), (n, 1)
            g = _chunk_logits(h, weight, bias, buffers).sub_(lse[s:s + ctx.chunk_size, None]).exp_().mul_(-g_out)
            g.scatter_add_(-1, labels[s:s + ctx.chunk_size, None], g_out)  # (n, V) fp32/64: g_out * (onehot - p)
            if need_b:
                grad_b += g.sum(0)
            g = g if g.dtype == weight.dtype else buffers[0][:len(h)].copy_(g)  # (n, V) in the weight's dtype
            if need_w and weight.dtype == grad_w.dtype:  # summed in place, no (V, H) temporary
                grad_w.addmm_(g.t(), h)
            elif need_w:  # the chunk's product in the weight's dtype, added to the fp32 sum in row blocks
                torch.mm(g.t(), h, out=low_w)  # (a mixed-dtype add_ of the whole would copy it to fp32 first)
                for r in range(0, len(low_w), 8192):
                    grad_w[r:r + 8192] += low_w[r:r + 8192]
            if need_h:
                torch.mm(g, weight, out=grad_h[s:s + ctx.chunk_size])
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
        return grad_h, cast(grad_w, weight), cast(grad_b, bias), None, None


def _acc_dtype(weight):
    """The dtype logits and log-probs are computed in: fp64 for fp64 weights, fp32 for every other dtype."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunk_buffers(hidden, weight, chunk_size):
    """(chunk, V) buffers for the head's output: in the weight's dtype, and in fp32 (the same one for fp32/64)."""
    low = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0], dtype=weight.dtype)
    return low, low if weight.dtype == _acc_dtype(weight) else torch.empty_like(low, dtype=torch.float32)


def _chunk_logits(h, weight, bias, buffers):
    """fp32 (fp64) logits (n, V) of the rows h (n, H), written into the buffers."""
    low = buffers[0][:len(h)]
    torch.mm(h, weight.t(), out=low) if bias is None else torch.addmm(bias, h, weight.t(), out=low)
    return low if buffers[1] is buffers[0] else buffers[1][:len(h)].copy_(low)


def token_logps(hidden, weight, bias, labels, chunk_size=None):
    """log p(label_i | hidden_i) for each of N rows: (N, H) -> (N,) in fp32 (fp64 for fp64), without (N, V) logits."""
    chunk_size = chunk_size or max(128, 2**24 // weight.shape[0] // 128 * 128)  # ~64 MiB of fp32 logits
    # per chunk, in multiples of 128 rows (a GPU matmul tile), and at least 128 rows so each matmul stays large
    return _ChunkedLogProb.apply(hidden, weight, bias, labels, chunk_size)


# Families whose logits are exactly lm_head(base_model(...)[0]), read in transformers' modeling_<name>.py.
# Any other model is checked once against its own logits: Gemma-2 and RecurrentGemma soft-cap them, Granite
# divides them, Cohere and FalconH1 multiply them, MiniCPM scales the hidden state, and others will come.
PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3"}


def sequence_logps(model, batch, chunk_size=None):
    """Summed log-prob of each response's tokens, and their count: (K,) fp32, (K,) long.

    `batch` comes from `collate` (one response a row) or `collate_shared` (a prompt once, its responses after it,
    several groups a row). The one-token shift happens once, in the collate's `score_index`: the token at
    position t is scored by the hidden state at t - 1, so a response's first token is scored at the last prompt
    position. All indices are built on the host: no boolean masks, no syncs here.
    The fused head is used when the model's logits are lm_head(final hidden), as `_head_is_plain` decides
    on the first batch (once per model); otherwise the model's own (B, T, V) logits."""
    return through_wrapper(model, _sequence_logps, model, batch, chunk_size)  # under torchrun: in DDP/FSDP2's forward


def _sequence_logps(model, batch, chunk_size):
    plain = getattr(model, "_plain_head", None)
    if plain is None:  # the first call only: decided once per model, kept on it
        plain = model._plain_head = _head_is_plain(model, batch)
    inputs = _model_inputs(model, batch)
    if plain:
        out = model.base_model(**inputs)
        hidden = out[0].flatten(0, 1).index_select(0, batch["score_index"])  # (N, H): only positions that score
        head = model.get_output_embeddings()
        per_token = token_logps(hidden, head.weight, head.bias, batch["labels"], chunk_size)  # (N,)
    else:
        logits = model(**inputs).logits
        logits = logits.flatten(0, 1).index_select(0, batch["score_index"])  # (N, V)
        logprobs = logits.to(_acc_dtype(logits)).log_softmax(-1)  # (N, V) fp32 (fp64 for fp64)
        per_token = logprobs.gather(-1, batch["labels"][:, None]).squeeze(-1)  # (N,)
    logps = per_token.new_zeros(len(batch["n_tokens"])).index_add(0, batch["response_of_token"], per_token)  # (K,)
    return logps, batch["n_tokens"]


def grouped_logps(model, groups, pad_token_id, device, chunk_size=None):
    """Summed log-probs and token counts of every response of every (prompt_ids, [response_ids, ...]) group,
    flat in group order: (K,) and (K,) for K responses in all. Each prompt is computed once (`collate_shared`),
    unless the model does not give the same log-probs that way (checked on the first call, once per model;
    one line says so), in which case each response is a row of its own with its own copy of the prompt.
    Attention runs dense over a row, masked (SDPA with a boolean mask, eager with an additive one; FlexAttention's
    block sparsity was not tried, no GPU was measured): a prompt with two responses saves more than the masked
    blocks cost, a prompt with many long responses (DICE's 16 samples) would not, so those go one per row."""
    shared = getattr(model, "_prompt_shared", None)
    if shared is None:  # under torchrun, the same answer on every rank
        works = _shared_layout_works(model, groups[:2], pad_token_id, device)
        shared = model._prompt_shared = agree(not works) == [0.0]
    batch = (collate_shared(groups, pad_token_id) if shared else
             collate([(p, r) for p, responses in groups for r in responses], pad_token_id))
    return sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, chunk_size)


@torch.no_grad()
def _shared_layout_works(model, groups, pad_token_id, device):
    """Whether the model computes each response in `collate_shared`'s layout (the groups packed in one row) as
    it does alone, in eval mode: (1) the same log-probs as in `collate`'s layout, to 1e-3 nats a token (0.05 in
    16-bit), which a model that ignores position ids fails; (2) no response's log-prob moves when the responses
    it must not see change (the first group's and every group's first response, reversed), to 1e-6 nats a token
    (1e-4 in 16-bit): attention under the mask gives them weight exactly 0, but a recurrent (Mamba-like) layer
    carries them in its state, and a model that ignores the 4D mask lets them through."""
    was_training = model.training
    model.eval()
    hidden = [(g, j) for g, (_, rs) in enumerate(groups) for j in range(len(rs)) if g == 0 or j == 0]
    changed = [(p, [r[::-1] if (g, j) in hidden else r for j, r in enumerate(rs)]) for g, (p, rs) in enumerate(groups)]
    seen = torch.tensor([(g, j) not in hidden for g, (_, rs) in enumerate(groups) for j in range(len(rs))])
    one_row = sum(len(p) + sum(map(len, rs)) for p, rs in groups)
    logps = lambda batch: sequence_logps(model, {k: v.to(device) for k, v in batch.items()})[0].cpu()
    try:
        shared = logps(collate_shared(groups, pad_token_id, one_row))
        moved = logps(collate_shared(changed, pad_token_id, one_row))
        error = None
    except Exception as e:  # a model that rejects a 4D mask or position ids
        error = one_line(e)
    separate = logps(collate([(p, r) for p, rs in groups for r in rs], pad_token_id))
    model.train(was_training)
    n_tokens = torch.tensor([len(r) for _, rs in groups for r in rs]).clamp(min=1)
    low = (getattr(model, "_compute_dtype", None) or next(model.parameters()).dtype) in (torch.float16, torch.bfloat16)
    gap = None if error else ((shared - separate).abs() / n_tokens).max()  # nats a token
    if error is None and gap > (0.05 if low else 1e-3):
        error = f"{gap:.3g} nats a token from the separate layout"
    if error is None and seen.any() and ((shared - moved).abs() / n_tokens)[seen].max() > (1e-4 if low else 1e-6):
        error = "a response's log-prob depends on tokens it must not see"
    if error:
        print(f"grouped_logps: {model.config.model_type} does not take a shared-prompt layout ({error}): "
              f"each response is computed with its own copy of the prompt")
    return error is None


def _model_inputs(model, batch):
    """The model's keyword arguments for a batch of `collate` (2D mask) or `collate_shared` (4D mask, position ids)."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if batch["attention_mask"].ndim == 4:  # (R, 1, T, T) bool, as SDPA takes it; eager attention adds a mask
        mask = batch["attention_mask"]
        if model.config._attn_implementation != "sdpa":  # fp32, so it adds to weights of any dtype
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        inputs.update(attention_mask=mask, position_ids=batch["position_ids"])
    return inputs


def grouped_scores(model, groups, pad_token_id, device, alone=False):
    """(K,) fp32 scores of a sequence classifier with one output (a reward model) for every response of every
    (prompt_ids, [response_ids, ...]) group, flat in group order, read where the model's own class reads them:
    at the last token that is not the pad token. Each prompt is computed once (`collate_shared`; the score head
    runs on one hidden state a response), unless the model does not give the same scores that way (checked on
    the first call, once per model; one line says so): then one response a row, the model's own forward.
    Under torchrun every rank calls it, unless alone=True: a model that one process uses by itself (a judge on
    rank 0), whose first call then decides for it without asking the other ranks."""
    shared = getattr(model, "_scores_shared", None)
    if shared is None:  # under torchrun, the same answer on every rank
        works = _shared_scores_work(model, groups[:2], pad_token_id, device)
        shared = model._scores_shared = works if alone else agree(not works) == [0.0]
    return (_shared_scores if shared else _separate_scores)(model, groups, pad_token_id, device)


def _separate_scores(model, groups, pad_token_id, device):
    batch = collate([(p, r) for p, rs in groups for r in rs], pad_token_id)  # right-padded rows
    no_cache = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}  # decoders only
    inputs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  **no_cache)
    return through_wrapper(model, lambda: model(**inputs).logits[:, 0].float())  # (K,)


def _shared_scores(model, groups, pad_token_id, device, row_tokens=None):
    batch = collate_shared(groups, pad_token_id, row_tokens)
    response, K = batch["response_of_token"], len(batch["n_tokens"])  # (N,): the tokens in row order
    read = torch.zeros(K, dtype=torch.long).scatter_reduce(0, response, batch["score_index"], "amin",
                                                           include_self=False)
    real = batch["labels"] != pad_token_id  # (N,); a response of pad tokens only reads at its prompt's last position
    read = read.scatter_reduce(0, response[real], batch["token_index"][real], "amax")  # (K,) its last real token
    inputs = _model_inputs(model, {k: v.to(device) for k, v in batch.items()})

    def forward():
        hidden = model.base_model(**inputs)[0].flatten(0, 1).index_select(0, read.to(device))  # (K, H)
        return model.score(hidden)[:, 0].float()  # (K,)
    return through_wrapper(model, forward)


@torch.no_grad()
def _shared_scores_work(model, groups, pad_token_id, device):
    """Whether the model scores each response in `collate_shared`'s layout (the groups packed in one row, the head
    `model.score` on the base model's hidden state) as its own forward scores it alone, to 1e-3 (0.05 in 16-bit)
    relative to the score; a model that ignores the 4D mask or the position ids, or whose head is not `score`,
    does not, and fails the check."""
    was_training = model.training
    model.eval()
    one_row = sum(len(p) + sum(map(len, rs)) for p, rs in groups)
    try:
        shared, error = _shared_scores(model, groups, pad_token_id, device, one_row).cpu(), None
    except Exception as e:  # a model without a `score` head, or one that rejects a 4D mask or position ids
        error = one_line(e)
    separate = _separate_scores(model, groups, pad_token_id, device).cpu()
    model.train(was_training)
    low = (getattr(model, "_compute_dtype", None) or next(model.parameters()).dtype) in (torch.float16, torch.bfloat16)
    gap = None if error else ((shared - separate).abs() / separate.abs().clamp(min=1)).max()
    if error is None and gap > (0.05 if low else 1e-3):
        error = f"scores {gap:.3g} apart from the separate layout's"
    if error:
        print(f"grouped_scores: {model.config.model_type} does not take a shared-prompt layout ({error}): "
              f"each response is scored with its own copy of the prompt")
    return error is None


@torch.no_grad()
def _head_is_plain(model, batch, rows=2, tokens=64, rtol=1e-3):
    """Whether model(...).logits is lm_head(base_model(...)[0]), on the first tokens of the first rows of a
    batch, in eval mode: true for PLAIN_HEAD_FAMILIES, else the two must agree to rtol of the largest logit."""
    if model.config.model_type in PLAIN_HEAD_FAMILIES:
        return True
    ids, mask = batch["input_ids"][:rows, :tokens], batch["attention_mask"][:rows, :tokens]  # (r, t): a prefix
    mask = mask if mask.ndim == 2 else torch.ones_like(ids)  # a shared layout: plain causal attention will do here
    was_training = model.training
    model.eval()  # no dropout in the comparison
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (r, t, V)
    head = model.get_output_embeddings()
    fused = F.linear(model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0], head.weight, head.bias)
    model.train(was_training)
    real = mask.bool()  # (r, t): compare at real tokens only
    diff, scale = (fused[real] - logits[real]).abs().max().item(), logits[real].abs().max().item()
    if diff > rtol * scale:
        print(f"sequence_logps: {model.config.model_type} transforms the LM head's logits (max difference {diff:.3g} "
              f"on {int(real.sum())} tokens): using the model's full logits, not the fused chunked head")
    return diff <= rtol * scale


# ---------------------------------------------------------------- tokenising and batching
def encode_prompt(tokenizer, prompt):
    """Token ids of a plain-text prompt, or of chat messages rendered with the tokenizer's template."""
    if isinstance(prompt, list):  # chat messages
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]  # the tokenizer adds BOS if its model expects one


def encode_response(tokenizer, prompt, response):
    """Token ids of a response, ending with EOS. A chat response ([{"role": "assistant", ...}]) is the
    text that the chat template adds after the prompt; its end-of-turn token serves as EOS if it is one."""
    if isinstance(response, list):
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
        ids = tokenizer(full[len(head):].rstrip(), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def prompt_head_length(tokenizer, prompt, prompt_ids):
    """How many leading tokens of an encoded prompt are the tokenizer's or the chat template's head, which
    `truncate` keeps: for text, what the tokenizer puts before any text (BOS); for chat messages, all that
    the template renders before any message's content (BOS, a default system prompt, the first role header).
    Counted as the tokens the head, encoded alone, shares with prompt_ids: a merge across its end only shortens it."""
    if isinstance(prompt, list):
        mark = "\ue000"  # a private-use character in place of every message's content
        text = tokenizer.apply_chat_template([{**m, "content": mark} for m in prompt], add_generation_prompt=True,
                                             tokenize=False)
        head = tokenizer(text[:max(text.find(mark), 0)], add_special_tokens=False)["input_ids"]
    else:
        head = tokenizer("")["input_ids"]
    return len(os.path.commonprefix([head, prompt_ids]))


def truncate(prompt_ids, responses, max_length, max_prompt_length=None, keep_start=0):
    """Fit prompt + each response into max_length. If the prompt and the longest response are too long, the
    prompt is cut first, to keep = max(max_length - longest response, min(prompt length, max_prompt_length or
    max_length // 2)) tokens: its first min(keep_start, keep // 2) tokens (BOS and the chat header, from
    `prompt_head_length`) and its last ones (the latest text and the generation prompt); its middle goes.
    Then each response loses its end to fit. Returns (prompt, responses, cut?)."""
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, responses, False
    keep = max(max_length - longest, min(len(prompt_ids), max_prompt_length or max_length // 2))
    start = min(keep_start, keep // 2)
    prompt_ids = prompt_ids[:start] + prompt_ids[len(prompt_ids) - keep + start:]
    return prompt_ids, [r[:max_length - len(prompt_ids)] for r in responses], True


def collate(rows, pad_token_id):
    """rows: [(prompt_ids, response_ids)] -> right-padded batch plus the host-built indices that
    `sequence_logps` needs: score_index (N,) into the flattened (B*T) positions, labels (N,),
    response_of_token (N,), n_tokens (B,), with N the number of response tokens in the batch."""
    B, T = len(rows), max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    response_mask = torch.zeros(B, T, dtype=torch.long)
    score_index, labels, response_of_token = [], [], []
    for i, (p, r) in enumerate(rows):
        assert len(p) >= 1, "a row needs at least one prompt token to score its first response token"
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, :len(p) + len(r)] = 1
        response_mask[i, len(p):len(p) + len(r)] = 1
        score_index += range(i * T + len(p) - 1, i * T + len(p) + len(r) - 1)
        labels += r
        response_of_token += [i] * len(r)
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                score_index=torch.tensor(score_index), labels=torch.tensor(labels),
                response_of_token=torch.tensor(response_of_token), n_tokens=response_mask.sum(-1))


def _first_fit_decreasing(sizes, T):
    """Items (by index) packed into bins of T: each, longest first, into the first bin with room for it."""
    rows, free = [], []
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        i = next((i for i in range(len(rows)) if free[i] >= sizes[g]), len(rows))
        rows, free = (rows, free) if i < len(rows) else (rows + [[]], free + [T])
        rows[i].append(g)
        free[i] -= sizes[g]
    return rows


def _pack(sizes, row_tokens=None):
    """(T, rows): the groups packed first fit into rows of T tokens. T is row_tokens (at least the longest group),
    or else the length, among 17 from the longest group's to twice that, whose packing has the fewest positions
    (rows x T): for batches of 8-32 pairs of 90-240 tokens padding falls from about 20% (rows as long as the
    longest group) to about 5%, for about 1.4x the attention."""
    longest = max(sizes)
    lengths = [max(row_tokens, longest)] if row_tokens else sorted({longest + longest * k // 16 for k in range(17)})
    packings = [(T, _first_fit_decreasing(sizes, T)) for T in lengths]
    return min(packings, key=lambda packing: (len(packing[1]) * packing[0], packing[0]))


def collate_shared(groups, pad_token_id, row_tokens=None):
    """groups: [(prompt_ids, [response_ids, ...])] -> a batch for `sequence_logps` in which each prompt is
    computed once: a group is its prompt followed by its responses, and each response sees the prompt and
    itself, never another response (Wang & Hegde 2024, "Accelerating DPO with Prefix Sharing"). Groups are
    packed into rows of row_tokens tokens (default: `_pack`'s choice, the length between the longest group's and
    twice that with the fewest positions in all), first fit in decreasing length. Position ids restart at each response
    where its prompt ends. The attention mask is 4D (R, 1, T, T) bool; two groups P1 C1 R1 | P2 C2 R2 in a row:

              P1 P1 C1 C1 R1 R1 P2 C2 R2
        P1     x
        P1     x  x
        C1     x  x  x                          position ids:  0 1 2 3 2 3 | 0 1 1
        C1     x  x  x  x
        R1     x  x        x                    a response's first token is scored at its prompt's last
        R1     x  x        x  x                 position, so R1's first token is scored where C1's is
        P2                       x
        C2                       x  x
        R2                       x     x

    Returns input_ids, position_ids, attention_mask, score_index, labels, response_of_token and n_tokens (one
    per response, flat in group order, as `collate` gives them for the rows [(p, r) for p, rs in groups for r in rs]),
    and token_index, where each response token is (flat over rows and positions)."""
    sizes = [len(p) + sum(map(len, rs)) for p, rs in groups]
    T, rows = _pack(sizes, row_tokens)  # rows: the groups in each row
    R = len(rows)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(R, T, dtype=torch.long)
    segment = torch.full((R, T), -1, dtype=torch.long)  # which group a position belongs to (-1: padding)
    part = torch.full((R, T), -1, dtype=torch.long)  # 0: prompt, j: the j-th response (-1: padding)
    first = [sum(len(rs) for _, rs in groups[:g]) for g in range(len(groups))]  # the group's first response's index
    n_tokens = torch.tensor([len(r) for _, rs in groups for r in rs], dtype=torch.long)
    score_index, labels, response_of_token, token_index = [], [], [], []
    for i, row in enumerate(rows):
        at = 0
        for g in row:
            p, responses = groups[g]
            assert len(p) >= 1, "a group needs at least one prompt token to score its responses' first tokens"
            input_ids[i, at:at + len(p)], position_ids[i, at:at + len(p)] = torch.tensor(p), torch.arange(len(p))
            segment[i, at:at + sizes[g]], part[i, at:at + len(p)] = g, 0
            last_prompt, at = i * T + at + len(p) - 1, at + len(p)
            for j, r in enumerate(responses):
                input_ids[i, at:at + len(r)] = torch.tensor(r, dtype=torch.long)
                position_ids[i, at:at + len(r)] = torch.arange(len(p), len(p) + len(r))
                part[i, at:at + len(r)] = j + 1
                score_index += [last_prompt, *range(i * T + at, i * T + at + len(r) - 1)][:len(r)]
                labels += r
                response_of_token += [first[g] + j] * len(r)
                token_index += range(i * T + at, i * T + at + len(r))
                at += len(r)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): a query at row index q sees keys k <= q
    same_group = segment[:, :, None] == segment[:, None, :]  # (R, T, T); padding sees only padding
    visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])  # the prompt, or its own part
    return dict(input_ids=input_ids, position_ids=position_ids, attention_mask=(causal & same_group & visible)[:, None],
                score_index=torch.tensor(score_index, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                response_of_token=torch.tensor(response_of_token, dtype=torch.long), n_tokens=n_tokens,
                token_index=torch.tensor(token_index, dtype=torch.long))


# ---------------------------------------------------------------- loading
def torch_dtype(name, device):
    """--dtype as a torch dtype: auto is bf16 on a CUDA device that has it, fp32 elsewhere."""
    if name == "auto":
        name = "bfloat16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return getattr(torch, name)


def load_model(name, dtype="auto", device=None, trust_remote_code=False):
    """A causal LM from a hub id or a local save_pretrained directory, dropout off (DPO needs pi = pi_ref at init)."""
    from transformers import AutoModelForCausalLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(AutoModelForCausalLM, name, "a causal LM", dtype=torch_dtype(dtype, device),
                            trust_remote_code=trust_remote_code)
    return disable_dropout(model).to(device)


def disable_dropout(model):
    """Zero every dropout probability, in place: nn.Dropout's p, and every float attribute whose name holds
    "drop" (dropout, attention_dropout, hidden_dropout, resid_pdrop, layerdrop, ...) on every module and on
    the config and its sub-configs, which many families (OPT, Falcon, BLOOM) read in train mode to call
    F.dropout. DPO needs pi = pi_ref at step 0 while the policy stays in train() (gradient checkpointing
    reads self.training), so eval() is no answer."""
    from transformers import PreTrainedConfig
    todo, seen = [model.config, *model.modules()], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d/2d/3d, AlphaDropout
            obj.p = 0.0
        for name, value in list(vars(obj).items()):
            if isinstance(value, PreTrainedConfig):  # a sub-config (text_config, ...), or a module's own config
                todo.append(value)
            elif isinstance(value, float) and "drop" in name.lower():
                setattr(obj, name, 0.0)
    return model


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    tokenizer = from_pretrained(AutoTokenizer, name, "a tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def quiet_transformers():
    """transformers without its load reports ("score.weight MISSING ... newly initialized": expected for a fresh
    scalar head) and its own progress bars ("Writing model shards"), which break into the run's bar."""
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def from_pretrained(auto_class, name, what, **kwargs):
    """auto_class.from_pretrained(name), quietly, with one line instead of a traceback when `name` is neither a local
    save_pretrained directory nor a hub id that holds `what`."""
    if not os.path.isdir(name) and (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise SystemExit(f"error: {name}: {'not a directory' if os.path.exists(name) else 'no such directory'}; "
                         f"expected a save_pretrained directory or a hub id")
    try:
        with quiet_transformers():
            return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: could not load {what} from {name}: {one_line(e)}")


DATA_FORMATS = "a local .jsonl, .json or .parquet file, a folder written by datasets' save_to_disk, or a hub dataset id"
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "ipython", "function"}


def load_rows(source, fields, split="train"):
    """Rows of a local .jsonl/.json/.parquet file, a save_to_disk folder or a hub dataset, as dicts, checked
    by `check_rows`. Every problem stops with one line that names the file, the 1-based line (JSON Lines)
    or row, and the field."""
    import datasets
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) and ext not in (".json", ".jsonl", ".parquet"):
        raise SystemExit(f"error: {source}: a {ext or 'file of unknown'} format is not read; a dataset is "
                         f"{DATA_FORMATS}")
    if not os.path.exists(source) and (ext in (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt")
                                       or source.startswith((".", "/", "~"))):
        raise SystemExit(f"error: {source}: no such file; a dataset is {DATA_FORMATS}")
    if os.path.exists(source):  # quiet for a local file: our error, if any, is the one line on stderr
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if os.path.isfile(source):
            data = datasets.load_dataset("parquet" if ext == ".parquet" else "json", data_files=source, split="train")
        elif os.path.isdir(source) and any(os.path.exists(os.path.join(source, f))
                                           for f in ("state.json", "dataset_dict.json")):
            data = datasets.load_from_disk(source)
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:  # a hub id, or a folder of data files
            data = datasets.load_dataset(source, split=split)
        rows = data.to_list()
    except Exception as e:
        if ext not in (".json", ".jsonl"):
            raise SystemExit(f"error: could not load dataset {source}: {one_line(e)}; a dataset is {DATA_FORMATS}")
        rows = read_json_rows(source)  # `datasets` could not type the file: read it plainly, naming the bad line
    return check_rows(source, rows, fields)


def one_line(error):
    return " ".join(str(error).split())[:300] or type(error).__name__


def read_json_rows(source):
    """A JSON array or JSON Lines file read with the json module, for exact errors where `datasets` fails:
    a line that is not UTF-8, not JSON, or not a JSON object stops with its line number."""
    with open(source, "rb") as f:
        raw = f.read()
    if raw.lstrip()[:1] == b"[":  # one JSON array
        try:
            rows = json.loads(raw)
        except ValueError as e:
            raise SystemExit(f"error: {source}: not valid JSON ({e})")
        numbered = [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    else:  # JSON Lines
        numbered = []
        for n, line in enumerate(raw.splitlines(), 1):
            try:
                numbered += [(f"line {n}", json.loads(line.decode("utf-8")))] if line.strip() else []
            except UnicodeDecodeError:
                raise SystemExit(f"error: {source}: line {n}: not UTF-8 text")
            except ValueError as e:
                raise SystemExit(f"error: {source}: line {n}: not valid JSON ({e})")
    for place, row in numbered:
        if not isinstance(row, dict):
            raise SystemExit(f"error: {source}: {place}: expected a JSON object, got {type(row).__name__}")
    return [row for _, row in numbered]


def where(source, i):
    """Row i's place for an error message: 'line N' in a JSON Lines file, else 'row N' (1-based)."""
    if os.path.isfile(source) and source.lower().endswith((".json", ".jsonl")):
        with open(source, "rb") as f:
            raw = f.read()
        lines = [n for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
        if raw.lstrip()[:1] == b"{" and i < len(lines):
            return f"line {lines[i]}"
    return f"row {i + 1}"


def check_rows(source, rows, fields):
    """Each field must be present, and all of them text, or all of them chat messages ([{"role", "content"}]
    dicts with a known role); the first row that is not stops with its file, line or row, and field."""
    if rows and "prompt" in fields and rows[0].get("prompt") is None and {"chosen", "rejected"} <= set(rows[0]):
        rows = [split_implicit_prompt(source, i, row) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        for name in fields:
            value = row.get(name)
            problem = None
            if value is None:
                problem = f"missing (found: {', '.join(k for k, v in row.items() if v is not None) or 'nothing'})"
            elif isinstance(value, list):
                problem = next((f"message {j + 1} must be a {{'role', 'content'}} dict with string values and a role "
                                f"in {sorted(CHAT_ROLES)}, got {str(m)[:80]!r}" for j, m in enumerate(value)
                                if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                                        and m.get("role") in CHAT_ROLES)), None)
                if not value:
                    problem = "an empty list of messages"
            elif not isinstance(value, str):
                problem = (f"expected a string or a list of {{'role', 'content'}} messages, got "
                           f"{type(value).__name__} {str(value)[:80]!r}")
            elif any(isinstance(row.get(f), list) for f in fields):
                chat = next(f for f in fields if isinstance(row.get(f), list))
                problem = f"text, while field '{chat}' is chat messages: give all fields as text or all as chat"
            if problem:
                raise SystemExit(f"error: {source}: {where(source, i)}: field '{name}': {problem}")
    return rows


def split_implicit_prompt(source, i, row):
    """TRL's implicit-prompt format: chosen and rejected are whole conversations (or texts) that share
    the prompt. For chats the prompt is every message before the last; for text, the common prefix up
    to its last "\\n\\nAssistant:" (Anthropic HH)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1 and chosen[:-1] == rejected[:-1]:
        return {**row, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = os.path.commonprefix([chosen, rejected])
        cut = common.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        if cut >= len("\n\nAssistant:"):
            return {**row, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    raise SystemExit(f"error: {source}: {where(source, i)}: field 'prompt': missing, and chosen/rejected share no "
                     f"prompt to split off")


def report_dropped(source, dropped, total):
    """Print how many rows were dropped and why, with the first few (1-based) row numbers; stop if none are left."""
    for reason, rows in dropped.items():
        if rows:
            print(f"{source}: dropped {len(rows)} of {total} rows ({reason}): rows {', '.join(map(str, rows[:5]))}"
                  f"{' ...' if len(rows) > 5 else ''}")
    if sum(map(len, dropped.values())) == total:
        raise SystemExit(f"error: {source}: no usable rows")


def fingerprint(source):
    """What a run records of an input, to refuse a resume whose input changed: a file's sha256; for a local
    directory (a model), the sha256 of its file names and sizes and of its small files' bytes (config,
    tokenizer; weights by size only, reading them all would take minutes); a hub id as it is."""
    if source is None or not os.path.exists(source):
        return source
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(source)) if os.path.isdir(source) else [("", None, [source])]:
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, source)} {os.path.getsize(path)}\n".encode())
            if not os.path.isdir(source) or os.path.getsize(path) < 2**20:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(2**24), b""):
                        digest.update(block)
    return digest.hexdigest()


def crash_point(name):
    """Test hook of the fault-injection tests: SIGKILL this process the n-th time it passes `name` when
    $DPO_CRASH_AT is "name:n". Nothing otherwise."""
    point, _, n = os.environ.get("DPO_CRASH_AT", "").partition(":")
    if point == name:
        _crossings[name] = _crossings.get(name, 0) + 1
        if _crossings[name] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


_crossings = {}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=64):
    """One sampled response per prompt (token id lists in, out), batched with the KV cache, left-padded.
    Pure sampling (no top-k / top-p) so that sample log-probs estimate KL without bias. A response
    ends with EOS when the model finished within max_new_tokens. A prompt that several rows of a batch
    share (two or K samples of it) is computed once (`_prompt_cache`)."""
    was_training, eos, device = model.training, tokenizer.eos_token_id, next(model.parameters()).device
    model.eval()
    responses = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        L = max(map(len, chunk))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (L - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=device)
        first = [chunk.index(p) for p in chunk]  # each row's first row with its prompt
        first = first if len(set(first)) < len(chunk) and L > 1 else None  # some prompt repeats: computed once
        out = through_wrapper(model, _generate, model, dict(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature, top_k=0,
            top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos), first)
        responses += [row[:row.index(eos) + 1] if eos in row else row for row in out[:, L:].tolist()]
    model.train(was_training)
    return responses


def _generate(model, kwargs, first=None):
    """model.generate(**kwargs), from `_prompt_cache` when rows share prompts (first: each row's first row with its
    prompt); under FSDP2 with every layer's full weights gathered once for the whole call (not at each new token),
    so that ranks whose samples end at different lengths need no collective."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        cache = None if first is None else _prompt_cache(model, kwargs["input_ids"], kwargs["attention_mask"], first)
        return model.generate(**kwargs, **({} if cache is None else {"past_key_values": cache}))
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def _prompt_cache(model, input_ids, attention_mask, first):
    """The KV cache of every row's prompt but its last token, from one forward pass over the distinct prompts
    (the rows `first` names), its entries then repeated for the rows that share them; generate goes on from it with
    the last token, and draws what it would draw from the whole batch (prefill is compute-bound: two samples a
    prompt halve it). Position ids as generate numbers left-padded rows. None if the model's cache holds more than
    keys and values (a recurrent state, as in Mamba hybrids), or if its generation config names a cache of its
    own (generate refuses a cache given with it): then generate computes every row."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    if getattr(model.generation_config, "cache_implementation", None):
        return None
    rows = sorted(set(first))
    mask = attention_mask[rows, :-1]
    cache = model(input_ids=input_ids[rows, :-1], attention_mask=mask, use_cache=True,
                  position_ids=(mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)).past_key_values
    if not getattr(cache, "layers", None) or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                                                 for layer in cache.layers):
        return None
    cache.batch_select_indices(torch.tensor([rows.index(f) for f in first], device=input_ids.device))
    return cache


# ---------------------------------------------------------------- several processes (torchrun)
# A plain `python script.py` run uses none of this: every function below is then the identity, or nearly.
# Under `torchrun --nproc_per_node=N script.py ...` each process (rank) holds a share of each batch; the policy is
# wrapped in DDP (a full copy a rank, gradients averaged) or sharded with FSDP2 (each rank a 1/N slice of every
# parameter, gradient and optimizer state; a decoder layer's full weights gathered just before it runs).
def _leave_process_group():
    """At exit, every rank together: a rank that tears its process group down while another still sends to it can
    abort at exit (gloo: "terminate called without an active exception", seen once in a run of the tests)."""
    import torch.distributed as dist
    with contextlib.suppress(Exception):  # a rank that failed: the others are being stopped by torchrun
        dist.barrier()
    dist.destroy_process_group()


def init_distributed(args):
    """(rank, world_size, device) of this process; under torchrun also the process group (NCCL on CUDA, gloo on
    CPU) and this rank's GPU. torchrun gives each rank one CPU thread unless OMP_NUM_THREADS is set (more threads
    than cores leave OpenMP threads waiting on each other). Only rank 0 prints: the others' stdout and stderr go
    nowhere,
    except a traceback, so a crash on any rank is seen."""
    import torch.distributed as dist
    if args.ddp and args.fsdp:
        raise SystemExit("error: --ddp and --fsdp exclude each other")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo",
                            device_id=torch.device(device) if device != "cpu" else None)
    atexit.register(_leave_process_group)
    if dist.get_rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *error: traceback.print_exception(*error, file=sys.__stderr__)
    return dist.get_rank(), dist.get_world_size(), device


def _dist():
    """torch.distributed when this process is one of several, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def world_size():
    return _dist().get_world_size() if _dist() else 1


def is_main():
    """Whether this process writes files: the only one, or rank 0."""
    return _dist() is None or _dist().get_rank() == 0


def on_rank_0(fn, *args):
    """fn(*args) run by rank 0 alone, its result given to every rank (a file system operation done once)."""
    if _dist() is None:
        return fn(*args)
    result = [fn(*args) if is_main() else None]
    _dist().broadcast_object_list(result, src=0)
    return result[0]


def agree(*values):
    """The largest of each value over the ranks, as floats: the same decision on every rank."""
    if _dist() is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(tensor):
    """The mean of a tensor over the ranks (the metrics of a step, each rank's from its own share)."""
    if _dist() is None:
        return tensor
    tensor = tensor.clone()
    _dist().all_reduce(tensor)
    return tensor / _dist().get_world_size()


def my_share(n, weights=False):
    """Indices of this rank's contiguous share of n items; every rank gets the same count (the last item
    repeated to fill), so that each runs the same forward passes, as FSDP2 needs. With weights=True also a
    (count,) tensor: 1 for the rank's own items, 0 for the repeats."""
    rank, world = (_dist().get_rank(), _dist().get_world_size()) if _dist() else (0, 1)
    per = -(-n // world)
    share = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
    return (share, torch.tensor([float(i < n) for i in range(rank * per, (rank + 1) * per)])) if weights else share


def gather_shares(share, n):
    """The results of every rank's `my_share(n)`, a (per, ...) tensor or a list, concatenated in rank order without
    the last share's padding: the (n, ...) whole, on every rank."""
    if isinstance(share, list):  # any objects (sampled responses, rows): through pickling
        return [x for part in gather_objects(share) for x in part][:n]
    if _dist() is None:
        return share
    tensor = share.to(_comm_device())
    parts = [torch.empty_like(tensor) for _ in range(_dist().get_world_size())]
    _dist().all_gather(parts, tensor.contiguous())
    return torch.cat(parts)[:n].cpu()


def _comm_device():
    """Where a tensor must be for a collective: this rank's GPU for NCCL, the CPU for gloo."""
    return f"cuda:{torch.cuda.current_device()}" if _dist().get_backend() == "nccl" else "cpu"


class _Forward(torch.nn.Module):
    """The module DDP or FSDP2 wraps: forward(fn, *args) runs fn(*args), for fn a computation on the model
    (`sequence_logps`, `generate`), so that their hooks run around it: DDP's, which prepare the gradients'
    all-reduce, and FSDP2's, which gather the embedding and the LM head (the decoder layers gather their own)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inside = model, False

    def forward(self, fn, *args):
        self.inside = True
        try:
            return fn(*args)
        finally:
            self.inside = False


def parallelize(model, args, trainable=True):
    """Under torchrun: wrap the model in DDP (--ddp) or shard it with FSDP2 (--fsdp; each decoder layer a unit
    of its own, the rest one unit; bf16 compute over fp32 weights on CUDA); by default DDP below 1B parameters,
    FSDP2 from 1B. A frozen model (a reference) is sharded under FSDP2 and left whole under DDP. The model
    stays the object the script holds (`sequence_logps` and `sample_responses` go through the wrapper); nothing
    happens in a single process. Returns "ddp", "fsdp" or None."""
    if _dist() is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel
    mode = "ddp" if args.ddp else "fsdp" if args.fsdp else (
        "fsdp" if sum(p.numel() for p in model.parameters()) >= 1e9 else "ddp")
    wrapper = _Forward(model)
    if mode == "ddp" and trainable:
        on_gpu = _comm_device() != "cpu"
        wrapper = DistributedDataParallel(wrapper, device_ids=[torch.cuda.current_device()] if on_gpu else None,
                                          forward_sync_buffers=False)  # the buffers (rotary tables) never change
    elif mode == "fsdp":
        low = torch.bfloat16 if _comm_device() != "cpu" and torch.cuda.is_bf16_supported() else None
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
        for module in model.modules():
            if type(module).__name__ in (model._no_split_modules or []):  # the decoder layers
                fully_shard(module, mp_policy=policy)
        fully_shard(wrapper, mp_policy=policy, reshard_after_forward=True)  # after any forward: only shards left
        model._compute_dtype = low
    model.__dict__["parallel"] = wrapper if mode == "fsdp" or trainable else None  # not a submodule: no cycle
    return mode


def through_wrapper(model, fn, *args):
    """fn(*args) inside the DDP/FSDP2 wrapper's forward when the model has one (`parallelize`) and is not inside it
    already, else fn(*args): the way to run any forward of a wrapped model (a reward model's, a discriminator's)."""
    wrapper = model.__dict__.get("parallel")
    inner = getattr(wrapper, "module", wrapper)  # DDP keeps the wrapped module as .module
    if wrapper is None or inner.inside:
        return fn(*args)
    return wrapper(fn, *args)


def sync_gradients(model, sync):
    """Whether the next backward pass averages gradients over the ranks: only the last micro-batch of a step
    needs to (DDP's no_sync; FSDP2 then reduce-scatters once a step)."""
    wrapper = model.__dict__.get("parallel")
    if hasattr(wrapper, "require_backward_grad_sync"):  # DDP
        wrapper.require_backward_grad_sync = sync
    elif hasattr(wrapper, "set_requires_gradient_sync"):  # FSDP2
        wrapper.set_requires_gradient_sync(sync)


def clip_grad_norm_(model, max_norm):
    """torch.nn.utils.clip_grad_norm_ over the model's parameters; the total norm a plain tensor also when
    FSDP2 shards the gradients (it is then reduced over the ranks)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state(model, optimizer=None, weights=True):
    """(model state, optimizer state) as full tensors keyed by parameter name (so a checkpoint loads on any number
    of processes): under torchrun gathered on rank 0's CPU ({} on the other ranks; every rank must call it), in a
    single process the model's own tensors. The model state is None for weights=False."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = None if not weights else \
        get_model_state_dict(model, options=options) if _dist() else model.state_dict()
    seen, tied = set(), set()  # a weight shared by two modules (tied embeddings) is saved once, as save_pretrained does
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    model_state = None if model_state is None else {k: v for k, v in model_state.items() if k not in tied}
    return model_state, optimizer and get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state):
    """The optimizer state of `full_state` into this rank's optimizer (its shard under FSDP2); under torchrun
    only rank 0 needs to have read it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_dist() is not None)
    set_optimizer_state_dict(model, optimizer, state or {}, options=options)


def load_model_state(model, state):
    """The model state of `full_state` into this rank's model (its shard under FSDP2); under torchrun only rank 0
    needs to have read it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_dist() is not None)
    set_model_state_dict(model, state or {}, options=options)


def this_rank():
    return _dist().get_rank() if _dist() else 0


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if _dist() is None:
        return [obj]
    objects = [None] * _dist().get_world_size()
    _dist().all_gather_object(objects, obj)
    return objects


# ---------------------------------------------------------------- preference pairs: data, log-probs, metrics
def load_pairs(source, tokenizer, args, split="train", rows=None):
    """Tokenised (prompt_ids, chosen_ids, rejected_ids) triples of `source` (or of `rows` read from it); unusable
    rows are dropped and counted; a pair too long loses its prompt's middle first (--max_length)."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split) if rows is None else rows
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    dropped = {"empty prompt or response": [], "chosen identical to rejected": [],
               "prompt alone longer than --max_length": []}
    pairs, n_cut = [], 0
    for i, row in enumerate(tqdm(rows, desc=f"tokenizing {source}", disable=len(rows) < 10000), 1):
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
            prompt, (chosen, rejected), cut = truncate(prompt, responses, args.max_length, args.max_prompt_length,
                                                       prompt_head_length(tokenizer, row["prompt"], prompt))
            pairs.append((prompt, chosen, rejected))
            n_cut += cut
    report_dropped(source, dropped, len(rows))
    if n_cut:
        print(f"{source}: truncated {n_cut} of {len(pairs)} pairs to --max_length {args.max_length}")
    return pairs


def load_pair_data(args, tokenizer):
    """Training and held-out pairs: --eval_dataset, or --eval_fraction of --dataset held out by a seeded shuffle."""
    train = load_pairs(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out = load_pairs(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_pairs, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    print(f"{len(train)} training pairs, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return train, held_out[:args.max_eval_pairs]


def pair_logps(model, pairs, pad_token_id, device):
    """Summed response log-probs of chosen and rejected, in one forward pass, each prompt computed once."""
    logps, _ = grouped_logps(model, [(p, [c, r]) for p, c, r in pairs], pad_token_id, device)  # (2B,): c, r, c, r...
    return logps[0::2], logps[1::2]


@torch.no_grad()
def all_pair_logps(model, pairs, args, pad_token_id, device, desc=None):
    """(N, 2) summed log-probs of chosen and rejected of every pair, in eval mode. Under torchrun each rank
    computes its share and every rank gets the whole."""
    share, out, was_training = my_share(len(pairs)), [torch.zeros(0, 2)], model.training
    model.eval()
    for s in tqdm(range(0, len(share), 2 * args.batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = [pairs[i] for i in share[s:s + 2 * args.batch_size]]
        out.append(torch.stack(pair_logps(model, chunk, pad_token_id, device), -1).cpu())
        crash_point("reference")
    model.train(was_training)
    return gather_shares(torch.cat(out), len(pairs))


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's metric names, as one tensor per name (means over the pairs)."""
    return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean()}


def evaluate_pairs(policy, pairs, reference_logps, args, pad_token_id, device, loss):
    """Mean DPO metrics of `loss` (a script's DPO loss: four log-prob tensors, beta, label smoothing -> losses,
    chosen and rejected rewards) on held-out pairs, TRL's names with the eval_ prefix; the policy in eval mode."""
    policy_logps = all_pair_logps(policy, pairs, args, pad_token_id, device, "evaluating").unbind(-1)
    metrics = dpo_metrics(*loss(*policy_logps, *reference_logps.unbind(-1), args.beta, args.label_smoothing),
                          *policy_logps)
    return {f"eval_{k}": v.item() for k, v in metrics.items()}


def cached(path, record, compute):
    """compute() once, kept at `path` with the record of what it was computed from; a resumed run reuses it (and
    never another run's). Under torchrun every rank computes (its share), rank 0 writes."""
    fixed = {k: v for k, v in record["args"].items() if k not in RESUME_MAY_CHANGE}, record["inputs"]
    if on_rank_0(os.path.exists, path):  # the same answer on every rank
        cache = torch.load(path, weights_only=False)
        if cache["record"] != fixed:
            sys.exit(f"error: {path} was computed for other flags or inputs; remove it to compute it again")
        return cache
    cache = compute()
    if is_main():
        torch.save({**cache, "record": fixed}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cache


def reference_cache(args, policy, splits, record, pad_token_id, device, directory=None, logps=all_pair_logps):
    """Reference log-probs of every item of each split (name -> pairs, or what `logps` scores) under the initial
    policy (pi = pi_ref at step 0), computed once and kept in the run's directory (`cached`)."""
    return cached(os.path.join(directory or args.output_dir, "reference_logps.pt"), record,
                  lambda: {name: logps(policy, items, args, pad_token_id, device, "reference log-probs")
                           for name, items in splits.items()})


def pair_references(args, run, policy, reference, train, held_out, record, pad_token_id):
    """The reference pi_ref of pair training: a frozen --ref_model (`reference`, loaded by the script), or log-probs
    precomputed with the initial policy and kept with the run (`reference_cache`). Returns reference(chunk, idx)
    for training pairs, and the held-out pairs' (N, 2)."""
    if reference is not None:
        frozen(reference, args)
        return (lambda chunk, idx: pair_logps(reference, chunk, pad_token_id, run.device)), \
            all_pair_logps(reference, held_out, args, pad_token_id, run.device)
    if run.checkpoint and not os.path.exists(os.path.join(args.output_dir, "reference_logps.pt")):
        raise SystemExit(f"error: {args.output_dir} has checkpoints but no reference_logps.pt; it cannot be resumed")
    cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, pad_token_id, run.device)
    return (lambda chunk, idx: cache["train"][idx].to(run.device).unbind(-1)), cache["eval"]


@contextlib.contextmanager
def torch_threads(n):
    """torch on n CPU threads inside the block. The toy's model is too small to share an operation among threads:
    on 2 busy cores, 512 samples of it took 51 s with 2 threads and 3.7 s with one, a DPO step 4x as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the run: flags
def flag(default, help, choices=None):
    """A field of an Args dataclass: its default, its one line of --help, the values it may take."""
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


@dataclass
class RunArgs:
    """The flags every script has; a script's Args adds its own after them, and may redefine one (its default, its
    help). Settings of the toy task are a script's TOY_DEFAULTS, used when --model is not given."""
    model: str = flag(None, "policy to train: hub id or local directory (default: the built-in toy model)")
    ref_model: str = flag(None, "frozen reference model; default: reference log-probs precomputed with the initial "
                                "policy")
    dataset: str = flag(None, "preference data (prompt/chosen/rejected): hub name, .jsonl/.json/.parquet, or a "
                              "save_to_disk folder (default: toy)")
    dataset_split: str = flag("train", "split of a hub dataset to train on")
    eval_dataset: str = flag(None, "held-out preference data; default: hold out --eval_fraction of --dataset")
    eval_fraction: float = flag(0.02, "fraction of --dataset held out when no --eval_dataset is given")
    output_dir: str = flag(None, "where checkpoints and metrics go (default: runs/<script>-<time>)")
    max_steps: int = flag(None, "optimizer steps (default: --epochs over the data)")
    epochs: int = flag(1, "passes over the training data, when --max_steps is not given")
    batch_size: int = flag(8, "pairs per micro-batch (one forward pass of 2 x batch_size rows)")
    grad_accum: int = flag(8, "micro-batches per optimizer step")
    learning_rate: float = flag(1e-6, "peak learning rate (DPO paper: 1e-6)")
    warmup_steps: int = flag(150, "linear warm-up steps, then constant (DPO paper: 150)")
    optimizer: str = flag("adamw", "adamw or rmsprop (the DPO paper's)", ["adamw", "rmsprop"])
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(10.0, "gradient clipping norm (DPO reference code: 10)")
    beta: float = flag(0.1, "KL strength beta (DPO paper: 0.1; 0.5 for TL;DR)")
    max_length: int = flag(512, "max tokens of prompt + response; the prompt's middle is cut first")
    max_prompt_length: int = flag(None, "a cut prompt keeps at least this many tokens (default max_length // 2)")
    seed: int = flag(0, "seed of the data order and of everything random")
    eval_every: int = flag(100, "evaluate on the held-out data every N steps")
    save_every: int = flag(500, "write a checkpoint every N steps")
    toy_eval_every: int = flag(0, "toy task only: every N steps also sample the test prompts and log gold reward, "
                                  "length and KL, a training curve (0: never)")
    resume: bool = flag(False, "continue the run in --output_dir from its newest checkpoint")
    gradient_checkpointing: bool = flag(False, "recompute activations in backward to save memory")
    dtype: str = flag("auto", "auto: bf16 on CUDA, fp32 on CPU", ["auto", "float32", "bfloat16", "float16"])
    trust_remote_code: bool = flag(False, "allow model code from the hub")
    ddp: bool = flag(False, "under torchrun: a full copy of the model a process (default below 1B parameters)")
    fsdp: bool = flag(False, "under torchrun: the model sharded over the processes with FSDP2 (default from 1B "
                             "parameters)")


POSITIVE, AT_LEAST_1 = (lambda v: 0 < v < math.inf, "a positive number"), (lambda v: v >= 1, "at least 1")
OPTIONAL_AT_LEAST_1 = (lambda v: v is None or v >= 1, "at least 1")
ZERO_OR_MORE = (lambda v: v >= 0, "0 or more")
RUN_CHECKS = dict(batch_size=AT_LEAST_1, grad_accum=AT_LEAST_1, epochs=AT_LEAST_1, eval_every=AT_LEAST_1,
                  save_every=AT_LEAST_1, max_length=(lambda v: v >= 2, "at least 2"), max_steps=OPTIONAL_AT_LEAST_1,
                  max_prompt_length=OPTIONAL_AT_LEAST_1, toy_eval_every=ZERO_OR_MORE, warmup_steps=ZERO_OR_MORE,
                  weight_decay=(lambda v: 0 <= v < math.inf, "0 or more"), learning_rate=POSITIVE, beta=POSITIVE,
                  max_grad_norm=POSITIVE, eval_fraction=(lambda v: 0 < v < 1, "between 0 and 1"))
RESUME_MAY_CHANGE = ("max_steps", "eval_every", "save_every", "toy_eval_every")  # every other flag must match the run's


def parse_flags(args_class, toy_defaults, checks, argv=None, description=None):
    """Flags as given, over the toy's defaults when --model is not given, over the dataclass' defaults; every value
    is checked (RUN_CHECKS and the script's `checks`: name -> (ok(value), what it must be)) before anything is read
    or written. Each flag also has a dashed spelling."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(args_class):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = "" if f.default is None or f.type is bool else f" (default: {f.default}" + (
            f"; toy: {toy_defaults[f.name]})" if f.name in toy_defaults else ")")
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type, choices=f.metadata.get("choices"))
        parser.add_argument(*flags, **kind, default=argparse.SUPPRESS, help=f.metadata["help"] + default)
    given = vars(parser.parse_args(argv))  # only the flags on the command line: an explicit one always wins
    defaults = {f.name: f.default for f in dataclasses.fields(args_class)}
    args = args_class(**{**defaults, **(toy_defaults if "model" not in given else {}), **given})
    for name, (ok, expected) in {**RUN_CHECKS, **checks}.items():
        if not ok(getattr(args, name)):
            sys.exit(f"error: --{name} must be {expected} (got {getattr(args, name)})")
    if args.toy_eval_every and args.dataset:
        sys.exit("error: --toy_eval_every is for the built-in toy task (without --dataset)")
    if args.dataset and not args.model:
        sys.exit("error: --dataset needs --model (without --model, the built-in toy task runs on its own data)")
    if args.resume and not args.output_dir:
        sys.exit("error: --resume needs the --output_dir of the run to continue")
    return args


# ---------------------------------------------------------------- the run: its directory
def check_output_dir(args):
    """Refuse, before anything is loaded or written, a directory this run may not use: a file, a read-only
    place, another run's files without --resume, or --resume where no run is. Returns the newest checkpoint
    to resume from, or None (a run killed before its first checkpoint restarts from step 0)."""
    directory = args.output_dir
    if directory and os.path.exists(directory) and not os.path.isdir(directory):
        sys.exit(f"error: --output_dir {directory} is a file")
    parent = directory if directory and os.path.isdir(directory) else \
        os.path.dirname(os.path.abspath(directory or "runs"))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        sys.exit(f"error: --output_dir {directory}: cannot write in {parent}")
    if args.resume:
        if not os.path.exists(os.path.join(directory, "args.json")):
            sys.exit(f"error: --resume: no run to continue in {directory} (no args.json)")
        checkpoints = list_checkpoints(directory)
        return checkpoints[-1] if checkpoints else None
    if directory and os.path.isdir(directory) and os.listdir(directory):
        sys.exit(f"error: --output_dir {directory} already holds files (another run?); pass --resume to continue "
                 f"it, or choose another --output_dir")
    return None


def run_record(args, tokenizer, **inputs):
    """What the checkpoints and the reference cache depend on: every flag, and the content of every input (the four
    every script has, and the script's own `inputs`: name -> path, hub id or None)."""
    sources = {**{name: getattr(args, name) for name in ("model", "ref_model", "dataset", "eval_dataset")}, **inputs}
    inputs = {name: fingerprint(source) for name, source in sources.items()}
    vocabulary = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, tokenizer.eos_token])
    inputs["tokenizer"] = hashlib.sha256(vocabulary.encode()).hexdigest()
    flags = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "resume")}  # not the run's
    flags["processes"] = world_size()  # torchrun's ranks: part of the batch, so a resume needs as many
    return {"args": flags, "inputs": inputs}


def check_resume(args, record):
    """A resumed run must have the flags and inputs of the run it continues, except RESUME_MAY_CHANGE."""
    path = os.path.join(args.output_dir, "args.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        sys.exit(f"error: {path}: not the record of a run ({e})")
    for section, values in record.items():
        for name, value in values.items():
            there = saved.get(section, {}).get(name)
            if name not in RESUME_MAY_CHANGE and there != value:
                what = ("the number of processes" if name == "processes" else f"--{name}" if section == "args"
                        else f"the content of --{name}")
                sys.exit(f"error: --resume: {what} differs from the run in {args.output_dir} ({there!r} there, "
                         f"{value!r} here); a resumed run may change only --{', --'.join(RESUME_MAY_CHANGE)}")


def claim_output_dir(args, record, script):
    """Make the directory this run's alone: args.json is linked into place, which fails if another run got there
    first (then the default name, runs/<script>-<time>, takes a suffix; an explicit --output_dir is an error)."""
    base = args.output_dir or time.strftime(f"runs/{script}-%Y%m%d-%H%M%S")
    for n in range(1000):
        directory = base if n == 0 else f"{base}-{n}"
        try:
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".args-{os.getpid()}.json")
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
            try:
                os.link(tmp, os.path.join(directory, "args.json"))  # atomic, and fails if the file exists
            finally:
                os.remove(tmp)
            args.output_dir = directory
            return directory
        except FileExistsError:
            if args.output_dir:
                sys.exit(f"error: --output_dir {directory} was just taken by another run; choose another --output_dir")
        except OSError as e:
            sys.exit(f"error: --output_dir {directory}: {e}")


# ---------------------------------------------------------------- the run: checkpoints and metrics
def save_checkpoint(directory, policy, tokenizer, optimizer, scheduler, step, extra=None):
    """Write checkpoint-<step> into a temporary directory, then rename it, then delete the older ones: a kill at
    any instant leaves at least one complete checkpoint. `extra`: the script's own state (rank 0's is saved, in
    extra_state.pt: a discriminator, a window, ...); under torchrun every rank calls this."""
    final = os.path.join(directory, f"checkpoint-{step}")
    if os.path.exists(final):
        return final
    model_state, optimizer_state = full_state(policy, optimizer)  # under torchrun: gathered on rank 0
    rng = gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),  # every rank's
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if not is_main():
        return final
    tmp = os.path.join(directory, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        policy.save_pretrained(tmp, state_dict=model_state)  # safetensors
    tokenizer.save_pretrained(tmp)
    crash_point("checkpoint")
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    if extra is not None:
        torch.save(extra, os.path.join(tmp, "extra_state.pt"))
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "rng": rng}, os.path.join(tmp, "training_state.pt"))
    os.rename(tmp, final)
    for old in list_checkpoints(directory)[:-1]:  # keep only the newest
        shutil.rmtree(old)
    return final


def list_checkpoints(directory):
    found = [d for d in os.listdir(directory) if d.startswith("checkpoint-")] if os.path.isdir(directory) else []
    return [os.path.join(directory, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def restore(checkpoint, policy, optimizer, scheduler):
    """Optimizer, scheduler and random state of a checkpoint (each rank's own); returns its step and the script's
    extra state (rank 0 reads it; None on the other ranks, and where none was saved)."""
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
    optimizer_state = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False) if is_main() else {}
    load_optimizer_state(policy, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][this_rank()]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    print(f"resuming from {checkpoint} at step {state['step']}")
    path = os.path.join(checkpoint, "extra_state.pt")
    return state["step"], torch.load(path, weights_only=False) if is_main() and os.path.exists(path) else None


def finished(directory, start_step, max_steps):
    """The final model is written last, and its config.json last of all: present means the run completed."""
    return start_step >= max_steps and os.path.exists(os.path.join(directory, "config.json"))


def save_final(directory, policy, tokenizer):
    """The final model in the output directory itself (so --model <output_dir> works), config.json last."""
    model_state, _ = full_state(policy)  # under torchrun: gathered on rank 0
    if not is_main():
        return
    tmp = os.path.join(directory, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        policy.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp), key=lambda name: name == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)
    print(f"saved the final model to {directory}")


def open_metrics(directory, start_step):
    """metrics.jsonl without what an interrupted run logged after its checkpoint; returns log(row), which puts
    each row on disk before it returns (under torchrun: rank 0's log; the others' does nothing)."""
    if not is_main():
        return lambda row: None
    path = os.path.join(directory, "metrics.jsonl")
    kept = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by a kill
                    row = json.loads(line)
                    kept += [line] if row["step"] <= start_step and "toy/gold_reward_after" not in row else []
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    metrics_file = open(path, "a")

    def log(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
    return log


def stop(message, directory):
    last = list_checkpoints(directory)
    raise SystemExit(f"error: {message}; stopping. Last good checkpoint: {last[-1] if last else 'none'}")


# ---------------------------------------------------------------- the run: signals, and its shape from start to end
@dataclass
class Run:
    """What the shared machinery keeps of a running script: its flags and command line, its file, where torchrun put
    it, the checkpoint it resumes from, the signals' state and, once open, its metrics log."""
    args: object
    argv: list
    script: str  # the script's file name, e.g. "dpo.py"
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    checkpoint: str = None
    signals: dict = field(default_factory=lambda: {"stop_after_step": False, "requested": None})
    log: object = None
    save_seconds: float = 0.0


def resume_command(run):
    """'Continue with: <the command line that continues this run>', or None before the run has its directory."""
    args, argv = run.args, run.argv
    if not args.output_dir or not os.path.exists(os.path.join(args.output_dir, "args.json")):
        return None
    command = [sys.argv[0], *sys.argv[1:]] if argv is None else [run.script, *argv]
    named = any(a.startswith(("--output_dir", "--output-dir")) for a in command)
    command += [] if named else ["--output_dir", args.output_dir]
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] if world_size() > 1 else ["python"]
    return "Continue with: " + shlex.join(launcher + command + ([] if "--resume" in command else ["--resume"]))


@contextlib.contextmanager
def start_run(args, argv, script_file):
    """The run of a script (its __file__) with these flags: torchrun's process group if any, the output directory
    checked (nothing read or written yet), and SIGINT (Ctrl-C) / SIGTERM handled: while run.signals'
    stop_after_step is set, the loop is asked to stop after its step (`requested`); otherwise, or a second time,
    the run stops at once. Either way the last line says how to continue."""
    run = Run(args, argv, os.path.basename(script_file))
    run.rank, run.world, run.device = init_distributed(args)  # (0, 1, "cuda" or "cpu") unless under torchrun
    run.checkpoint = on_rank_0(check_output_dir, args)  # reads only

    def handler(signum, frame):
        if run.signals["stop_after_step"] and not run.signals["requested"]:
            run.signals["requested"] = signum
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)")
        else:
            raise KeyboardInterrupt
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield run
    except KeyboardInterrupt:
        sys.exit(f"interrupted. {resume_command(run) or 'Nothing was written.'}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def toy_task(args, dataset="train_pairs.jsonl", eval_dataset="test_pairs.jsonl"):
    """The built-in toy task when --model is not given: (the toy module, its directory), with --model, --dataset
    and --eval_dataset set to its SFT model and data files (a file name, or None for none); else (None, None)."""
    if args.model is not None:
        return None, None
    import toy
    toy_dir = toy.ensure_built()
    args.model = os.path.join(toy_dir, "sft")
    args.dataset = dataset and os.path.join(toy_dir, dataset)
    args.eval_dataset = args.eval_dataset or eval_dataset and os.path.join(toy_dir, eval_dataset)
    return toy, toy_dir


def steps_of(args, n, world, what="pairs", have=None):
    """(steps per epoch, the run's steps) for n training items (pairs, rows, prompts), --batch_size x --grad_accum
    of them per process a step; too few for one step stops the run here, saying it has only n `have`."""
    per_step = args.batch_size * args.grad_accum * world
    if n // per_step == 0:
        sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                 f"{per_step} {what} per step, but {args.dataset} gives only {n} {have or 'training ' + what}")
    return n // per_step, args.max_steps or args.epochs * (n // per_step)


def load_policy(run, checkpoint=None):
    """The policy: the checkpoint's weights or --model's, seeded first, with gradient checkpointing if asked, and
    under torchrun wrapped in DDP or FSDP2. Returns it and which wrapper ("ddp", "fsdp" or None)."""
    args = run.args
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    policy = load_model(checkpoint or args.model, args.dtype, run.device, args.trust_remote_code)
    if args.gradient_checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # the name since transformers 5.x; the old one before
    return policy, parallelize(policy, args)  # under torchrun: DDP or FSDP2; else nothing


def frozen(model, args):
    """A model for scoring only (a reference, a judge): eval mode, no gradients, under torchrun sharded (FSDP2) or
    whole (DDP)."""
    model.eval().requires_grad_(False)
    parallelize(model, args, trainable=False)
    return model


def make_optimizer(policy, args):
    """AdamW (or RMSprop) over the policy, and its learning rate: linear warm-up, then constant (DPO paper App. B)."""
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                      fused=True)  # one kernel per step: 1.1-1.2x faster steps at vocab 128k (bench/)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    return optimizer, scheduler


def training_bar(run, policy, start_step, max_steps, desc):
    """The loop's steps with a progress bar; from here Ctrl-C / SIGTERM finish the step and save first."""
    run.signals["stop_after_step"] = True
    run.save_seconds = 3 * sum(p.numel() * p.element_size() for p in policy.parameters()) / 2e8  # a guess at 200 MB/s
    return tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=desc)


def update(run, policy, optimizer, scheduler, sums, step, directory=None):
    """The end of a step's backward passes: clip the gradient, one host sync for the step's metrics (mean over the
    ranks; `sums`: name -> tensor), stop on a non-finite loss or gradient, keeping the last good checkpoint (in
    `directory`, default --output_dir), then the optimizer and scheduler step. Returns the step's row of metrics."""
    grad_norm = clip_grad_norm_(policy, run.args.max_grad_norm)
    values = mean_over_ranks(torch.stack([*sums.values(), grad_norm.float()])).tolist()  # one host sync
    row = dict(zip([*sums, "grad_norm"], values))
    if not all(map(math.isfinite, values)):
        stop(f"non-finite loss or gradient at step {step + 1} ({row})", directory or run.args.output_dir)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    crash_point("step")
    return row


def eval_line(row):
    return (f"eval loss {row['eval_loss']:.4f}, accuracy {row['eval_rewards/accuracies']:.3f}, "
            f"margin {row['eval_rewards/margins']:.3f}")


def end_of_step(run, row, step, max_steps, bar, evaluate, save, toy_curve=None, describe=eval_line, directory=None):
    """After step `step` (0-based): evaluate (a function returning eval_ metrics, or None for none) every
    --eval_every steps and at the end, and print describe(row); log the toy's curve (toy_curve(): its figures) every
    --toy_eval_every steps; write the row; save a checkpoint (save()) every --save_every steps, at the end, or when
    a signal asked the run to stop, and stop then, naming the newest checkpoint in `directory` (--output_dir)."""
    args = run.args
    if evaluate and ((step + 1) % args.eval_every == 0 or step + 1 == max_steps):
        row.update(evaluate())
        tqdm.write(f"step {step + 1}: {describe(row)}")
    if toy_curve and args.toy_eval_every and (step + 1) % args.toy_eval_every == 0 and step + 1 < max_steps:
        row.update({f"toy/{k}": v for k, v in toy_curve().items()})
    run.log(row)
    requested, slow_save = agree(run.signals["requested"] or 0, run.save_seconds >= 10)  # the same on every rank
    if (step + 1) % args.save_every == 0 or step + 1 == max_steps or requested and not slow_save:
        started = time.time()
        save()
        run.save_seconds = time.time() - started
    if requested:
        bar.close()
        print(f"stopped after step {step + 1}; newest checkpoint: "
              f"{(list_checkpoints(directory or args.output_dir) or ['none (a resume starts at step 0)'])[-1]}. "
              f"{resume_command(run) or ''}", file=sys.stderr)
        raise SystemExit(128 + int(requested))


def toy_before(toy, toy_dir, reference, tokenizer, seed):
    """The toy's test prompts and the gold reward, length and KL of the starting model's samples on them."""
    prompts = toy.test_prompts(toy_dir)
    return prompts, toy.evaluate(reference, reference, tokenizer, prompts, seed=seed)


def toy_after(toy, prompts, before, policy, reference, tokenizer, seed, log, step):
    """The toy's figures after training, logged (toy/<name>_before, toy/<name>_after) and printed in the words every
    script ends with."""
    after = toy.evaluate(policy, reference, tokenizer, prompts, seed=seed)
    log({"step": step, **{f"toy/{k}_before": v for k, v in before.items()},
         **{f"toy/{k}_after": v for k, v in after.items()}})
    print(f"toy task, {len(prompts)} test prompts, one sample each:\n"
          f"  gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}   "
          f"length {before['length']:.1f} -> {after['length']:.1f} words   "
          f"KL(policy || reference) {before['kl']:.2f} -> {after['kl']:.2f} nats")


# ---------------------------------------------------------------- reward models (distilled_dpo.py's teachers)
def check_reward_model(name, flag, trust_remote_code=False):
    """A given reward model must be a sequence classifier with one output: checked on its config (and its tokenizer
    loaded), before anything is written; `flag` names where it was given."""
    from transformers import AutoConfig
    config = from_pretrained(AutoConfig, name, "a reward model", trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        sys.exit(f"error: {flag} {name}: not a reward model (a sequence classifier with one output): its "
                 f"config says architectures {architectures}, {config.num_labels} outputs")
    load_tokenizer(name, trust_remote_code)


def load_reward_model(name, args, device, num_labels=None):
    """AutoModelForSequenceClassification from a hub id or directory (num_labels=1 puts a new one-output head on
    a causal LM), dropout off, padding id set so the model finds each row's last token. Returns it and its
    tokenizer."""
    from transformers import AutoModelForSequenceClassification
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    extra = {} if num_labels is None else {"num_labels": num_labels}
    model = from_pretrained(AutoModelForSequenceClassification, name, "a reward model",
                            dtype=torch_dtype(args.dtype, device), trust_remote_code=args.trust_remote_code, **extra)
    model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model).to(device), tokenizer


# ---------------------------------------------------------------- files written whole (dice.py's stages)
def write_json(path, value):
    """JSON (indent 1) into a temporary file, then renamed: a kill leaves the whole file or none."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows):
    """JSON Lines into a temporary file, then renamed: a kill leaves the whole file or none."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)

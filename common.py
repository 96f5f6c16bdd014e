"""What every DPO-family script needs, and nothing algorithm-specific.

1. `sequence_logps`: summed log pi(y|x) of each response from one forward pass, with the LM head
   run only on the positions that score a response token, in chunks, never holding [B, T, V] logits.
   `grouped_logps`: the same for a prompt with several responses, the prompt computed once (`collate_shared`).
2. `encode_prompt` / `encode_response` / `truncate` / `collate`: (prompt, response) -> padded batch.
3. `load_model` / `load_tokenizer` / `load_rows`: hub id or local path, with clear errors on bad data.
"""
import atexit
import contextlib
import hashlib
import json
import os
import signal
import sys
import traceback

import torch
import torch.nn.functional as F


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
    return through_wrapper(model, _sequence_logps, model, batch, chunk_size)  # under torchrun: inside DDP/FSDP2's forward


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
        shared = model._prompt_shared = agree(not _shared_layout_works(model, groups[:2], pad_token_id, device)) == [0.0]
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
        shared, moved = logps(collate_shared(groups, pad_token_id, one_row)), logps(collate_shared(changed, pad_token_id, one_row))
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
    inputs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **no_cache)
    return through_wrapper(model, lambda: model(**inputs).logits[:, 0].float())  # (K,)


def _shared_scores(model, groups, pad_token_id, device, row_tokens=None):
    batch = collate_shared(groups, pad_token_id, row_tokens)
    response, K = batch["response_of_token"], len(batch["n_tokens"])  # (N,): the tokens in row order
    read = torch.zeros(K, dtype=torch.long).scatter_reduce(0, response, batch["score_index"], "amin", include_self=False)
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
def load_model(name, dtype="auto", device=None, trust_remote_code=False):
    """A causal LM from a hub id or a local save_pretrained directory, dropout off (DPO needs pi = pi_ref at init)."""
    from transformers import AutoModelForCausalLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    model = from_pretrained(AutoModelForCausalLM, name, "a causal LM", dtype=getattr(torch, dtype),
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


def from_pretrained(auto_class, name, what, **kwargs):
    """auto_class.from_pretrained(name), with one line instead of a traceback when `name` is neither a local
    save_pretrained directory nor a hub id that holds `what`."""
    if not os.path.isdir(name) and (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise SystemExit(f"error: {name}: {'not a directory' if os.path.exists(name) else 'no such directory'}; "
                         f"expected a save_pretrained directory or a hub id")
    try:
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
        raise SystemExit(f"error: {source}: a {ext or 'file of unknown'} format is not read; a dataset is {DATA_FORMATS}")
    if not os.path.exists(source) and (ext in (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt")
                                       or source.startswith((".", "/", "~"))):
        raise SystemExit(f"error: {source}: no such file; a dataset is {DATA_FORMATS}")
    if os.path.exists(source):  # quiet for a local file: our error, if any, is the one line on stderr
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if os.path.isfile(source):
            data = datasets.load_dataset("parquet" if ext == ".parquet" else "json", data_files=source, split="train")
        elif os.path.isdir(source) and any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json")):
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
        for field in fields:
            value = row.get(field)
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
                raise SystemExit(f"error: {source}: {where(source, i)}: field '{field}': {problem}")
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
    than cores leave OpenMP threads waiting on each other). Only rank 0 prints: the others' stdout and stderr go nowhere,
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
    dist.init_process_group("nccl" if device != "cpu" else "gloo", device_id=torch.device(device) if device != "cpu" else None)
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
    model_state = None if not weights else get_model_state_dict(model, options=options) if _dist() else model.state_dict()
    seen, tied = set(), set()  # a weight shared by two modules (tied embeddings) is saved once, as save_pretrained does
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    model_state = None if model_state is None else {k: v for k, v in model_state.items() if k not in tied}
    if optimizer is None or not isinstance(optimizer, torch.optim.Optimizer):  # none, or one that saves itself
        return model_state, optimizer and optimizer.state_dict()  # (D2PO's optimizer plus discriminator)
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state):
    """The optimizer state of `full_state` into this rank's optimizer (its shard under FSDP2); under torchrun
    only rank 0 needs to have read it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.load_state_dict(state)
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

"""What every DPO-family script needs, and nothing algorithm-specific.

1. `sequence_logps`: summed log pi(y|x) of each row's response from one forward pass, with the LM head
   run only on the positions that score a response token, in chunks, never holding [B, T, V] logits.
2. `encode_prompt` / `encode_response` / `truncate` / `collate`: (prompt, response) -> padded batch.
3. `load_model` / `load_tokenizer` / `load_rows`: hub id or local path, with clear errors on bad data.
"""
import json
import os

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- log-probs
class _ChunkedLogProb(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[label] row by row, `chunk_size` rows of logits at a time.
    Backward recomputes each chunk's logits instead of storing them: memory is O(chunk_size * V), one
    buffer reused by every chunk, and the fp32 weight gradient (for bf16/fp16 weights also an fp32 chunk
    buffer and a (V, H) one in the weight's dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):  # hidden (N, H), labels (N,)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
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
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        buffers = _chunk_buffers(hidden, weight, ctx.chunk_size)
        low_w = None if not need_w or weight.dtype == torch.float32 else torch.empty_like(weight)  # (V, H)
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h, g_out = hidden[s:s + ctx.chunk_size], grad_out[s:s + ctx.chunk_size, None]  # (n, H), (n, 1)
            g = _chunk_logits(h, weight, bias, buffers).sub_(lse[s:s + ctx.chunk_size, None]).exp_().mul_(-g_out)
            g.scatter_add_(-1, labels[s:s + ctx.chunk_size, None], g_out)  # (n, V) fp32: g_out * (onehot - p)
            if need_b:
                grad_b += g.sum(0)
            g = g if g.dtype == weight.dtype else buffers[0][:len(h)].copy_(g)  # (n, V) in the weight's dtype
            if need_w and weight.dtype == torch.float32:  # summed in place, no (V, H) temporary
                grad_w.addmm_(g.t(), h)
            elif need_w:  # the chunk's product in the weight's dtype, added to the fp32 sum in row blocks
                torch.mm(g.t(), h, out=low_w)  # (a mixed-dtype add_ of the whole would copy it to fp32 first)
                for r in range(0, len(low_w), 8192):
                    grad_w[r:r + 8192] += low_w[r:r + 8192]
            if need_h:
                torch.mm(g, weight, out=grad_h[s:s + ctx.chunk_size])
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
        return grad_h, cast(grad_w, weight), cast(grad_b, bias), None, None


def _chunk_buffers(hidden, weight, chunk_size):
    """(chunk, V) buffers for the head's output: in the weight's dtype, and in fp32 (the same one for fp32)."""
    low = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0], dtype=weight.dtype)
    return low, low if weight.dtype == torch.float32 else torch.empty_like(low, dtype=torch.float32)


def _chunk_logits(h, weight, bias, buffers):
    """fp32 logits (n, V) of the rows h (n, H), written into the buffers."""
    low = buffers[0][:len(h)]
    torch.mm(h, weight.t(), out=low) if bias is None else torch.addmm(bias, h, weight.t(), out=low)
    return low if buffers[1] is buffers[0] else buffers[1][:len(h)].copy_(low)


def token_logps(hidden, weight, bias, labels, chunk_size=None):
    """log p(label_i | hidden_i) for each of N rows: (N, H) -> (N,) in fp32, without (N, V) logits."""
    chunk_size = chunk_size or max(128, 2**24 // weight.shape[0] // 128 * 128)  # ~64 MiB of fp32 logits
    # per chunk, in multiples of 128 rows (a GPU matmul tile), and at least 128 rows so each matmul stays large
    return _ChunkedLogProb.apply(hidden, weight, bias, labels, chunk_size)


def sequence_logps(model, batch, chunk_size=None):
    """Summed log-prob of each row's response tokens, and their count: (B,) fp32, (B,) long.

    `batch` comes from `collate`. The one-token shift happens once, in `collate`'s `score_index`: the
    token at position t is scored by the hidden state at t - 1, so the first response token is scored
    at the last prompt position. All indices are built on the host: no boolean masks, no syncs here."""
    B = batch["input_ids"].shape[0]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        # Models that transform the logits after the LM head (Gemma-2, Cohere): plain, unfused path.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits.flatten(0, 1).index_select(0, batch["score_index"]).float()  # (N, V)
        per_token = logits.log_softmax(-1).gather(-1, batch["labels"][:, None]).squeeze(-1)  # (N,)
    else:
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        hidden = out[0].flatten(0, 1).index_select(0, batch["score_index"])  # (N, H): only positions that score
        head = model.get_output_embeddings()
        per_token = token_logps(hidden, head.weight, head.bias, batch["labels"], chunk_size)  # (N,)
    logps = per_token.new_zeros(B).index_add(0, batch["row_of_token"], per_token)  # (B,)
    return logps, batch["n_tokens"]


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


def truncate(prompt_ids, responses, max_length, max_prompt_length=None):
    """Fit prompt + each response into max_length: cut the prompt first, keeping its end (but not below
    max_prompt_length, default max_length // 2), then the responses. Returns (prompt, responses, cut?)."""
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, responses, False
    keep = max(max_length - longest, min(len(prompt_ids), max_prompt_length or max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    return prompt_ids, [r[:max_length - len(prompt_ids)] for r in responses], True


def collate(rows, pad_token_id):
    """rows: [(prompt_ids, response_ids)] -> right-padded batch plus the host-built indices that
    `sequence_logps` needs: score_index (N,) into the flattened (B*T) positions, labels (N,),
    row_of_token (N,), n_tokens (B,), with N the number of response tokens in the batch."""
    B, T = len(rows), max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    response_mask = torch.zeros(B, T, dtype=torch.long)
    score_index, labels, row_of_token = [], [], []
    for i, (p, r) in enumerate(rows):
        assert len(p) >= 1, "a row needs at least one prompt token to score its first response token"
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, :len(p) + len(r)] = 1
        response_mask[i, len(p):len(p) + len(r)] = 1
        score_index += range(i * T + len(p) - 1, i * T + len(p) + len(r) - 1)
        labels += r
        row_of_token += [i] * len(r)
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                score_index=torch.tensor(score_index), labels=torch.tensor(labels),
                row_of_token=torch.tensor(row_of_token), n_tokens=response_mask.sum(-1))


# ---------------------------------------------------------------- loading
def load_model(name, dtype="auto", device=None, trust_remote_code=False):
    """A causal LM from a hub id or a local save_pretrained directory, dropout off (DPO needs pi = pi_ref at init)."""
    from transformers import AutoModelForCausalLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load model '{name}': {e}")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model.to(device)


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_rows(source, fields, split="train"):
    """Rows of a hub dataset or a local json/jsonl/parquet file, as dicts. Each field in `fields` must be a
    string or a list of chat messages ({"role", "content"} dicts): anything else stops with file, row, field."""
    import datasets
    kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(os.path.splitext(source)[1])
    try:
        data = datasets.load_dataset(kind, data_files=source, split="train") if kind else \
            datasets.load_dataset(source, split=split)
    except Exception as e:
        if kind == "json":  # usually a type clash between rows: find it ourselves and name it
            with open(source) as f:
                rows = [json.loads(line) for line in f if line.strip()] if source.endswith("l") else json.load(f)
            return check_rows(source, rows, fields)
        raise SystemExit(f"error: could not load dataset '{source}': {e}")
    return check_rows(source, data.to_list(), fields)


def check_rows(source, rows, fields):
    if rows and "prompt" in fields and "prompt" not in rows[0] and {"chosen", "rejected"} <= set(rows[0]):
        rows = [split_implicit_prompt(source, i, row) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        for field in fields:
            if field not in row:
                raise SystemExit(f"error: {source}: row {i}: missing field '{field}' (found: {sorted(row)})")
            value = row[field]
            chat_ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     and isinstance(m.get("role"), str) for m in value)
            if not (isinstance(value, str) or chat_ok):
                raise SystemExit(f"error: {source}: row {i}: field '{field}' must be a string or a list of "
                                 f"{{'role', 'content'}} messages, got {type(value).__name__}: {str(value)[:80]!r}")
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
    raise SystemExit(f"error: {source}: row {i}: no 'prompt' field, and chosen/rejected share no prompt to split off")


def report_dropped(dropped, total):
    """Print how many rows were dropped and why, with the first few row numbers; stop if none are left."""
    for reason, rows in dropped.items():
        if rows:
            print(f"dropped {len(rows)} of {total} rows ({reason}): rows {', '.join(map(str, rows[:5]))}"
                  f"{' ...' if len(rows) > 5 else ''}")
    if sum(map(len, dropped.values())) == total:
        raise SystemExit("error: no usable rows left in the dataset")


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=64):
    """One sampled response per prompt (token id lists in, out), batched with the KV cache, left-padded.
    Pure sampling (no top-k / top-p) so that sample log-probs estimate KL without bias. A response
    ends with EOS when the model finished within max_new_tokens."""
    was_training, eos, device = model.training, tokenizer.eos_token_id, next(model.parameters()).device
    model.eval()
    responses = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        L = max(map(len, chunk))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (L - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        responses += [row[:row.index(eos) + 1] if eos in row else row for row in out[:, L:].tolist()]
    model.train(was_training)
    return responses

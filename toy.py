"""The built-in toy task: a world small enough to run every algorithm on a laptop CPU in minutes.

The world is short movie reviews. A tiny Llama-style model (and a byte-level BPE tokenizer trained with
the `tokenizers` library) is pretrained on synthetic reviews of mixed sentiment, so it samples fluent
text whose mean sentiment is near neutral. The gold reward is a program, in the spirit of the DPO paper's
IMDb task: positive minus negative sentiment words per 10 words (normalised by length, so length alone
cannot raise it; best fluent answers score about +3, the SFT model about 0). Preference pairs are two
samples of the SFT model for one prompt, ordered by a noisy Bradley-Terry annotator of the gold reward
(optionally biased toward longer answers). Everything is saved in the formats real data and models use:

    <dir>/sft/                  save_pretrained model + tokenizer (what --model takes)
    <dir>/train_pairs.jsonl     {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    <dir>/test_pairs.jsonl      the same, on held-out prompts
    <dir>/unpaired.jsonl        {"prompt", "completion", "label", "score"}: label = gold reward > 0
    <dir>/test_prompts.jsonl    {"prompt"} for evaluation by sampling
    <dir>/meta.json             version, seed, counts, build time, library versions

Built from a seed on first use and cached in $DPO_TOY_DIR (default ~/.cache/dpo_family/<VERSION>);
`python toy.py [--dir D] [--seed S]` builds it and prints a summary. The build (seed 0: 1,920 training pairs,
448 test pairs, 512 test prompts) took 89 s on 2 CPU cores at load average 1, and 2 min 21 s at load 6-7
(toy-v1, on 2 threads: 76 s and 13 min 31 s). It runs on one CPU thread (see one_thread), and gives the
same files, byte for byte, with 1 or 2 threads. A CPU with other vector instructions (AVX2 rather
than AVX-512, say) rounds differently: the SFT weights then drift apart during pretraining and the samples
differ, but not the prompts nor the number of pairs.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import time

import torch
from tqdm import tqdm

from common import collate, sample_responses, sequence_logps

VERSION = "toy-v3"  # bump whenever the built content changes, so that no old cache is reused
DEFAULT_DIR = os.environ.get("DPO_TOY_DIR", os.path.join(os.path.expanduser("~"), ".cache", "dpo_family", VERSION))

# ---------------------------------------------------------------- the world
POSITIVE = ("great wonderful brilliant beautiful funny charming moving clever fresh delightful superb lovely "
            "gripping warm smart loved enjoyed liked").split()
NEGATIVE = ("boring awful dull weak bad silly slow messy flat terrible predictable lazy cheap bland painful "
            "hated disliked wasted").split()
NEUTRAL = "long quiet simple dark loud short strange familiar serious old different unusual".split()
SUBJECTS = ("the movie|the film|the plot|the story|the acting|the cast|the music|the ending|the dialogue|"
            "the script|the characters|the pacing|the soundtrack|the camera work|the humor|the sequel").split("|")
VERBS = "was|felt|seemed|looked|turned out".split("|")
ADVERBS = "very|really|quite|a bit|rather|pretty|so|somewhat|truly|".split("|")
OPENERS = "honestly|overall|i think|to be fair|in the end|at first|for me|as a whole|".split("|")
CONNECTORS = "and|but|although|while|because|yet|so".split("|")
SENTIMENT = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def gold_reward(text):
    """Positive minus negative sentiment words per 10 words (at least 10 words counted)."""
    words = [w.strip(".,!?") for w in text.lower().split()]
    return 10.0 * sum(SENTIMENT.get(w, 0) for w in words) / max(len(words), 10)


def annotate(reward_a, reward_b, len_a, len_b, rng, temperature=0.5, length_bias=0.0):
    """A noisy Bradley-Terry annotator: True if it prefers a. length_bias adds that much reward per 10
    words of extra length (an annotator who likes long answers; the gold reward does not)."""
    margin = reward_a - reward_b + length_bias * (len_a - len_b) / 10.0
    return rng.random() < 1.0 / (1.0 + math.exp(-margin / temperature))


def review(rng):
    """One synthetic review; its mood decides how likely each sentiment word is positive."""
    mood = rng.betavariate(2.0, 2.2)  # P(positive | sentiment word); slightly below 1/2 on average

    def adjective():
        if rng.random() < 0.3:
            return rng.choice(NEUTRAL)
        return rng.choice(POSITIVE[:15] if rng.random() < mood else NEGATIVE[:15])

    def clause():
        form = rng.random()
        if form < 0.6:
            adverb = rng.choice(ADVERBS)
            return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {adverb + ' ' if adverb else ''}{adjective()}"
        if form < 0.8:
            return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {adjective()} and {adjective()}"
        verb = rng.choice(POSITIVE[15:] if rng.random() < mood else NEGATIVE[15:])
        return f"i {verb} {rng.choice(SUBJECTS)}"

    sentences = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        opener = rng.choice(OPENERS)
        parts = [f"{opener} {clause()}" if opener else clause()]
        for _ in range(rng.choice([0, 1, 1, 2])):
            parts.append(f"{rng.choice(CONNECTORS)} {clause()}")
        sentences.append(" ".join(parts) + " .")
    return " ".join(sentences)


def split_review(text, rng):
    """(prompt, response): the first 2-4 words, and the rest with its leading space."""
    words = text.split(" ")
    k = rng.randint(2, min(4, len(words) - 2))
    return " ".join(words[:k]), " " + " ".join(words[k:])


# ---------------------------------------------------------------- building the toy
def build_tokenizer(corpus, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    # A minimal chat template, so chat-formatted data runs through the same code path as a real chat model.
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tokenizer


def pack(docs, eos, pad, row_len):
    """Reviews (each + EOS) back to back in rows of row_len tokens (widened to the longest review if need be).
    Position ids restart at 0 with every review, which transformers reads as packed sequences: each review
    attends to itself only, exactly as if it were alone in its row, and little compute goes to padding (random
    batches of whole reviews were 55% padding). Returns input_ids, position_ids and labels, each (rows, row_len);
    a review's first token is not predicted (no BOS), nor is padding."""
    row_len = max(row_len, 1 + max(map(len, docs)))
    rows, used = [[]], 0
    for doc in docs:
        if used + len(doc) + 1 > row_len:
            rows.append([])
            used = 0
        rows[-1].append(doc + [eos])
        used += len(doc) + 1
    input_ids = torch.full((len(rows), row_len), pad)  # (N, row_len)
    position_ids = torch.arange(row_len).repeat(len(rows), 1)  # (N, row_len); a row's padding keeps these
    labels = torch.full((len(rows), row_len), -100)  # (N, row_len)
    for r, row in enumerate(rows):
        start = 0
        for doc in row:
            input_ids[r, start:start + len(doc)] = torch.tensor(doc)
            position_ids[r, start:start + len(doc)] = torch.arange(len(doc))
            labels[r, start + 1:start + len(doc)] = torch.tensor(doc[1:])
            start += len(doc)
    return input_ids, position_ids, labels


def pretrain(model, docs, eos, pad, steps, rows, row_len, lr, seed):
    """Plain next-token SFT on whole reviews, packed (see pack), `rows` rows a step, AdamW, cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(range(steps), desc="toy: pretraining the SFT model", mininterval=2)
    input_ids, start = [], 0
    for _ in bar:
        if start + rows > len(input_ids):  # a new pass over the corpus, in a new order
            order = torch.randperm(len(docs), generator=g).tolist()
            input_ids, position_ids, labels = pack([docs[i] for i in order], eos, pad, row_len)  # (N, row_len)
            start = 0
        batch = slice(start, start + rows)
        start += rows
        # no attention_mask and no KV cache: then transformers makes the mask from the position ids, a block per review
        loss = model(input_ids=input_ids[batch], position_ids=position_ids[batch], labels=labels[batch],
                     use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def prompt_stream(rng):
    """Prompts without end: the beginnings of fresh reviews."""
    while True:
        yield split_review(review(rng), rng)[0]


def make_pairs(model, tokenizer, prompts, n_pairs, seed, max_new_tokens=64, length_bias=0.0, chunk=256, desc="pairs"):
    """Exactly n_pairs pairs: two SFT samples per prompt, ordered by the annotator, taking prompts from the
    iterator `prompts` `chunk` at a time until enough pairs are usable (a pair with an unfinished, empty or
    identical sample is skipped). The annotator and the sampling have random streams of their own, derived from
    seed; each chunk is sampled under a seed of its own: the samples depend on the model, the prompts and seed only."""
    annotator_rng, sampling_rng = random.Random(f"{seed}/annotator"), random.Random(f"{seed}/sampling")
    pairs, eos = [], tokenizer.eos_token_id
    bar = tqdm(total=n_pairs, desc=f"toy: sampling {desc}", unit="pair", mininterval=2)
    while len(pairs) < n_pairs:
        batch = list(itertools.islice(prompts, chunk))
        ids = [tokenizer(p)["input_ids"] for p in batch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sampling_rng.getrandbits(32))
            samples = sample_responses(model, tokenizer, ids + ids, max_new_tokens, batch_size=2 * len(ids))
        for prompt, a, b in zip(batch, samples[:len(batch)], samples[len(batch):]):
            ta, tb = tokenizer.decode(a[:-1]), tokenizer.decode(b[:-1])
            usable = a[-1:] == [eos] and b[-1:] == [eos] and ta.strip() and tb.strip() and ta != tb
            if not usable or len(pairs) == n_pairs:
                continue
            ga, gb = gold_reward(ta), gold_reward(tb)
            if not annotate(ga, gb, len(ta.split()), len(tb.split()), annotator_rng, length_bias=length_bias):
                ta, tb, ga, gb = tb, ta, gb, ga
            pairs.append(dict(prompt=prompt, chosen=ta, rejected=tb, score_chosen=ga, score_rejected=gb))
        if len(pairs) == bar.n:
            raise RuntimeError(f"toy: no usable pair from {len(batch)} prompts: the model does not finish its samples "
                               f"within {max_new_tokens} tokens")
        bar.update(len(pairs) - bar.n)
    bar.close()
    return pairs


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block. The toy's model is so small that its operations are too
    short to share among threads: on 2 busy cores, sampling it with 2 threads took 18x as long as with one
    (OpenMP threads wait for each other on every operation), and the toy builds identically whatever the
    machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def build(directory=DEFAULT_DIR, seed=0, n_train_pairs=1920, n_test_pairs=448, n_test_prompts=512, steps=220):
    """Build the whole toy into a temporary directory, then move it into place (never half-built)."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    start = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    corpus = [review(rng) for _ in range(15000)]
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    docs = [tokenizer(text)["input_ids"] for text in corpus]
    loss = pretrain(model, docs, tokenizer.eos_token_id, tokenizer.pad_token_id, steps, 20, 128, 3e-3, seed)

    tmp = directory + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "sft"))
    tokenizer.save_pretrained(os.path.join(tmp, "sft"))
    # prompts: beginnings of fresh reviews, from streams of their own for the train and the test split
    train = make_pairs(model, tokenizer, prompt_stream(random.Random(f"{seed}/train prompts")), n_train_pairs,
                       seed=f"{seed}/train", desc="train pairs")
    test_prompts = list(itertools.islice(prompt_stream(random.Random(f"{seed}/test prompts")), n_test_prompts))
    test = make_pairs(model, tokenizer, prompt_stream(random.Random(f"{seed}/test prompts")), n_test_pairs,
                      seed=f"{seed}/test", desc="test pairs")  # on the test prompts (and a few more if needed)
    write_jsonl(os.path.join(tmp, "train_pairs.jsonl"), train)
    write_jsonl(os.path.join(tmp, "test_pairs.jsonl"), test)
    write_jsonl(os.path.join(tmp, "unpaired.jsonl"),
                [dict(prompt=p["prompt"], completion=p[k], label=p["score_" + k] > 0, score=p["score_" + k])
                 for p in train for k in ("chosen", "rejected")])
    write_jsonl(os.path.join(tmp, "test_prompts.jsonl"), [dict(prompt=p) for p in test_prompts])
    agree = sum((p["score_chosen"] > p["score_rejected"]) for p in train) / len(train)
    meta = dict(version=VERSION, seed=seed, build_seconds=round(time.time() - start, 1), n_train_pairs=len(train),
                n_test_pairs=len(test), n_test_prompts=len(test_prompts), sft_final_loss=round(loss, 3),
                annotator_agrees_with_gold=round(agree, 3),
                sft_mean_gold=round(sum(p["score_chosen"] + p["score_rejected"] for p in train) / (2 * len(train)), 3),
                torch=torch.__version__, transformers=transformers.__version__)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    print(f"toy: built in {meta['build_seconds']} s at {directory}: {meta}")
    return directory


def read_meta(directory):
    """The toy's meta.json as a dict, or None if the directory holds no finished build."""
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_built(directory=DEFAULT_DIR):
    """The toy's directory, building it first if it holds no toy of this VERSION yet."""
    meta = read_meta(directory)
    if meta is None or meta.get("version") != VERSION:
        old = f" (it holds {meta.get('version')})" if meta else " (first use only)"
        print(f"toy: building the toy task {VERSION} in {directory}{old}, 1.5-2.5 minutes ...")
        build(directory)
    return directory


def relabelled_pairs(directory=DEFAULT_DIR, length_bias=0.0, seed=0):
    """The toy's training pairs, the same two samples each, reordered by a fresh annotator with `length_bias`
    (see annotate; from the gold rewards already in the file, no re-sampling); deterministic from seed. Written
    once beside the toy as train_pairs-length_bias<b>-seed<s>.jsonl (atomically, the same bytes every time) and
    returned as that path. What build writes is untouched."""
    path = os.path.join(directory, f"train_pairs-length_bias{float(length_bias):g}-seed{seed}.jsonl")
    if not os.path.exists(path):
        rng = random.Random(f"{seed}/relabel/{float(length_bias)!r}")
        with open(os.path.join(directory, "train_pairs.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        out = []
        for row in rows:  # a = the built chosen: the draw below does not depend on which one is a
            a, b, ga, gb = row["chosen"], row["rejected"], row["score_chosen"], row["score_rejected"]
            if not annotate(ga, gb, len(a.split()), len(b.split()), rng, length_bias=length_bias):
                a, b, ga, gb = b, a, gb, ga
            out.append({**row, "chosen": a, "rejected": b, "score_chosen": ga, "score_rejected": gb})
        tmp = f"{path}.tmp-{os.getpid()}"
        write_jsonl(tmp, out)
        os.replace(tmp, path)
    return path


def test_prompts(directory=DEFAULT_DIR):
    with open(os.path.join(directory, "test_prompts.jsonl")) as f:
        return [json.loads(line)["prompt"] for line in f]


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(policy, reference, tokenizer, prompts, max_new_tokens=64, seed=0):
    """Sample once per prompt from the policy; return mean gold reward, mean length in words, and
    KL(policy || reference) estimated as the mean of log pi(y|x) - log pi_ref(y|x) over the samples.
    Runs on one CPU thread (see one_thread), 256 prompts at a time."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses = []  # a batch at a time, as sample_responses would, so that a bar shows the progress
        for s in tqdm(range(0, len(prompts), 256), desc=f"toy: sampling {len(prompts)} test prompts", leave=False):
            responses += sample_responses(policy, tokenizer, prompt_ids[s:s + 256], max_new_tokens, batch_size=256)
        kl = []
        for s in range(0, len(prompts), 256):
            batch = collate(list(zip(prompt_ids[s:s + 256], responses[s:s + 256])), tokenizer.pad_token_id)
            batch = {k: v.to(next(policy.parameters()).device) for k, v in batch.items()}
            kl += (sequence_logps(policy, batch)[0] - sequence_logps(reference, batch)[0]).tolist()
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    return dict(gold_reward=sum(map(gold_reward, texts)) / len(texts),
                length=sum(len(t.split()) for t in texts) / len(texts), kl=sum(kl) / len(kl))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the toy task (if it is not built yet) and print a summary.")
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help=f"where the toy is built and cached; dpo.py reads $DPO_TOY_DIR (default: {DEFAULT_DIR})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the whole build; a directory built from another seed is rebuilt (default: 0)")
    args = parser.parse_args(argv)
    meta = read_meta(args.dir)
    if meta is None or meta.get("version") != VERSION or meta.get("seed") != args.seed:
        print(f"toy: building the toy task {VERSION} from seed {args.seed} in {args.dir} ...")
        build(args.dir, seed=args.seed)
    print(json.dumps(read_meta(args.dir), indent=1))
    with open(os.path.join(args.dir, "train_pairs.jsonl")) as f:
        for line in itertools.islice(f, 3):
            print(line.strip())


if __name__ == "__main__":
    main()

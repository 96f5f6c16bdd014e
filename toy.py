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

Built deterministically from a seed on first use (about two minutes on 2 CPU cores), cached in
$DPO_TOY_DIR (default ~/.cache/dpo_family/toy-v1). `python toy.py` builds it and prints a summary.
"""
import json
import math
import os
import random
import shutil
import time

import torch
from tqdm import tqdm

from common import collate, sample_responses, sequence_logps

VERSION = "toy-v1"
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


def pretrain(model, docs, eos, pad, steps, batch_size, lr, seed):
    """Plain next-token SFT on whole reviews (each ends with EOS), AdamW, cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(range(steps), desc="toy: pretraining the SFT model", mininterval=2)
    for _ in bar:
        idx = torch.randint(len(docs), (batch_size,), generator=g).tolist()
        T = max(len(docs[i]) + 1 for i in idx)
        ids = torch.full((batch_size, T), pad)
        for row, i in enumerate(idx):
            ids[row, :len(docs[i]) + 1] = torch.tensor(docs[i] + [eos])
        mask = (ids != pad).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def make_pairs(model, tokenizer, prompts, rng, max_new_tokens, length_bias=0.0):
    """Two SFT samples per prompt, ordered by the annotator. Pairs with an unfinished or identical sample are skipped."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    samples = sample_responses(model, tokenizer, ids + ids, max_new_tokens, batch_size=256)
    pairs, eos = [], tokenizer.eos_token_id
    for prompt, a, b in zip(prompts, samples[:len(prompts)], samples[len(prompts):]):
        if a[-1:] != [eos] or b[-1:] != [eos] or a == b:
            continue
        ta, tb = tokenizer.decode(a[:-1]), tokenizer.decode(b[:-1])
        ga, gb = gold_reward(ta), gold_reward(tb)
        if not annotate(ga, gb, len(ta.split()), len(tb.split()), rng, length_bias=length_bias):
            ta, tb, ga, gb = tb, ta, gb, ga
        pairs.append(dict(prompt=prompt, chosen=ta, rejected=tb, score_chosen=ga, score_rejected=gb))
    return pairs


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(directory=DEFAULT_DIR, seed=0, n_train_prompts=2000, n_test_prompts=256, steps=220):
    """Build the whole toy into a temporary directory, then move it into place (never half-built)."""
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
    pretrain(model, docs, tokenizer.eos_token_id, tokenizer.pad_token_id, steps, 64, 3e-3, seed)

    # prompts: beginnings of fresh reviews, drawn independently for the train and test splits
    prompts = {split: [split_review(review(rng), rng)[0] for _ in range(n)]
               for split, n in (("train", n_train_prompts), ("test", n_test_prompts))}

    tmp = directory + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "sft"))
    tokenizer.save_pretrained(os.path.join(tmp, "sft"))
    print("toy: sampling preference pairs from the SFT model ...")
    train = make_pairs(model, tokenizer, prompts["train"], rng, max_new_tokens=64)
    test = make_pairs(model, tokenizer, prompts["test"], rng, max_new_tokens=64)
    write_jsonl(os.path.join(tmp, "train_pairs.jsonl"), train)
    write_jsonl(os.path.join(tmp, "test_pairs.jsonl"), test)
    write_jsonl(os.path.join(tmp, "unpaired.jsonl"),
                [dict(prompt=p["prompt"], completion=p[k], label=p["score_" + k] > 0, score=p["score_" + k])
                 for p in train for k in ("chosen", "rejected")])
    write_jsonl(os.path.join(tmp, "test_prompts.jsonl"), [dict(prompt=p) for p in prompts["test"]])
    agree = sum((p["score_chosen"] > p["score_rejected"]) for p in train) / len(train)
    meta = dict(version=VERSION, seed=seed, build_seconds=round(time.time() - start, 1), n_train_pairs=len(train),
                n_test_pairs=len(test), annotator_agrees_with_gold=round(agree, 3),
                sft_mean_gold=round(sum(p["score_chosen"] + p["score_rejected"] for p in train) / (2 * len(train)), 3))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    print(f"toy: built in {meta['build_seconds']} s at {directory}: {meta}")
    return directory


def ensure_built(directory=DEFAULT_DIR):
    """The toy's directory, building it first if it is not there yet."""
    if not os.path.exists(os.path.join(directory, "meta.json")):
        print(f"toy: building the toy task in {directory} (first use only) ...")
        build(directory)
    return directory


def test_prompts(directory=DEFAULT_DIR):
    with open(os.path.join(directory, "test_prompts.jsonl")) as f:
        return [json.loads(line)["prompt"] for line in f]


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(policy, reference, tokenizer, prompts, max_new_tokens=64, seed=0):
    """Sample once per prompt from the policy; return mean gold reward, mean length in words, and
    KL(policy || reference) estimated as the mean of log pi(y|x) - log pi_ref(y|x) over the samples."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses = sample_responses(policy, tokenizer, prompt_ids, max_new_tokens)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    kl = []
    for s in range(0, len(prompts), 64):
        batch = collate(list(zip(prompt_ids[s:s + 64], responses[s:s + 64])), tokenizer.pad_token_id)
        batch = {k: v.to(next(policy.parameters()).device) for k, v in batch.items()}
        kl += (sequence_logps(policy, batch)[0] - sequence_logps(reference, batch)[0]).tolist()
    return dict(gold_reward=sum(map(gold_reward, texts)) / len(texts),
                length=sum(len(t.split()) for t in texts) / len(texts), kl=sum(kl) / len(kl))


if __name__ == "__main__":
    directory = ensure_built()
    with open(os.path.join(directory, "meta.json")) as f:
        print(json.load(f))
    with open(os.path.join(directory, "train_pairs.jsonl")) as f:
        for line in list(f)[:3]:
            print(line.strip())

"""The toy task's machinery: packed pretraining, a fixed number of pairs, the version check, the command lines."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import toy
from conftest import ROOT, tiny_llama


def test_packed_reviews_score_as_if_each_were_alone(tokenizer):
    rng = random.Random(1)
    docs = [tokenizer(toy.review(rng))["input_ids"] for _ in range(30)]
    model = tiny_llama(len(tokenizer)).train()
    input_ids, position_ids, labels = toy.pack(docs, tokenizer.eos_token_id, tokenizer.pad_token_id, 128)
    assert input_ids.shape[0] < len(docs) and (labels != -100).sum() == sum(map(len, docs))
    packed = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    rows = [torch.tensor([d + [tokenizer.eos_token_id]]) for d in docs]  # each review alone, (1, len + 1)
    alone = sum(model(input_ids=row, labels=row).loss * (row.shape[1] - 1) for row in rows)  # summed over tokens
    torch.testing.assert_close(packed, alone / sum(map(len, docs)), atol=1e-5, rtol=1e-5)


def test_pairs_are_exactly_n_usable_and_independent_of_the_global_rng(toy_dir):
    from common import load_model, load_tokenizer
    tokenizer = load_tokenizer(os.path.join(toy_dir, "sft"))
    model = load_model(os.path.join(toy_dir, "sft"), "float32", "cpu")
    make = lambda: toy.make_pairs(model, tokenizer, toy.prompt_stream(random.Random(5)), 24, seed="t", chunk=16)
    with toy.one_thread():  # as in toy.build: a tiny model samples fastest on one thread
        pairs = make()
        torch.rand(100)  # the global RNG moves on: the pairs must not change
        assert make() == pairs and len(pairs) == 24
    for p in pairs:
        assert p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"]
        assert [p["score_chosen"], p["score_rejected"]] == [toy.gold_reward(p[k]) for k in ("chosen", "rejected")]


def test_a_model_that_never_finishes_is_an_error_not_an_endless_loop(tokenizer):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(RuntimeError, match="no usable pair"):
        toy.make_pairs(model, tokenizer, toy.prompt_stream(random.Random(0)), 4, seed=0, max_new_tokens=2, chunk=8)


def test_evaluate_leaves_the_thread_count_as_it_was(toy_dir):
    from common import load_model, load_tokenizer
    tokenizer = load_tokenizer(os.path.join(toy_dir, "sft"))
    model = load_model(os.path.join(toy_dir, "sft"), "float32", "cpu")
    threads = torch.get_num_threads()
    result = toy.evaluate(model, model, tokenizer, toy.test_prompts(toy_dir)[:8])
    assert torch.get_num_threads() == threads
    assert result["kl"] == pytest.approx(0.0, abs=1e-4) and result["length"] > 0


def test_a_cache_of_another_version_is_rebuilt(tmp_path, monkeypatch):
    (tmp_path / "meta.json").write_text(json.dumps({"version": "toy-v1", "seed": 0}))
    built = []
    monkeypatch.setattr(toy, "build", lambda directory, **kw: built.append(directory))
    toy.ensure_built(str(tmp_path))
    assert built == [str(tmp_path)]
    (tmp_path / "meta.json").write_text(json.dumps({"version": toy.VERSION, "seed": 0}))
    toy.ensure_built(str(tmp_path))
    assert len(built) == 1


@pytest.mark.parametrize("script", ["toy.py", "scripts/toy_results.py"])
def test_help(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage:" in result.stdout and "--seed" in result.stdout

"""Tokenising, truncation, batching and dataset validation in common.py."""
import json

import pytest
import torch

from common import collate, encode_prompt, encode_response, load_rows, truncate


def test_truncate_cuts_prompt_first_keeping_its_end_then_responses():
    prompt, responses = list(range(10)), [[100, 101, 102], [200] * 5]
    assert truncate(prompt, responses, 20) == (prompt, responses, False)
    p, r, cut = truncate(prompt, responses, 12)  # 10 + 5 > 12: the prompt loses its first 3 tokens
    assert cut and p == list(range(3, 10)) and r == responses
    p, r, cut = truncate(prompt, [[7] * 30, [8] * 2], 16)  # the prompt keeps max_length // 2, responses fill the rest
    assert p == list(range(2, 10)) and r == [[7] * 8, [8] * 2] and cut
    p, r, _ = truncate(prompt, [[7] * 30], 16, max_prompt_length=3)
    assert p == [7, 8, 9] and r == [[7] * 13]


def test_encode_response_appends_eos_once(tokenizer):
    ids = encode_response(tokenizer, "the movie", " was great .")
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
    assert tokenizer.decode(ids[:-1]) == " was great ."


def test_chat_prompt_and_response_render_with_the_template(tokenizer):
    prompt = [{"role": "user", "content": "the movie"}]
    response = [{"role": "assistant", "content": " was great ."}]
    p, r = encode_prompt(tokenizer, prompt), encode_response(tokenizer, prompt, response)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    assert tokenizer.decode(p + r) == full.rstrip()  # the template's own end-of-turn EOS, not a second one
    assert r.count(tokenizer.eos_token_id) == 1 and r[-1] == tokenizer.eos_token_id


def test_collate_masks_exactly_the_response():
    batch = collate([([5, 6], [7, 8, 0]), ([5], [9, 0])], pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [5, 9, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["n_tokens"].tolist() == [3, 2]
    flat = batch["input_ids"].flatten()
    # each label is the token right after the position that scores it
    assert torch.equal(flat[batch["score_index"] + 1], batch["labels"])
    assert batch["row_of_token"].tolist() == [0, 0, 0, 1, 1]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_column_names_file_and_field(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(SystemExit, match=r"d\.jsonl: row 0: missing field 'rejected'"):
        load_rows(path, ["prompt", "chosen", "rejected"])


def test_wrong_type_names_file_row_and_field(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2 + [{"prompt": "a", "chosen": 5, "rejected": "c"}]
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(SystemExit, match=r"d\.jsonl: row 2: field 'chosen' must be a string"):
        load_rows(path, ["prompt", "chosen", "rejected"])


def test_implicit_prompt_is_split_off_chat_pairs(tmp_path):
    user = {"role": "user", "content": "hi"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "good"}],
             "rejected": [user, {"role": "assistant", "content": "bad"}]}]
    path = write(tmp_path / "d.jsonl", rows)
    row = load_rows(path, ["prompt", "chosen", "rejected"])[0]
    assert row["prompt"] == [user] and row["chosen"][0]["content"] == "good" and row["rejected"][0]["content"] == "bad"


def test_parquet_loads(tmp_path):
    import datasets
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]).to_parquet(path)
    assert load_rows(path, ["prompt", "chosen", "rejected"]) == [{"prompt": "a", "chosen": "b", "rejected": "c"}]

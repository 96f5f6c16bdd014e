"""Tokenising, truncation, batching and dataset validation in common.py."""
import json

import pytest
import torch

from common import collate, encode_prompt, encode_response, load_rows, prompt_head_length, truncate


def test_truncate_cuts_the_prompts_middle_first_keeping_its_head_and_end_then_responses():
    prompt, responses = list(range(10)), [[100, 101, 102], [200] * 5]
    assert truncate(prompt, responses, 20) == (prompt, responses, False)
    p, r, cut = truncate(prompt, responses, 12)  # 10 + 5 > 12: the prompt loses its first 3 tokens
    assert cut and p == list(range(3, 10)) and r == responses
    p, r, cut = truncate(prompt, responses, 12, keep_start=2)  # ... or, with a 2-token head, the 3 after it
    assert cut and p == [0, 1, 5, 6, 7, 8, 9] and r == responses
    p, r, cut = truncate(prompt, [[7] * 30, [8] * 2], 16)  # the prompt keeps max_length // 2, responses fill the rest
    assert p == list(range(2, 10)) and r == [[7] * 8, [8] * 2] and cut
    p, r, _ = truncate(prompt, [[7] * 30], 16, max_prompt_length=3)
    assert p == [7, 8, 9] and r == [[7] * 13]
    p, r, _ = truncate(prompt, [[7] * 30], 16, max_prompt_length=3, keep_start=5)  # the head gets at most half
    assert p == [0, 8, 9] and r == [[7] * 13]


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The test tokenizer with a BOS that it adds to text, and a template that opens with BOS and a system header."""
    import copy
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<|bos|>"})
    tokenizer.add_bos_token = True
    tokenizer.chat_template = "{{ bos_token }}<|system|>You are a film critic.\n" + tokenizer.chat_template
    return tokenizer


def test_a_cut_chat_prompt_keeps_the_templates_header_and_the_generation_prompt(bos_tokenizer):
    prompt = [{"role": "user", "content": "the plot was " + "very " * 60 + "thin ."}]
    ids = encode_prompt(bos_tokenizer, prompt)
    head = prompt_head_length(bos_tokenizer, prompt, ids)
    assert bos_tokenizer.decode(ids[:head]) == "<|bos|><|system|>You are a film critic.\n<|user|>"
    p, r, cut = truncate(ids, [[5] * 10], 100, keep_start=head)
    assert cut and len(p) == 90 and r == [[5] * 10] and len(ids) > 200
    assert p == ids[:head] + ids[len(ids) - 90 + head:]  # the header, then the prompt's end
    assert bos_tokenizer.decode(p).endswith("very very thin .<|assistant|>")


def test_a_cut_text_prompt_keeps_bos(bos_tokenizer, tokenizer):
    text = "the movie " * 40
    ids = encode_prompt(bos_tokenizer, text)
    assert ids[0] == bos_tokenizer.bos_token_id and prompt_head_length(bos_tokenizer, text, ids) == 1
    p, _, cut = truncate(ids, [[5] * 10], 30, keep_start=prompt_head_length(bos_tokenizer, text, ids))
    assert cut and p == [bos_tokenizer.bos_token_id] + ids[-19:]
    assert prompt_head_length(tokenizer, text, encode_prompt(tokenizer, text)) == 0  # no BOS: nothing to keep


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
    assert batch["response_of_token"].tolist() == [0, 0, 0, 1, 1]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_column_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(SystemExit, match=r"d\.jsonl: line 2: field 'rejected': missing \(found: prompt, chosen\)"):
        load_rows(path, ["prompt", "chosen", "rejected"])


def test_wrong_type_names_file_line_and_field(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2 + [{"prompt": "a", "chosen": 5, "rejected": "c"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n\n" for r in rows))  # blank lines: the line is not the row
    with pytest.raises(SystemExit, match=r"d\.jsonl: line 6: field 'chosen': expected a string"):
        load_rows(str(path), ["prompt", "chosen", "rejected"])


def test_a_json_array_names_the_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": 1.5}]))
    with pytest.raises(SystemExit, match=r"d\.json: row 2: field 'rejected'"):
        load_rows(str(path), ["prompt", "chosen", "rejected"])


def test_a_save_to_disk_folder_loads(tmp_path):
    import datasets
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved"), ["prompt", "chosen", "rejected"]) == rows


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

"""Prompt parsing: truncated tail dropped, dedupe, deterministic disjoint split."""
import json

import pytest

from dflash_core.datasets import (
    conversation_base_id,
    iter_json_array,
    load_humaneval_prompts,
    parse_sharegpt,
    split_of,
)


def _record(cid, first, text):
    return {"id": cid, "conversations": [{"from": first, "value": text},
                                         {"from": "gpt", "value": "ok"}]}


def _truncated_array(records, tail_record):
    full = json.dumps(records + [tail_record], indent=2)
    cut = full.rindex(tail_record["conversations"][0]["value"][:5]) + 3
    return full[:cut]  # cut off inside the last record's string


def test_iter_json_array_drops_truncated_tail():
    recs = [_record(f"c{i}_0", "human", f"question number {i}") for i in range(5)]
    text = _truncated_array(recs, _record("tail_0", "human", "this one is cut off"))
    with_tail_error = False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        with_tail_error = True
    assert with_tail_error
    got = list(iter_json_array(text))
    assert got == recs
    # a complete array parses fully too
    assert list(iter_json_array(json.dumps(recs))) == recs


def test_parse_sharegpt_first_turn_dedupe_filter():
    recs = [
        _record("a_0", "human", "How do I sort a list in Python?"),
        _record("a_1", "gpt", "continuation record starts with the model"),
        _record("b_0", "human", "  how do I   sort a list in python?  "),  # duplicate
        _record("c_0", "human", "hi"),  # too short
        _record("d_0", "human", "x" * 5000),  # too long
        _record("e_0", "human", "Write a haiku about the sea."),
    ]
    text = _truncated_array(recs, _record("z_0", "human", "truncated prompt text"))
    prompts = parse_sharegpt(text)
    assert [p.conv_id for p in prompts] == ["a_0", "e_0"]
    assert prompts[0].text == "How do I sort a list in Python?"


def test_split_deterministic_disjoint_and_grouped():
    ids = [f"conv{i}_{j}" for i in range(3000) for j in range(2)]
    s1 = [split_of(c) for c in ids]
    s2 = [split_of(c) for c in ids]
    assert s1 == s2
    holdout = {c for c, s in zip(ids, s1) if s == "holdout"}
    train = {c for c, s in zip(ids, s1) if s == "train"}
    assert holdout and train and not (holdout & train)
    # ~6% holdout
    assert 0.03 < len(holdout) / len(ids) < 0.09
    # pieces of one chat land on the same side
    for i in range(3000):
        assert split_of(f"conv{i}_0") == split_of(f"conv{i}_1")
    assert conversation_base_id("QWJhYvA_12") == "QWJhYvA"
    assert conversation_base_id("noid") == "noid"


def test_humaneval_prompts():
    prompts = load_humaneval_prompts()
    assert len(prompts) == 164
    assert prompts[0].conv_id == "HumanEval/0"
    assert "def has_close_elements" in prompts[0].text
    assert all(p.split == "eval" for p in prompts)


def test_parse_sharegpt_later_turns_standalone_disjoint_and_split_by_conversation():
    def chat(cid, *turns):
        return {"id": cid, "conversations": [{"from": who, "value": t} for who, t in turns]}

    recs = [
        chat("a_0", ("human", "How do I sort a list in Python?"), ("gpt", "sorted()"),
             ("human", "And in reverse order, please?"), ("gpt", "reverse=True"),
             ("human", "hi")),                                              # too short
        chat("a_1", ("gpt", "continued answer"), ("human", "Now explain the key argument.")),
        chat("b_0", ("human", "Write a haiku about the sea."), ("gpt", "..."),
             ("human", "how do I sort a list in python?"),                  # repeats a_0's opening
             ("human", "and in reverse ORDER, please?")),                   # repeats a later turn
        chat("c_0", ("human", "Tell me a joke about cats."), ("gpt", "..."),
             ("human", "Write a haiku about the sea.")),                    # repeats b_0's opening
    ]
    text = json.dumps(recs)
    firsts = parse_sharegpt(text)
    later = parse_sharegpt(text, turns="later")
    assert [p.conv_id for p in firsts] == ["a_0", "b_0", "c_0"]
    assert [(p.conv_id, p.text) for p in later] == [("a_0/1", "And in reverse order, please?"),
                                                    ("a_1/0", "Now explain the key argument.")]
    # no later turn repeats an opening message, and each keeps its conversation's split
    assert not {p.text.lower() for p in later} & {p.text.lower() for p in firsts}
    assert [p.split for p in later] == [split_of("a_0"), split_of("a_1")]
    assert split_of("a_0") == split_of("a_1")
    with pytest.raises(ValueError, match="turns"):
        parse_sharegpt(text, turns="all")


def test_data_turns_setting_keeps_old_folders_and_refuses_a_mix(tmp_path):
    from dflash_core.training.datagen import DataConfig, Manifest
    first = DataConfig(out=str(tmp_path))
    assert "turns" not in first.identity()       # folders written before --turns still resume
    Manifest(tmp_path, first).add("shard_00000.npz", {"num_records": 1})
    with pytest.raises(ValueError, match="turns"):
        Manifest(tmp_path, DataConfig(out=str(tmp_path), turns="later"))
    with pytest.raises(ValueError, match="turns"):
        DataConfig(turns="every")

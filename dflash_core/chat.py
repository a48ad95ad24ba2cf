"""Prompt encoding: the one place the chat template is applied (CLI, data generation,
evaluation, the server)."""
from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The tokenizer's chat template over `messages` ([{"role", "content"}]) -> token ids.
    Template errors (e.g. an unsupported role order) propagate to the caller."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):   # a BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """One user turn through the chat template (chat=True), or the raw text's tokens."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

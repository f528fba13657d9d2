"""ShareGPT and `messages` files built from the shared data's real rows: real instructions and answers, chained
three exchanges to a conversation, a few with long news articles (T0) so they need cutting at 1,024 tokens."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SHARED_DATA

SELF_INSTRUCT = SHARED_DATA / "self-instruct"


def real_exchanges(name: str) -> list[tuple[str, str]]:
    """Give back (user text, answer) pairs from a Self-Instruct file: instruction (+ input) and the output."""
    pairs = []
    for line in (SELF_INSTRUCT / name).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        instance = record["instances"][0]
        if instance["output"].strip():
            user = record["instruction"] + ("\n\n" + instance["input"] if instance["input"].strip() else "")
            pairs.append((user, instance["output"]))
    return pairs


def long_exchanges(count: int) -> list[tuple[str, str]]:
    """Give back `count` T0 (prompt, completion) pairs whose prompts are news articles of 1,000+ words."""
    rows = [json.loads(line) for line in
            (SELF_INSTRUCT / "t0_train_50k" / "multi_news_synthesize.jsonl").read_text().splitlines()]
    # T0 ends each completion with GPT-2's marker; a conversation file carries none (clean would drop the row)
    return [(r["prompt"], r["completion"].removesuffix("<|endoftext|>").strip()) for r in rows
            if len(r["prompt"]) > 5000][:count]


def conversations(pairs: list[tuple[str, str]], turns: int = 3) -> list[list[dict[str, str]]]:
    """Give back conversations of `turns` exchanges each, in role/content form."""
    chats = []
    for start in range(0, len(pairs) - turns + 1, turns):
        chat = []
        for user, answer in pairs[start:start + turns]:
            chat += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        chats.append(chat)
    return chats


def write_sharegpt(path: Path) -> list[list[dict[str, str]]]:
    """Write a ShareGPT file (human/gpt) from the seed tasks plus long-article conversations; give back its chats."""
    chats = conversations(real_exchanges("seed_tasks.jsonl")) + conversations(long_exchanges(9))
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    path.write_text("".join(json.dumps({"id": f"c{i}", "conversations": [
        {"from": names[t["role"]], "value": t["content"]} for t in chat]}) + "\n" for i, chat in enumerate(chats)))
    return chats


def write_messages(path: Path) -> list[list[dict[str, str]]]:
    """Write an OpenAI `messages` file from the user-oriented tasks, every other one with a system prompt."""
    chats = [([{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []) + chat
             for i, chat in enumerate(conversations(real_exchanges("user_oriented_instructions.jsonl")))]
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    return chats

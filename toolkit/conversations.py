"""Conversations as turns: check a record's turns at ingest, and cut a tokenized conversation at turn boundaries.

A conversation is an optional system turn, then user and assistant turns alternating, user first. A
record that breaks that shape is refused with a code, a reason and the index of the turn at fault,
so ingest can quarantine it instead of training on a misread dialogue.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from toolkit.tokenizer import IGNORE_INDEX

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
              "bing": "assistant", "bard": "assistant", "system": "system", "model": "assistant"}
# roles of tool use: the chat templates here have no form for them, so such conversations are set aside
TOOL_ROLES = {"tool", "function", "function_call", "function_response", "ipython", "observation", "tool_call"}

# kinds of a rendered conversation's segments (see toolkit/chat_template.py)
HEADER, CONTEXT, ANSWER, MASKED_ANSWER = 0, 1, 2, 3
# what cutting long conversations did: conversations cut, the windows they became, assistant turns in no window
CUTS = ("conversations_cut", "conversation_windows", "assistant_turns_dropped")


class TurnError(ValueError):
    """A conversation that cannot be trained on: a code, a reason and the turn at fault (None: the whole record)."""

    def __init__(self, code: str, reason: str, turn: int | None = None):
        super().__init__(reason)
        self.code, self.reason, self.turn = code, reason, turn


def checked_turns(turns: Any, role_key: str, text_key: str) -> list[dict[str, str]]:
    """Give back a record's turns as [{role, content}] in canonical roles, or raise TurnError saying what is wrong.

    A trailing user turn (a question left unanswered) is dropped: it has no answer to learn from.
    """
    if not isinstance(turns, list) or not turns:
        raise TurnError("bad_conversation", "must be a non-empty list of turns")
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise TurnError("bad_turn", f"turn {index} lacks text in '{text_key}'", index)
        raw_role = str(turn.get(role_key, "")).lower()
        if raw_role in TOOL_ROLES:
            raise TurnError("tool_turn", f"turn {index} is a {raw_role!r} turn; tool use is not supported by the "
                                         "chat templates", index)
        role = ROLE_NAMES.get(raw_role)
        if role is None:
            raise TurnError("unknown_role", f"turn {index} has unknown role {turn.get(role_key)!r}", index)
        expected = _expected_roles(messages)
        if role not in expected:
            raise TurnError("roles_out_of_order", f"turn {index} is {role} where {' or '.join(expected)} "
                                                  "was expected", index)
        if role == "assistant" and not turn[text_key].strip():
            raise TurnError("empty_assistant_turn", f"turn {index} is an empty assistant turn", index)
        if role == "user" and not turn[text_key].strip():
            raise TurnError("empty_user_turn", f"turn {index} is an empty user turn", index)
        messages.append({"role": role, "content": turn[text_key]})
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise TurnError("no_assistant_turn", "conversation has no assistant turn")
    return messages


def conversation_fields(messages: list[dict[str, str]]) -> dict[str, str]:
    """Give back a conversation's single-turn view: its last user turn as the instruction, the turns before that
    as `role: text` lines of input, its last answer as the response."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return {"instruction": messages[last_user]["content"],
            "input": "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last_user]),
            "response": messages[-1]["content"]}


def _expected_roles(before: list[dict[str, str]]) -> tuple[str, ...]:
    if not before:
        return ("system", "user")
    return ("assistant",) if before[-1]["role"] == "user" else ("user",)


# ---------------------------------------------------------------- cutting at turn boundaries


def exchanges(kinds: list[int]) -> list[list[int]]:
    """Give back the segment indices of each exchange (the context before an answer, then the answer).

    Segment 0 is the header (BOS and system prompt), kept in every window; a last context without an
    answer (text a template writes after the final turn) joins the last exchange.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for index, kind in enumerate(kinds[1:], start=1):
        current.append(index)
        if kind in (ANSWER, MASKED_ANSWER):
            groups.append(current)
            current = []
    if current:
        if groups:
            groups[-1] += current
        else:
            groups.append(current)
    return groups


def windows(lengths: list[int], kinds: list[int], max_length: int, mode: str) -> list[list[int]]:
    """Give back the windows of a conversation as lists of segment indices, each at most max_length tokens
    where whole exchanges allow, always starting with the header and ending on a whole exchange.

    `truncate_left`: one window, the latest exchanges that fit. `split`: consecutive windows covering every
    exchange. An exchange too long on its own is a window by itself (the caller truncates inside it).
    """
    groups = exchanges(kinds)
    size = [sum(lengths[i] for i in group) for group in groups]
    budget = max_length - lengths[0]
    if sum(size) <= budget:
        return [[0, *[i for group in groups for i in group]]]
    if mode == "truncate_left":
        kept, used = [], 0
        for group, n in zip(reversed(groups), reversed(size), strict=True):
            if kept and used + n > budget:
                break
            kept.insert(0, group)
            used += n
        return [[0, *[i for group in kept for i in group]]]
    result, current, used = [], [], 0
    for group, n in zip(groups, size, strict=True):
        if current and used + n > budget:
            result.append(current)
            current, used = [], 0
        current += group
        used += n
    return [[0, *window] for window in result + [current]]


def fit_example(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Give back (input_ids, labels, truncated) for one example within max_length tokens."""
    if len(prompt) + len(completion) <= max_length:
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, False
    keep_prompt = min(len(prompt), max(max_length // 4, max_length - len(completion)))
    completion = completion[: max_length - keep_prompt]
    head = keep_prompt // 2
    prompt = prompt[:head] + prompt[len(prompt) - (keep_prompt - head):]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, True


def fit_conversation(pieces: list[list[int]], kinds: list[int], max_length: int, mode: str
                     ) -> tuple[list[tuple[list[int], list[int], bool]], int, int]:
    """Give back (the windows of one tokenized conversation as (input_ids, labels, truncated), answer tokens lost,
    assistant turns dropped: in no window kept).

    Labels are the answer tokens and -100 elsewhere. A window that still exceeds max_length holds a single
    exchange, cut like any example (prompt middle first); a window without a target is left out.
    """
    examples, kept, kept_turns = [], 0, 0
    for window in windows([len(p) for p in pieces], kinds, max_length, mode):
        ids = [token for i in window for token in pieces[i]]
        labels = [token if kinds[i] == ANSWER else IGNORE_INDEX for i in window for token in pieces[i]]
        truncated = len(ids) > max_length
        if truncated:
            last = max(i for i in window if kinds[i] in (ANSWER, MASKED_ANSWER))
            prompt = [token for i in window if i < last for token in pieces[i]]
            ids, labels, _ = fit_example(prompt, pieces[last], max_length)
            if kinds[last] != ANSWER:
                labels = [IGNORE_INDEX] * len(labels)
        targets = sum(label != IGNORE_INDEX for label in labels)
        if targets:
            examples.append((ids, labels, truncated))
            kept += targets
            kept_turns += sum(kinds[i] in (ANSWER, MASKED_ANSWER) for i in window)
    answers = sum(kind in (ANSWER, MASKED_ANSWER) for kind in kinds)
    return examples, sum(len(p) for p, kind in zip(pieces, kinds, strict=True) if kind == ANSWER) - kept, \
        answers - kept_turns


def conversation_batch(batch: pa.RecordBatch, max_length: int, mode: str, encode: Any, schema: pa.Schema
                       ) -> tuple[pa.RecordBatch, dict[str, int]]:
    """Give back (the tokenized rows (in `schema`) of templated conversation rows, the counts of CUTS).

    One row per window, the first keeping the row's id and counting the answer tokens lost to cuts, the next
    ones `<id>#<n>`. A conversation counts as cut when it became several windows or lost whole turns.
    """
    segment_lists = batch.column("segments").to_pylist()
    flat, lengths = encode([text for pieces in segment_lists for text in pieces])
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    cuts = dict.fromkeys(CUTS, 0)
    position = 0
    for row, (pieces, kinds) in enumerate(zip(segment_lists, batch.column("segment_kinds").to_pylist(), strict=True)):
        ids = [flat[bounds[position + i]:bounds[position + i + 1]].tolist() for i in range(len(pieces))]
        position += len(pieces)
        examples, lost, dropped = fit_conversation(ids, kinds, max_length, mode)
        if len(examples) > 1 or dropped:
            cuts["conversations_cut"] += 1
            cuts["conversation_windows"] += len(examples)
            cuts["assistant_turns_dropped"] += dropped
        for number, (input_ids, labels, truncated) in enumerate(examples):
            row_id = batch.column("id")[row].as_py()
            columns["id"].append(row_id if number == 0 else f"{row_id}#{number}")
            columns["split"].append(batch.column("split")[row].as_py())
            columns["category"].append(batch.column("category")[row].as_py())
            columns["input_ids"].append(input_ids)
            columns["labels"].append(labels)
            columns["length"].append(len(input_ids))
            columns["n_target"].append(sum(label != IGNORE_INDEX for label in labels))
            columns["truncated"].append(truncated or (lost > 0 and number == 0))
            columns["n_target_lost"].append(lost if number == 0 else 0)
    return pa.RecordBatch.from_pydict(columns, schema=schema), cuts

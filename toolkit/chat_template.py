"""Chat templates in transformers' own format: render conversations for training, and make a model folder
self-describing.

Every template is Jinja over `messages` as transformers' `apply_chat_template` reads it; assistant text
sits in `{% generation %}` blocks, so transformers' renderer reports where the targets are. The built-in
`chat` form is ChatML-style: a role marker line per turn and GPT-2's <|endoftext|> closing each turn, so
the end of an answer is the token `generate` already stops at. The single-turn forms (paper, alpaca,
template.custom) get a Jinja twin for the model folder, so one prompt recipe travels with every model.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from catalog.sections import TemplateConfig
from toolkit.conversations import ANSWER, CONTEXT, HEADER, MASKED_ANSWER

END_OF_TEXT = "<|endoftext|>"  # GPT-2's BOS, EOS and here also the end-of-turn token
SPECIAL_TOKENS = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _jinja_of_format(text: str, fields: dict[str, str]) -> str:
    """Give back a str.format template as Jinja: literal text kept raw, each {field} as the given expression."""
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(text):
        if literal:
            pieces.append("{% raw %}" + literal + "{% endraw %}")
        if name is not None:
            pieces.append("{{ " + fields[name] + " }}")
    return "".join(pieces)


def single_turn_jinja(prompt: str, prompt_with_input: str, response: str) -> str:
    """Give back the Jinja twin of a single-turn template: each user turn is an instruction (its optional
    `input` key the input), each assistant turn a response."""
    user = {"instruction": "message['content']", "input": "message['input']"}
    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% if message.get('input') %}" + _jinja_of_format(prompt_with_input, user) + "{% else %}"
            + _jinja_of_format(prompt, user) + "{% endif %}"
            "{% elif message['role'] == 'assistant' %}{% generation %}"
            + _jinja_of_format(response, {"response": "message['content']"}) + "{% endgeneration %}"
            "{% endif %}{% endfor %}")


def is_chat(config: TemplateConfig) -> bool:
    """Give back whether rows render through a chat template (whole conversations, every answer a target)."""
    return config.name == "chat"


def chat_template_for(config: TemplateConfig, parts: tuple[str, str, str] | None = None) -> str:
    """Give back the Jinja chat template of a template config (the chat form, the user's, or a single-turn twin)."""
    if is_chat(config):
        return config.chat_template or CHAT_TEMPLATE
    if parts is None:
        raise ValueError(f"template '{config.name}' needs its format strings for a chat template")
    return single_turn_jinja(*parts)


def row_messages(messages: str, instruction: str, input_text: str, response: str) -> list[dict[str, str]]:
    """Give back a row's conversation: its `messages`, or the instruction row as a one-turn conversation."""
    if messages:
        return json.loads(messages)
    user = instruction + ("\n\n" + input_text if input_text else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def takes_input(template: str) -> bool:
    """Give back whether a template is a single-turn twin, whose user turn has its own `input` slot."""
    return "message.get('input')" in template


def user_turn(template: str, instruction: str, input_text: str = "") -> dict[str, str]:
    """Give back a user message for an instruction (and input) in the form the template reads."""
    if takes_input(template):
        return {"role": "user", "content": instruction, "input": input_text}
    return {"role": "user", "content": instruction + ("\n\n" + input_text if input_text else "")}


def scored_turns(template: str, messages: str, instruction: str, input_text: str) -> list[dict[str, str]]:
    """Give back the turns a row's scored answer (its last) follows: the conversation before that answer, or,
    for an instruction row or a single-turn twin (which the template step fed the row's instruction and its
    flattened context as input), one user turn."""
    if messages and not takes_input(template):
        turns = json.loads(messages)
        return turns[:max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")]
    return [user_turn(template, instruction, input_text)]


def generation_prompt(messages: list[dict[str, str]], template: str) -> str:
    """Give back the text a model continues to answer `messages` (the template's generation prompt appended)."""
    return render(messages, template, add_generation_prompt=True)[0]


def render(messages: list[dict[str, str]], template: str, add_generation_prompt: bool = False
           ) -> tuple[str, list[tuple[int, int]]]:
    """Give back (the rendered text, the character spans of its assistant text) through transformers' renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans = render_jinja_template([messages], chat_template=template, return_assistant_tokens_mask=True,
                                         add_generation_prompt=add_generation_prompt, **SPECIAL_TOKENS)
    return texts[0], [tuple(span) for span in spans[0]]


def segments(messages: list[dict[str, str]], template: str, train_on: str) -> tuple[list[str], list[int]]:
    """Give back a conversation cut into text segments and their kinds: the header (BOS and system prompt),
    then context and answer by turns, then any trailing text; `train_on: last_assistant` masks earlier answers.
    """
    text, spans = render(messages, template)
    answers = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != answers:
        raise ValueError(f"the chat template marked {len(spans)} assistant span(s) with {{% generation %}} in a "
                         f"conversation of {answers} assistant turn(s); wrap each assistant message in "
                         "{% generation %}...{% endgeneration %}")
    systems = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    try:
        header = render(messages[:systems], template)[0]
    except Exception:  # noqa: BLE001 - a user template may not render without a user turn: no header then
        header = ""
    if not text.startswith(header) or len(header) > spans[0][0]:
        header = ""
    pieces, kinds, cursor = [header], [HEADER], len(header)
    for number, (start, end) in enumerate(spans, start=1):
        pieces += [text[cursor:start], text[start:end]]
        kinds += [CONTEXT, ANSWER if train_on == "all_assistant" or number == len(spans) else MASKED_ANSWER]
        cursor = end
    return [*pieces, text[cursor:]], [*kinds, CONTEXT]


def save_model_folder_template(folder: Path, template: str, max_new_tokens: int = 256) -> None:
    """Write the chat template into a model folder's tokenizer files and a generation_config.json whose EOS is
    the end-of-turn token, so transformers alone prompts and stops the model as itune does."""
    import copy

    from transformers import GenerationConfig

    from toolkit.tokenizer import gpt2_tokenizer

    tokenizer = copy.deepcopy(gpt2_tokenizer())
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    GenerationConfig(bos_token_id=end_of_turn, eos_token_id=end_of_turn, pad_token_id=end_of_turn,
                     do_sample=False, max_new_tokens=max_new_tokens).save_pretrained(folder)


def folder_template(folder: Path) -> str | None:
    """Give back the chat template a model folder's tokenizer carries, or None."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return None


def conversation_columns(messages: list[dict[str, str]], template: str, train_on: str
                         ) -> tuple[str, str, list[str], list[int]]:
    """Give back (prompt, completion, segments, kinds) of one conversation: the prompt is everything before its
    last answer, the completion that answer on; segments only for a conversation with several answers (the
    others tokenize as plain prompt and completion)."""
    pieces, kinds = segments(messages, template, train_on)
    last = max(i for i, kind in enumerate(kinds) if kind in (ANSWER, MASKED_ANSWER))
    several = sum(kind in (ANSWER, MASKED_ANSWER) for kind in kinds) > 1
    return "".join(pieces[:last]), "".join(pieces[last:]), pieces if several else [], kinds if several else []

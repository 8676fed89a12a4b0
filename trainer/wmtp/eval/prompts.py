"""What the model is asked, and what of its answer is run against the tests.

A base model continues the task's prompt and stops at the task's stop strings. An instruct model answers a chat
turn (`chat_template`): the prompt goes in the tokenizer's chat template as the user's message, the answer ends
at the model's end of turn (the task's stop strings, such as "\\ndef ", would cut a full answer short), and
`extract_code` keeps the code block of the answer, so the model is scored on its code, not on its prose.
"""

from __future__ import annotations

import re
from typing import Any

from wmtp.config import ConfigError
from wmtp.eval.tasks import Problem

# The prompt is code to complete; asking for the whole program keeps the answer runnable after it (a full
# definition after the prompt's stub replaces the stub).
CHAT_REQUEST = "Complete this Python code. Reply with the whole code in one ```python code block.\n\n```python\n{}```"
# The first fenced block; an answer cut off by max_new_tokens may leave it open.
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def code_block(answer: str) -> str:
    """The first fenced code block of an answer, or the whole answer when it has none."""
    found = _CODE_BLOCK.search(answer)
    return found.group(1) if found else answer


class Prompting:
    """How problems become token prompts and answers become completions, for one tokenizer and `EvalSettings`."""

    def __init__(self, tokenizer: Any, chat_template: bool = False, extract_code: bool = False) -> None:
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat-template: the model's tokenizer has no chat template (a base model?)")
        self.tokenizer, self.chat_template, self.extract_code = tokenizer, chat_template, extract_code

    def ids(self, problem: Problem) -> list[int]:
        if not self.chat_template:
            return list(self.tokenizer(problem.prompt)["input_ids"])
        messages = [{"role": "user", "content": CHAT_REQUEST.format(problem.prompt)}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes its own special tokens (a BOS among them, where the model has one).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stop(self, problem: Problem) -> tuple[str, ...]:
        return () if self.chat_template else problem.stop

    def completion(self, text: str) -> str:
        return code_block(text) if self.extract_code else text

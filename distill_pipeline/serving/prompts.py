"""Recognising the task's prompt in a chat request, and answering in the task's response format.

An application already sends the teacher one of the task's prompt templates with the input in its
placeholder; the student can answer exactly those requests. A template becomes a pattern whose
fixed text must match (runs of whitespace may differ) and whose placeholder captures the input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distill_pipeline.core.task import LabelSpec, PromptTemplate, Task


@dataclass(frozen=True)
class Recognised:
    """A request that is a rendering of one of the task's templates."""

    template: PromptTemplate
    input: str


def _fixed_text_pattern(text: str) -> str:
    return r"\s+".join(re.escape(part) for part in text.split())


def template_pattern(template: PromptTemplate) -> re.Pattern[str]:
    prefix, suffix = template.text.split(template.placeholder, 1)
    # The leading and trailing whitespace of each fixed part is optional, so that a client that
    # strips the rendered prompt, or the input, still matches.
    return re.compile(
        r"\s*" + _fixed_text_pattern(prefix) + r"\s*(?P<input>.*?)\s*" + _fixed_text_pattern(suffix) + r"\s*",
        re.DOTALL,
    )


def message_text(content: Any) -> str | None:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


class PromptMatcher:
    """Finds which of a task's templates a conversation renders, and its input."""

    def __init__(self, task: Task) -> None:
        self.templates = [(template, template_pattern(template)) for template in task.prompts.values()]

    def recognise(self, messages: Sequence[dict[str, Any]]) -> Recognised | None:
        """The template and input of a one-message user conversation; None for anything else.

        A system prompt or an earlier turn changes what the teacher would answer, so such a
        conversation is not the task the student learnt and goes to the teacher.
        """
        if len(messages) != 1 or messages[0].get("role") != "user":
            return None
        text = message_text(messages[0].get("content"))
        if text is None:
            return None
        for template, pattern in self.templates:
            match = pattern.fullmatch(text)
            if match is not None:
                return Recognised(template, match["input"])
        return None


def answer_text(label: LabelSpec, value: int) -> str:
    """The student's answer in the shape the task's prompts ask the teacher for: ``{"is_bad": 1}``."""
    return json.dumps({label.field: value})

"""Prompts: (document, selection, task, history) → token ids. Pure: no pygls, no torch."""

from .build import CodeContext, Prompt, PromptTooLong, Reference, build_prompt
from .format import Message, PromptFormat, StarChatFormat, TemplateFormat, format_for
from .tasks import Task, instruction

__all__ = [
    "CodeContext",
    "Message",
    "Prompt",
    "PromptFormat",
    "PromptTooLong",
    "Reference",
    "StarChatFormat",
    "Task",
    "TemplateFormat",
    "build_prompt",
    "format_for",
    "instruction",
]

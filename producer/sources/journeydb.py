"""JourneyDB: the annotation JSON Lines, plain or inside a ``.tgz``.

Each record has ``img_path``, ``prompt``, ``Task1`` {``Style``, ``Content``,
``Atmosphere``, ``Others``: lists of text} and ``Task2`` {``Caption``}. ``--field``
chooses the text to generate from: the Midjourney ``prompt`` or the ``caption``
(``Task2.Caption``). Every other field is carried, nested ones by their dot path
(``Task1.Style``); with ``--field caption`` the prompt is carried as ``source_prompt``.
"""

from __future__ import annotations

from typing import Any

from producer.sources.formats import JsonReader
from producer.sources.location import base_name

TEXT_FIELDS = {"prompt": "prompt", "caption": "Task2.Caption"}


class JourneyDB(JsonReader):
    """JourneyDB's annotation JSON Lines, generating from the prompt or the caption."""

    name = "journeydb"

    def __init__(self, path: str, field: str = "prompt", carry: tuple[str, ...] | None = None):
        super().__init__(path, base_name(path) or path, TEXT_FIELDS[field], carry, "jsonl")
        self.field = field

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "field": self.field}

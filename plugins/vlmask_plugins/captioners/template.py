"""Captions written from a manifest row's own fields (``label``, ``verb``/``noun``, ...)."""

from __future__ import annotations

import string
from typing import Any


class TemplateCaptioner:
    """A rule-based captioner for label-only data sets: ``"a video of {label}"`` per row.

    FILS (BMVC 2024) needs text for every clip; data sets such as Kinetics, Something-Something
    or EPIC-KITCHENS carry a class ``label`` (or ``verb`` and ``noun``) but no caption. Turning
    the label into a sentence with a prompt template is how ActionCLIP (Wang et al., 2021) and
    CLIP's zero-shot prompts (Radford et al., ICML 2021) use class names as text.

    This captioner READS THE ROW, NOT THE PIXELS: the caption says no more than the label
    does, which is honest for label-only data (no invented detail) but adds no information.
    ``caption_row`` fills every ``{field}`` of the template from the row; ``label`` falls
    back to ``"<verb> <noun>"`` as in the manifest format (docs/contract.md, "Data manifest"); any other field (e.g. a custom
    ``{colour}``) is read as is. A row lacking a field, or with it empty or not a string or
    number, gets None (no caption) and ``fill_captions`` keeps the line uncaptioned.

    Args:
        template: a ``str.format`` template naming at least one row field, e.g.
            ``"a video of {label}"`` or ``"a person {verb} the {noun}"``.
        replace_underscores: write ``playing_guitar`` as ``playing guitar``.
    """

    def __init__(self, template: str = "a video of {label}", replace_underscores: bool = True) -> None:
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"template must be a non-empty string such as 'a video of {{label}}', got {template!r}")
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as error:
            raise ValueError(f"template {template!r} is not a valid format string ({error})") from None
        fields: list[str] = []
        for _literal, name, _spec, _conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise ValueError(
                    f"template {template!r}: every {{field}} must name a manifest field, e.g. {{label}}, got {{{name}}}"
                )
            if name not in fields:
                fields.append(name)
        if not fields:
            raise ValueError(f"template {template!r} names no manifest field; use e.g. 'a video of {{label}}'")
        self.template = template
        self.fields: tuple[str, ...] = tuple(fields)
        self.replace_underscores = replace_underscores
        self.identity: str = f"template:{template!r}:replace_underscores={replace_underscores}"

    def caption_row(self, row: dict[str, Any]) -> str | None:
        """The template filled from ``row``, whitespace collapsed; None when a field is missing."""
        values: dict[str, str] = {}
        for name in self.fields:
            value = row.get(name)
            if name == "label" and value is None:
                verb, noun = row.get("verb"), row.get("noun")
                if isinstance(verb, str) and isinstance(noun, str) and verb.strip() and noun.strip():
                    value = f"{verb.strip()} {noun.strip()}"
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return None
            text = str(value).strip()
            if self.replace_underscores:
                text = text.replace("_", " ")
            if not text.strip():
                return None
            values[name] = " ".join(text.split())
        caption = " ".join(self.template.format(**values).split())
        return caption or None

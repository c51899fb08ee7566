"""Text a request may carry: valid Unicode only.

JSON can escape half a surrogate pair ("\\ud800"), and Python decodes it into a string that
no encoder takes (UTF-8's, the tokenizer's, the database driver's): left alone it surfaces
as a 500 deep inside. Request bodies are checked whole, once, before any field is used.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator
from pydantic_core import PydanticCustomError


def _lone_surrogate(text: str) -> int | None:
    """Where `text` holds half a surrogate pair, or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def invalid_text(value: Any, path: tuple = ()) -> tuple[tuple, str, int] | None:
    """The first string (value or object key) in a JSON value that is not valid Unicode."""
    if isinstance(value, str):
        at = _lone_surrogate(value)
        return None if at is None else (path, value, at)
    if isinstance(value, dict):
        for k, v in value.items():
            found = invalid_text(k, path + (k,)) if isinstance(k, str) else None
            found = found or invalid_text(v, path + (k,))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = invalid_text(v, path + (i,))
            if found:
                return found
    return None


class ValidText(BaseModel):
    """A request body (the outermost model: the check walks all of it) whose text is all
    valid Unicode: a lone surrogate anywhere in it is a 400 that names the field."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = invalid_text(data, ())
        if found:
            path, text, at = found
            field = ".".join(str(p) for p in path) or "body"
            raise PydanticCustomError(
                "invalid_unicode", "{field} is not valid Unicode: it holds a lone surrogate ({code}) at character "
                "{at}; send UTF-8 text (a surrogate pair must be whole)",
                {"field": field, "param": str(path[0]) if path else None, "code": f"\\u{ord(text[at]):04x}",
                 "at": at})
        return data

"""Files shipped inside the package (chat templates), read with importlib.resources."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def read_chat_template(file_name: str) -> str:
    """The text of a chat template shipped in `tunelab/resources/chat_templates/`."""
    path = resources.files("tunelab").joinpath("resources", "chat_templates", file_name)
    return path.read_text(encoding="utf-8")

"""The dataset card (dataset.json) next to prepared shards. Light on purpose: Ray Data tasks import this module,
and must not pay for importing torch."""

from __future__ import annotations

import json
from pathlib import Path

CARD_NAME = "dataset.json"


def load_card(prepared: str | Path) -> dict:
    """The dataset card of a prepared folder, or a clear error saying how to make one."""
    path = Path(prepared) / CARD_NAME
    if not path.is_file():
        raise ValueError(f"{Path(prepared)} is not a prepared data set (no {CARD_NAME}); run `asda prepare` first")
    return json.loads(path.read_text())

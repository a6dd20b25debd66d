"""``storage.sqlite_text.exact_time_parser`` on SQLite's dialect: it accepts exactly the
text SQLAlchemy's SQLite DATETIME writes for the value it parses to (its fast path, a
match of the written form, agrees with rendering the parsed value again)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from storage.sqlite_text import exact_time_parser

DIALECT = sqlite.dialect()
TYPE = sa.DateTime(timezone=True)
RENDER: Any = TYPE.dialect_impl(DIALECT).bind_processor(DIALECT)
PARSE: Any = TYPE.dialect_impl(DIALECT).result_processor(DIALECT, None)


EXACT: Any = exact_time_parser(TYPE, DIALECT)


def _reference(text: str) -> bool:
    """Accepted by the rule as written: parse, render as on write, compare."""
    try:
        return bool(RENDER(PARSE(text)) == text)
    except (ValueError, TypeError):
        return False


def _accepts(text: str) -> bool:
    try:
        EXACT(text)
    except (ValueError, TypeError):
        return False
    return True


def _genuine(seed: int) -> list[str]:
    rng = random.Random(seed)
    start = datetime(1, 1, 1)
    span = (datetime(9999, 12, 31) - start).total_seconds()
    values = [start + timedelta(seconds=rng.random() * span) for _ in range(200)]
    return [RENDER(v) for v in values]


def _respelled(text: str) -> list[str]:
    parsed = datetime.fromisoformat(text)
    return [
        text.replace(" ", "T"), text + "+00:00", text + "000", text[:-3],
        parsed.isoformat(), parsed.isoformat(" ", "milliseconds"), " " + text, text + "\n",
        text.replace("-", "", 2), "\u0662" + text[1:],  # ARABIC-INDIC DIGIT TWO
    ]  # fmt: skip


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fast_path_accepts_what_rendering_again_accepts(seed: int) -> None:
    for text in _genuine(seed):
        assert _accepts(text), text
        for other in _respelled(text):
            assert _accepts(other) == _reference(other), other

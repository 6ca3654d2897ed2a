"""Prompts: the A1111 parser (`parser`), encoding with a cache (`encoding`), AND (`composable`) and
textual-inversion embeddings (`embeddings`).

The package re-exports what the old flat module ``pipelines.prompts`` (now `parser`) offered.
"""

from pipelines.prompts.parser import (  # noqa: F401 - the old module's names
    BREAK,
    MAX_WEIGHT,
    MIN_WEIGHT,
    ROUND_MULTIPLIER,
    SQUARE_MULTIPLIER,
    TIMELINES,
    Timeline,
    parse_weighted,
    prompt_schedule,
    prompts_per_step,
)

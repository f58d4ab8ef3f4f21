"""One progress bar per long run: units done, tokens per second (off unless asked for)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over ``total`` units with a tokens/s postfix; disabled when not ``enabled``.

    Call :meth:`advance` after each piece of work, :meth:`close` at the end (or use it as a
    context manager).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool, unit: str = "pass"):
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
        self.tokens = 0
        self.seconds = 0.0

    def advance(self, units: int, tokens: int = 0, seconds: float = 0.0) -> None:
        """Record ``units`` done that produced ``tokens`` tokens in ``seconds``."""
        self.tokens += tokens
        self.seconds += seconds
        if self.seconds > 0:
            self.bar.set_postfix_str(f"{self.tokens / self.seconds:.0f} tok/s", refresh=False)
        self.bar.update(units)

    def describe(self, text: str) -> None:
        """Show what is running now."""
        self.bar.set_description_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Command-line helpers shared by the demo and the examples: argument errors as one line."""
from __future__ import annotations

import argparse
from typing import Callable


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line ("prog: error: ...") instead of the
    usage block followed by the message; exit status 2 as usual."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse

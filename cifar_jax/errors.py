"""Errors from libraries (Orbax, TensorStore, torch, pickle) as the one line our messages quote."""


def one_line(e: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message' (cut at `limit`); just the type for an empty message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__

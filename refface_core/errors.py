class RefFaceError(Exception):
    """A problem with the user's input or files: the message says what is wrong and how to fix it."""


class Cancelled(RefFaceError):
    """Sampling was stopped by the cancel hook."""


def listing(title: str, items: list[str], limit: int = 30) -> str:
    """A multi-line message naming every item (up to ``limit``)."""
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:limit]) + more

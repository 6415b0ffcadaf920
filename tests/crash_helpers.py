"""Worker functions for engine tests; importable by spawned worker processes."""

import os

from shards.process import process_item


def crash_on_key(item, params):
    """Behaves like the real per-image function, but kills its process for one key."""
    if item.key == "sub_coffee":
        os._exit(7)
    return process_item(item, params)

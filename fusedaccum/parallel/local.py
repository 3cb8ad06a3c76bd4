"""No data parallel: one process, or ``process_group=False``. Nothing is communicated."""

from .base import Engine, Window, local_normalizer

__all__ = ["Local"]


class Local(Engine):
    """The buckets hold the full gradient; the normalizer is the window's own count."""

    reduces_locally = True

    def __init__(self, process_group=False):
        self.process_group = process_group

    def reduce(self, accums, window: Window, force: bool, device):
        self.check_synced(window)
        return local_normalizer(window), window.items()

    def __repr__(self) -> str:
        return "Local()"

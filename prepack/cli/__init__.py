"""The ``prepack`` command (:mod:`.commands`: ``plan``, ``bench``) and its argument checks (:mod:`.args`)."""

from .commands import main

__all__ = ["main"]

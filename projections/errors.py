"""The projections' error tree: what a rebuild refuses, said before it touches anything.

ProjectionError
└── InvalidRebuildTarget      the table asked for is hookledger's own, or not a plain name
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Base of every error the projections raise on purpose."""


class InvalidRebuildTarget(ProjectionError):
    def __init__(self, table: str, reason: str) -> None:
        super().__init__(table, reason)
        self.table = table
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot rebuild into {self.table!r}: {self.reason}"

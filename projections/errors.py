"""The projections' error tree: what a rebuild refuses, said before it touches anything.

ProjectionError
├── InvalidRebuildTarget      the table asked for is hookledger's own, or not a plain name
│   └── RebuildTargetExists   a table (view, index…) of that name exists that no rebuild made
└── RebuildInProgress         another rebuild is filling the same table now
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


class RebuildTargetExists(InvalidRebuildTarget):
    """The user's own table (or view, index…) holds the name: a rebuild would drop it. A table is
    replaced only when asked (`replace=True`, `--replace`); anything else, never."""

    def __init__(self, table: str, kind: str) -> None:
        if kind == "table":
            reason = (
                "a table of that name exists that no rebuild made; it was left as it is "
                "(--replace drops it and rebuilds into it)"
            )
        else:
            reason = (
                f"a {kind} of that name exists; it was left as it is (only a table is replaced)"
            )
        super().__init__(table, reason)
        self.kind = kind


class RebuildInProgress(ProjectionError):
    """Another rebuild holds the claim on `table` (its scratch table, or the same `--into`)."""

    def __init__(self, projection: str, table: str) -> None:
        super().__init__(projection, table)
        self.projection = projection
        self.table = table

    def __str__(self) -> str:
        return (
            f"a rebuild of {self.projection} is already in progress (another rebuild is filling "
            f"{self.table}); try again when it has finished"
        )

"""Read tables folded from the log, the runner that keeps them caught up, and rebuilds."""

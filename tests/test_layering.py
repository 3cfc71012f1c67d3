"""Dependencies point one way: server → projections → ledger. `ledger` never imports aiohttp."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("ledger", ["aiohttp", "server", "projections", "prometheus_client"]),
        ("projections", ["aiohttp", "server"]),
    ],
)
def test_lower_layers_do_not_import_upper_ones(package: str, forbidden: list[str]) -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    if '.migrations' not in m.name: importlib.import_module(m.name)\n"
        f"print(','.join(n for n in {forbidden!r} if n in sys.modules))\n"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"{package} pulled in {result.stdout.strip()}"

"""Headless Chromium for the tests of the pages the service serves (``tools/cdp.py``).

Chromium missing skips those tests, except on CI (``CI=true``), where it is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.cdp import CHROMIUM, Page, chromium


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A fresh page; the test fails if the page threw or logged an error meanwhile."""
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"no Chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with chromium(tmp_path) as opened:
        yield opened
        assert not opened.errors, f"the page threw or logged errors: {opened.errors}"

"""Every test starts as a fresh process would: warnings said once per process
(optgen/runtime/once.py) are said again in the test that expects them, whatever ran before."""
import pytest

from optgen.runtime import once


@pytest.fixture(autouse=True)
def _warnings_not_yet_said():
    once._WARNED.clear()

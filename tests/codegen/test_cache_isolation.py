"""The test session never touches the user's kernel cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

from codegen.cache import cache_dir


def test_the_session_cache_is_a_temporary_folder():
    folder = cache_dir().resolve()
    assert folder.is_relative_to(Path(tempfile.gettempdir()).resolve()), folder
    assert not folder.is_relative_to((Path.home() / ".cache").resolve()), folder

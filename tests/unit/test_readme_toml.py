"""Every ```toml block in README.md is a config the gateway accepts: copying one works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import load_config, validate

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"^```toml\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_toml_blocks() -> None:
    assert BLOCKS, f"no ```toml block found in {README.name}"


@pytest.mark.parametrize("n", range(len(BLOCKS)))
def test_readme_toml_block_is_a_valid_config(n: int, tmp_path: Path) -> None:
    path = tmp_path / f"block{n}.toml"
    path.write_text(BLOCKS[n])
    cfg = validate(load_config(path))
    assert cfg is not None

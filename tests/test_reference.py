"""docs/reference.md is the command line's own help: regenerating it changes nothing."""

import importlib.util
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[1] / "docs" / "gen_reference.py"


def test_reference_page_matches_the_help():
    spec = importlib.util.spec_from_file_location("gen_reference", GENERATOR)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.REFERENCE.read_text() == gen.render(), "docs/reference.md is out of date: run python docs/gen_reference.py"

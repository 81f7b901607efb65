"""The README documents the log schema exactly as the code defines it."""

from pathlib import Path

from distill_pipeline.logs.schema import SCHEMA_FIELDS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_schema_table_matches_the_code() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 4 and cells[2] in ("yes", "no"):
            documented[cells[0].strip("`")] = (cells[1], cells[2] == "yes", cells[3])
    expected = {spec.name: (spec.json_type, spec.required, spec.doc) for spec in SCHEMA_FIELDS}
    assert documented == expected

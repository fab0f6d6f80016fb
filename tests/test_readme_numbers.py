"""Every generated section of README.md and docs/*.md equals what the records produce, so a hand-edited number
(or a stale table) fails the suite; every record is well-formed and its goals' `met` agrees with its numbers."""
import re

import pytest

from benchmarks import record, report

RECORDS = record.load_records()
REQUIRED = {"bench", "config", "rows", "goals", "provenance", "units", "columns"}


@pytest.mark.parametrize("path", report.generated_files(), ids=lambda p: p.name)
def test_generated_sections_match_records(path):
    text = path.read_text()
    assert report.render_text(text, RECORDS) == text, \
        f"{path.name}: a generated section differs from benchmarks/results (run `make report`)"


def test_every_number_in_readme_tables_is_in_a_record():
    text = (report.REPO_ROOT / "README.md").read_text()
    for m in report.MARKER.finditer(text):
        name = m.group("name").split(":")[0]
        if name == "goals":
            allowed = {report.fmt(v) for r in RECORDS.values() for g in r["goals"]
                       for v in (g["measured"], g["target"])}
        elif name in RECORDS:
            allowed = {report.fmt(v) for row in RECORDS[name]["rows"] for v in row.values()}
        else:
            allowed = set()
        for line in m.group("body").splitlines():
            if not line.startswith("|") or line.startswith("|---"):
                continue
            for cell in line.strip("|").split("|"):
                cell = cell.strip().removeprefix(">= ").removeprefix("<= ").removeprefix("> ").removeprefix("< ")
                if re.fullmatch(r"-?[\d,]+(\.\d+)?(e[-+]\d+)?", cell):
                    assert cell in allowed, f"README number {cell!r} in section {name} is in no record"


@pytest.mark.parametrize("bench", sorted(RECORDS))
def test_record_is_well_formed(bench):
    rec = RECORDS[bench]
    assert REQUIRED <= rec.keys()
    for c in rec["columns"]:
        assert c in rec["units"], f"column {c} has no unit"
    prov = rec["provenance"]
    for k in ("commit", "dirty", "date_utc", "machine", "torch", "python", "libs"):
        assert k in prov
    for g in rec["goals"]:
        again = record.goal(g["name"], g["metric"], g["measured"], g["target"], g["op"])
        assert again["met"] == g["met"], f"goal {g['name']}: met={g['met']} disagrees with its numbers"

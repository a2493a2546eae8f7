"""The one JSONL reader behind hashtag files, caption files and caption corpora."""
import re

import pytest

from maws_fast.data.jsonl import check_caption, jsonl_rows
from maws_fast.errors import DataError


def _rows(path):
    return list(jsonl_rows(path, ("file", "tags"), "hashtag file", "pass the right one"))


def test_rows_with_their_line_numbers_blank_lines_skipped(tmp_path):
    p = tmp_path / "tags.jsonl"
    p.write_text('{"file": "a.jpg", "tags": [1]}\n\n  \n{"file": "b.jpg", "tags": ["dog"], "extra": 1}\n')
    assert _rows(p) == [(1, {"file": "a.jpg", "tags": [1]}), (4, {"file": "b.jpg", "tags": ["dog"], "extra": 1})]


@pytest.mark.parametrize("line, why", [
    ("{not json", "JSONDecodeError"),
    ('["file", "tags"]', "got a JSON list"),
    ('{"file": "a.jpg"}', "got no 'tags'"),
    ("3", "got a JSON int"),
])
def test_a_bad_line_names_file_line_and_the_row_expected(tmp_path, line, why):
    p = tmp_path / "tags.jsonl"
    p.write_text('{"file": "a.jpg", "tags": []}\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(f'{p}:2: expected {{"file": ..., "tags": ...}}') + ".*" + why):
        _rows(p)


def test_a_missing_file_names_what_it_is_and_what_to_pass(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"hashtag file {tmp_path / 'no.jsonl'} does not exist; pass the right")):
        _rows(tmp_path / "no.jsonl")


def test_a_caption_must_be_a_string(tmp_path):
    assert check_caption("c.jsonl", 3, "a dog") == "a dog"
    with pytest.raises(DataError, match=r'c\.jsonl:3: "caption" is list, not a string'):
        check_caption("c.jsonl", 3, ["a dog"])

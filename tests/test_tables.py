"""pibake.tables: the one plain-text table of the CLI and deploy."""

from pibake.tables import text_table


def test_columns_line_up_and_lines_have_no_trailing_blanks():
    lines = text_table([("NAME", "STATE", "DETAIL"), ("red01", "on", ""), ("kitchen-plug", 1, "error: timed out")])
    assert lines == ["NAME          STATE  DETAIL",
                     "red01         on",
                     "kitchen-plug  1      error: timed out"]


def test_short_rows_and_no_rows():
    assert text_table([("A", "B"), ("x",)]) == ["A  B", "x"]
    assert text_table([]) == []

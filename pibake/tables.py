"""Plain-text tables for people (the CLI's listings, deploy's per-host results): each column padded to its
widest cell, two spaces apart, no trailing blanks. Scripts read --json, never these."""


def text_table(rows):
    """The lines of ``rows``: the header row first, then the data rows; cells are turned into text."""
    rows = [[str(cell) for cell in row] for row in rows]
    columns = max((len(row) for row in rows), default=0)
    widths = [max((len(row[i]) for row in rows if i < len(row)), default=0) for i in range(columns)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]

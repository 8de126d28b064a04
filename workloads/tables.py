"""Text tables for the CLIs: boxed (vdevctl ls, like npu-smi) and plain (benchmark reports)."""

from __future__ import annotations


def _widths(rows: list[tuple[str, ...]]) -> list[int]:
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]


def boxed(rows: list[tuple[str, ...]]) -> str:
    widths = _widths(rows)
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [rule]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            lines.append(rule.replace("-", "="))
    lines.append(rule)
    return "\n".join(lines)


def plain(rows: list[tuple[str, ...]]) -> str:
    widths = _widths(rows)
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

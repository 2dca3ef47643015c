"""Drawing a learning-rate curve: a terminal chart, or a PNG written with zlib and struct only.

matplotlib is not a dependency of optgen; a line chart of one series needs a canvas, Bresenham
lines and a 3×5 pixel font for the axis labels, which fit in this module.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _label(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def ascii_chart(values: list[float], width: int = 72, height: int = 16, title: str = "") -> str:
    """The curve as text: one column per bucket of steps, '*' at each bucket's value."""
    n = len(values)
    width = max(2, min(width, n))
    lo, hi = min(values), max(values)
    span = hi - lo or abs(hi) or 1.0
    rows = [[" "] * width for _ in range(height)]
    for col in range(width):
        step = round(col * (n - 1) / (width - 1)) if width > 1 else 0
        row = round((hi - values[step]) / span * (height - 1)) if hi != lo else height // 2
        rows[row][col] = "*"
    labels = [_label(hi), _label((hi + lo) / 2), _label(lo)]
    pad = max(map(len, labels))
    lines = [title] if title else []
    for i, cells in enumerate(rows):
        label = labels[0] if i == 0 else labels[2] if i == height - 1 else labels[1] if i == (height - 1) // 2 else ""
        lines.append(f"{label:>{pad}} |{''.join(cells)}")
    lines.append(" " * pad + " +" + "-" * width)
    last = str(n - 1)
    lines.append(" " * pad + "  0" + " " * max(1, width - 1 - len(last)) + last + "  (step)")
    return "\n".join(lines)


# 3×5 glyphs, one string of 15 pixels per character ("#" on), rows top to bottom.
_FONT = {
    "0": "####.##.##.####", "1": ".#.##..#..#.###", "2": "###..#####..###", "3": "###..####..####",
    "4": "#.##.####..#..#", "5": "####..###..####", "6": "####..####.####", "7": "###..#..#..#..#",
    "8": "####.#####.####", "9": "####.####..####", ".": "............#..", "-": "......###......",
    "e": ".#." "#.#" "###" "#.." ".##", "+": "....#.###.#....", " ": "...............",
}


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thick: int = 1) -> None:
        """Bresenham's line, ``thick`` pixels wide."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, text: str, color, scale: int = 2) -> None:
        for k, ch in enumerate(text):
            glyph = _FONT.get(ch, _FONT[" "])
            for i, on in enumerate(glyph):
                if on == "#":
                    for ox in range(scale):
                        for oy in range(scale):
                            self.set(x + (k * 4 + i % 3) * scale + ox, y + (i // 3) * scale + oy, color)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        stride = self.width * 3
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def write_png(path: str | Path, values: list[float], width: int = 800, height: int = 400) -> None:
    """The curve as a PNG line chart: axes, a light grid, min/max lr and the step count labelled."""
    canvas = _Canvas(width, height)
    left, right, top, bottom = 80, 20, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = min(values), max(values)
    span = hi - lo or abs(hi) or 1.0
    grey, axis, blue = (225, 225, 225), (90, 90, 90), (31, 119, 180)
    for k in range(5):  # horizontal grid lines at 0, 25, 50, 75, 100 %
        y = top + round(k * plot_h / 4)
        canvas.line(left, y, left + plot_w, y, grey)
    canvas.line(left, top, left, top + plot_h, axis)
    canvas.line(left, top + plot_h, left + plot_w, top + plot_h, axis)
    n = len(values)

    def point(i: int) -> tuple[int, int]:
        x = left + (round(i * plot_w / (n - 1)) if n > 1 else 0)
        y = top + (round((hi - values[i]) / span * plot_h) if hi != lo else plot_h // 2)
        return x, y

    previous = point(0)
    for i in range(1, n):
        current = point(i)
        canvas.line(*previous, *current, blue, thick=2)
        previous = current
    canvas.text(4, top - 4, _label(hi), axis)
    canvas.text(4, top + plot_h - 6, _label(lo), axis)
    canvas.text(left - 2, top + plot_h + 10, "0", axis)
    canvas.text(left + plot_w - 8 * len(str(n - 1)), top + plot_h + 10, str(n - 1), axis)
    Path(path).write_bytes(canvas.png())

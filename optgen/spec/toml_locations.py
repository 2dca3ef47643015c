"""Where every key and value of a TOML file starts.

``tomllib`` parses TOML correctly but forgets positions, and spec errors must point at the exact
line and column.  This module re-reads the same text with a small scanner that understands just
enough of TOML's lexical structure (tables, keys, strings, arrays, inline tables, comments) to
record a position for every key path; ``tomllib`` stays the authority on what the values are.

Paths are tuples of keys and array indices, e.g. ``("hyperparameters", "lr", "default")`` or
``("check", 0, "error")``.  ``positions[path]`` is the (line, col) of the key, and
``value_positions[path]`` the (line, col) where the value's text starts — inside the quotes for a
string, on the next line for a multi-line string that begins with a newline (TOML trims it).
"""
from __future__ import annotations

Position = tuple[int, int]  # 1-based line, 1-based column

_BARE_KEY_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.i = 0
        self.positions: dict[tuple, Position] = {}
        self.value_positions: dict[tuple, Position] = {}
        self.array_table_counts: dict[tuple, int] = {}
        # Line starts, to turn an offset into (line, col).
        self.line_starts = [0]
        for k, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(k + 1)

    # -- low level -----------------------------------------------------------------------------
    def pos(self, offset: int | None = None) -> Position:
        import bisect

        offset = self.i if offset is None else offset
        line = bisect.bisect_right(self.line_starts, offset) - 1
        return line + 1, offset - self.line_starts[line] + 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.i : self.i + n]

    def skip_ws(self, newlines: bool) -> None:
        while self.i < len(self.text):
            ch = self.text[self.i]
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.i += 1
            elif ch == "#":
                while self.i < len(self.text) and self.text[self.i] != "\n":
                    self.i += 1
            else:
                return

    def skip_to_eol(self) -> None:
        while self.i < len(self.text) and self.text[self.i] != "\n":
            self.i += 1

    # -- keys ----------------------------------------------------------------------------------
    def key(self) -> tuple[list[str], Position]:
        """A dotted key; returns its parts and the position of its first character."""
        start = self.pos()
        parts = []
        while True:
            self.skip_ws(newlines=False)
            ch = self.peek()
            if ch in ('"', "'"):
                parts.append(self.string_literal()[0])
            else:
                j = self.i
                while self.i < len(self.text) and self.text[self.i] in _BARE_KEY_CHARS:
                    self.i += 1
                parts.append(self.text[j : self.i])
                if j == self.i:  # not a key at all: let tomllib report it
                    raise ValueError("bad key")
            self.skip_ws(newlines=False)
            if self.peek() == ".":
                self.i += 1
                continue
            return parts, start

    # -- values --------------------------------------------------------------------------------
    def string_literal(self) -> tuple[str, Position]:
        """Skips a string of any of TOML's four kinds; returns (raw text, content start)."""
        for quote in ('"""', "'''"):
            if self.peek(3) == quote:
                self.i += 3
                if self.peek() == "\n":  # TOML trims a newline right after the opening quotes
                    self.i += 1
                elif self.peek(2) == "\r\n":
                    self.i += 2
                start = self.pos()
                j = self.i
                end = self.text.find(quote, self.i)
                if end < 0:
                    raise ValueError("unterminated string")
                while self.text[end + 3 : end + 4] == quote[0]:  # up to two quotes may end the content
                    end += 1
                self.i = end + 3
                return self.text[j:end], start
        quote = self.peek()
        self.i += 1
        start = self.pos()
        j = self.i
        while self.i < len(self.text) and self.text[self.i] != quote:
            if quote == '"' and self.text[self.i] == "\\":
                self.i += 1
            if self.text[self.i] == "\n":
                raise ValueError("unterminated string")
            self.i += 1
        self.i += 1
        return self.text[j : self.i - 1], start

    def value(self, path: tuple) -> None:
        self.skip_ws(newlines=False)
        ch = self.peek()
        if ch in ('"', "'"):
            _, start = self.string_literal()
            self.value_positions[path] = start
            return
        self.value_positions[path] = self.pos()
        if ch == "[":
            self.i += 1
            index = 0
            while True:
                self.skip_ws(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                self.value(path + (index,))
                self.positions.setdefault(path + (index,), self.value_positions[path + (index,)])
                index += 1
                self.skip_ws(newlines=True)
                if self.peek() == ",":
                    self.i += 1
        elif ch == "{":
            self.i += 1
            while True:
                self.skip_ws(newlines=False)
                if self.peek() == "}":
                    self.i += 1
                    return
                parts, start = self.key()
                sub = path + tuple(parts)
                self.positions[sub] = start
                self.skip_ws(newlines=False)
                self.i += 1  # '='
                self.value(sub)
                self.skip_ws(newlines=False)
                if self.peek() == ",":
                    self.i += 1
        else:  # number, bool, date: runs to a delimiter
            while self.i < len(self.text) and self.text[self.i] not in ",]}\n#":
                self.i += 1

    # -- document ------------------------------------------------------------------------------
    def document(self) -> None:
        table: tuple = ()
        while True:
            self.skip_ws(newlines=True)
            if self.i >= len(self.text):
                return
            start = self.pos()
            if self.peek(2) == "[[":
                self.i += 2
                parts, _ = self.key()
                base = tuple(parts)
                index = self.array_table_counts.get(base, 0)
                self.array_table_counts[base] = index + 1
                table = base + (index,)
                self.positions.setdefault(base, start)
                self.positions[table] = start
                self.skip_to_eol()
            elif self.peek() == "[":
                self.i += 1
                parts, _ = self.key()
                table = tuple(parts)
                self.positions[table] = start
                self.skip_to_eol()
            else:
                parts, kstart = self.key()
                path = table + tuple(parts)
                self.positions[path] = kstart
                self.skip_ws(newlines=False)
                self.i += 1  # '='
                self.value(path)
                self.skip_to_eol()


def locate(text: str) -> tuple[dict[tuple, Position], dict[tuple, Position]]:
    """Key positions and value positions of a TOML document that ``tomllib`` accepted."""
    scanner = _Scanner(text)
    try:
        scanner.document()
    except (ValueError, IndexError):
        pass  # positions found so far stay useful; tomllib reports real syntax errors
    return scanner.positions, scanner.value_positions

"""Parses a log of `strace -f -tt -y -yy -s N -o LOG` into one record per
system call, in the order strace observed them.

A call that another thread's event interrupted is printed in two lines,
`name(args <unfinished ...>` and `<... name resumed>rest`; they are joined
here. Every record carries `start` (the index of the line where the call
entered, or its only line) and `end` (the index of the line where it
returned). strace prints a call's exit only once the tracee stopped there,
and a thread only goes on after strace let it resume, so when call A's
`end` comes before call B's `start`, A had returned before B entered: the
log order is a happens-before order between the calls it shows.

With -y every file descriptor argument reads `N</path>`, which `Fd` keeps
apart (number, path; a path shown for a deleted file loses its
` (deleted)` suffix). Strings keep their unescaped bytes and whether strace
cut them short (`"..."...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LINE = re.compile(r"^(\d+)\s+(\d\d:\d\d:\d\d\.\d+)\s+(.*)$")
UNFINISHED = " <unfinished ...>"
RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$")
RETURN = re.compile(r"^= (-?\d+|\?)(?:<(.*)>)?(?: ([A-Z][A-Z0-9_]*) \(.*\))?(?:\s.*)?$")


class ParseError(Exception):
    """A line this parser cannot read: the log is not what it expects."""


@dataclass(frozen=True)
class Fd:
    """A descriptor argument as -y prints it: `7</path>`."""

    number: int
    path: str


class Str:
    """A string argument: its bytes (unescaped when first asked for: most
    are data transfers nobody reads), and whether strace cut it short."""

    __slots__ = ("body", "truncated", "_data")

    def __init__(self, body: str, truncated: bool):
        self.body = body
        self.truncated = truncated
        self._data = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = unescape(self.body)
        return self._data


@dataclass
class Call:
    """One system call of one thread."""

    tid: int
    time: str
    name: str
    args: list = field(default_factory=list)
    raw_args: list = field(default_factory=list)
    ret: int | None = None
    ret_path: str | None = None
    errno: str | None = None
    start: int = 0
    end: int = 0

    @property
    def ok(self) -> bool:
        return self.ret is not None and self.ret >= 0

    def fd(self, index: int = 0) -> Fd | None:
        a = self.args[index] if index < len(self.args) else None
        return a if isinstance(a, Fd) else None

    def string(self, index: int) -> Str | None:
        a = self.args[index] if index < len(self.args) else None
        return a if isinstance(a, Str) else None

    def __str__(self) -> str:
        where = f"line {self.start + 1}" if self.start == self.end else f"lines {self.start + 1}-{self.end + 1}"
        shown = ", ".join(self.raw_args)
        if len(shown) > 160:
            shown = shown[:160] + "..."
        ret = "?" if self.ret is None else str(self.ret)
        if self.errno:
            ret += " " + self.errno
        return f"[{where}, tid {self.tid}] {self.name}({shown}) = {ret}"


ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92, '"': 34, "'": 39, "?": 63}


def unescape(body: str) -> bytes:
    """The bytes of a C-escaped string body as strace prints it."""
    out = bytearray()
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            out.extend(c.encode("utf-8"))
            i += 1
            continue
        if i + 1 >= n:
            raise ParseError(f"a string ends in a lone backslash: {body!r}")
        e = body[i + 1]
        if e == "x":
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        elif e in "01234567":
            j = i + 1
            while j < n and j < i + 4 and body[j] in "01234567":
                j += 1
            out.append(int(body[i + 1 : j], 8) & 0xFF)
            i = j
        elif e in ESCAPES:
            out.append(ESCAPES[e])
            i += 2
        else:
            raise ParseError(f"unknown escape \\{e} in {body!r}")
    return bytes(out)


STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def scan_string(text: str, i: int) -> int:
    """Index just past the closing quote of the string opening at `i`."""
    m = STRING.match(text, i)
    if m is None:
        raise ParseError(f"unterminated string in {text[:200]!r}")
    return m.end()


def scan_decoration(text: str, i: int) -> int:
    """Index just past the `>` closing the -y decoration opening at `i`
    (`<`). Brackets and strings inside it (`UNIX-STREAM:[1->2,"/s"]`) nest."""
    assert text[i] == "<"
    depth = 0
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == '"':
            j = scan_string(text, j)
            continue
        if c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif c == ">" and depth == 0:
            return j + 1
        j += 1
    raise ParseError(f"unterminated fd decoration in {text!r}")


def split_call(text: str) -> tuple[str, list[str], str]:
    """`name(a, b, c) = ret` -> (name, [a, b, c], "= ret")."""
    m = re.match(r"^([a-z0-9_]+)\(", text)
    if not m:
        raise ParseError(f"not a system call: {text!r}")
    name = m.group(1)
    i = m.end()
    depth = 0
    args: list[str] = []
    current_start = i
    while i < len(text):
        c = text[i]
        if c == '"':
            i = scan_string(text, i)
            continue
        if c == "<" and i > 0 and (text[i - 1].isdigit() or text[i - 1] == "D"):
            i = scan_decoration(text, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0 and c == ")":
                piece = text[current_start:i].strip()
                if piece:
                    args.append(piece)
                rest = text[i + 1 :].strip()
                return name, args, rest
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[current_start:i].strip())
            current_start = i + 1
        i += 1
    raise ParseError(f"no closing parenthesis: {text!r}")


FD_ARG = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>$", re.S)


def clean_path(path: str) -> str:
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


def parse_arg(text: str):
    m = FD_ARG.match(text)
    if m:
        number = -100 if m.group(1) == "AT_FDCWD" else int(m.group(1))
        return Fd(number, clean_path(m.group(2)))
    if text.startswith('"'):
        end = scan_string(text, 0)
        rest = text[end:]
        if rest in ("", "..."):
            return Str(text[1 : end - 1], rest == "...")
    if re.match(r"^-?\d+$", text):
        return int(text)
    return text


def parse_return(rest: str, call: Call) -> None:
    m = RETURN.match(rest)
    if not m:
        raise ParseError(f"cannot read the return value {rest!r} of {call.name}")
    call.ret = None if m.group(1) == "?" else int(m.group(1))
    call.ret_path = clean_path(m.group(2)) if m.group(2) is not None else None
    call.errno = m.group(3)


def parse(lines) -> tuple[list[Call], dict]:
    """Every system call of the log, by order of entry; and counts of what
    else the log holds (signals, exits, lines that are not calls)."""
    calls: list[Call] = []
    pending: dict[int, tuple[int, str, str]] = {}
    other = {"signals": 0, "exits": 0, "lines": 0}
    for index, line in enumerate(lines):
        line = line.rstrip("\n")
        other["lines"] += 1
        m = LINE.match(line)
        if not m:
            raise ParseError(f"line {index + 1}: no pid and time: {line[:200]!r}")
        tid, time, text = int(m.group(1)), m.group(2), m.group(3)
        if text.startswith("---"):
            other["signals"] += 1
            continue
        if text.startswith("+++"):
            other["exits"] += 1
            pending.pop(tid, None)
            continue
        r = RESUMED.match(text)
        if r:
            if tid not in pending:
                raise ParseError(f"line {index + 1}: resumes a call that never started: {line[:200]!r}")
            start, start_time, head = pending.pop(tid)
            name = r.group(1)
            if not head.startswith(name + "("):
                raise ParseError(f"line {index + 1}: resumes {name} but tid {tid} entered {head[:60]!r}")
            text = head + r.group(2)
            call = build(tid, start_time, text, index + 1)
            call.start, call.end = start, index
            calls.append(call)
            continue
        if text.endswith(UNFINISHED):
            if tid in pending:
                raise ParseError(f"line {index + 1}: tid {tid} enters a call while one is unfinished")
            pending[tid] = (index, time, text[: -len(UNFINISHED)])
            continue
        call = build(tid, time, text, index + 1)
        call.start = call.end = index
        calls.append(call)
    # A call left unfinished at the end never returned (the thread died in
    # it, e.g. exit_group): it is recorded without a return value.
    for tid, (start, time, head) in pending.items():
        name, raw, _ = split_call(head + ") = ?")
        call = Call(tid, time, name, [parse_arg(a) for a in raw], raw)
        call.start = call.end = start
        calls.append(call)
    calls.sort(key=lambda c: c.start)
    return calls, other


def build(tid: int, time: str, text: str, line_number: int) -> Call:
    try:
        name, raw, rest = split_call(text)
        call = Call(tid, time, name, [parse_arg(a) for a in raw], raw)
        parse_return(rest, call)
    except ParseError as e:
        raise ParseError(f"line {line_number}: {e}") from None
    return call

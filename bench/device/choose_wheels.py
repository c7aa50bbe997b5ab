"""Print the wheels.txt pins this Python needs: missing here, or older than their floor.

Run by run.sh with the host's Python before anything is installed; standard library only
(the host may lack ``packaging``). A wheel marked ``with NAME`` is considered only when NAME
itself is chosen (a dependency of a wheel the host already has is the host's business).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def _key(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def needed(name: str, floor: str) -> bool:
    """Whether ``name`` is missing here or older than ``floor``."""
    try:
        have = version(name)
    except PackageNotFoundError:
        return True
    return _key(have) < _key(floor)


def rows(path: str) -> list[tuple[str, str, str | None]]:
    """(pin, floor, parent or None) for each line of the list."""
    out = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            words = line.split("#", 1)[0].split()
            if words:
                out.append((words[0], words[1], words[3] if len(words) > 3 and words[2] == "with" else None))
    return out


def choose(path: str) -> list[str]:
    """The pins to install, in the list's order."""
    listed = rows(path)
    chosen = {
        pin.split("==")[0]
        for pin, floor, parent in listed
        if parent is None and needed(pin.split("==")[0], floor)
    }
    return [
        pin
        for pin, floor, parent in listed
        if (parent is None and pin.split("==")[0] in chosen)
        or (parent in chosen and needed(pin.split("==")[0], floor))
    ]


if __name__ == "__main__":
    print("\n".join(choose(sys.argv[1])))

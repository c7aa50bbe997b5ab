"""Print the insurance.txt wheels this Python needs: missing, or older than their floor.

Run by run.sh with the host's Python; standard library only (the host may lack packaging).
"""

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


def main(path: str) -> None:
    """Print one pinned requirement a line."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            words = line.split("#", 1)[0].split()
            if words:
                rows.append((words[0], words[1], words[3] if len(words) > 3 and words[2] == "with" else None))
    names = [pin.split("==")[0] for pin, _, _ in rows]
    chosen = {
        name
        for name, (_, floor, parent) in zip(names, rows, strict=True)
        if parent is None and needed(name, floor)
    }
    for name, (pin, floor, parent) in zip(names, rows, strict=True):
        if (parent is None and name in chosen) or (parent in chosen and needed(name, floor)):
            print(pin)


if __name__ == "__main__":
    main(sys.argv[1])

"""Rules for strings that become path components or Redis keys."""

from __future__ import annotations

import hashlib
import re

from ..errors import UnsafeNameError

# Experiment and dataset names: start alphanumeric, then letters, digits, '_', '.', '-'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# One component of an output path or a point folder.
COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.=,+-]{1,120}$")
NAME_RULE = "1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit"


def check_name(value: object, what: str) -> str:
    """Return `value` if it is a safe name, else raise UnsafeNameError naming `what`."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise UnsafeNameError(f"{what} {value!r} is not a valid name ({NAME_RULE})")
    return value


def check_relative_path(value: object, what: str) -> str:
    """A relative path whose every component is safe: no '..', no absolute paths."""
    if not isinstance(value, str) or not value or value.startswith("/"):
        raise UnsafeNameError(f"{what} {value!r} must be a relative path")
    for part in value.split("/"):
        if part in ("", ".", "..") or not COMPONENT_RE.match(part):
            raise UnsafeNameError(
                f"{what} {value!r} has an unsafe component {part!r} "
                "(allowed: letters, digits, '_', '.', '=', ',', '+', '-')"
            )
    return value


def path_component(text: str) -> str:
    """Make a readable, safe folder name from `text`; add a hash if anything was lost."""
    safe = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text).strip("._") or "x"
    if safe != text or len(safe) > 80:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        safe = f"{safe[:70]}-{digest}"
    return safe


def did_you_mean(word: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `options`, or ''."""
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

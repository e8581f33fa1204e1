"""Ops that TFLite builtins lack: reading them from converter errors.

When a model uses a TensorFlow op that has no TFLite builtin kernel, the
converter fails with a message listing it, as a TensorFlow Select (Flex) op
(``TF Select ops: Erf``; the file could run with the Flex delegate) or as a
custom op (``Custom ops: Erfinv``; neither builtins nor Flex provide it).
`unsupported_ops` extracts both lists and `flex_error` turns them into an
`ExportError` that names the ops and the option that allows Flex.

Example:

>>> unsupported_ops("...\\nTF Select ops: Erf, Lgamma\\nDetails: ...")
(('Erf', 'Lgamma'), ())
>>> print(flex_error(("Erf",), ()))  # doctest: +ELLIPSIS
Expected a model that converts to TFLite builtin ops only (allow_flex=False). Received: a model that needs the TensorFlow Select (Flex) op(s) Erf. Fix: pass `allow_flex=True` ...
"""

from __future__ import annotations

import re

from keras_autoprune.errors import ExportError

_LISTS = {
    "select": re.compile(r"^\s*(?:TF Select|Flex) ops:\s*(.+)$", re.MULTILINE),
    "custom": re.compile(r"^\s*Custom ops:\s*(.+)$", re.MULTILINE),
}
_NEITHER = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def unsupported_ops(message: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Returns ``(select_ops, custom_ops)`` named in a converter error message.

    Both are empty when the message is about something else. Op names are
    TensorFlow's (``Erf``), without the ``tf.`` prefix, in order, each once.
    When the message has no lists but names ops that are "neither a custom
    op nor a flex op", those are returned as ``select_ops``.
    """
    found = {}
    for kind, pattern in _LISTS.items():
        names = [n.strip() for m in pattern.findall(message) for n in m.split(",")]
        found[kind] = tuple(dict.fromkeys(n for n in names if n))
    if not found["select"] and not found["custom"]:
        found["select"] = tuple(dict.fromkeys(_NEITHER.findall(message)))
    return found["select"], found["custom"]


def flex_error(
    select_ops: tuple[str, ...],
    custom_ops: tuple[str, ...],
    allow_flex: bool = False,
) -> ExportError:
    """The error for a model that needs ops outside the TFLite builtins.

    Args:
        select_ops, custom_ops: from `unsupported_ops`.
        allow_flex: whether Flex ops were allowed (then only custom ops fail).
    """
    parts = []
    if select_ops:
        parts.append(f"the TensorFlow Select (Flex) op(s) {', '.join(select_ops)}")
    if custom_ops:
        parts.append(f"op(s) that neither TFLite builtins nor Flex provide: {', '.join(custom_ops)}")
    fixes = ["replace the layers or `keras.ops` calls that create these ops"]
    if select_ops and not allow_flex:
        fixes.insert(0, (
            "pass `allow_flex=True` (CLI: `--allow-flex`) to keep them as Flex ops; the "
            "runtime then needs the Flex delegate (on Android the "
            "`tensorflow-lite-select-tf-ops` dependency), and the file cannot be "
            "verified here, as LiteRT's Python interpreter has no Flex delegate"
        ))
    allowed = "TFLite builtin or TF Select (Flex) ops (allow_flex=True)" if allow_flex else (
        "TFLite builtin ops only (allow_flex=False)")
    return ExportError(
        f"Expected a model that converts to {allowed}. Received: a model that needs "
        f"{' and '.join(parts)}. Fix: {'; or '.join(fixes)}."
    )

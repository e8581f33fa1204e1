"""Exception classes raised by keras-autoprune.

Every error says what was expected, what was received and how to fix it. The
classes subclass the built-in exception a caller would naturally catch
(`ValueError` or `TypeError`), so ``except ValueError`` keeps working.
"""


class UnsupportedModelError(TypeError):
    """The model cannot be analysed (subclassed, not built, ...)."""


class PlanError(ValueError):
    """A `PrunePlan` does not fit the model's dependency graph."""


class SurgeryError(RuntimeError):
    """Layer surgery produced a model that disagrees with its masked twin.

    This signals a bug in a handler, never a user mistake; please report it.
    """

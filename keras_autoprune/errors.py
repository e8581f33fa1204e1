"""Exception classes raised by keras-autoprune.

Every error says what was expected, what was received and how to fix it. The
classes subclass the built-in exception a caller would naturally catch
(`ValueError` or `TypeError`), so ``except ValueError`` keeps working.
"""


class UnsupportedModelError(TypeError):
    """The model cannot be analysed (subclassed, not built, ...)."""


class BudgetUnreachableError(ValueError):
    """The budget is below the smallest model the method can build on this model.

    Raised before any work (a callback's ``on_train_begin``, `kap.red.compress`'s
    budget mode, `kap.metapruning`'s uniform reference); the message gives the
    smallest fraction the method reaches and the budget to ask for instead.
    """


class PlanError(ValueError):
    """A `PrunePlan` does not fit the model's dependency graph."""


class SurgeryError(RuntimeError):
    """Layer surgery produced a model that disagrees with its masked twin.

    This signals a bug in a handler, never a user mistake; please report it.
    """


class ExportError(RuntimeError):
    """A model could not be exported under the options given.

    For example, TFLite conversion needs TensorFlow Select (Flex) ops while
    ``allow_flex=False``; the message names the ops and the option.
    """


class VerificationError(ExportError):
    """An exported file disagrees with the Keras model it came from.

    Raised when a float32 file's relative error exceeds ``tolerance``, or a
    file's top-1 agreement is below ``min_top1_agreement``. The message gives
    the measured figures.
    """

"""Entry point of the ``keras-autoprune`` command (`keras_autoprune.cli` does the work).

It lives outside the package because it must act before TensorFlow loads,
and importing any part of ``keras_autoprune`` loads TensorFlow: it sets
``TF_CPP_MIN_LOG_LEVEL=3`` (unless the user set it) and imports TensorFlow
with the native standard error captured, so the lines TensorFlow's C++ code
prints while it starts (CUDA probing, oneDNN notices) do not reach the
console. If that import fails, what it printed is shown with the error.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence


def _import_tensorflow_quietly() -> None:
    with tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _import_tensorflow_quietly()
    from keras_autoprune.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())

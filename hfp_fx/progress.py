"""Progress of long library calls (``prune``, ``finalize``, ``dependency_graph`` of big models).

Each call is a short list of named stages.  Every finished stage is logged at INFO level on the
``hfp_fx`` logger with its duration; on an interactive terminal a ``tqdm`` bar (when tqdm is
installed) shows the stage running now.  Nested calls (``prune`` builds a dependency graph)
report under the outer call's bar.

Example::

    >>> import logging, hfp_fx
    >>> logging.getLogger("hfp_fx").setLevel(logging.INFO)   # stage timings in the log
    >>> hfp_fx.set_progress(False)                           # never draw bars (e.g. in CI)
    >>> hfp_fx.set_progress(None)                            # default: bars on a TTY only
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

__all__ = ["set_progress", "stages"]

log = logging.getLogger("hfp_fx")
_setting: Optional[bool] = None
_active = threading.local()


def set_progress(enabled: Optional[bool]) -> None:
    """``True``/``False`` force progress bars on/off; ``None`` (default): on when stderr is a TTY.

    The environment variable ``HFP_FX_PROGRESS=0`` (or ``1``) sets the default the same way.
    """
    global _setting
    _setting = enabled


def _bars_wanted() -> bool:
    setting = _setting
    if setting is None and os.environ.get("HFP_FX_PROGRESS", "") in ("0", "1"):
        setting = os.environ["HFP_FX_PROGRESS"] == "1"
    if setting is None:
        setting = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not setting:
        return False
    try:
        import tqdm  # noqa: F401  (optional: the bench extra installs it)
    except ImportError:
        return False
    return True


class _Stages:
    """Times each stage; logs it at ``level`` and advances ``bar`` (None for nested calls)."""

    def __init__(self, desc: str, bar, level: int):
        self.desc, self.bar, self.level = desc, bar, level

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)
        start = time.perf_counter()
        yield
        log.log(self.level, "%s: %s done in %.2f s", self.desc, name, time.perf_counter() - start)
        if self.bar is not None:
            self.bar.update(1)


@contextlib.contextmanager
def stages(desc: str, names: Sequence[str]):
    """``with stages("prune", ["graph", "plan"]) as stage: with stage("graph"): ...``"""
    if getattr(_active, "depth", 0):
        _active.depth += 1
        try:
            yield _Stages(desc, None, logging.DEBUG)  # the outer call's bar stays
        finally:
            _active.depth -= 1
        return
    bar = None
    if _bars_wanted():
        from tqdm.auto import tqdm
        bar = tqdm(total=len(names), desc=f"hfp_fx.{desc}", leave=False, unit="stage")
    _active.depth = 1
    start = time.perf_counter()
    try:
        yield _Stages(desc, bar, logging.INFO)
    finally:
        _active.depth = 0
        if bar is not None:
            bar.close()
        log.info("%s finished in %.2f s", desc, time.perf_counter() - start)

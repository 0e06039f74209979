"""Orbax's error logs of a failed checkpoint save, held back (`ERROR_LOGS`).

A save that fails (a full disk, no permission) makes Orbax and TensorStore log a traceback per array and thread
(~870 lines for one full disk). `train.checkpoint.Checkpointer` raises one CheckpointSaveError of a few lines
instead, naming the first error logged (`ERROR_LOGS.take()`); `--verbosity=0` shows every record.
"""

import logging
import sys
import traceback

from absl import logging as absl_logging


class HeldBackErrors(logging.Filter):
  """Holds back the ERROR records logged from Orbax's code or about its failures (asyncio's "exception was never
  retrieved"), keeping the first one's text for the CheckpointSaveError (a failed save logs a traceback per array
  and thread). Nothing is held back at absl verbosity INFO or more (`--verbosity=0`)."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()
    self.first = ""
    self._hook = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or absl_logging.get_verbosity() >= absl_logging.INFO:
      return True
    text, where = record.getMessage(), record.pathname
    if record.exc_info and record.exc_info[1] is not None:
      text += " " + "".join(traceback.format_exception_only(record.exc_info[1]))
      where += "".join(traceback.format_tb(record.exc_info[2]))
    if "/orbax/" not in where and not any(d in text for d in self.directories):
      return True
    self.first = self.first or text
    return False

  def watch(self, directory: str) -> None:
    self.directories.add(directory)
    for name in ("absl", "asyncio"):
      if self not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(self)
    self._hold_back_closed_loops()

  def take(self) -> str:
    first, self.first = self.first, ""
    return first

  def _hold_back_closed_loops(self) -> None:
    """Also drops the "Event loop is closed" errors of TensorStore writes that complete after Orbax closed the
    event loop of a failed save (unraisable exceptions, a traceback each; nothing else raises them here)."""
    if sys.unraisablehook is self._hook:
      return
    previous = sys.unraisablehook

    def hook(unraisable):
      if not (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)
    self._hook = sys.unraisablehook = hook


ERROR_LOGS = HeldBackErrors()   # the one filter of every Checkpointer

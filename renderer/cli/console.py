"""What the CLI shows: its own stage bars and one-line messages, not the chatter of the libraries under it.

`quiet_libraries()` silences, at their source and for this process only:
* diffusers' and transformers' model-loading bars ("Loading pipeline components...", "Loading weights")
  and the hub's download bars;
* their info/warning logging (deprecation advice, "some weights were not used", ...); errors still show;
* FutureWarning/DeprecationWarning raised from inside diffusers, transformers and huggingface_hub (e.g.
  diffusers' "`torch_dtype` is deprecated" from `from_pretrained`);
* Ray's notice that token authentication is on by default (a security warning about it being *off*
  still shows). Ray's own start-up INFO lines are kept down by `ray.init(logging_level=WARNING)` in
  `cluster.placement.connect`.
"""

from __future__ import annotations

import logging
import sys
import warnings

LIBRARIES = r"(diffusers|transformers|huggingface_hub)(\.|$)"


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries() -> None:
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    token_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(existing, _DropMessages) for existing in token_notice.filters):
        token_notice.addFilter(_DropMessages("Token authentication is enabled"))


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not the stream it was at set-up (which a
    caller such as a test's capture may have closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _ignored) -> None:
        pass


def show_render_log(prog: str = "freescale-render") -> None:
    """The renderer's own notes (resumed from a checkpoint, a damaged checkpoint ignored, a lost worker
    replaced) as one line each on stderr."""
    log = logging.getLogger("freescale_poster")
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

"""Known-harmless third-party warnings and log lines, kept off the terminal (driver and render actors).

Each entry names the message precisely (and the category and module where Python's `warnings` carries
them); nothing is ignored wholesale. With `--verbose` (RENDERFLEET_VERBOSE=1) everything is shown again.
The driver still writes everything, filtered lines included, to its log file (`log_to_file`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "RENDERFLEET_VERBOSE"

# (message regex, category, module regex) for Python warnings.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # torchsde's Brownian interval: float rounding of the query time against the interval's ends.
    (r"Should have (ta|tb)(>=|<=)(t0|t1) but got", UserWarning, r"torchsde\."),
    # Audio VAEs built with the old weight_norm API.
    (r"`torch\.nn\.utils\.weight_norm` is deprecated", FutureWarning, r"torch\.nn\.utils\.weight_norm"),
)

# (logger name prefix, message regex) for library loggers.
HARMLESS_LOGS: tuple[tuple[str, str], ...] = (
    ("diffusers", r"There are modules in \w+ that should be kept in float32"),
    ("diffusers", r"The \w+ has been deprecated and will not receive bug fixes"),
    ("diffusers", r"No LoRA keys associated to \w+ found with the prefix"),
    ("transformers", r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"),
    ("ray", r"Progress bars disabled\. To enable"),  # we turn them off on purpose: the job prints its own
    ("ray", r"Token authentication is enabled for this Ray cluster"),
)

# Loggers that do not propagate to the root logger and carry their own stderr handler.
LIBRARY_LOGGERS = ("diffusers", "transformers", "ray", "ray.data")

_LOG_RES = tuple((prefix, re.compile(rx)) for prefix, rx in HARMLESS_LOGS)
_WARN_RES = tuple((re.compile(rx), cat, re.compile(mod)) for rx, cat, mod in HARMLESS_WARNINGS)


def _path_of(module: re.Pattern) -> str:
    """The file-path form of a module regex (r"torch\\.nn\\.utils" -> "torch/nn/utils"), as warnings print it."""
    return module.pattern.replace("\\.", "/").rstrip("/")


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def is_harmless_warning(message: str, category: type[Warning], module: str) -> bool:
    return any(rx.search(message) and issubclass(category, cat) and mod.match(module) for rx, cat, mod in _WARN_RES)


class HarmlessFilter(logging.Filter):
    """Drops the known-harmless records; with `min_level`, also records below it from Ray's loggers."""

    def __init__(self, ray_min_level: int = logging.WARNING):
        super().__init__("renderfleet-quiet")
        self.ray_min_level = ray_min_level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if (name == "ray" or name.startswith("ray.")) and record.levelno < self.ray_min_level:
            return False
        if name == "py.warnings":  # captured warnings: "file:line: Category: message"
            text = record.getMessage()
            return not any(rx.search(text) and cat.__name__ in text and _path_of(mod) in text for rx, cat, mod in _WARN_RES)
        msg = record.getMessage()
        return not any((name == p or name.startswith(p + ".")) and rx.search(msg) for p, rx in _LOG_RES)


def _library_handlers() -> list[logging.Handler]:
    """The stderr handlers of the library loggers (configured first, so that they exist)."""
    try:
        import ray.data  # noqa: F401 - Ray sets up its loggers' handlers on import
    except Exception:  # noqa: BLE001
        pass
    for configure in ("transformers.utils.logging", "diffusers.utils.logging"):
        if configure.split(".")[0] not in sys.modules:
            continue  # never imported here (the driver): nothing to quiet, and importing diffusers costs seconds
        try:
            mod = __import__(configure, fromlist=["get_logger"])
            mod.get_logger()  # sets up the library's root logger and its handler
        except Exception:  # noqa: BLE001 - a missing library has nothing to quiet
            pass
    handlers = []
    for name in LIBRARY_LOGGERS:
        # Ray's PlainRayHandler writes to stderr; its SessionFileHandler (ray.data) and our own log are files.
        handlers += [h for h in logging.getLogger(name).handlers
                     if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__]
    return handlers


def _add_filter(handler: logging.Handler, flt: logging.Filter) -> None:
    handler.filters = [f for f in handler.filters if not isinstance(f, HarmlessFilter)]
    handler.addFilter(flt)


def quiet_actor(verbose: bool | None = None) -> None:
    """For render actors: known-harmless warnings ignored, library handlers filtered (unless verbose)."""
    if verbose is None:
        verbose = verbose_from_env()
    if verbose:
        return
    for rx, cat, mod in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=rx, category=cat, module=mod)
    flt = HarmlessFilter()
    for h in _library_handlers():
        _add_filter(h, flt)


def quiet_driver(verbose: bool = False, level: str | int | None = None) -> None:
    """For the driver: warnings go through logging, so the log file gets them all while the terminal gets
    only what is not known-harmless; Ray's own loggers at warning level. Verbose shows everything (and is
    passed on to locally started actors through the environment)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    terminal_level = logging.INFO if verbose else (level or os.environ.get("RENDERFLEET_LOG_LEVEL", "WARNING"))
    root.setLevel(logging.INFO)  # the log file gets INFO; the terminal handlers keep their own level
    flt = HarmlessFilter(ray_min_level=logging.DEBUG if verbose else logging.WARNING)
    for h in root.handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(terminal_level)
            if not verbose:
                _add_filter(h, flt)
    for h in _library_handlers():
        if verbose:
            h.filters = [f for f in h.filters if not isinstance(f, HarmlessFilter)]
        else:
            _add_filter(h, flt)


_file_handler: logging.FileHandler | None = None


def log_to_file(path: str) -> str:
    """The driver's full log (INFO and up, filtered warnings included) goes to `path` from now on."""
    global _file_handler
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("",) + LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _file_handler is not None:
            logger.removeHandler(_file_handler)
        logger.addHandler(handler)
    if _file_handler is not None:
        _file_handler.close()
    _file_handler = handler
    return path

"""Exit statuses of the `renderfleet` command, kept import-free so `--help` and `--version` stay fast."""

from __future__ import annotations

EXIT_OK = 0  # every row final, and failures within --max-failed-fraction
EXIT_CRASH = 1  # an unexpected error (a traceback): a bug or an environment problem
EXIT_USAGE = 2  # unusable input: bad arguments, manifest, catalog, or a path without results
EXIT_ROWS_FAILED = 3  # the job ran to the end, but more rows failed than --max-failed-fraction allows
EXIT_RESULTS_UNAVAILABLE = 75  # results could not be written (EX_TEMPFAIL); the same command resumes
EXIT_INTERRUPTED = 130  # Ctrl-C; the same command resumes

RESULTS_DEADLINE_S = 600.0  # --results-deadline-seconds default; equals storage.results.DEFAULT_DEADLINE_S (tested)


class UsageError(ValueError):
    """A user mistake the command reports in one line (exit 2), never as a traceback."""

"""The one base class of errors that are the user's to fix (bad config, input, paths, checkpoints).

Every subcommand prints such an error as one line, `tidar-megatron <command>: error: <message>`, and exits
with status 2 (cli.py); anything else is a bug and keeps its traceback (status 1).
"""


class TiDARError(Exception):
    """A problem with what the user gave us; the message names the input and the fix, on one line."""

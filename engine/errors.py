"""The one error type of the scripts: bad input from the user becomes one `error:` line and exit code 2."""

import sys


class UserError(Exception):
    """Bad input from the user (a flag, a file, a field): the scripts print it as one line and exit 2."""


def run_script(main, *args):
    """A script's entry point: exit with main()'s code; a UserError becomes one `error:` line and code 2."""
    try:
        sys.exit(main(*args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

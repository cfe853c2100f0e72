"""The one error type for problems the user fixes in the config, the command line or the files.

`main.py` prints a ConfigError as one line (`error: ...`) and exits with status 1; every other
exception keeps its traceback, because it is a bug or an environment failure, not a setting.
A ConfigError's message names the config key (or file, flag, shape) and the fix.
"""


class ConfigError(ValueError):
  """A problem the user fixes: the message names the key, file or flag and what to set."""

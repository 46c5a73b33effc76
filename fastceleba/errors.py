"""The one error type users see: a single line that names the file and the fix."""


class DataError(Exception):
    """Bad input (a missing file, a corrupt image or shard, a wrong option).

    The message is one line that names what is wrong and how to fix it; the command-line
    tools print it as ``error: <message>`` and exit with status 2.
    """

"""User-facing errors: the CLI prints them as one line on stderr and exits with status 2."""


class ApgaError(Exception):
    """Anything the user can fix (bad config, bad argument, bad file). Message = one line."""


class ConfigError(ApgaError):
    """A config key or value is wrong. The message names the key and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run stops cleanly (resumable); the CLI exits 143."""

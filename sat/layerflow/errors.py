"""The error every layer raises for a bad configuration value, defined below all of them.

:class:`ConfigError` is raised by the config loader (:mod:`layerflow.config`) and by the runtime
checks that need the whole run (``runtime.parallel`` in :mod:`layerflow.runtime.parallel`); the
command line turns it into one line and exit status 2. It lives here, at the bottom of the import
layers, so that a lower layer can raise it without importing the config module above it.
"""


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the file it came from."""


class FieldError(ConfigError):
    """A value out of its range, raised by a section's checks; :func:`layerflow.config.load_config` adds
    key and origin."""

    def __init__(self, name: str, expected: str):
        super().__init__(f"{name}: expected {expected}")
        self.name = name
        self.expected = expected

"""wattserve bottom package: message types, errors and expert specs shared by runtime/, router/ and workers/."""

__version__ = "0.1.0"

"""Every error modelhash raises on purpose; the CLI catches `ModelhashError` once."""


class ModelhashError(Exception):
    """Base for every error we raise on purpose."""


class SourceError(ModelhashError, ValueError):
    """A source or model URI cannot be listed or resolved (bad path, unsupported scheme)."""


class BlobError(ModelhashError, OSError):
    """Bytes could not be read (missing file, short read, out-of-range request)."""


class FormatError(ModelhashError, ValueError):
    """The bytes are not a valid checkpoint of that format, or it is unsupported."""


class UnsafePickleError(FormatError):
    """A pickle in a checkpoint references code outside the allow-list; nothing was executed."""


class NoCheckpointError(FormatError):
    """A model folder holds no checkpoint file we can read."""


class HashingError(ModelhashError, ValueError):
    """The weights cannot be hashed (NaN/Inf values, no usable tensors)."""


class SpecMismatchError(ModelhashError, ValueError):
    """Codes of two different specs (or lengths) were compared."""


class ModelIndexError(ModelhashError, ValueError):
    """The index is missing, empty where it must not be, or corrupt."""


class VerifyError(ModelhashError, ValueError):
    """A model cannot run (unknown architecture, weights that do not fit it, NaN outputs), or two models
    cannot be compared by behaviour (different inputs or label spaces)."""

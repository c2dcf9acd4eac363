"""Exceptions. Every message names the file, node or group at fault and says what to do."""


class OnnxconetError(Exception):
    """Base class of every user-facing error; the CLI prints its message on one line and exits 1."""


class ModelSpecError(OnnxconetError):
    """A model spec cannot be resolved (unknown name, missing file, factory that raises)."""


class InputShapeError(OnnxconetError):
    """The input shape does not fit the model."""


class GraphError(OnnxconetError):
    """The ONNX graph cannot be read or analysed (corrupt file, unsupported structure)."""


class SurgeryError(OnnxconetError):
    """A width plan cannot be applied (width out of range, frozen group resized)."""


class DataError(OnnxconetError):
    """A dataset cannot be loaded (missing folder, unreadable image, class count mismatch)."""


class LatencyError(OnnxconetError):
    """A latency measurement cannot be made (provider unavailable under --strict, session failure)."""


class BudgetError(OnnxconetError):
    """No allowed width configuration can meet the budget."""


class WriteError(OnnxconetError):
    """A file cannot be written (disk full, read-only folder); the message names it and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where, and how to continue. The CLI prints it and exits 130.
    A KeyboardInterrupt, so that a caller's own Ctrl-C handling still sees one."""

"""User mistakes (bad path, malformed record, wrong flag) end as one sentence, not a traceback."""
from models.errors import UserError  # noqa: F401  (one class for models/ and engine/)


class DataError(UserError):
    """A data file or record the engine cannot use; the message names the file and record."""

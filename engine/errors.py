"""User mistakes (bad path, malformed record, wrong flag) end as one sentence, not a traceback."""


class UserError(ValueError):
    """Raised for bad input; the message is one sentence naming the file, record or flag."""

"""User mistakes (bad path, malformed record, wrong flag) end as one sentence, not a traceback.
Defined with the models (which know nothing of the engine); engine/runtime/errors.py re-exports it."""


class UserError(ValueError):
    """Raised for bad input; the message is one sentence naming the file, record or flag."""

class DatasetError(Exception):
    """A dataset that is missing or unreadable; the message says what to do."""

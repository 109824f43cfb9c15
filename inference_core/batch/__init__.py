"""OpenAI's Files API (and, built on it, the Batch API): state in SQLite, file contents on disk."""

"""Everything Somnus records, in one SQLite file in the data folder."""

from assistant.store.connection import StoreError
from assistant.store.store import Store, open_store

__all__ = ["Store", "StoreError", "open_store"]

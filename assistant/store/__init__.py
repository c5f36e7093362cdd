"""Everything Somnus records, in one SQLite file in the data folder."""

from assistant.store.connection import StoreError
from assistant.store.store import Store, open_store
from assistant.store.timestamps import now

__all__ = ["Store", "StoreError", "now", "open_store"]

"""What the mesh keeps: versioned documents replicated by patches (:mod:`.patch`,
:mod:`.replica`, :mod:`.context`, :mod:`.objects`, :mod:`.cache`), the core's group-commit
batch (:mod:`.batch`), and SQLite in WAL mode (:mod:`.store`, the only module here that
does I/O)."""

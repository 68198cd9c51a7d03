"""The request journal (SQLite, shared by every worker process), in five modules.

`store` (the file: schema, its one group-committing writer, readers, `JournalUnavailable`),
`records` (the record of every request and how it moves), `claims` (the per-user claim across
processes), `idempotency` (Idempotency-Key outcomes) and `liveness` (whether a record's or a
claim's owner process still runs).
"""

"""The request journal (SQLite, shared by every worker process), in three modules.

`records` (the file and the record of every request), `claims` (the per-user claim across
processes) and `liveness` (whether a record's or a claim's owner process still runs).
"""

"""The local backend: Windows PowerShell hosts on the Exchange server, in three layers.

`protocol` (the wire format, pure), `pool` and `process_tree` (processes, deadlines, the warm
pool), `backend` (the Exchange port adapter). `host.ps1` is the one script every host runs.
"""

"""The local backend: Windows PowerShell hosts on the Exchange server, in three layers.

`protocol` (the wire format, pure); `host` and `process_tree` (one host: its process and the
conversation with it), `supply` (what both modes share), `warm_pool` (pool_size warm hosts) and
`per_command` (pool_size 0); `backend` (the Exchange port adapter). `host.ps1` is the one script
every host runs.
"""

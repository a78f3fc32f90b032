"""The `ferry` command: a client of the control API over HTTP, and a launcher of the
API, worker and beat processes (it imports none of them)."""

"""The catalog: Ferry's single source of truth (Postgres in a cluster, SQLite embedded).

models.py holds the tables and state enums, db.py engines and transactions, and the
modules beside them the queries that change state (jobs.py, replicas.py). Only this
package writes to the database.
"""

"""Ferry: keeps content-addressed objects where policy says they should be.

This package is the kernel every other part stands on: settings, the error tree,
the catalog (models, states, the queries that change state, migrations) and the
`ferry` command.
"""

__version__ = "0.1.0"

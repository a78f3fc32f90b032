"""What runs against storage: the backend interface, the driver registry, one module
per driver, streaming transfer with hashing, and content addressing (CID).

Nothing here touches the catalog: workers know bytes and keys, tasks/ records outcomes.
"""

"""Content search: text extraction, chunking and embeddings, the vector index, and queries."""

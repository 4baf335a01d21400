"""Over-the-air updates: signed metadata (TUF), resumable downloads, and the update client that
joins them to the model store and the swap."""

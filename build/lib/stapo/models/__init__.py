"""Model helpers: loading by hub id or path, and tiny local models for tests and the demo."""

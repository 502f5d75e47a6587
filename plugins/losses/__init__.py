"""Loss plugins: `(model outputs, batch) -> (loss, metrics)`."""

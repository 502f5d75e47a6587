"""Expert plugins: label states (prompt + response prefix) with the best next token."""

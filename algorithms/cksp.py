"""Being written (issue 15): registers nothing yet."""

"""Constants shared by the data, the loss, context parallelism and the recipe."""

#: Label of a token that is not trained (prompt, padding, a skipped sample): no loss, not counted.
IGNORE_INDEX = -100

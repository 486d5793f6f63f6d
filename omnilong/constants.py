"""Constants shared by the data, the models, the loss, context parallelism and the recipe."""

#: Label of a token that is not trained (prompt, padding, a skipped sample): no loss, not counted.
IGNORE_INDEX = -100

#: Batch keys of vision pixels: a batch with either has vision features to place in its sequence.
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")

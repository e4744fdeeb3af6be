"""Stage 08: the report card, and the submission bundle with its verify."""

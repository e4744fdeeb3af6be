"""Stages 01 and 02: the corpus (sources, records, cleaning, dedup, split), the tokenizer and the encoded tokens, and
the SFT data readers."""

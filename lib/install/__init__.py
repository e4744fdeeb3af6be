"""Stage 06: installed models in the models dir (install, list, info, remove) and their runtime environment."""

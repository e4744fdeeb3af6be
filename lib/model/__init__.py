"""Our transformer (homellm), its generation loop and its Hugging Face-format save/load."""

"""Benchmarks behind ``python -m rdlm bench``: the train step (`train`) and decoding (`sample`)."""

"""Prompts: the A1111 parser (`parser`), encoding with a cache (`encoding`), AND (`composable`) and
textual-inversion embeddings (`embeddings`). Import from the submodules.
"""

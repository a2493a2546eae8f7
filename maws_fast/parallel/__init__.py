"""Parallelism applied to a model from outside: the mesh, tensor parallel, our ZeRO, the engines (docs/ARCHITECTURE.md)."""

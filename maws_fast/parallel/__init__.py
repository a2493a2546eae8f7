"""Parallelism (ZeRO, tensor parallel, engines) lands here; see DESIGN.md, section Parallelism."""
